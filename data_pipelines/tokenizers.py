"""Tokenizers behind one interface: SentencePiece models trained here, and HuggingFace
`tokenizer.json` files (the ModernBERT/Ettin BPE of imported checkpoints).

Every tokenizer names its specials [PAD] [UNK] [CLS] [SEP] [MASK] ([CLS] is BOS, [SEP] is EOS);
a tokenizer lacking one is refused. SentencePiece models trained by ettin-jax put them at the
fixed ids of `special_tokens.PROJECT` (0..4). `encode` never adds special tokens; a special
token's literal text in the input ("[MASK]") encodes to its id, as transformers does.

`save` writes files that `transformers.AutoTokenizer.from_pretrained(DIR)` loads with the same
ids: for SentencePiece, `tokenizer.model` plus a `tokenizer_config.json` naming the
`SentencePieceBackend` class (the fast converters of transformers 5 mis-tokenize such models,
a known transformers 5 behaviour); for HF tokenizers, `tokenizer.json` as it is.
`save(DIR, objective=...)` (what model exports write) adds special tokens as the member sees
them (`special_tokens.with_special_tokens`) through a `tokenizer.json` whose post-processor is
built from that function: transformers 5 loads every ModernBERT directory with its
`tokenizers`-backed class whatever `tokenizer_config.json` names, so a SentencePiece model is
also written as an equivalent `tokenizer.json` (`sentencepiece_tokenizer_json`).
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import sentencepiece as spm

from data_pipelines.special_tokens import SpecialTokens, with_special_tokens
from ettin_jax import storage

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
        """From the tokenizer's file, or a directory holding it under its usual name (`FILE`);
        local or a URL."""
        path = storage.path(path)
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

    def save(self, directory: str | Path, *, objective: str | None = None) -> tuple[str, ...]:
        """Writes the tokenizer for ettin-jax and transformers; returns the file names.

        Without `objective`: `FILE` plus the configuration files naming `HF_CLASS` and the
        special tokens; transformers adds no special tokens. With `objective` ("mlm" or "clm",
        for a model directory): also `tokenizer.json` with the post-processor of
        `special_tokens_post_processor`, so that `AutoTokenizer(DIR)(text)` and
        `(text_a, text_b)` give `with_special_tokens(...)` of our ids; ettin-jax still reads
        `FILE` (a SentencePiece model keeps precedence over tokenizer.json in `load_tokenizer`).
        Raises TokenizerError, before writing anything, when this tokenizer has no
        tokenizer.json equivalent (`sentencepiece_tokenizer_json`).
        """
        tokenizer_json = None if objective is None else self.hf_tokenizer_json(objective)
        directory = storage.path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        data = self._data if self.BINARY else self._data.encode("utf-8")
        (directory / self.FILE).write_bytes(data)
        if tokenizer_json is None:
            return (self.FILE, *self._write_hf_config(directory, self.HF_CLASS))
        (directory / HF_TOKENIZER_FILE).write_text(tokenizer_json)
        written = dict.fromkeys((self.FILE, HF_TOKENIZER_FILE))  # ordered, without repeats
        return (*written, *self._write_hf_config(directory, "PreTrainedTokenizerFast"))

    def hf_tokenizer_json(self, objective: str) -> str:
        """A HuggingFace `tokenizer.json` encoding like this tokenizer and adding the special
        tokens of `objective` ("mlm" or "clm") the way `with_special_tokens` does."""
        from tokenizers import Tokenizer as RustTokenizer

        rust = RustTokenizer.from_str(self._base_tokenizer_json())
        rust.post_processor = special_tokens_post_processor(self.special_tokens, objective)
        return rust.to_str(pretty=True)

    def _base_tokenizer_json(self) -> str:
        raise NotImplementedError

    def _encode_plain(self, text: str) -> list[int]:
        raise NotImplementedError

    @property
    def _special_ids(self) -> dict[str, int]:
        return {SPECIAL_TOKEN_TEXT[name]: value
                for name, value in self.special_tokens.as_dict().items()}

    def _write_hf_config(self, directory: Path, tokenizer_class: str) -> tuple[str, ...]:
        tokens = {hf: SPECIAL_TOKEN_TEXT[name] for hf, name in _HF_SPECIAL_NAMES.items()}
        # No add_bos_token / add_eos_token: transformers would replace tokenizer.json's
        # post-processor with its own template. ModernBERT takes no token_type_ids.
        config = {"tokenizer_class": tokenizer_class, **tokens,
                  "model_max_length": 1_000_000_000, "clean_up_tokenization_spaces": False,
                  "model_input_names": ["input_ids", "attention_mask"]}
        (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
        (directory / "special_tokens_map.json").write_text(json.dumps(tokens, indent=2) + "\n")
        return ("tokenizer_config.json", "special_tokens_map.json")


# Stand-ins for the two texts when with_special_tokens is asked for its template: never an id.
_FIRST, _SECOND = -1, -2


def special_tokens_post_processor(specials: SpecialTokens, objective: str):
    """The `tokenizers` TemplateProcessing that brackets one text or a pair exactly as
    `with_special_tokens(first, second, specials, objective=objective)` does (the template is
    read off that function, so the two cannot drift). Type ids are 0 up to the second text and
    1 from it on. Raises ValueError for an unknown objective."""
    from tokenizers import processors

    names = {value: SPECIAL_TOKEN_TEXT[name]
             for name, value in specials.as_dict().items() if value is not None}

    def template(pair: bool) -> tuple[str, list[int]]:
        ids = with_special_tokens([_FIRST], [_SECOND] if pair else None, specials,
                                  objective=objective).tolist()
        pieces, type_id = [], 0
        for token_id in ids:
            type_id = 1 if token_id == _SECOND else type_id
            piece = {_FIRST: "$A", _SECOND: "$B"}.get(token_id) or names[token_id]
            pieces.append(f"{piece}:{type_id}")
        return " ".join(pieces), [i for i in ids if i >= 0]

    single, single_ids = template(False)
    pair, pair_ids = template(True)
    used = sorted(set(single_ids + pair_ids))
    return processors.TemplateProcessing(single=single, pair=pair,
                                         special_tokens=[(names[i], i) for i in used])


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

    def _base_tokenizer_json(self) -> str:
        return sentencepiece_tokenizer_json(self._processor)


def sentencepiece_tokenizer_json(processor: spm.SentencePieceProcessor) -> str:
    """A HuggingFace `tokenizer.json` (no post-processor) encoding like `processor`, one of the
    models `SentencePieceTokenizer.train` writes: identity normalization with a "\u2581" prefix
    and spaces as "\u2581", byte fallback, the five specials as added tokens.

    BPE: merges ranked by the merged piece's score (SentencePiece merges the best-scored pair,
    leftmost first); ids agree with SentencePiece's. Unigram: the same pieces and scores; ids
    agree except where two segmentations tie in score (SentencePiece sums scores in float32,
    `tokenizers` in float64), e.g. some long runs of spaces made of whitespace-only pieces
    (45 of 23,363 lines of the bundled held-out text and code differ at vocabulary 2048).
    Raises TokenizerError for a model with another normalization."""
    from tokenizers import AddedToken, decoders, models, normalizers
    from tokenizers import Tokenizer as RustTokenizer
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(processor.serialized_model_proto())
    spec, norm = proto.trainer_spec, proto.normalizer_spec
    if (norm.name != "identity" or not norm.add_dummy_prefix or norm.remove_extra_whitespaces
            or spec.treat_whitespace_as_suffix or not spec.byte_fallback):
        raise TokenizerError(f"cannot convert this SentencePiece model to tokenizer.json: "
                             f"normalization {norm.name!r}, add_dummy_prefix "
                             f"{norm.add_dummy_prefix}, remove_extra_whitespaces "
                             f"{norm.remove_extra_whitespaces}, byte_fallback "
                             f"{spec.byte_fallback} (ettin-jax trains identity, True, False, True)")
    pieces = [(p.piece, p.score) for p in proto.pieces]
    unk = processor.unk_id()
    if spec.model_type == sentencepiece_model_pb2.TrainerSpec.BPE:
        normal = {p.piece: p.score for p in proto.pieces
                  if p.type == sentencepiece_model_pb2.ModelProto.SentencePiece.NORMAL}
        vocab = {piece: i for i, (piece, _) in enumerate(pieces)}
        merges = sorted(
            (-score, vocab[piece], cut, (piece[:cut], piece[cut:]))
            for piece, score in normal.items() for cut in range(1, len(piece))
            if piece[:cut] in normal and piece[cut:] in normal)
        model = models.BPE(vocab, [m[-1] for m in merges], unk_token=pieces[unk][0],
                           byte_fallback=True, fuse_unk=True)
    elif spec.model_type == sentencepiece_model_pb2.TrainerSpec.UNIGRAM:
        # SentencePiece never matches a byte piece's text ("<0x41>"); a score far below every
        # other keeps tokenizers from doing so (an unknown character has one path either way).
        floor = min(score for _, score in pieces) - 1000.0
        byte = sentencepiece_model_pb2.ModelProto.SentencePiece.BYTE
        model = models.Unigram([(p.piece, floor if p.type == byte else p.score)
                                for p in proto.pieces], unk_id=unk, byte_fallback=True)
    else:
        raise TokenizerError(f"cannot convert a SentencePiece model of type "
                             f"{spec.model_type} to tokenizer.json (only unigram and BPE)")
    rust = RustTokenizer(model)
    rust.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"),
                                            normalizers.Replace(" ", "\u2581")])
    rust.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(),
                                      decoders.Fuse(), decoders.Strip(" ", 1, 0)])
    rust.add_special_tokens([AddedToken(text, normalized=False, special=True)
                             for text in SPECIAL_TOKEN_TEXT.values()])
    return rust.to_str()


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

    def _base_tokenizer_json(self) -> str:
        return self._data



def load_tokenizer(path: str | Path) -> Tokenizer:
    """The tokenizer at `path`: a directory with tokenizer.model (SentencePiece, preferred) or
    tokenizer.json (HuggingFace), or one of those files. Raises FileNotFoundError / TokenizerError
    naming the path. `path` may be a URL."""
    path = storage.path(path)
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
