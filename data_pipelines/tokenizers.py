"""Tokenizers behind one interface: SentencePiece models trained here, and HuggingFace
`tokenizer.json` files (the ModernBERT/Ettin BPE of imported checkpoints).

Every tokenizer names its specials [PAD] [UNK] [CLS] [SEP] [MASK] ([CLS] is BOS, [SEP] is EOS);
a tokenizer lacking one is refused. SentencePiece models trained by ettin-jax put them at the
fixed ids of `special_tokens.PROJECT` (0..4). `encode` never adds special tokens; a special
token's literal text in the input ("[MASK]") encodes to its id, as transformers does.

`save` writes files that `transformers.AutoTokenizer.from_pretrained(DIR)` loads with the same
ids: for SentencePiece, `tokenizer.model` plus a `tokenizer_config.json` naming the
`SentencePieceBackend` class (the fast converters of transformers 5 mis-tokenize such models,
see ../shared/ettin_reference.md section 4); for HF tokenizers, `tokenizer.json` as it is.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipelines.special_tokens import SpecialTokens

SPECIAL_TOKEN_TEXT: dict[str, str] = {
    "pad": "[PAD]", "unk": "[UNK]", "cls": "[CLS]", "sep": "[SEP]", "mask": "[MASK]",
}
# transformers' names for the same tokens (tokenizer_config.json / special_tokens_map.json).
_HF_SPECIAL_NAMES = {
    "pad_token": "pad", "unk_token": "unk", "cls_token": "cls", "sep_token": "sep",
    "mask_token": "mask", "bos_token": "cls", "eos_token": "sep",
}
_SPECIAL_PATTERN = re.compile("(" + "|".join(re.escape(t) for t in SPECIAL_TOKEN_TEXT.values())
                              + ")")
SENTENCEPIECE_FILE = "tokenizer.model"
HF_TOKENIZER_FILE = "tokenizer.json"
# Training sentences longer than this (bytes) are cut into pieces (sentencepiece skips them).
_MAX_SENTENCE_BYTES = 4096
# SentencePiece's trainer splits its work over this many threads whatever the machine (its
# default): the model depends on the number, so a fixed one keeps training reproducible.
TRAINER_THREADS = 16


class TokenizerError(ValueError):
    """A tokenizer cannot be loaded, trained or used; the message names the file or value."""


class Tokenizer:
    """The interface the data pipelines use. Subclasses are built from their file's content
    (`__init__(data, source=...)`, kept as `_data` so that pickling is cheap and exact), set
    `vocab_size` and `special_tokens` (all five ids) and implement `_encode_plain` and the rest."""

    FILE: str  # the file name a directory holds
    BINARY: bool  # whether that file is read as bytes (else as UTF-8 text)
    HF_CLASS: str  # the transformers class that loads it with the same ids
    vocab_size: int
    special_tokens: SpecialTokens
    _data: bytes | str
    _source: str

    def __getstate__(self) -> dict:
        return {"data": self._data, "source": self._source}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["data"], source=state["source"])

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """From the tokenizer's file, or a directory holding it under its usual name (`FILE`)."""
        path = Path(path)
        file = path / cls.FILE if path.is_dir() else path
        if not file.is_file():
            raise FileNotFoundError(f"{file}: no such tokenizer file")
        data = file.read_bytes()
        return cls(data if cls.BINARY else data.decode("utf-8"), source=str(file))

    def encode(self, text: str) -> np.ndarray:
        """int32 ids of `text`, no special tokens added (literal special tokens map to their id)."""
        ids: list[int] = []
        for piece in _SPECIAL_PATTERN.split(text):
            special = self._special_ids.get(piece)
            if special is not None:
                ids.append(special)
            elif piece:
                ids.extend(self._encode_plain(piece))
        return np.asarray(ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every text."""
        return [self.encode(text) for text in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids` (special tokens dropped)."""
        raise NotImplementedError

    def id_to_token(self, token_id: int) -> str:
        """The vocabulary entry of `token_id`."""
        raise NotImplementedError

    def save(self, directory: str | Path) -> tuple[str, ...]:
        """Writes the tokenizer for ettin-jax and transformers (`FILE` plus the configuration
        files naming `HF_CLASS` and the special tokens); returns the file names."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self._data if self.BINARY else self._data.encode("utf-8")
        (directory / self.FILE).write_bytes(data)
        return (self.FILE, *self._write_hf_config(directory, self.HF_CLASS))

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def _special_ids(self) -> dict[str, int]:
        return {SPECIAL_TOKEN_TEXT[name]: value
                for name, value in self.special_tokens.as_dict().items()}

    def _write_hf_config(self, directory: Path, tokenizer_class: str) -> tuple[str, ...]:
        tokens = {hf: SPECIAL_TOKEN_TEXT[name] for hf, name in _HF_SPECIAL_NAMES.items()}
        config = {"tokenizer_class": tokenizer_class, **tokens,
                  "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        return ("tokenizer_config.json", "special_tokens_map.json")


def _find_specials(lookup, source: str) -> SpecialTokens:
    """SpecialTokens from `lookup(text) -> id or None`; TokenizerError naming the missing ones."""
    ids = {name: lookup(text) for name, text in SPECIAL_TOKEN_TEXT.items()}
    missing = [SPECIAL_TOKEN_TEXT[name] for name, value in ids.items() if value is None]
    if missing:
        raise TokenizerError(f"{source}: the tokenizer lacks the special tokens {missing} "
                         f"(ettin-jax needs {', '.join(SPECIAL_TOKEN_TEXT.values())})")
    return SpecialTokens(**ids)


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece model (unigram or BPE), held as its serialized bytes (picklable)."""

    FILE, BINARY, HF_CLASS = SENTENCEPIECE_FILE, True, "SentencePieceBackend"

    def __init__(self, model_proto: bytes, *, source: str = "<memory>"):
        self._data, self._source = model_proto, source
        self._processor = spm.SentencePieceProcessor()
        try:
            self._processor.LoadFromSerializedProto(model_proto)
        except RuntimeError as err:
            raise TokenizerError(f"{source}: not a SentencePiece model: {err}") from None
        self.vocab_size = self._processor.GetPieceSize()

        def lookup(text: str) -> int | None:
            token_id = self._processor.PieceToId(text)
            return token_id if self._processor.IdToPiece(token_id) == text else None

        self.special_tokens = _find_specials(lookup, source)

    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        *,
        vocab_size: int,
        model_type: str = "unigram",
        max_sentences: int = 300_000,
        seed: int = 21,
    ) -> SentencePieceTokenizer:
        """Trains on the lines of `texts` with [PAD] 0, [UNK] 1, [CLS] 2, [SEP] 3, [MASK] 4.

        Byte fallback is on (no text is lost to [UNK]) and normalization is off (code keeps its
        whitespace). At most `max_sentences` lines are used, sampled with `seed`. The same
        texts and arguments give the same model, byte for byte, on any machine: the sample is
        drawn here (SentencePiece's own sampling is not reproducible even when seeded) and the
        trainer always runs `TRAINER_THREADS` threads (its result depends on their number).
        Raises TokenizerError for a vocabulary too small for the specials and byte pieces, or
        for texts without any line.
        """
        minimum = len(SPECIAL_TOKEN_TEXT) + 256 + 64
        if vocab_size < minimum:
            raise TokenizerError(f"vocab_size {vocab_size} is too small: the specials and the "
                                 f"256 byte pieces need at least {minimum}")
        lines = [piece for text in texts for line in text.splitlines() if line.strip()
                 for piece in _cut(line)]
        if not lines:
            raise TokenizerError("no text to train the tokenizer on (every document is empty)")
        if len(lines) > max_sentences:
            chosen = np.random.default_rng(seed).choice(len(lines), max_sentences, replace=False)
            lines = [lines[i] for i in np.sort(chosen)]
        model = io.BytesIO()
        try:
            spm.SentencePieceTrainer.train(
                sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size,
                model_type=model_type, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
                pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
                user_defined_symbols=["[MASK]"], byte_fallback=True, character_coverage=0.9995,
                normalization_rule_name="identity", remove_extra_whitespaces=False,
                allow_whitespace_only_pieces=True, split_digits=True,
                input_sentence_size=0, shuffle_input_sentence=False,
                max_sentence_length=_MAX_SENTENCE_BYTES * 2, num_threads=TRAINER_THREADS,
                minloglevel=2,
            )
        except RuntimeError as err:  # e.g. a vocabulary larger than the text supports
            raise TokenizerError(f"sentencepiece training failed: {err}") from None
        return cls(model.getvalue())

    def _encode_plain(self, text: str) -> list[int]:
        return self._processor.EncodeAsIds(text)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        """`encode` of every text; texts without special literals go through one C++ call."""
        plain = [i for i, t in enumerate(texts) if not _SPECIAL_PATTERN.search(t)]
        out: list[np.ndarray | None] = [None] * len(texts)
        for i, ids in zip(plain, self._processor.EncodeAsIds([texts[i] for i in plain])):
            out[i] = np.asarray(ids, np.int32)
        return [o if o is not None else self.encode(texts[i]) for i, o in enumerate(out)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._processor.DecodeIds([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        return self._processor.IdToPiece(int(token_id))



def _cut(line: str) -> Iterable[str]:
    """`line` in pieces of at most _MAX_SENTENCE_BYTES bytes (roughly: by characters x 4)."""
    step = _MAX_SENTENCE_BYTES // 4
    return (line[i:i + step] for i in range(0, len(line), step))


class HFTokenizer(Tokenizer):
    """A HuggingFace `tokenizer.json` (e.g. ModernBERT's BPE) through the `tokenizers` library."""

    FILE, BINARY, HF_CLASS = HF_TOKENIZER_FILE, False, "PreTrainedTokenizerFast"

    def __init__(self, serialized: str, *, source: str = "<memory>"):
        from tokenizers import Tokenizer as RustTokenizer

        self._data, self._source = serialized, source
        try:
            self._tokenizer = RustTokenizer.from_str(serialized)
        except Exception as err:  # the Rust library raises its own exception type
            raise TokenizerError(f"{source}: not a HuggingFace tokenizer.json: {err}") from None
        self.vocab_size = self._tokenizer.get_vocab_size(with_added_tokens=True)
        self.special_tokens = _find_specials(self._tokenizer.token_to_id, source)

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tokenizer.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: Sequence[str]) -> list[np.ndarray]:
        return [np.asarray(e.ids, np.int32)
                for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tokenizer.decode([int(i) for i in ids])

    def id_to_token(self, token_id: int) -> str:
        return self._tokenizer.id_to_token(int(token_id))



def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a directory with tokenizer.model (SentencePiece, preferred) or
    tokenizer.json (HuggingFace), or one of those files. Raises FileNotFoundError / TokenizerError
    naming the path."""
    path = Path(path)
    if path.is_dir():
        if (path / SENTENCEPIECE_FILE).is_file():
            return SentencePieceTokenizer.load(path)
        if (path / HF_TOKENIZER_FILE).is_file():
            return HFTokenizer.load(path)
        raise FileNotFoundError(f"{path}: no {SENTENCEPIECE_FILE} or {HF_TOKENIZER_FILE} here")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such tokenizer file or directory")
    if path.suffix == ".json":
        return HFTokenizer.load(path)
    return SentencePieceTokenizer.load(path)


def train_tokenizer(
    out_dir: str | Path,
    *,
    vocab_size: int,
    texts: Iterable[str] | None = None,
    model_type: str = "unigram",
    seed: int = 21,
) -> SentencePieceTokenizer:
    """Trains a SentencePiece tokenizer (on the bundled corpus's training split by default),
    saves it to `out_dir` (tokenizer.model and transformers' files) and returns it. The same
    texts, vocabulary size, model type and seed give byte-identical files."""
    if texts is None:
        from data_pipelines.corpus import bundled_documents

        texts = (d.text for d in bundled_documents("train"))
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=vocab_size, model_type=model_type,
                                             seed=seed)
    tokenizer.save(out_dir)
    return tokenizer
