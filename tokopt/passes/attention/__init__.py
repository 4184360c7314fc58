"""Helpers of the attention passes (``gqa``, ``sparse-attention``, ``kv-layout``).

``selection`` picks the layers a pass touches, ``merge`` holds the K/V head-merging math,
``refine`` the block-local refinement, ``block`` one attention block on the interpreter's
kernels, ``trainable`` a differentiable forward of a graph for healing.  The KV-cache memory
model is the IR's (:mod:`tokopt.optimizer.ir.kv_memory`).
"""
