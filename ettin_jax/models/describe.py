"""Parameter counts and training FLOPs of encoder and decoder, without allocating weights."""

from __future__ import annotations

from typing import Any

import numpy as np
from flax import nnx

from ettin_jax.models.attention import local_window
from ettin_jax.models.config import ModelConfig, Objective
from ettin_jax.models.transformer import EttinModel, ParamPath, named_params

# Parameters that are not "non-embedding": the token embedding (tied with the vocab
# projection) and the prediction head. This matches the reference table's counts.
_EMBEDDING_AND_HEAD = ("embeddings.tok_embeddings", "head.", "decoder_bias")


def parameter_shapes(config: ModelConfig, objective: Objective) -> dict[ParamPath, tuple[int, ...]]:
    """Parameter path -> shape, from `nnx.eval_shape` (no weights are allocated)."""
    abstract = nnx.eval_shape(lambda: EttinModel(config, objective, rngs=nnx.Rngs(0)))
    return {path: tuple(value.shape) for path, value in named_params(abstract).items()}


def mean_visible_keys(seq_len: int, *, causal: bool, window: tuple[int, int] | None) -> float:
    """Average number of keys a query attends to in a full row of `seq_len` tokens."""
    i = np.arange(seq_len)
    left = i if window is None else np.minimum(i, window[0])
    right = 0 if causal else (seq_len - 1 - i if window is None else np.minimum(seq_len - 1 - i, window[1]))
    return float(np.mean(left + right + 1))


def training_flops_per_token(
    config: ModelConfig, objective: Objective, *, seq_len: int, mlm_mask_ratio: float
) -> dict[str, float]:
    """Training FLOPs per token (forward + backward = 3x forward), split by where they go.

    matmul: the blocks' projections (2 FLOPs per weight per token); attention: scores and
    weighted values over the keys each query really sees (causal and window aware); head:
    dense + vocab projection, on masked tokens only for MLM (sparse prediction), on every
    token for CLM. The embedding lookup is free.
    """
    h, i = config.hidden_size, config.intermediate_size
    causal = objective == "clm"
    matmul = attention = 0.0
    for layer in range(config.num_layers):
        matmul += 2 * (4 * h * h + 3 * h * i)  # Wqkv + Wo, Wi (2I) + Wo (I)
        window = None if config.is_global_layer(layer) else local_window(
            config.local_attention, causal=causal
        )
        attention += 4 * h * mean_visible_keys(seq_len, causal=causal, window=window)
    predicted = mlm_mask_ratio if objective == "mlm" else 1.0
    head = predicted * 2 * (h * h + h * config.vocab_size)
    forward = {"matmul": matmul, "attention": attention, "head": head}
    breakdown = {name: 3 * value for name, value in forward.items()}
    breakdown["total"] = sum(breakdown.values())
    return breakdown


def describe_member(
    config: ModelConfig, objective: Objective, *, seq_len: int, mlm_mask_ratio: float
) -> dict[str, Any]:
    """Parameter counts and training FLOPs per token of one member of the pair."""
    shapes = parameter_shapes(config, objective)
    sizes = {".".join(map(str, path)): int(np.prod(shape)) for path, shape in shapes.items()}
    embedding_and_head = sum(
        n for name, n in sizes.items() if name.startswith(_EMBEDDING_AND_HEAD)
    )
    flops = training_flops_per_token(
        config, objective, seq_len=seq_len, mlm_mask_ratio=mlm_mask_ratio
    )
    return {
        "objective": objective,
        "params": sum(sizes.values()),
        "non_embedding_params": sum(sizes.values()) - embedding_and_head,
        "train_flops_per_token": flops["total"],
        "train_flops_breakdown": {k: v for k, v in flops.items() if k != "total"},
    }


def describe_pair(config: ModelConfig, *, seq_len: int, mlm_mask_ratio: float) -> dict[str, Any]:
    """The architecture and, for "encoder" (mlm) and "decoder" (clm), `describe_member`."""
    return {
        "model": {
            "preset": config.preset,
            "layers": config.num_layers,
            "hidden": config.hidden_size,
            "intermediate": config.intermediate_size,
            "heads": config.num_heads,
            "head_dim": config.head_dim,
            "vocab": config.vocab_size,
            "layer_types": list(config.layer_types),
            "local_attention": config.local_attention,
        },
        "seq_len": seq_len,
        "mlm_mask_ratio": mlm_mask_ratio,
        "encoder": describe_member(config, "mlm", seq_len=seq_len, mlm_mask_ratio=mlm_mask_ratio),
        "decoder": describe_member(config, "clm", seq_len=seq_len, mlm_mask_ratio=mlm_mask_ratio),
    }


def format_description(report: dict[str, Any]) -> str:
    """Human-readable table of `describe_pair`'s report."""
    model = report["model"]
    lines = [
        f"model {model['preset'] or '(custom)'}: {model['layers']} layers, hidden "
        f"{model['hidden']}, intermediate {model['intermediate']}, {model['heads']} heads x "
        f"{model['head_dim']}, vocab {model['vocab']}",
        f"layers: {''.join('G' if t == 'global' else 'l' for t in model['layer_types'])} "
        f"(G global, l local window {model['local_attention']})",
        f"per token at seq_len {report['seq_len']}, MLM mask ratio {report['mlm_mask_ratio']}:",
        f"{'member':<14}{'params':>16}{'non-embedding':>16}{'train FLOPs/token':>20}",
    ]
    for member in ("encoder", "decoder"):
        m = report[member]
        lines.append(
            f"{member + ' (' + m['objective'] + ')':<14}{m['params']:>16,}"
            f"{m['non_embedding_params']:>16,}{m['train_flops_per_token']:>20.4g}"
        )
    return "\n".join(lines)
