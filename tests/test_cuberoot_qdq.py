"""CubeRootQdqPass: cube-root int8 weights and activations around a MatMul (graphq.passes.cuberoot_qdq)."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_model
from graphq.passes.cuberoot_qdq import CUBEROOT_W8, CubeRootQdqPass
from graphq.passes.qdq_insert import QdqConfig

from graphq.errors import GraphqError
from graphq.numerics.companding import (
    activation_scale,
    fake_quantize_activation,
    fake_quantize_activation_per_token,
    quantize_cuberoot,
)

RNG = np.random.default_rng(5)
K, N = 64, 24
W = (RNG.standard_t(4, size=(K, N)) * 0.05).astype(np.float32)
X = (RNG.standard_t(3, size=(2, 5, K))).astype(np.float32)


def _model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 5, K]))
    weight = ir.Value(name="w", const_value=ir.tensor(W))
    nodes = []
    for name in ("a", "b"):  # two MatMuls share one activation quantizer
        matmul = ir.node("MatMul", [x, weight], name=name)
        matmul.outputs[0].name = f"y_{name}"
        matmul.outputs[0].dtype, matmul.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([2, 5, N])
        nodes.append(matmul)
    graph = ir.Graph([x], [n.outputs[0] for n in nodes], nodes=nodes, initializers=[weight], opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


@pytest.mark.parametrize("scheme", ["dynamic-token", "static"])
def test_companded_activations_and_weights_match_the_reference(scheme, tmp_path):
    r = float(np.abs(X).max())
    qdq = CubeRootQdqPass({"a": "int8", "b": "int8"}, QdqConfig(activation_scheme=scheme), activation_abs_max={"x": r})

    result = qdq(_model())

    assert result.modified and qdq.quantized == ["a", "b"]
    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["MatMul"] == 2 and ops["Sign"] == 1 and ops["Pow"] == 2  # one quantizer: f(x) and its cube
    assert ops["QuantizeLinear"] == (1 if scheme == "static" else 0)
    assert "w" not in result.model.graph.initializers
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    actual = run_model(result.model, {"x": X}, tmp_path)
    x_hat = fake_quantize_activation_per_token(X) if scheme == "dynamic-token" else fake_quantize_activation(X, activation_scale(r))
    expected = x_hat @ quantize_cuberoot(W, CUBEROOT_W8).dequantize()
    # ORT's Pow(|x|, 1/3) and numpy's cbrt may round a value to the neighbouring level now and then:
    # budget 1 % of the output range, and the bulk exact to float rounding
    for y in actual:
        assert np.abs(y - expected).max() < 0.01 * np.abs(expected).max()
        assert np.median(np.abs(y - expected)) < 1e-5 * np.abs(expected).max()
    error = np.abs(actual[0] - X @ W).max() / np.abs(X @ W).max()
    assert error < 0.05  # 8-bit cube-root on heavy-tailed data


def test_empty_plan_changes_nothing():
    model = _model()
    assert not CubeRootQdqPass({"a": "float"}, QdqConfig(activation_scheme="dynamic-token"))(model).modified
    assert sum(1 for _ in model.graph) == 2


def test_bad_input_is_refused():
    with pytest.raises(GraphqError, match="not in the graph"):
        CubeRootQdqPass({"zz": "int8"}, QdqConfig(activation_scheme="dynamic-token"))(_model())
    with pytest.raises(GraphqError, match="no calibrated range"):
        CubeRootQdqPass({"a": "int8"}, QdqConfig(activation_scheme="static"))(_model())
    with pytest.raises(GraphqError, match="form"):
        CubeRootQdqPass({"a": "int8"}, weight_form="nbits")
