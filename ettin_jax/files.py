"""Writing files so that a crash never leaves a half-written one: the one way ettin-jax
replaces a file that others read (HF exports, the run directory's recipe, metrics)."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path


def write_atomically(final: str | Path, write: Callable[[str], object]) -> None:
    """Runs write(tmp_path) on a temporary path beside `final`, then renames it to `final`:
    readers and a process killed at any moment see the old file or the new one, never part."""
    final = Path(final)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    try:
        write(str(tmp))
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomically(final: str | Path, text: str) -> None:
    """`write_atomically` of a text file."""
    write_atomically(final, lambda tmp: Path(tmp).write_text(text))
