import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_model
from graphq.errors import GraphqError
from graphq.numerics.quantize import fake_quantize, per_column_weight_quantization, symmetric_scale
from graphq.passes.qdq_insert import QdqConfig, QdqInsertionPass
from graphq.quantize import ort_kernel_counts

RNG = np.random.default_rng(0)
W = (RNG.normal(size=(16, 8)) * 0.2).astype(np.float32)
X = RNG.normal(size=(2, 5, 16)).astype(np.float32)
X[0, 3, 2] = 9.0  # one outlier token


def _matmul_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, 16]))
    w = ir.Value(name="w", const_value=ir.tensor(W))
    matmul = ir.node("MatMul", [x, w], name="proj")
    softmax = ir.node("Softmax", [matmul.outputs[0]], attributes={"axis": -1}, name="softmax")
    matmul.outputs[0].name, softmax.outputs[0].name = "h", "y"
    softmax.outputs[0].dtype, softmax.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2, 5, 8])
    graph = ir.Graph([x], [softmax.outputs[0]], nodes=[matmul, softmax], initializers=[w], opset_imports={"": 18}, name="mm")
    return ir.Model(graph, ir_version=10)


def _reference_static() -> np.ndarray:
    wq, ws = per_column_weight_quantization(W)
    x_hat = fake_quantize(X, symmetric_scale(np.abs(X).max()))
    return x_hat @ (wq.astype(np.float32) * ws)


def _reference_per_token() -> np.ndarray:
    wq, ws = per_column_weight_quantization(W)
    token_scale = symmetric_scale(np.abs(X).max(axis=-1, keepdims=True))
    return fake_quantize(X, token_scale) @ (wq.astype(np.float32) * ws)


def _softmax(h):
    e = np.exp(h - h.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize("target", ["cpu", "tensorrt"])
def test_static_qdq_structure_and_numerics(target, tmp_path):
    model = _matmul_model()
    result = QdqInsertionPass({"proj": "int8"}, QdqConfig("static", target), activation_abs_max={"x": float(np.abs(X).max())})(model)

    graph = result.model.graph
    assert result.modified
    ops = [n.op_type for n in graph]
    assert ops == ["QuantizeLinear", "DequantizeLinear", "DequantizeLinear", "MatMul", "Softmax"]
    weight = graph.initializers["proj.weight_int8"].const_value
    assert weight.dtype == ir.DataType.INT8 and "w" not in graph.initializers
    assert not np.any(graph.initializers["proj.weight_zero_point"].const_value.numpy())
    zero = graph.initializers["x/act_zero_point"].const_value.numpy()
    assert (zero.dtype, int(zero)) == ((np.dtype(np.uint8), 128) if target == "cpu" else (np.dtype(np.int8), 0))
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, _softmax(_reference_static()), rtol=1e-5, atol=1e-6)
    path = tmp_path / "static.onnx"
    ir.save(result.model, path)
    assert ort_kernel_counts(path).get("MatMulIntegerToFloat") == 1


def test_dynamic_per_token_structure_and_numerics(tmp_path):
    model = _matmul_model()
    result = QdqInsertionPass({"proj": "int8"}, QdqConfig("dynamic-token"))(model)

    ops = [n.op_type for n in result.model.graph]
    # float32: per-row blocked QuantizeLinear (no Abs copy) and one MatMulIntegerToFloat (opset raised to 21)
    assert "MatMulIntegerToFloat" in ops and "QuantizeLinear" in ops and ops[-1] == "Softmax"
    assert not {"MatMul", "MatMulInteger", "Cast", "Abs", "Round"} & set(ops)
    assert result.model.opset_imports[""] == 21 and result.model.opset_imports["com.microsoft"] == 1
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, _softmax(_reference_per_token()), rtol=1e-5, atol=1e-6)
    # Per-token scales: the outlier token does not coarsen the grid of the other tokens.
    exact = _softmax(X @ W)
    static_error = np.abs(_softmax(_reference_static()) - exact)[1].max()
    token_error = np.abs(actual - exact)[1].max()
    assert token_error < static_error
    path = tmp_path / "dynamic.onnx"
    ir.save(result.model, path)
    assert ort_kernel_counts(path).get("MatMulIntegerToFloat") == 1


def test_dynamic_per_token_codes_match_the_op_chain(tmp_path):
    """The blocked QuantizeLinear gives the same uint8 codes and scales as Abs/ReduceMax/Div/Round/Add/Cast."""
    fused = QdqInsertionPass({"proj": "int8"}, QdqConfig("dynamic-token"))
    model = fused(_matmul_model()).model
    graph = model.graph
    codes = next(n for n in graph if n.op_type == "QuantizeLinear").outputs[0]
    scale = next(n for n in graph if n.op_type == "MatMulIntegerToFloat").inputs[2]
    graph.outputs.extend([codes, scale])
    _, actual_codes, actual_scale = run_model(model, {"x": X}, tmp_path)
    expected_scale = np.maximum(np.abs(X).max(axis=-1, keepdims=True) / np.float32(127), np.float32(1e-8))
    np.testing.assert_array_equal(actual_scale, expected_scale)
    np.testing.assert_array_equal(actual_codes, (np.round(X / expected_scale) + 128).astype(np.uint8))


def test_dynamic_per_token_float16_keeps_the_op_chain(tmp_path):
    """No float16 MatMulIntegerToFloat kernel on the CPU EP: float16 graphs keep MatMulInteger + Muls."""
    model = _matmul_model()
    weight = model.graph.initializers["w"]
    weight.const_value = ir.tensor(W.astype(np.float16), name="w")
    cast = ir.node("Cast", [model.graph.inputs[0]], attributes={"to": ir.DataType.FLOAT16}, name="to_half")
    cast.outputs[0].dtype, cast.outputs[0].shape = ir.DataType.FLOAT16, ir.Shape([2, 5, 16])
    model.graph.insert_before(model.graph.node(0), cast)
    model.graph.node("proj").replace_input_with(0, cast.outputs[0])
    result = QdqInsertionPass({"proj": "int8"}, QdqConfig("dynamic-token"))(model)
    ops = [n.op_type for n in result.model.graph]
    assert "MatMulInteger" in ops and "MatMulIntegerToFloat" not in ops and "QuantizeLinear" not in ops
    assert result.model.opset_imports[""] == 18


def test_float_plan_changes_nothing():
    model = _matmul_model()
    before = ir.serde.serialize_model(model).SerializeToString()
    result = QdqInsertionPass({"proj": "float"})(model)
    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


@pytest.mark.parametrize("plan, message", [
    ({"softmax": "int8"}, "kept in float"),
    ({"nowhere": "int8"}, "not in the graph"),
    ({"proj": "int3"}, "expected int8 or float"),
    ({"proj": "int8"}, "no calibrated range"),
])
def test_bad_plans_are_refused(plan, message):
    with pytest.raises(GraphqError, match=message):
        QdqInsertionPass(plan, QdqConfig("static"), kept_node_names=frozenset({"softmax"}))(_matmul_model())


def test_bad_configs_are_refused():
    with pytest.raises(GraphqError):
        QdqConfig("dynamic-token", "tensorrt")
    with pytest.raises(GraphqError):
        QdqConfig("sometimes")
