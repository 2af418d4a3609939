import numpy as np
import onnx_ir as ir

from graphq.passes.keep_float import keep_float_violations, kept_nodes, residual_adds, rms_norm_nodes


def test_policy_finds_softmax_norms_and_residuals(tiny_llama_onnx):
    model = ir.load(tiny_llama_onnx)
    kept = kept_nodes(model)
    graph = model.graph
    softmaxes = [n for n in graph if n.op_type == "Softmax"]
    assert len(softmaxes) == 2 and set(softmaxes) <= kept
    norms = rms_norm_nodes(graph)
    # 2 layers x 2 norms + the final norm, each Pow, ReduceMean, Add, Sqrt, Div, Mul, Cast, Mul(gamma).
    assert sum(1 for n in norms if n.op_type == "ReduceMean") == 5
    assert sum(1 for n in norms if n.op_type == "Pow") == 5
    assert all("layernorm" in n.name or "/norm/" in n.name for n in norms)
    residuals = residual_adds(graph)
    assert len(residuals) == 4 and all(n.name.endswith(("/Add", "/Add_1")) for n in residuals)
    assert not any(n.op_type == "MatMul" for n in kept)


def test_violation_is_reported_when_a_kept_op_reads_dequantized_data():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    scale = ir.Value(name="s", const_value=ir.tensor(np.array(0.1, dtype=np.float32)))
    q = ir.node("QuantizeLinear", [x, scale], name="q")
    dq = ir.node("DequantizeLinear", [q.outputs[0], scale], name="dq")
    softmax = ir.node("Softmax", [dq.outputs[0]], name="softmax")
    relu = ir.node("Relu", [x], name="relu")
    violations = keep_float_violations([softmax, relu])
    assert len(violations) == 1 and "softmax" in violations[0] and "DequantizeLinear" in violations[0]
    assert keep_float_violations([relu]) == []
