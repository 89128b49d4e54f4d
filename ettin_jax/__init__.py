"""ettin-jax: train paired masked-LM encoders and causal-LM decoders (Ettin/ModernBERT) in JAX."""

__version__ = "0.1.0"
