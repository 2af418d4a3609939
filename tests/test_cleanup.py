import numpy as np
import onnx
import onnx_ir as ir

from conftest import run_model
from graphq.passes.cleanup import CleanupPass


def _graph_with_dead_code() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    weight = ir.Value(name="w", const_value=ir.tensor(np.arange(6, dtype=np.float32).reshape(2, 3)))
    unused = ir.Value(name="unused", const_value=ir.tensor(np.ones((4,), dtype=np.float32)))
    add = ir.node("Add", [x, weight], name="add")
    dead = ir.node("Mul", [x, weight], name="dead_mul")
    dead_chain = ir.node("Relu", [dead.outputs[0]], name="dead_relu")
    add.outputs[0].name = "y"
    add.outputs[0].dtype = ir.DataType.FLOAT
    add.outputs[0].shape = ir.Shape([2, 3])
    graph = ir.Graph(
        [x], [add.outputs[0]], nodes=[add, dead, dead_chain],
        initializers=[weight, unused], opset_imports={"": 18, "com.microsoft": 1}, name="cleanup_test",
    )
    return ir.Model(graph, ir_version=10)


def test_removes_dead_nodes_and_unused_initializers(tmp_path):
    model = _graph_with_dead_code()
    feeds = {"x": np.random.default_rng(0).normal(size=(2, 3)).astype(np.float32)}
    (expected,) = run_model(model, feeds, tmp_path)

    result = CleanupPass()(model)

    assert result.modified
    assert [n.name for n in result.model.graph] == ["add"]
    assert set(result.model.graph.initializers) == {"w"}
    assert "com.microsoft" not in result.model.opset_imports
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, feeds, tmp_path)
    np.testing.assert_array_equal(actual, expected)


def test_clean_graph_is_unchanged():
    model = CleanupPass()(_graph_with_dead_code()).model
    before = ir.serde.serialize_model(model).SerializeToString()

    result = CleanupPass()(model)

    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


def test_exported_graph_needs_no_cleanup(tiny_llama_onnx):
    assert not CleanupPass()(ir.load(tiny_llama_onnx)).modified
