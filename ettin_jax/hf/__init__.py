"""HuggingFace transformers interchange (ModernBertForMaskedLM / ModernBertDecoderForCausalLM)."""
