"""The bundled corpus: Shakespeare's plays and poems plus the Python standard library's code.

See README.md in this folder for provenance and licences.
"""

from __future__ import annotations

import dataclasses
import hashlib
import sysconfig
import tarfile
from functools import lru_cache
from pathlib import Path
from typing import Literal

Split = Literal["train", "heldout"]
SPLITS: tuple[str, ...] = ("train", "heldout")

SHAKESPEARE_ARCHIVE = Path(__file__).with_name("shakespeare.tar.xz")
HELDOUT_TEXT = frozenset({"macbeth_gut.txt", "twelfth_night_gut.txt"})
HELDOUT_CODE_MODULUS = 20
# Folders of Lib/ that are not library code (tests, GUIs, tooling, installed packages).
_SKIPPED_CODE_DIRS = frozenset({
    "test", "tests", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo",
    "ensurepip", "venv", "pydoc_data", "__pycache__",
})


@dataclasses.dataclass(frozen=True)
class Document:
    """One document: a stable name (e.g. "shakespeare/macbeth_gut.txt"), its text and kind."""

    name: str
    text: str
    kind: Literal["text", "code"]


def bundled_documents(split: Split = "train") -> tuple[Document, ...]:
    """The bundled corpus's documents of `split`, in a fixed order (text, then code by path).

    Raises ValueError for an unknown split.
    """
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; valid: {', '.join(SPLITS)}")
    heldout = split == "heldout"
    return tuple(d for d in _all_documents() if _is_heldout(d) == heldout)


def _is_heldout(document: Document) -> bool:
    stem = document.name.split("/", 1)[1]
    if document.kind == "text":
        return stem in HELDOUT_TEXT
    return int(hashlib.sha1(stem.encode()).hexdigest(), 16) % HELDOUT_CODE_MODULUS == 0


@lru_cache(maxsize=1)
def _all_documents() -> tuple[Document, ...]:
    return (*_shakespeare(), *_stdlib_code())


def _shakespeare() -> list[Document]:
    documents = []
    with tarfile.open(SHAKESPEARE_ARCHIVE) as archive:
        for member in sorted(archive.getmembers(), key=lambda m: m.name):
            if member.isfile() and member.name.endswith(".txt"):
                raw = archive.extractfile(member).read()
                documents.append(Document(f"shakespeare/{member.name}",
                                          raw.decode("utf-8", errors="replace"), "text"))
    return documents


def _stdlib_code() -> list[Document]:
    lib = Path(sysconfig.get_paths()["stdlib"])
    documents = []
    for path in sorted(lib.rglob("*.py")):
        relative = path.relative_to(lib)
        if set(relative.parts[:-1]) & _SKIPPED_CODE_DIRS or relative.parts[0].startswith("config-"):
            continue
        text = path.read_bytes().decode("utf-8", errors="replace")
        if text.strip():
            documents.append(Document(f"python-stdlib/{relative.as_posix()}", text, "code"))
    return documents
