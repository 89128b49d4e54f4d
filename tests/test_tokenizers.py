"""Tokenizers: trained SentencePiece models and HF tokenizer.json files give the same ids in
ettin-jax and in transformers' AutoTokenizer, with the specials at fixed ids."""

from __future__ import annotations

import json
import pickle

import numpy as np
import pytest
from transformers import AutoTokenizer

from data_pipelines.corpus import bundled_documents
from data_pipelines.special_tokens import PROJECT
from data_pipelines.tokenizers import (
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    train_tokenizer,
)

EXTRA_LINES = ["café naïve über Straße", "日本語のテキストと中文", "emoji 🙂🚀 ok", "   ", "\t\tindent",
               "x [MASK] y [CLS]", "a  b   c", " leading", "trailing ", "1234567890"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A unigram tokenizer trained on a sixth of the bundled training text, saved."""
    out = tmp_path_factory.mktemp("tokenizer")
    texts = [d.text for d in bundled_documents("train")[::6]]
    return train_tokenizer(out, vocab_size=2048, texts=texts), out


def _heldout_lines() -> list[str]:
    lines = [line for d in bundled_documents("heldout") for line in d.text.splitlines()]
    return lines + EXTRA_LINES


def test_transformers_gives_exactly_our_ids(trained):
    tokenizer, out = trained
    assert sorted(p.name for p in out.iterdir()) == [
        "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    theirs = AutoTokenizer.from_pretrained(out)
    lines = _heldout_lines()
    assert len(lines) >= 2000
    ours = tokenizer.encode_batch(lines)
    agree = sum(o.tolist() == theirs(line, add_special_tokens=False)["input_ids"]
                for o, line in zip(ours, lines))
    assert agree == len(lines), f"{agree} of {len(lines)} lines agree"
    assert tokenizer.special_tokens == PROJECT
    for name in ("pad", "unk", "cls", "sep", "mask"):
        assert getattr(theirs, f"{name}_token_id") == getattr(PROJECT, name)
    assert (theirs.bos_token_id, theirs.eos_token_id) == (PROJECT.cls, PROJECT.sep)


def test_encode_decode_pickle_and_load(trained, rng):
    tokenizer, out = trained
    words = ["the", "king", "def", "return", "naïve", "(x)", "\n", "    "]
    text = "".join(rng.choice(words, 40))
    ids = tokenizer.encode(text)
    assert ids.dtype == np.int32 and not np.isin(ids, [0, 2, 3]).any()
    assert tokenizer.decode(ids) == text  # identity normalization, byte fallback: lossless
    assert tokenizer.encode("a [MASK] b").tolist().count(PROJECT.mask) == 1
    batch = tokenizer.encode_batch([text, "x [SEP]", ""])
    assert [b.tolist() for b in batch] == [tokenizer.encode(t).tolist()
                                          for t in (text, "x [SEP]", "")]
    clone = pickle.loads(pickle.dumps(tokenizer))
    assert clone.encode(text).tolist() == ids.tolist()
    assert load_tokenizer(out).encode(text).tolist() == ids.tolist()
    assert load_tokenizer(out / "tokenizer.model").vocab_size == 2048


def test_training_is_reproducible_and_seeded():
    """The same lines and seed give the same model bytes, also when the lines are sampled;
    another seed samples other lines."""
    texts = [d.text for d in bundled_documents("train")[:30]]
    models = [SentencePieceTokenizer.train(texts, vocab_size=500, max_sentences=3000,
                                           seed=seed)._data for seed in (7, 7, 8)]
    assert models[0] == models[1] and models[0] != models[2]


def test_bpe_model_type_trains_too():
    texts = [d.text for d in bundled_documents("train")[:40]]
    tokenizer = SentencePieceTokenizer.train(texts, vocab_size=600, model_type="bpe")
    assert tokenizer.special_tokens == PROJECT and tokenizer.vocab_size == 600
    assert tokenizer.decode(tokenizer.encode("To be, or not")) == "To be, or not"


def _modernbert_like_bpe(tmp_path):
    """A small byte-level BPE with ModernBERT's special names placed after the vocabulary."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="[UNK]"))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator([d.text for d in bundled_documents("train")[:20]], trainer)
    tokenizer.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    return tmp_path / "tokenizer.json"


def test_hf_tokenizer_json(tmp_path):
    path = _modernbert_like_bpe(tmp_path)
    tokenizer = load_tokenizer(path)
    assert isinstance(tokenizer, HFTokenizer)
    special = tokenizer.special_tokens
    assert min(special.as_dict().values()) >= 500 - 5  # at the end, as in ModernBERT
    text = "Thou art more lovely [MASK] temperate."
    ids = tokenizer.encode(text)
    assert special.mask in ids.tolist() and tokenizer.decode(ids) == text.replace("[MASK]", "")
    tokenizer.save(tmp_path / "saved")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "saved")
    for line in _heldout_lines()[:300]:
        assert theirs(line, add_special_tokens=False)["input_ids"] == tokenizer.encode(line).tolist()
    assert theirs.mask_token_id == special.mask and theirs.pad_token_id == special.pad
    assert pickle.loads(pickle.dumps(tokenizer)).encode(text).tolist() == ids.tolist()


def test_bad_tokenizers_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_tokenizer(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="no tokenizer.model or tokenizer.json"):
        load_tokenizer(tmp_path)
    path = _modernbert_like_bpe(tmp_path)
    data = json.loads(path.read_text())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["content"] != "[MASK]"]
    data["model"]["vocab"].pop("[MASK]", None)
    (tmp_path / "nomask.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match=r"nomask.json: the tokenizer lacks the special tokens "
                                         r"\['\[MASK\]'\]"):
        load_tokenizer(tmp_path / "nomask.json")
    (tmp_path / "junk.model").write_bytes(b"not a model")
    with pytest.raises(ValueError, match="junk.model: not a SentencePiece model"):
        load_tokenizer(tmp_path / "junk.model")
    with pytest.raises(ValueError, match="too small"):
        SentencePieceTokenizer.train(["some text"], vocab_size=100)
    with pytest.raises(ValueError, match="no text"):
        SentencePieceTokenizer.train(["", "  \n"], vocab_size=1000)
