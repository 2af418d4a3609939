import numpy as np
import onnx
import onnx_ir as ir

from conftest import run_model
from graphq.passes.shape_inference import ShapeInferencePass, count_typed_values


def _untyped_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 8]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.ones((8, 4), dtype=np.float32)))
    matmul = ir.node("MatMul", [x, weight], name="matmul")
    relu = ir.node("Relu", [matmul.outputs[0]], name="relu")
    relu.outputs[0].name = "y"
    relu.outputs[0].dtype = ir.DataType.FLOAT
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[matmul, relu], initializers=[weight], opset_imports={"": 18}, name="shape_test")
    return ir.Model(graph, ir_version=10)


def test_infers_dtypes_and_shapes(tmp_path):
    model = _untyped_model()
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 8)).astype(np.float32)}
    (expected,) = run_model(model, feeds, tmp_path)
    assert count_typed_values(model) == 0

    result = ShapeInferencePass()(model)

    assert result.modified
    assert count_typed_values(result.model) == 2
    matmul_out = result.model.graph.node("matmul").outputs[0]
    assert matmul_out.dtype == ir.DataType.FLOAT
    assert list(matmul_out.shape) == [2, 4]
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, feeds, tmp_path)
    np.testing.assert_array_equal(actual, expected)


def test_second_run_changes_nothing():
    model = ShapeInferencePass()(_untyped_model()).model
    assert not ShapeInferencePass()(model).modified


def test_exported_llm_gets_shapes(tiny_llama_onnx):
    # The export pipeline already ran the pass: every node output is typed.
    model = ir.load(tiny_llama_onnx)
    total = sum(len(n.outputs) for n in model.graph)
    assert count_typed_values(model) >= 0.9 * total
