"""The architecture of the shared Ettin network, as one frozen dataclass.

Encoder and decoder are built from the same `ModelConfig`; only the objective ("mlm" or "clm")
differs, and it is passed when the model is built, not stored here (see `EttinModel`).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from ettin_jax.errors import did_you_mean

Objective = Literal["mlm", "clm"]
OBJECTIVES: tuple[str, ...] = ("mlm", "clm")


def check_member_choice(objective: str, value: str, choices: dict[str, tuple[str, ...]],
                        what: str) -> None:
    """Raises ValueError when `value` is not among `choices[objective]` (what each member
    supports, e.g. poolings), naming `what`, the value, the member and its choices."""
    if objective not in OBJECTIVES:
        raise ValueError(f"unknown objective {objective!r}; valid: {', '.join(OBJECTIVES)}")
    if value not in choices[objective]:
        member = "encoder" if objective == "mlm" else "decoder"
        raise ValueError(f"{what} {value!r} is not supported by the {member} "
                         f"(objective {objective!r}); supported: "
                         f"{', '.join(choices[objective])}")

AttentionImpl = Literal["xla", "pallas", "cudnn", "splash", "auto"]
DType = Literal["float32", "bfloat16", "float16"]
Precision = Literal["uniform", "autocast"]
PRECISIONS: tuple[str, ...] = ("uniform", "autocast")
# Fields that change how a model runs, not what its weights are: a checkpoint saved with one
# value resumes with another.
RUNTIME_MODEL_FIELDS: tuple[str, ...] = ("preset", "attention_impl", "dtype", "precision",
                                         "scan_layers")
# Fields a new training phase (or a weights-only start) may change on trained weights: the RoPE
# bases (context extension) and dropout.
PHASE_MODEL_FIELDS: tuple[str, ...] = ("global_rope_theta", "local_rope_theta",
                                       "attention_output_dropout")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of the ModernBERT/Ettin transformer shared by encoder and decoder.

    Defaults are the Ettin-150m architecture. `preset` names the preset this config started
    from (informational; recipes resolve it, see `ettin_jax.models.presets`).

    Fields:
      local_attention: the full local window, as ModernBERT counts it. The encoder's local
        layers see keys with |i - j| <= local_attention // 2; the decoder's see the
        local_attention // 2 most recent keys, itself included (HuggingFace semantics, see
        `ettin_jax.models.attention.local_window`).
      global_layers: explicit indices of global-attention layers; when None, layer i is
        global iff i % global_attn_every_n_layers == 0.
      global_rope_theta / local_rope_theta: RoPE base of global and local layers.
      attention_output_dropout: dropout after the attention output projection, the only
        dropout Ettin trains with; it is off whenever the model runs deterministically.
      dtype / param_dtype: compute and storage dtypes (bf16 compute with fp32 params is the
        training setting).
      precision: where `dtype` applies.
        "uniform": every op computes in `dtype`, the residual stream, LayerNorm outputs and
          logits included (the default).
        "autocast": PyTorch autocast as Ettin trained (Composer amp_bf16): the matmuls
          (Wqkv, Wo, Wi, head dense, attention) take `dtype` inputs and give `dtype` outputs,
          and GELU runs on them in `dtype`; the embedding output, every LayerNorm (computed
          and returned in float32), the residual stream and the vocabulary logits (`dtype`
          inputs, float32 accumulation and output, float32 bias) are float32.
        The two are the same network when dtype is float32.
      attention_impl: which implementation runs attention (`ettin_jax.models.attention`):
          "xla", "pallas", "splash", "cudnn", or "auto" (the kernel for the platform the step
          is lowered for: our Pallas kernels on TPU and GPU, XLA on CPU). The default stays
          "xla": "auto" computes the same on CPU but traces every platform's kernels (about
          5 s more per tiny model on this CPU), so the recipes opt in.
      scan_layers: run the repeating groups of layers (Ettin: local, local, global after
        layer 0) as one `jax.lax.scan` instead of unrolling every layer: the same parameters
        (still one per layer), dropout keys and operations, a 3x smaller program that traces
        faster and compiles 5-25% faster for TPU, but needs more temporary memory (the scan
        keeps every layer's backward residuals; +35-70% for ettin-150m on TPU) and compiles
        no faster on CPU; the forward pass is bit-identical, gradients can differ in the
        last bits (XLA fuses a loop body differently). Off by default for the memory; see
        docs/benchmarks.md "Compile time". Layer kinds that do not repeat run unrolled
        (`ettin_jax.models.transformer.layer_scan`).

    Raises ValueError from construction when the fields are inconsistent, naming the field.
    """

    preset: str | None = None
    vocab_size: int = 50368
    hidden_size: int = 768
    intermediate_size: int = 1152
    num_layers: int = 22
    num_heads: int = 12
    global_attn_every_n_layers: int = 3
    global_layers: tuple[int, ...] | None = None
    local_attention: int = 128
    global_rope_theta: float = 10_000.0
    local_rope_theta: float = 10_000.0
    norm_eps: float = 1e-5
    attention_output_dropout: float = 0.1
    init_std: float = 0.02
    dtype: DType = "float32"
    param_dtype: DType = "float32"
    precision: Precision = "uniform"
    attention_impl: AttentionImpl = "xla"
    scan_layers: bool = False

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(
                f"head_dim = hidden_size / num_heads = {self.head_dim} must be even for RoPE"
            )
        if self.global_attn_every_n_layers < 1:
            raise ValueError(
                f"global_attn_every_n_layers must be >= 1, got {self.global_attn_every_n_layers}"
            )
        if self.local_attention < 2 or self.local_attention % 2:
            raise ValueError(
                f"local_attention must be an even number >= 2 (the full window), "
                f"got {self.local_attention}"
            )
        if self.global_layers is not None:
            out_of_range = [i for i in self.global_layers if not 0 <= i < self.num_layers]
            if out_of_range:
                raise ValueError(
                    f"global_layers {list(self.global_layers)} has indices {out_of_range} outside "
                    f"0..{self.num_layers - 1} (num_layers = {self.num_layers})"
                )
            if len(set(self.global_layers)) != len(self.global_layers):
                raise ValueError(f"global_layers {list(self.global_layers)} repeats an index")
        for name in ("global_rope_theta", "local_rope_theta", "norm_eps", "init_std"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name)}")
        if self.precision not in PRECISIONS:
            raise ValueError(
                f"unknown precision {self.precision!r}."
                f"{did_you_mean(str(self.precision), PRECISIONS)} Valid: {', '.join(PRECISIONS)}"
            )
        if not 0.0 <= self.attention_output_dropout < 1.0:
            raise ValueError(
                f"attention_output_dropout must be in [0, 1), got {self.attention_output_dropout}"
            )

    @property
    def stream_dtype(self) -> str:
        """The dtype of the embedding output, the LayerNorm outputs and the residual stream:
        float32 under precision "autocast", `dtype` under "uniform"."""
        return "float32" if self.precision == "autocast" else self.dtype

    @property
    def head_dim(self) -> int:
        """Features per attention head (64 in every Ettin size)."""
        return self.hidden_size // self.num_heads

    def is_global_layer(self, layer: int) -> bool:
        """Whether `layer` uses global (full-sequence) attention rather than the local window."""
        if self.global_layers is not None:
            return layer in self.global_layers
        return layer % self.global_attn_every_n_layers == 0

    @property
    def layer_types(self) -> tuple[str, ...]:
        """Per-layer "global" / "local", in layer order."""
        return tuple(
            "global" if self.is_global_layer(i) else "local" for i in range(self.num_layers)
        )


def model_differences(have: ModelConfig, want: ModelConfig, *,
                      ignore: tuple[str, ...] = RUNTIME_MODEL_FIELDS) -> list[str]:
    """"field have (want: value)" for every field but `ignore` where the configs differ:
    empty when weights of `have` can be used as `want`."""
    return [f"{f.name} {getattr(have, f.name)!r} (want {getattr(want, f.name)!r})"
            for f in dataclasses.fields(ModelConfig)
            if f.name not in ignore and getattr(have, f.name) != getattr(want, f.name)]
