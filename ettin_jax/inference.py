"""Using a trained pair: fill in [MASK] tokens with the encoder, continue a prompt with the
decoder.

    fill_mask(encoder, tokenizer, "The capital of France is [MASK].", top_k=5)
    generate(decoder, tokenizer, "Once upon a time", max_new_tokens=50, temperature=0.8,
             top_p=0.95).text

Text is presented as training presents documents and as exported tokenizers present it in
transformers (`data_pipelines.special_tokens.with_special_tokens`): [CLS] first, and for the
encoder [SEP] last; positions start at 0 at [CLS]. Generation runs the KV cache of
`ettin_jax.models.decoding`: one prefill of the prompt, then one compiled step per token.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from data_pipelines.special_tokens import with_special_tokens
from data_pipelines.tokenizers import SPECIAL_TOKEN_TEXT, Tokenizer, load_tokenizer
from ettin_jax.errors import CheckpointError
from ettin_jax.models.decoding import decode_step, init_cache, prefill
from ettin_jax.models.transformer import EttinModel

MASK_TEXT = SPECIAL_TOKEN_TEXT["mask"]


@dataclasses.dataclass(frozen=True)
class GenerationResult:
    """What `generate` produced.

    text: the decoded continuation (special tokens dropped). token_ids: the continuation's ids,
    ending with EOS when generation stopped there. prompt_ids: the ids the decoder was given,
    [CLS] first. finish_reason: "eos" (EOS generated, stop_at_eos) or "length"
    (max_new_tokens reached).
    """

    text: str
    token_ids: tuple[int, ...]
    prompt_ids: tuple[int, ...]
    finish_reason: Literal["eos", "length"]


def fill_mask(
    model: EttinModel, tokenizer: Tokenizer, text: str, *, top_k: int = 5
) -> list[list[tuple[str, int, float]]]:
    """The encoder's top_k predictions for every [MASK] in `text`, in order of appearance.

    The text is encoded with `tokenizer` (its literal "[MASK]" becomes the tokenizer's mask id)
    and bracketed [CLS] ... [SEP]. Returns one list per mask of (token string, id, probability)
    sorted by decreasing probability; probabilities are the softmax over the whole vocabulary.
    Raises ValueError when the model is not an encoder (objective "mlm"), the tokenizer has
    no mask token, the text holds none, or top_k < 1.
    """
    if model.objective != "mlm":
        raise ValueError(f"fill_mask needs an encoder (objective 'mlm'); this model's objective "
                         f"is {model.objective!r}")
    _check_top_k(top_k)
    special = tokenizer.special_tokens
    if special.mask is None:
        raise ValueError("the tokenizer has no mask token")
    ids = with_special_tokens(tokenizer.encode(text), None, special, objective="mlm")
    positions = np.flatnonzero(ids == special.mask)
    if positions.size == 0:
        raise ValueError(f"the text holds no mask token {MASK_TEXT!r}: {text!r}")
    model.check_inputs(jnp.asarray(ids[None]), None, None)
    probs, top_ids = _masked_top_k(model, jnp.asarray(ids[None]), jnp.asarray(positions),
                                   min(top_k, model.config.vocab_size))
    return [
        [(tokenizer.id_to_token(int(i)), int(i), float(p)) for i, p in zip(row_ids, row_probs)]
        for row_ids, row_probs in zip(np.asarray(top_ids), np.asarray(probs))
    ]


@functools.partial(nnx.jit, static_argnums=3)
def _masked_top_k(model: EttinModel, ids: jax.Array, positions: jax.Array, k: int):
    hidden = model(ids)[0, positions]
    probs = jax.nn.softmax(model.logits(hidden).astype(jnp.float32), axis=-1)
    return jax.lax.top_k(probs, k)


def generate(
    model: EttinModel,
    tokenizer: Tokenizer,
    prompt: str,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int = 0,
    stop_at_eos: bool = True,
) -> GenerationResult:
    """Continues `prompt` with the decoder, one token at a time, with a KV cache.

    The prompt is encoded as [CLS] + tokenizer.encode(prompt). temperature 0 is greedy
    (argmax; top_k and top_p change nothing then); otherwise each token is drawn from
    softmax(filter_logits(logits / temperature, top_k, top_p)) with a key derived from `seed`
    and the step: the same arguments give the same tokens. Generation ends after
    max_new_tokens tokens, or at the first EOS ([SEP], kept in token_ids) when stop_at_eos.
    Raises ValueError for an encoder model, max_new_tokens < 1, temperature < 0 (or not
    finite), top_k < 1, or top_p outside (0, 1].
    """
    if model.objective != "clm":
        raise ValueError(f"generate needs a decoder (objective 'clm'); this model's objective "
                         f"is {model.objective!r}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    _check_sampling(temperature, top_k, top_p)
    special = tokenizer.special_tokens
    prompt_ids = with_special_tokens(tokenizer.encode(prompt), None, special, objective="clm")
    # The last new token is returned, never fed back: the cache needs one slot less.
    cache = init_cache(model, 1, len(prompt_ids) + max_new_tokens - 1)
    logits, cache = prefill(model, jnp.asarray(prompt_ids[None]), cache)
    key = jax.random.key(seed)
    new_ids: list[int] = []
    finish: Literal["eos", "length"] = "length"
    for step in range(max_new_tokens):
        token = sample_next(logits, jax.random.fold_in(key, step), temperature=temperature,
                            top_k=top_k, top_p=top_p)
        new_ids.append(int(token[0]))
        if stop_at_eos and new_ids[-1] == special.eos:
            finish = "eos"
            break
        if step + 1 < max_new_tokens:
            logits, cache = decode_step(model, token, cache)
    return GenerationResult(tokenizer.decode(new_ids), tuple(new_ids),
                            tuple(int(i) for i in prompt_ids), finish)


def sample_next(
    logits: jax.Array,
    key: jax.Array,
    *,
    temperature: float,
    top_k: int | None = None,
    top_p: float | None = None,
) -> jax.Array:
    """The next token of each row of logits [B, V]: int32 [B].

    temperature 0: argmax. Otherwise a draw (with `key`) from
    softmax(filter_logits(logits / temperature, top_k, top_p)). Raises ValueError for the
    argument values `generate` refuses.
    """
    _check_sampling(temperature, top_k, top_p)
    return _sample_next(jnp.asarray(logits), key, temperature, top_k, top_p)


@functools.partial(jax.jit, static_argnums=(2, 3, 4))
def _sample_next(logits, key, temperature, top_k, top_p):
    if temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    filtered = filter_logits(logits.astype(jnp.float32) / temperature, top_k, top_p)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32)


def filter_logits(
    logits: jax.Array, top_k: int | None = None, top_p: float | None = None
) -> jax.Array:
    """logits [..., V] (float32) with the tokens outside the sampling set at -inf.

    top_k: keep the top_k largest logits of each row (all of them when top_k >= V; ties with
    the k-th value are kept too). top_p (nucleus), applied after top_k: keep the smallest set of
    most probable tokens, under softmax of the remaining logits, whose total probability
    reaches top_p; the most probable token is always kept. None (or top_p = 1) disables a
    filter. Raises ValueError for top_k < 1 or top_p outside (0, 1].
    """
    _check_sampling(0.0, top_k, top_p)
    logits = jnp.asarray(logits, jnp.float32)
    if top_k is not None and top_k < logits.shape[-1]:
        kth_largest = jax.lax.top_k(logits, top_k)[0][..., -1:]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None and top_p < 1.0:
        descending = -jnp.sort(-logits, axis=-1)
        probs = jax.nn.softmax(descending, axis=-1)
        mass_before = jnp.cumsum(probs, axis=-1) - probs
        # Keep a token while the more probable ones have not yet reached top_p.
        cutoff = jnp.min(jnp.where(mass_before < top_p, descending, jnp.inf), axis=-1,
                         keepdims=True)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return logits


def _check_top_k(top_k: int | None) -> None:
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")


def _check_sampling(temperature: float, top_k: int | None, top_p: float | None) -> None:
    if not (math.isfinite(temperature) and temperature >= 0):
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), "
                         f"got {temperature}")
    _check_top_k(top_k)
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


def load_model(path: str | Path, member: Literal["encoder", "decoder"]
               ) -> tuple[EttinModel, Tokenizer]:
    """The `member` model and its tokenizer from `path`: a run directory (its RUN_DIR/<member>),
    a member or checkpoint step directory (latest complete step), or a HuggingFace directory
    written by `ettin-jax export`.

    Raises CheckpointError when `path` holds no such model, holds the other member, or has no
    tokenizer.
    """
    from ettin_jax.hf.pretrained import CONFIG_FILE, from_pretrained
    from ettin_jax.training.checkpoint import MEMBERS, find_members, restore_weights

    path = Path(path)
    if (path / CONFIG_FILE).is_file():
        loaded = from_pretrained(path)
        model, tokenizer_dir = loaded.model, loaded.tokenizer_dir
    else:
        found = find_members(path)
        if member not in found and "" not in found:
            raise CheckpointError(f"{path}: no {member} here (found {', '.join(found)})")
        restored = restore_weights(found.get(member, found.get("")))
        model, tokenizer_dir = restored.model, restored.tokenizer_dir
    if model.objective != MEMBERS[member]:
        raise CheckpointError(f"{path} holds a {model.objective} model, not the {member} "
                              f"({MEMBERS[member]})")
    if tokenizer_dir is None:
        raise CheckpointError(f"{path}: no tokenizer saved with this model")
    return model, load_tokenizer(tokenizer_dir)
