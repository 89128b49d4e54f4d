"""Sentence-transformers export (`ettin_jax.hf.sentence_transformers`) against the real library:
`SentenceTransformer(dir).encode(texts)` equals our `embed` for both members and every pooling
they support, on random texts of different lengths (padding) and random weights."""

from __future__ import annotations

import json
import os
import zlib

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is ever downloaded

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from conftest import randomized_model, small_config  # noqa: E402
from flax import nnx  # noqa: E402

from data_pipelines.special_tokens import with_special_tokens  # noqa: E402
from data_pipelines.tokenizers import load_tokenizer  # noqa: E402
from ettin_jax.hf.sentence_transformers import save_sentence_transformer  # noqa: E402
from ettin_jax.models.embedding import embed, without_lm_head  # noqa: E402

pytest.importorskip("sentence_transformers")

# (member, pooling, normalize): every pooling each member supports, normalize both ways.
CASES = [("mlm", "mean", True), ("mlm", "cls", False), ("clm", "lasttoken", True),
         ("clm", "mean", False), ("clm", "weightedmean", True)]
MAX_SEQ_LENGTH = 96


@pytest.fixture(scope="module")
def members(tokenizer_dir):
    """Random encoder and decoder over the session tokenizer's 512 pieces; init_std 0.2 so that
    hidden states differ clearly between tokens and a wrong pooling shows."""
    config = small_config(vocab_size=512, init_std=0.2, local_attention=8)
    seed = zlib.crc32(b"test_sentence_transformers.members")
    return {objective: randomized_model(config, objective, seed + i)
            for i, objective in enumerate(("mlm", "clm"))}


def _random_texts(tokenizer, rng: np.random.Generator, count: int) -> list[str]:
    pieces = [tokenizer.id_to_token(i) for i in range(tokenizer.vocab_size)]
    pieces = [p.replace("\u2581", "") for p in pieces
              if p.strip("\u2581") and not p.startswith(("[", "<0x", "<"))]
    return [" ".join("".join(rng.choice(pieces, size=int(rng.integers(1, 3))))
                     for _ in range(int(rng.integers(1, 25)))) for _ in range(count)]


def _native_batch(tokenizer, texts: list[str], objective: str):
    rows = [with_special_tokens(tokenizer.encode(t), None, tokenizer.special_tokens,
                                objective=objective) for t in texts]
    width = max(len(r) for r in rows)
    assert width <= MAX_SEQ_LENGTH
    ids = np.full((len(rows), width), tokenizer.special_tokens.pad, np.int32)
    mask = np.zeros((len(rows), width), np.int32)
    for i, row in enumerate(rows):
        ids[i, :len(row)], mask[i, :len(row)] = row, 1
    return ids, mask


@nnx.jit(static_argnames=("pooling", "normalize"))
def _embed(model, ids, mask, *, pooling, normalize):
    return embed(model, ids, mask, pooling, normalize=normalize)


@pytest.mark.parametrize("objective,pooling,normalize", CASES,
                         ids=[f"{o}-{p}-{'norm' if n else 'raw'}" for o, p, n in CASES])
def test_sentence_transformer_encode_equals_embed(members, tokenizer_dir, tmp_path, rng,
                                                 objective, pooling, normalize):
    from sentence_transformers import SentenceTransformer

    model = members[objective]
    path = save_sentence_transformer(model, tmp_path / "st", pooling=pooling,
                                     normalize=normalize, tokenizer_dir=tokenizer_dir,
                                     max_seq_length=MAX_SEQ_LENGTH)
    st = SentenceTransformer(str(path), device="cpu", local_files_only=True)
    assert st.max_seq_length == MAX_SEQ_LENGTH
    tokenizer = load_tokenizer(tokenizer_dir)
    texts = _random_texts(tokenizer, rng, 7)
    ids, mask = _native_batch(tokenizer, texts, objective)
    assert len(set(mask.sum(1))) > 2  # rows of different lengths: padding is exercised

    theirs_ids = st.preprocess(texts)
    np.testing.assert_array_equal(theirs_ids["input_ids"].numpy(), ids)
    np.testing.assert_array_equal(theirs_ids["attention_mask"].numpy(), mask)

    theirs = st.encode(texts, batch_size=len(texts), convert_to_numpy=True)
    ours = np.asarray(_embed(model, ids, mask, pooling=pooling, normalize=normalize))
    assert ours.dtype == np.float32 and ours.shape == (len(texts), model.config.hidden_size)
    np.testing.assert_allclose(theirs, ours, rtol=1e-4, atol=1e-4)
    if normalize:
        np.testing.assert_allclose(np.linalg.norm(ours, axis=1), 1.0, rtol=1e-5)
    # A head-less model exports the same directory contents.
    again = save_sentence_transformer(without_lm_head(model), tmp_path / "again",
                                      pooling=pooling, normalize=normalize,
                                      tokenizer_dir=tokenizer_dir, max_seq_length=MAX_SEQ_LENGTH)
    assert (again / "model.safetensors").read_bytes() == (path / "model.safetensors").read_bytes()


@pytest.mark.parametrize("objective", ["mlm", "clm"])
def test_directory_is_the_base_model_and_sentence_transformers_files(members, tokenizer_dir,
                                                                     tmp_path, objective):
    from transformers import AutoModel

    pooling = "mean"
    path = save_sentence_transformer(members[objective], tmp_path / "st", pooling=pooling,
                                     normalize=True, tokenizer_dir=tokenizer_dir,
                                     max_seq_length=32)
    model, info = AutoModel.from_pretrained(str(path), output_loading_info=True,
                                            local_files_only=True)
    expected = {"mlm": "ModernBertModel", "clm": "ModernBertDecoderModel"}[objective]
    assert type(model).__name__ == expected
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    modules = json.loads((path / "modules.json").read_text())
    assert [m["path"] for m in modules] == ["", "1_Pooling", "2_Normalize"]
    pooling_config = json.loads((path / "1_Pooling" / "config.json").read_text())
    assert pooling_config["pooling_mode_mean_tokens"] is True
    assert sum(v is True for k, v in pooling_config.items() if k.startswith("pooling_mode")) == 1


def test_export_refuses_what_sentence_transformers_would_not_reproduce(members, tokenizer_dir,
                                                                       tmp_path):
    with pytest.raises(ValueError, match="'lasttoken' is not supported by the encoder"):
        save_sentence_transformer(members["mlm"], tmp_path / "a", pooling="lasttoken",
                                  normalize=False, tokenizer_dir=tokenizer_dir,
                                  max_seq_length=32)
    with pytest.raises(ValueError, match="max_seq_length"):
        save_sentence_transformer(members["clm"], tmp_path / "b", pooling="lasttoken",
                                  normalize=False, tokenizer_dir=tokenizer_dir,
                                  max_seq_length=0)
    with pytest.raises(FileNotFoundError, match="tokenizer_dir"):
        save_sentence_transformer(members["clm"], tmp_path / "c", pooling="lasttoken",
                                  normalize=False, tokenizer_dir=tmp_path / "nowhere",
                                  max_seq_length=32)
