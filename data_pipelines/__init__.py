"""Grain pipelines from raw text, TFDS or prepared shards to packed MLM and CLM batches."""
