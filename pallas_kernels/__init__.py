"""Pallas kernels for Ettin training: flash attention and masked-token packing.

The kernels issue fills this package; the model selects it with `attention_impl="pallas"`.
"""
