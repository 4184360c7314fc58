"""``act_quant`` (run-time int8 activations): its definition against onnxruntime's MatMulNBits
accuracy level 4, the standard-op lowering, the quantize pass option and the verifier."""

from __future__ import annotations

import pytest
import torch

import tokopt
from tokopt.errors import PassOptionError, VerificationError
from tokopt.optimizer.interpret import ReferenceExecutor
from tokopt.optimizer.interpret.activations import quantize_activations
from tokopt.optimizer.ir.attrs import act_quant_attr
from tokopt.optimizer.ir.verify import verify
from tokopt.optimizer.ir.weights import QuantizedWeight, materialize
from tokopt.optimizer.pass_api import PassContext
from tokopt.passes.quant.rtn import quantize_rtn
from tokopt.passes.quantize import QuantizePass


def _matmulnbits(w, x: torch.Tensor, accuracy_level: int) -> torch.Tensor:
    """One MatMulNBits node run by onnxruntime on ``x``."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from tokopt.backends.onnxruntime.ops.nbits import file_tensors

    n, k = w.shape
    b, scales, zeros = file_tensors(w)
    inits = [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "S")]
    if zeros is not None:
        inits.append(numpy_helper.from_array(zeros, "Z"))
    node = helper.make_node("MatMulNBits", ["x", "B", "S"] + (["Z"] if zeros is not None else []), ["y"],
                            domain="com.microsoft", K=k, N=n, bits=w.bits, block_size=w.group_size,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, n])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(
        "com.microsoft", 1)], ir_version=10)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"x": x.numpy()})[0])


@pytest.mark.parametrize("bits, symmetric", [(4, True), (4, False), (8, True)])
@pytest.mark.parametrize("group", [16, 32, 128])
@pytest.mark.parametrize("rows", [1, 5])
def test_definition_is_matmulnbits_accuracy_level_4(bits, symmetric, group, rows):
    """The reference's int8 activations reproduce onnxruntime's to float rounding; fp32 activations do not.

    One row takes onnxruntime's separate single-row kernels; symmetric grids reach the lowest
    code (−8 at 4 bits), which those kernels must read as such.
    """
    pytest.importorskip("onnxruntime")
    gen = torch.Generator().manual_seed(group + bits)
    w = quantize_rtn(torch.randn(96, 512, generator=gen) * 0.05, bits, group, symmetric, "float32")
    assert bool((w.codes() == 0).any())
    x = torch.randn(rows, 512, generator=gen) * torch.rand(1, 512, generator=gen) * 3
    got = _matmulnbits(w, x, accuracy_level=4)
    dense = materialize(w, torch.float32)
    modelled = quantize_activations(x, 8, group) @ dense.T
    assert (got - modelled).abs().max() <= 2e-5 * got.abs().max()
    assert (got - x @ dense.T).abs().max() > 100 * (got - modelled).abs().max()  # the effect is real


def test_quantize_activations_properties():
    x = torch.tensor([[0.0, 0.0, 1.0, -2.0], [0.5, -0.25, 0.125, 127.0]])
    y = quantize_activations(x, 8, 2)
    assert torch.equal(y[0, :2], torch.zeros(2))  # an all-zero block stays zero (no division by zero)
    assert y[0, 3] == -2.0 and y[1, 3] == 127.0  # each block's peak is exact
    assert y[1, 2] == 0.0  # 0.125 is below half a step (127/127/2) of its block
    assert torch.allclose(quantize_activations(y, 8, 2), y)  # idempotent


@pytest.fixture(scope="module")
def llama(tiny_model_dir):
    return tokopt.load(str(tiny_model_dir("llama")[0]))


def test_quantize_pass_marks_quantized_linears(llama):
    graph = QuantizePass(bits=4, group_size=16, method="rtn", act_bits=8, lm_head=False).run(
        llama, PassContext()).graph
    marked = {n.name: n.attrs["act_quant"] for n in graph.nodes("Linear")}
    assert marked["lm_head"] is None  # not quantized, not marked
    assert {repr(v) for k, v in marked.items() if k != "lm_head"} == {repr(act_quant_attr(8, 16))}
    ids = torch.randint(0, llama.meta.vocab_size, (1, 24), generator=torch.Generator().manual_seed(0))
    plain = graph.copy()  # the same weights (run-time int8 activations keep the mirrored grid), attribute off
    for node in plain.nodes("Linear"):
        node.attrs["act_quant"] = None
    diff = (ReferenceExecutor(graph).forward(ids) - ReferenceExecutor(plain).forward(ids)).abs().max()
    assert 0 < diff < 0.5  # the reference honours the attribute: a small, nonzero change


@pytest.mark.parametrize("backend, opts, expected", [
    ("onnxruntime", {"bits": 8}, (32, 8)),  # 64 does not divide the tiny model's 96-wide MLP input; 32 does
    ("onnxruntime", {"bits": 8, "group_size": -1}, (-1, None)),  # per channel: no int8-activation kernel
    ("onnxruntime", {"bits": 8, "act_bits": 0}, (-1, None)),
    ("onnxruntime", {"bits": 8, "group_size": 16}, (16, 8)),
    ("onnxruntime", {"bits": 4}, (32, 8)),
    ("onnxruntime", {"bits": 4, "act_bits": 0}, (32, None)),
    (None, {"bits": 8}, (-1, None)),
    (None, {"bits": 8, "act_bits": 8}, (32, 8)),  # asked for: blocks, hence groups, on any target
    ("torch-compile", {"bits": 8}, (-1, None)),  # its int8 kernel is per channel, bfloat16 inputs
])
def test_unset_formats_take_the_targets_fast_path(llama, backend, opts, expected):
    f = QuantizePass(**opts).formats(llama, PassContext(backend=backend))
    assert (f.group_size, f.act_bits) == expected


def test_int8_keeps_channels_and_float_inputs_where_no_group_divides_the_widths(tmp_path):
    import transformers as tf

    config = tf.LlamaConfig(vocab_size=128, hidden_size=40, intermediate_size=72, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2)
    tf.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "m")
    graph = tokopt.load(str(tmp_path / "m"))
    f = QuantizePass(bits=8).formats(graph, PassContext(backend="onnxruntime"))
    assert (f.group_size, f.act_bits) == (-1, None)


def test_int8_default_on_onnxruntime_is_the_int8_kernel_and_says_so(llama, tmp_path):
    """``quantize:bits=8 --backend onnxruntime`` runs MatMulNBits' int8 kernel (8-bit codes, int8 inputs), not
    float-accuracy nibble planes; the note names what was chosen and how to undo it."""
    pytest.importorskip("onnxruntime")
    import onnx

    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

    result = QuantizePass(bits=8, method="rtn").run(llama, PassContext(backend="onnxruntime"))
    assert any("act_bits=8 chosen" in n and "groups of 32" in n for n in result.notes)
    artifact = OnnxRuntimeBackend().lower(result.graph, tmp_path / "out", parity_tokens=torch.randint(
        0, llama.meta.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert artifact.extra["parity"]["top1_agreement"] == 1.0
    model = onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    attrs = [{a.name: a.i for a in n.attribute} for n in nbits]
    assert nbits and all((a["bits"], a["block_size"], a["accuracy_level"]) == (8, 32, 4) for a in attrs)
    assert not [t.name for t in model.graph.initializer if t.name.endswith((".q8hi", ".q8lo"))]


def test_act_bits_needs_weights():
    with pytest.raises(PassOptionError, match="act_bits"):
        QuantizePass(weights=False, kv_bits=8, act_bits=8).validate()


def test_verifier_rejects_a_block_that_does_not_divide(llama):
    graph = llama.copy()
    graph.node("lm_head").attrs["act_quant"] = act_quant_attr(8, 7)
    with pytest.raises(VerificationError, match="does not divide"):
        verify(graph, "test")


def test_standard_op_lowering_on_dense_weights(llama, tmp_path):
    """act_quant on a weight MatMulNBits cannot run (dense here) lowers to ReduceMax/Round ops.

    The decomposition is bit-exact on its own; through a whole model, float-level differences upstream
    can flip a rounding, so the parity bar is the quantized one (top-1) plus a loose logit bound."""
    pytest.importorskip("onnxruntime")
    from tokopt.backends.onnxruntime.backend import OnnxRuntimeBackend

    graph = llama.copy()
    for node in graph.nodes("Linear"):
        node.attrs["act_quant"] = act_quant_attr(8, 16)
    artifact = OnnxRuntimeBackend().lower(graph, tmp_path / "out", parity_tokens=torch.randint(
        0, graph.meta.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0)))
    assert artifact.extra["parity"]["top1_agreement"] == 1.0
    assert artifact.extra["parity"]["max_abs_diff"] <= 0.05
    import onnx

    ops = [n.op_type for n in onnx.load(str(tmp_path / "out" / "model.onnx"), load_external_data=False).graph.node]
    fused = 3 * len(graph.nodes("Attention"))  # per layer, fused q/k/v and fused gate/up quantize their input once
    assert ops.count("Round") == len(graph.nodes("Linear")) - fused


def test_run_time_int8_activations_keep_the_mirrored_grid(llama):
    """Whole-range codes (−8) reach only weights whose Linears take float inputs (see tokopt.passes.quant.rtn)."""
    def lowest_code_used(**opts) -> bool:
        g = QuantizePass(bits=4, group_size=16, method="rtn", **opts).run(llama, PassContext()).graph
        return any(bool((w.codes() == 0).any()) for w in g.params.values() if isinstance(w, QuantizedWeight))

    assert lowest_code_used(act_bits=0) and not lowest_code_used(act_bits=8)
