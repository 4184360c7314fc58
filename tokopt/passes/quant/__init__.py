"""Numerics behind the ``quantize`` pass, one module per algorithm.

``rtn`` is the definition (round to nearest on a group grid) every other method must
produce codes for; ``gptq`` chooses those codes with second-order error feedback from
calibration activations; ``calibration`` runs the model block by block to collect the
statistics GPTQ needs without holding every layer's activations at once.
"""
