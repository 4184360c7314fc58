"""Helpers of the attention passes (``gqa``, ``sparse-attention``, ``kv-layout``).

``selection`` picks the layers a pass touches, ``calibration`` finds calibration text,
``merge`` holds the K/V head-merging math, ``trainable`` a differentiable forward of a
graph for healing, ``kv_memory`` the KV-cache memory model.
"""
