import numpy as np
import onnx
import onnx_ir as ir

from conftest import run_model
from graphq.passes.dedupe_initializers import DeduplicateInitializersPass
from graphq.verify import cpu_session
from graphq.runtime import GraphSignature, build_feeds

RNG = np.random.default_rng(0)
EMBEDDING = RNG.normal(size=(64, 32)).astype(np.float32)  # vocab x hidden


def _model_with_copies(transposed_copy: np.ndarray, bias_copy: np.ndarray) -> ir.Model:
    """hidden = Gather(E, ids) + b;  logits = hidden @ E^T (stored separately) + b2."""
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([5]))
    embedding = ir.Value(name="embedding", const_value=ir.tensor(EMBEDDING))
    lm_head = ir.Value(name="lm_head", const_value=ir.tensor(transposed_copy))
    bias = ir.Value(name="bias", const_value=ir.tensor(np.full((32,), 0.5, dtype=np.float32)))
    bias2 = ir.Value(name="bias2", const_value=ir.tensor(bias_copy))
    gather = ir.node("Gather", [embedding, ids], name="gather")
    add = ir.node("Add", [gather.outputs[0], bias], name="add")
    matmul = ir.node("MatMul", [add.outputs[0], lm_head], name="lm_head_matmul")
    add2 = ir.node("Add", [gather.outputs[0], bias2], name="add2")
    matmul.outputs[0].name = "logits"
    add2.outputs[0].name = "hidden"
    matmul.outputs[0].dtype = add2.outputs[0].dtype = ir.DataType.FLOAT
    matmul.outputs[0].shape, add2.outputs[0].shape = ir.Shape([5, 64]), ir.Shape([5, 32])
    graph = ir.Graph(
        [ids], [matmul.outputs[0], add2.outputs[0]], nodes=[gather, add, matmul, add2],
        initializers=[embedding, lm_head, bias, bias2], opset_imports={"": 18}, name="dedupe_test",
    )
    return ir.Model(graph, ir_version=10)


FEEDS = {"ids": np.array([0, 3, 63, 7, 3], dtype=np.int64)}


def test_merges_exact_and_transposed_copies(tmp_path):
    model = _model_with_copies(EMBEDDING.T.copy(), np.full((32,), 0.5, dtype=np.float32))
    expected = run_model(model, FEEDS, tmp_path)

    result = DeduplicateInitializersPass()(model)

    graph = result.model.graph
    assert result.modified
    assert set(graph.initializers) == {"embedding", "bias"}
    transpose = graph.node("lm_head/dedupe_transpose")
    assert transpose.op_type == "Transpose" and transpose.inputs[0].name == "embedding"
    assert graph.node("lm_head_matmul").inputs[1] is transpose.outputs[0]
    assert graph.node("add2").inputs[1].name == "bias"
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    for actual, reference in zip(run_model(result.model, FEEDS, tmp_path), expected):
        np.testing.assert_array_equal(actual, reference)


def test_near_copies_are_kept(tmp_path):
    nearly = EMBEDDING.T.copy()
    nearly[0, 0] += 1e-6
    other_bias = np.full((32,), 0.5, dtype=np.float32)
    other_bias[-1] = 0.25
    model = _model_with_copies(nearly, other_bias)
    before = ir.serde.serialize_model(model).SerializeToString()

    result = DeduplicateInitializersPass()(model)

    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


def test_tied_lm_head_of_an_export_is_stored_once(tiny_llama_onnx, tmp_path):
    """Undo the exporter's tying (lm_head as its own E^T initializer), then deduplicate."""
    model = ir.load(tiny_llama_onnx)
    graph = model.graph
    embedding = graph.initializers["model.embed_tokens.weight"]
    transpose = next(n for n in graph if n.op_type == "Transpose" and n.inputs[0] is embedding)
    untied = ir.Value(name="lm_head.weight", const_value=ir.tensor(embedding.const_value.numpy().T.copy()))
    graph.register_initializer(untied)
    transpose.outputs[0].replace_all_uses_with(untied)
    graph.remove(transpose, safe=True)
    untied_path = tmp_path / "untied.onnx"
    ir.save(model, untied_path)
    session = cpu_session(untied_path)
    signature = GraphSignature.of(session)
    feeds = build_feeds(signature, np.arange(1, 17, dtype=np.int64)[None, :])
    (expected,) = session.run(["logits"], feeds)
    untied_bytes = sum(v.const_value.nbytes for v in graph.initializers.values())

    result = DeduplicateInitializersPass()(model)

    assert result.modified
    deduped_bytes = sum(v.const_value.nbytes for v in result.model.graph.initializers.values())
    assert untied_bytes - deduped_bytes == embedding.const_value.nbytes
    assert sum(1 for v in result.model.graph.initializers.values() if v.const_value.size == embedding.const_value.size) == 1
    deduped_path = tmp_path / "deduped.onnx"
    ir.save(result.model, deduped_path)
    onnx.checker.check_model(str(deduped_path), full_check=True)
    (actual,) = cpu_session(deduped_path).run(["logits"], feeds)
    np.testing.assert_array_equal(actual, expected)
