"""JAX's persistent compilation cache, configured in one place.

`ettin-jax train` and `ettin-jax eval` call `enable_compilation_cache(cache_directory(option))`
before anything compiles, so a restarted, resumed or repeated run loads its compiled steps from
disk instead of compiling them again; the tests' conftest uses `cache_environment` for itself and
every process it starts. Where the cache lives, first match wins:

  1. `--compilation-cache DIR` on the command line,
  2. the environment variable ETTIN_JAX_COMPILATION_CACHE (a path),
  3. JAX's own JAX_COMPILATION_CACHE_DIR, when set,
  4. $XDG_CACHE_HOME/ettin-jax/jax (default ~/.cache/ettin-jax/jax).
"off" or "0" in 1 or 2 turns the cache off. Entries are keyed by the program, the JAX and
libtpu versions, the devices and the compiler flags, so a stale entry is never used. JAX writes
entries from process 0 only (one writer per multi-process run); every process reads them.
The cache is trusted code: point it only at a directory that nobody else can write to.

This module imports JAX only inside `enable_compilation_cache`, so a test set-up can import it
before JAX reads its environment.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

CACHE_ENV = "ETTIN_JAX_COMPILATION_CACHE"
OFF_VALUES: tuple[str, ...] = ("off", "0")
# Every compiled program is written, however fast it compiled (JAX's default skips those under
# 1 s): a train or eval start compiles dozens of small programs (initialisation, placement,
# metrics, the eval step) besides the train step, which together take seconds to compile and
# milliseconds to load; on a CPU a tiny recipe's whole step compiles in under a second.
MIN_COMPILE_TIME_SECS = 0.0
# 0 keeps JAX's own per-filesystem minimum entry size (none for a local disk); -1 would forbid
# that override.
MIN_ENTRY_SIZE_BYTES = 0


def default_cache_directory(environ: Mapping[str, str] | None = None) -> Path:
    """$XDG_CACHE_HOME/ettin-jax/jax, or ~/.cache/ettin-jax/jax when XDG_CACHE_HOME is unset or
    empty in `environ` (default os.environ)."""
    environ = os.environ if environ is None else environ
    return Path(environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ettin-jax" / "jax"


def cache_directory(option: str | None = None,
                    environ: Mapping[str, str] | None = None) -> str | None:
    """The cache directory for a command given `option` (--compilation-cache) and `environ`
    (default os.environ), by the precedence in the module docstring; None when the cache is
    off. Does not create the directory."""
    environ = os.environ if environ is None else environ
    for value in (option, environ.get(CACHE_ENV)):
        if value:
            return None if value.strip().lower() in OFF_VALUES else str(Path(value).expanduser())
    return environ.get("JAX_COMPILATION_CACHE_DIR") or str(default_cache_directory(environ))


def cache_environment(directory: str | Path) -> dict[str, str]:
    """The environment variables that give a process started with them (JAX reads them when it
    is imported) the cache `enable_compilation_cache(directory)` configures."""
    return {"JAX_COMPILATION_CACHE_DIR": str(directory),
            "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(MIN_COMPILE_TIME_SECS),
            "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": str(MIN_ENTRY_SIZE_BYTES)}


def enable_compilation_cache(directory: str | Path | None) -> None:
    """Turns JAX's persistent compilation cache on in `directory` (created if missing) with
    this module's thresholds, or off when `directory` is None.

    Call it before the first compile of the process; called again with another directory, it
    switches the process to that one (the cache JAX had opened is closed).
    """
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    previous = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    if directory is None:
        jax.config.update("jax_enable_compilation_cache", False)
    else:
        Path(directory).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_enable_compilation_cache", True)
        jax.config.update("jax_compilation_cache_dir", str(directory))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", MIN_COMPILE_TIME_SECS)
        jax.config.update("jax_persistent_cache_min_entry_size_bytes", MIN_ENTRY_SIZE_BYTES)
    current = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
    if current != previous:
        # JAX opens its cache once per process, at the first compile; make it reopen.
        compilation_cache.reset_cache()
