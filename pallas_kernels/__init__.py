"""Pallas kernels for Ettin training, for TPU (Mosaic) and GPU (Triton), run on CPU in interpret
mode: flash attention for global, sliding-window and packed attention, and masked-token packing
for the MLM head. The model selects them with `attention_impl="pallas"` and its sparse head."""

from pallas_kernels.flash_attention import flash_attention, reference_attention
from pallas_kernels.masked_packing import (
    PackedTokens,
    capacity_for,
    overflow,
    pack_masked_tokens,
    unpack_masked_tokens,
)

__all__ = ["PackedTokens", "capacity_for", "flash_attention", "overflow", "pack_masked_tokens",
           "reference_attention", "unpack_masked_tokens"]
