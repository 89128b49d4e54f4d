"""Every path a user gives, local or in object storage: the one path abstraction of ettin-jax.

    path = storage.path("gs://bucket/run")     # an etils.epath.Path (local paths stay local)
    storage.write_text_atomically(path / "recipe.yaml", text)
    with storage.local_copy(path / "tokenizer") as local:   # a local directory with its files
        ...
    storage.upload_tree(local_dir, path / "hf")

Run directories, `checkpoint.init_from`, tokenizers, prepared shards, `data prepare` output and
exports may be `gs://` or `s3://` URLs. Orbax and TensorStore write checkpoints there directly;
everything else goes through `etils.epath` (gcsfs / s3fs underneath). Endpoints come from the
standard variables, so the same commands run against a real bucket or a local emulator:
`STORAGE_EMULATOR_HOST` for GCS (e.g. http://127.0.0.1:4443, no credentials), `AWS_ENDPOINT_URL`
plus the usual `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` / `AWS_DEFAULT_REGION` for S3.

Atomicity: a file is written locally first and then replaces the final one in one step: an
`os.replace` on a local disk, a single object upload in a bucket (an object is visible whole or
not at all). Checkpoints use orbax's own protocols: a renamed temporary directory on a local
disk, a `commit_success.txt` written last in a bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import sys
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from etils import epath

PathLike = str | os.PathLike
REMOTE_SCHEMES = ("gs://", "s3://")


class StorageError(OSError):
    """Writing to a run's storage failed (a bucket refusing or unreachable, a full disk): the
    message names what was being written, where, and what stays intact."""


def is_remote(value: PathLike) -> bool:
    """Whether `value` names object storage (gs:// or s3://) rather than a local path."""
    return os.fspath(value).startswith(REMOTE_SCHEMES)


def path(value: PathLike) -> epath.Path:
    """`value` as an etils.epath.Path: a URL stays a URL, a local path stays as given."""
    _configure_endpoints()
    return epath.Path(value)


def absolute(value: PathLike) -> epath.Path:
    """`path(value)`, made absolute when local (orbax requires absolute directories)."""
    result = path(value)
    return result if is_remote(result) else epath.Path(os.path.abspath(result))


def write_atomically(final: PathLike, write: Callable[[str], object]) -> None:
    """Runs write(tmp_path) on a local temporary file, then makes it `final` in one step:
    readers and a process killed at any moment see the old file or the new one, never part.
    `final` may be a URL (the file is uploaded as one object)."""
    if not is_remote(final):
        final = Path(os.fspath(final))
        tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
        try:
            write(str(tmp))
            os.replace(tmp, final)
        finally:
            tmp.unlink(missing_ok=True)
        return
    with tempfile.TemporaryDirectory(prefix="ettin-jax-upload-") as scratch:
        tmp = os.path.join(scratch, path(final).name)
        write(tmp)
        upload_file(tmp, final)


def write_text_atomically(final: PathLike, text: str) -> None:
    """`write_atomically` of a text file."""
    write_atomically(final, lambda tmp: Path(tmp).write_text(text))


def upload_file(local: PathLike, target: PathLike) -> None:
    """Copies the local file `local` to `target` (a URL or a local path) as one object."""
    target = path(target)
    if not is_remote(target):
        write_atomically(target, lambda tmp: shutil.copyfile(local, tmp))
        return
    target.parent.mkdir(parents=True, exist_ok=True)
    _filesystem(target).put_file(os.fspath(local), _fs_path(target))


def copy_file(source: PathLike, target: PathLike) -> None:
    """Copies one file between any two places (local or object storage); the target appears
    whole or not at all."""
    source, target = path(source), path(target)
    if not is_remote(source):
        upload_file(source, target)
        return
    with tempfile.TemporaryDirectory(prefix="ettin-jax-copy-") as scratch:
        local = os.path.join(scratch, source.name)
        _filesystem(source).get_file(_fs_path(source), local)
        upload_file(local, target)


def upload_tree(local_dir: PathLike, target: PathLike) -> None:
    """Copies every file under the local directory `local_dir` to the same relative paths
    under `target`, each file atomically."""
    local_dir = Path(os.fspath(local_dir))
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        upload_file(file, path(target) / file.relative_to(local_dir).as_posix())


def move_tree(source: PathLike, target: PathLike, *, first: str | None = None) -> None:
    """Moves the directory `source` to `target`: one rename on a local disk; in a bucket every
    object is copied, then the originals are deleted, the one named `first` (the file that
    marks the directory complete) before the others, so an interrupted move never leaves
    `source` looking complete with files missing."""
    source, target = path(source), path(target)
    if not is_remote(source):
        os.replace(source, target)
        return
    fs = _filesystem(source)
    fs.copy(_fs_path(source), _fs_path(target), recursive=True)
    if first is not None and (source / first).exists():
        (source / first).unlink()
    fs.rm(_fs_path(source), recursive=True)


@contextlib.contextmanager
def local_copy(value: PathLike) -> Iterator[Path]:
    """A local path holding what `value` holds: `value` itself when local; for a URL, a
    download of the file or of the whole directory into a temporary directory, removed on
    exit. Raises FileNotFoundError naming `value` when nothing is there."""
    if not is_remote(value):
        yield Path(os.fspath(value))
        return
    source = path(value)
    with tempfile.TemporaryDirectory(prefix="ettin-jax-download-") as scratch:
        yield _download(source, Path(scratch) / source.name)


def _download(source: PathLike, target: Path) -> Path:
    """Copies the file or directory `source` (a URL) to the local `target`; returns it.
    Raises FileNotFoundError naming `source` when nothing is there."""
    source = path(source)
    fs = _filesystem(source)
    if source.is_dir():
        target.mkdir(parents=True, exist_ok=True)
        root = _fs_path(source).rstrip("/")
        for name in fs.find(root):
            local = target / name[len(root) + 1:]
            local.parent.mkdir(parents=True, exist_ok=True)
            fs.get_file(name, str(local))
    elif source.exists():
        target.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(_fs_path(source), str(target))
    else:
        raise FileNotFoundError(f"{source} does not exist")
    return target


def cached_copy(source: PathLike) -> Path:
    """A local copy of the file `source` in ettin-jax's cache (~/.cache/ettin-jax/objects, or
    $XDG_CACHE_HOME), downloaded once per source URL, size and modification time; `source`
    itself when local. For files read many times at random offsets (prepared shards)."""
    if not is_remote(source):
        return Path(os.fspath(source))
    source = path(source)
    info = _filesystem(source).info(_fs_path(source))
    key = f"{source}|{info.get('size')}|{info.get('etag') or info.get('md5Hash') or ''}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:24]
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"), "ettin-jax",
                 "objects", digest)
    local = cache / source.name
    if not local.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        write_atomically(local, lambda tmp: _filesystem(source).get_file(_fs_path(source), tmp))
    return local


def checkpoint_options(directory: PathLike) -> dict:
    """Keyword arguments for orbax's CheckpointManagerOptions that make a step's completion
    atomic where `directory` is: a commit file written last in object storage (no directory
    rename there; orbax picks it for gs:// itself, not for s3://), orbax's own choice (a
    renamed temporary directory) on local disks. For a URL, also lets orbax write arrays to
    s3:// (`_teach_orbax_s3`): every orbax manager of ettin-jax takes its options from here,
    so orbax is imported only by what checkpoints, not by every path."""
    if not is_remote(directory):
        return {}
    from orbax.checkpoint import options as orbax_options

    _teach_orbax_s3()

    return {"atomicity_options": orbax_options.AtomicityOptions(
        mode=orbax_options.AtomicityMode.COMMIT_FILE)}


def _fs_path(value: epath.Path) -> str:
    """`value` as its fsspec filesystem names it (bucket/key, no scheme)."""
    return os.fspath(value).split("://", 1)[1]


def _filesystem(value: epath.Path):
    import fsspec

    return fsspec.filesystem(os.fspath(value).split("://", 1)[0])


def _configure_endpoints() -> None:
    """Points every client at the endpoints the standard variables name (checked on every
    call, cheap): TensorStore's GCS driver and gcsfs at STORAGE_EMULATOR_HOST (TensorStore's
    S3 driver reads AWS_ENDPOINT_URL through `_teach_orbax_s3`)."""
    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if emulator:
        if "://" not in emulator:
            emulator = f"http://{emulator}"
        os.environ["TENSORSTORE_GCS_HTTP_URL"] = emulator
        # An emulator needs no credentials; TensorStore otherwise looks for Google's.
        os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
        # gcsfs would ask the emulator for the bucket's layout over gRPC, which emulators
        # do not serve (each call waits for a timeout); read when gcsfs is imported.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    _no_listings_cache()
    _forget_clients_of_other_endpoints()


ENDPOINT_VARIABLES = ("STORAGE_EMULATOR_HOST", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                      "AWS_DEFAULT_REGION", "AWS_REGION")
_endpoints_in_use: dict[str, str | None] = {}


def _forget_clients_of_other_endpoints() -> None:
    """Drops the cached gcsfs / s3fs clients when the endpoint variables changed since the last
    call: fsspec and etils keep one client per protocol, bound to the endpoint and credentials
    of its creation, so a process that moves to another store (another emulator, a test's
    server on a new port) would otherwise keep talking to the old one."""
    current = {name: os.environ.get(name) for name in ENDPOINT_VARIABLES}
    if _endpoints_in_use and current != _endpoints_in_use:
        from etils.epath import backend

        backend.fsspec_backend._get_filesystem.cache_clear()
        for module, client in (("gcsfs", "GCSFileSystem"), ("s3fs", "S3FileSystem")):
            if module in sys.modules:
                getattr(sys.modules[module], client).clear_instance_cache()
    _endpoints_in_use.update(current)


def _no_listings_cache() -> None:
    """Makes gcsfs and s3fs list directories afresh every time: by default they remember a
    listing forever, so a process would never see the checkpoint steps other processes (or
    a later run) wrote."""
    import fsspec.config

    for protocol in ("gs", "gcs", "s3", "s3a"):
        fsspec.config.conf.setdefault(protocol, {})["use_listings_cache"] = False


def _teach_orbax_s3() -> None:
    """Lets orbax write arrays to s3:// through TensorStore's S3 driver.

    orbax-checkpoint 0.12.8 builds TensorStore key-value store specs for gs:// and local paths
    only (an s3:// directory is normalised to "s3:/..." and refused as relative); its path
    handling (etils.epath, s3fs) and commit-file atomicity serve s3:// already. This routes
    s3:// directories the way it routes gs:// ones, with an S3 spec (endpoint from
    AWS_ENDPOINT_URL, region from AWS_DEFAULT_REGION / AWS_REGION, credentials from
    AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY when set)."""
    from orbax.checkpoint._src.path import gcs_utils
    from orbax.checkpoint._src.serialization import tensorstore_utils

    if getattr(tensorstore_utils, "_ettin_s3", False):
        return
    normalize, use_remote_driver = (tensorstore_utils._normalize_path,
                                    tensorstore_utils._use_gcs_driver)
    gcs_spec = gcs_utils.get_kvstore_for_gcs

    def normalized(value: str) -> str:
        if str(value).startswith("s3:/"):
            return "s3://" + os.path.normpath(str(value)[len("s3:/"):]).lstrip("/")
        return normalize(value)

    def remote(directory: str) -> bool:
        return str(directory).startswith("s3://") or use_remote_driver(directory)

    def spec(directory: str) -> dict:
        if not str(directory).startswith("s3://"):
            return gcs_spec(directory)
        bucket, _, key = str(directory)[len("s3://"):].partition("/")
        result = {"driver": "s3", "bucket": bucket, "path": key.rstrip("/") + "/"}
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            result["endpoint"] = endpoint
        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        if region:
            result["aws_region"] = region
        if os.environ.get("AWS_ACCESS_KEY_ID"):  # else the default chain (profile, IMDS, ...)
            result["aws_credentials"] = {"type": "environment"}
        return result

    tensorstore_utils._normalize_path = normalized
    tensorstore_utils._use_gcs_driver = remote
    gcs_utils.get_kvstore_for_gcs = spec
    tensorstore_utils._ettin_s3 = True
