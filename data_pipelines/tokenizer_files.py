"""The files that make up a tokenizer on disk, as transformers and ettin-jax read them."""

from __future__ import annotations

from etils.epath import Path

from ettin_jax import storage

# What transformers' tokenizers read from a model directory (and ettin-jax writes).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
)


def tokenizer_file_names(directory: Path) -> tuple[str, ...]:
    """The tokenizer files present in `directory` (possibly none)."""
    return tuple(name for name in TOKENIZER_FILES if (directory / name).is_file())


def copy_tokenizer_files(source: Path, target: Path) -> tuple[str, ...]:
    """Copies the tokenizer files of `source` into `target` (created; either may be a URL),
    each atomically; returns their names.

    Raises FileNotFoundError naming `source` when it holds none.
    """
    names = tokenizer_file_names(source)
    if not names:
        raise FileNotFoundError(f"{source}: no tokenizer files ({', '.join(TOKENIZER_FILES)})")
    target.mkdir(parents=True, exist_ok=True)
    if storage.absolute(source) != storage.absolute(target):
        for name in names:
            storage.copy_file(source / name, target / name)
    return names
