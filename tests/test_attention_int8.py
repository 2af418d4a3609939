import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_model
from graphq.errors import GraphqError
from graphq.modelio import load_model
from graphq.numerics.kv_cache import fake_quantize_int8
from graphq.passes.attention_int8 import AttentionInt8Pass, find_attention

RNG = np.random.default_rng(0)
Q, K, V = (RNG.normal(size=(1, 2, 6, 8)).astype(np.float32) for _ in range(3))
MASK = np.triu(np.full((6, 6), -1e4, dtype=np.float32), 1)


def _attention_model() -> ir.Model:
    """softmax(Q K^T * c + mask) V, the shape of optimum's unfused attention."""
    def value(name, shape):
        return ir.Value(name=name, type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(shape))

    q, k, v = value("q", [1, 2, 6, 8]), value("k", [1, 2, 6, 8]), value("v", [1, 2, 6, 8])
    scale = ir.Value(name="c", const_value=ir.tensor(np.array(8 ** -0.5, dtype=np.float32)))
    mask = ir.Value(name="mask", const_value=ir.tensor(MASK))
    kt = ir.node("Transpose", [k], attributes={"perm": [0, 1, 3, 2]}, name="kt")
    scores = ir.node("MatMul", [q, kt.outputs[0]], name="qk")
    scaled = ir.node("Mul", [scores.outputs[0], scale], name="scale")
    masked = ir.node("Add", [scaled.outputs[0], mask], name="mask_add")
    probs = ir.node("Softmax", [masked.outputs[0]], attributes={"axis": -1}, name="softmax")
    out = ir.node("MatMul", [probs.outputs[0], v], name="pv")
    nodes = [kt, scores, scaled, masked, probs, out]
    for node in nodes:
        node.outputs[0].name = node.name + "_out"
    out.outputs[0].dtype, out.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([1, 2, 6, 8])
    graph = ir.Graph([q, k, v], [out.outputs[0]], nodes=nodes, initializers=[scale, mask], opset_imports={"": 18}, name="attn")
    return ir.Model(graph, ir_version=10)


def _reference() -> np.ndarray:
    kt = np.swapaxes(K, -1, -2)
    scores = fake_quantize_int8(Q, -1) @ fake_quantize_int8(kt, -2) * np.float32(8 ** -0.5) + MASK
    probs = np.exp(scores - scores.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    return fake_quantize_int8(probs, -1) @ fake_quantize_int8(V, -2)


def test_structure_and_numerics(tmp_path):
    model = _attention_model()
    (float_out,) = run_model(model, {"q": Q, "k": K, "v": V}, tmp_path)
    result = AttentionInt8Pass()(model)
    assert result.modified
    nodes = {n.name: n for n in model.graph}
    for name in ("qk", "pv"):
        assert all(v.producer().op_type == "Mul" and v.producer().name.endswith("/dequantize") for v in nodes[name].inputs)
    assert nodes["softmax"].inputs[0].producer().name == "mask_add"  # Softmax reads float scores
    assert sum(n.op_type == "Cast" and n.attributes["to"].value == ir.DataType.INT8 for n in model.graph) == 4
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)
    (actual,) = run_model(model, {"q": Q, "k": K, "v": V}, tmp_path)
    np.testing.assert_allclose(actual, _reference(), rtol=1e-5, atol=1e-6)
    assert np.abs(actual - float_out).max() < 0.02 * np.abs(float_out).max()  # error budget vs float


def test_optimum_graph_has_one_pattern_per_layer(tiny_llama_past_onnx, tmp_path):
    model = load_model(tiny_llama_past_onnx)
    found = find_attention(model)
    assert len(found) == 2 and all(qk.name.endswith("self_attn/MatMul") and pv.name.endswith("self_attn/MatMul_1")
                                   for qk, _, pv in found)


def test_graphs_without_attention_are_refused_unchanged():
    plain = ir.Model(ir.Graph([], [], nodes=[], opset_imports={"": 18}, name="empty"), ir_version=10)
    with pytest.raises(GraphqError, match="no attention pattern"):
        AttentionInt8Pass()(plain)
    gqa = ir.node("GroupQueryAttention", [], domain="com.microsoft", name="gqa", num_outputs=3)
    fused = ir.Model(ir.Graph([], [], nodes=[gqa], opset_imports={"": 18, "com.microsoft": 1}, name="f"), ir_version=10)
    before = ir.serde.serialize_model(fused).SerializeToString()
    with pytest.raises(GraphqError, match="fused into GroupQueryAttention"):
        AttentionInt8Pass()(fused)
    assert ir.serde.serialize_model(fused).SerializeToString() == before
