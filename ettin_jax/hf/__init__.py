"""HuggingFace interchange: transformers' ModernBERT directories to and from native models.

    from ettin_jax import hf
    model = hf.from_pretrained("path/to/ettin-encoder-150m")   # logits = model(ids, mask)
    hf.save_pretrained(model, "out/")                           # loads in transformers
"""

from ettin_jax.hf.pretrained import ExportReport, PretrainedModel, from_pretrained, save_pretrained

__all__ = ["ExportReport", "PretrainedModel", "from_pretrained", "save_pretrained"]
