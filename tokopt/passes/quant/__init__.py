"""The ``quantize`` pass's work, one module per concern.

``weights`` (RTN/GPTQ onto :class:`~tokopt.optimizer.ir.weights.QuantizedWeight`), ``activations``
(``act_quant`` on the quantized Linears) and ``kv`` (the cache format) are what the pass page
(:mod:`tokopt.passes.quantize`) composes.  Beneath them: ``rtn`` is the definition (round to nearest
on a group grid) every other method must produce codes for; ``gptq`` chooses those codes with
second-order error feedback from calibration activations; ``calibration`` runs the model block by
block to collect the statistics GPTQ needs without holding every layer's activations at once.
"""
