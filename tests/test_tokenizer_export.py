"""Exported tokenizers bracket text in transformers exactly as ettin-jax does
(`data_pipelines.special_tokens.with_special_tokens`): AutoTokenizer ids for texts and pairs,
transformers' fill-mask pipeline against `fill_mask`, and `AutoModelForCausalLM.generate` on
the exported tokenizer's ids against `generate`, for SentencePiece (unigram and BPE) and
HuggingFace tokenizer.json tokenizers, through `export_checkpoint` (what `ettin-jax export`
runs) on a native run directory.

Small models (2 layers, hidden 64, vocab 512, std 0.2 so that a wrong or missing special
token moves the predictions) shared by every tokenizer kind; random texts from each
tokenizer's own pieces plus characters it has never seen.
"""

from __future__ import annotations

import zlib

import numpy as np
import pytest
import torch
from conftest import randomized_model, small_config
from flax import nnx
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

from data_pipelines.corpus import bundled_documents
from data_pipelines.special_tokens import with_special_tokens
from data_pipelines.tokenizers import (
    HF_TOKENIZER_FILE,
    SentencePieceTokenizer,
    Tokenizer,
    TokenizerError,
    load_tokenizer,
    sentencepiece_tokenizer_json,
    special_tokens_post_processor,
)
from ettin_jax.hf.pretrained import save_pretrained
from ettin_jax.hf.transfer import export_checkpoint
from ettin_jax.inference import fill_mask, generate
from ettin_jax.training.checkpoint import save_weights

VOCAB = 512
KINDS = ("spm-unigram", "spm-bpe", "hf-bpe")
OBJECTIVES = {"encoder": "mlm", "decoder": "clm"}


def _module_rng(name: str) -> np.random.Generator:
    return np.random.default_rng(zlib.crc32(f"{__name__}::{name}".encode()))


def _training_texts() -> list[str]:
    return [d.text for d in bundled_documents("train")[:12]]


def _make_tokenizer(kind: str, directory) -> None:
    """Writes a tokenizer of `kind` (at most VOCAB pieces) into `directory`."""
    if kind.startswith("spm"):
        model_type = "unigram" if kind == "spm-unigram" else "bpe"
        SentencePieceTokenizer.train(_training_texts(), vocab_size=VOCAB,
                                     model_type=model_type).save(directory)
        return
    # ModernBERT-like: byte-level BPE with the specials after the vocabulary.
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    rust = RustTokenizer(models.BPE(unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    rust.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB - 5,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    rust.train_from_iterator(_training_texts(), trainer)
    rust.add_special_tokens(["[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]"])
    directory.mkdir(parents=True, exist_ok=True)
    rust.save(str(directory / HF_TOKENIZER_FILE))


@pytest.fixture(scope="module")
def models():
    """{"encoder": model, "decoder": model}, random, shared by every tokenizer kind."""
    rng = _module_rng("models")
    config = small_config(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_heads=4,
                          num_layers=2, local_attention=8, init_std=0.2,
                          global_rope_theta=float(rng.choice([160_000.0, 80_000.0])),
                          local_rope_theta=float(rng.choice([10_000.0, 5_000.0])))
    return {name: randomized_model(config, objective, seed=int(rng.integers(1 << 30)))
            for name, objective in OBJECTIVES.items()}


@pytest.fixture(scope="module", params=KINDS)
def exported(request, models, tmp_path_factory):
    """(kind, {member: exported HF directory}, {member: model}, our tokenizer) for a run
    directory exported as `ettin-jax export` does. The decoder's EOS logit is pushed down (for
    this tokenizer's EOS id) so that greedy runs are long."""
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    _make_tokenizer(kind, root / "tokenizer")
    ours = load_tokenizer(root / "tokenizer")
    members = {"encoder": models["encoder"], "decoder": nnx.clone(models["decoder"])}
    bias = members["decoder"].decoder_bias
    bias[...] = bias[...].at[ours.special_tokens.eos].add(-30.0)
    for name, model in members.items():
        save_weights(root / "run" / name, model, special_tokens=ours.special_tokens,
                     tokenizer_dir=root / "tokenizer")
    reports = export_checkpoint(root / "run", root / "hf")
    dirs = {name: report.path for name, report in reports.items()}
    assert sorted(dirs) == ["decoder", "encoder"]
    for path in dirs.values():
        assert (path / HF_TOKENIZER_FILE).is_file()
        again = load_tokenizer(path)
        assert type(again) is type(ours) and again.special_tokens == ours.special_tokens
    return kind, dirs, members, ours


def _random_text(tokenizer: Tokenizer, rng: np.random.Generator, words: int) -> str:
    """Words glued from random vocabulary pieces, some foreign characters (byte fallback /
    unseen bytes), single spaces between words."""
    pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    pieces = [p.replace("\u2581", "").replace("\u0120", "") for p in pieces
              if p.strip("\u2581\u0120") and not p.startswith(("[", "<0x"))]
    foreign = list("éßøλжЖ中文🙂→")
    out = []
    for _ in range(words):
        word = "".join(rng.choice(pieces, size=int(rng.integers(1, 3))))
        if rng.random() < 0.1:
            word += str(rng.choice(foreign))
        out.append(word)
    return " ".join(out)


@pytest.mark.parametrize("member", sorted(OBJECTIVES))
def test_auto_tokenizer_adds_what_with_special_tokens_adds(exported, member, rng):
    kind, dirs, _, ours = exported
    theirs = AutoTokenizer.from_pretrained(dirs[member])
    objective, special = OBJECTIVES[member], ours.special_tokens
    assert (theirs.cls_token_id, theirs.sep_token_id, theirs.mask_token_id) == \
        (special.cls, special.sep, special.mask)
    for _ in range(12):
        first = _random_text(ours, rng, int(rng.integers(1, 12)))
        second = _random_text(ours, rng, int(rng.integers(1, 12)))
        if rng.random() < 0.3:
            first += " [MASK]"
        a, b = ours.encode(first), ours.encode(second)
        want = with_special_tokens(a, None, special, objective=objective).tolist()
        got = theirs(first)
        assert got["input_ids"] == want, (kind, first)
        assert set(got) == {"input_ids", "attention_mask"}  # ModernBERT takes no type ids
        want_pair = with_special_tokens(a, b, special, objective=objective).tolist()
        assert theirs(first, second)["input_ids"] == want_pair, (kind, first, second)
        assert theirs(first, add_special_tokens=False)["input_ids"] == a.tolist()


def test_post_processor_equals_with_special_tokens_for_any_ids(rng):
    """Run by the Rust library on random words, with the specials at random ids."""
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers import models as rust_models
    from tokenizers import pre_tokenizers

    from data_pipelines.special_tokens import SpecialTokens

    order = rng.permutation(40)
    names = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(35)]
    vocab = {name: int(i) for name, i in zip(names, order)}
    special = SpecialTokens(pad=vocab["[PAD]"], unk=vocab["[UNK]"], cls=vocab["[CLS]"],
                            sep=vocab["[SEP]"], mask=vocab["[MASK]"])
    rust = RustTokenizer(rust_models.WordLevel(vocab, unk_token="[UNK]"))
    rust.pre_tokenizer = pre_tokenizers.Whitespace()
    for objective in ("mlm", "clm"):
        rust.post_processor = special_tokens_post_processor(special, objective)
        for _ in range(5):
            a, b = (" ".join(f"w{i}" for i in rng.integers(0, 35, rng.integers(0, 6)))
                    for _ in range(2))
            ids_a, ids_b = (rust.encode(t, add_special_tokens=False).ids for t in (a, b))
            assert rust.encode(a).ids == with_special_tokens(
                ids_a, None, special, objective=objective).tolist()
            assert rust.encode(a, b).ids == with_special_tokens(
                ids_a, ids_b, special, objective=objective).tolist()
    with pytest.raises(ValueError, match="objective"):
        special_tokens_post_processor(special, "seq2seq")


def test_fill_mask_pipeline_equals_ours(exported, rng):
    kind, dirs, models, _ = exported
    ours = load_tokenizer(dirs["encoder"])
    words = _random_text(ours, rng, 14).split()
    for index in sorted(rng.choice(len(words), size=2, replace=False), reverse=True):
        words[index] = "[MASK]"
    text = " ".join(words)
    top_k = 5
    predictions = fill_mask(models["encoder"], ours, text, top_k=top_k)
    fill = pipeline("fill-mask", model=str(dirs["encoder"]), top_k=top_k, device="cpu")
    theirs = fill(text)
    assert len(predictions) == len(theirs) == 2
    for row, their_row in zip(predictions, theirs):
        assert [token_id for _, token_id, _ in row] == [r["token"] for r in their_row], kind
        np.testing.assert_allclose([p for _, _, p in row], [r["score"] for r in their_row],
                                   rtol=0, atol=1e-5)


def test_transformers_generate_on_its_tokenizer_equals_ours(exported, rng):
    kind, dirs, models, _ = exported
    ours = load_tokenizer(dirs["decoder"])
    prompt = _random_text(ours, rng, int(rng.integers(3, 8)))
    new_tokens = 12
    result = generate(models["decoder"], ours, prompt, max_new_tokens=new_tokens)
    tokenizer = AutoTokenizer.from_pretrained(dirs["decoder"])
    model = AutoModelForCausalLM.from_pretrained(dirs["decoder"]).eval()
    inputs = tokenizer(prompt, return_tensors="pt")
    assert inputs["input_ids"][0].tolist() == list(result.prompt_ids)
    with torch.no_grad():
        out = model.generate(**inputs, do_sample=False, max_new_tokens=new_tokens)
    expected = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(expected) == new_tokens
    assert list(result.token_ids) == expected, kind


def test_other_sentencepiece_models_are_refused_and_exported_as_they_are(models, tmp_path):
    """A SentencePiece model with another normalization has no exact tokenizer.json here:
    conversion names the setting; export copies the files with a warning."""
    import io

    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(_training_texts()[0].splitlines()), model_writer=model,
        vocab_size=400, minloglevel=2, byte_fallback=True, pad_id=0, unk_id=1, bos_id=2,
        eos_id=3, pad_piece="[PAD]", unk_piece="[UNK]", bos_piece="[CLS]", eos_piece="[SEP]",
        user_defined_symbols=["[MASK]"])
    tokenizer = SentencePieceTokenizer(model.getvalue())
    with pytest.raises(TokenizerError, match="nmt_nfkc"):
        sentencepiece_tokenizer_json(tokenizer._processor)
    tokenizer.save(tmp_path / "tok")
    with pytest.warns(UserWarning, match="will not add special tokens"):
        report = save_pretrained(models["decoder"], tmp_path / "hf",
                                 special_tokens=tokenizer.special_tokens,
                                 tokenizer_dir=tmp_path / "tok")
    assert HF_TOKENIZER_FILE not in report.tokenizer_files
    assert (tmp_path / "hf" / "tokenizer.model").read_bytes() == model.getvalue()
