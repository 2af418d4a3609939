import numpy as np
import onnx_ir as ir

from graphq.passes import canonicalize_passes
from graphq.passes.cleanup import CleanupPass
from graphq.pipeline import run_pipeline


def _model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    a = ir.Value(name="a", const_value=ir.tensor(np.ones(4, dtype=np.float32)))
    b = ir.Value(name="b", const_value=ir.tensor(np.ones(4, dtype=np.float32)))
    first = ir.node("Add", [x, a], name="first")
    second = ir.node("Add", [first.outputs[0], b], name="second")
    second.outputs[0].name = "y"
    second.outputs[0].dtype = ir.DataType.FLOAT
    second.outputs[0].shape = ir.Shape([4])
    graph = ir.Graph([x], [second.outputs[0]], nodes=[first, second], initializers=[a, b], opset_imports={"": 18}, name="pipeline_test")
    return ir.Model(graph, ir_version=10)


def test_records_what_each_pass_changed():
    result = run_pipeline(_model(), canonicalize_passes())

    names = [r.name for r in result.records]
    assert names == ["CleanupPass", "DeduplicateInitializersPass", "ShapeInferencePass"]
    cleanup, dedupe, shapes = result.records
    assert not cleanup.modified and cleanup.before == cleanup.after
    assert dedupe.modified
    assert (dedupe.before.initializers, dedupe.after.initializers) == (2, 1)
    assert dedupe.before.initializer_bytes - dedupe.after.initializer_bytes == 16
    assert shapes.modified
    assert result.modified
    assert "16" not in cleanup.summary() and "no change" in cleanup.summary()


def test_empty_pipeline_changes_nothing():
    model = _model()
    result = run_pipeline(model, [])
    assert result.model is model and not result.modified and result.records == ()


def test_passes_run_in_the_given_order():
    result = run_pipeline(_model(), [CleanupPass(), CleanupPass()])
    assert [r.name for r in result.records] == ["CleanupPass", "CleanupPass"]
