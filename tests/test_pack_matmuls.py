"""Packing MatMuls that share an input: structure (GroupQueryAttention reads packed QKV, gate/up are
split), exact agreement with the unpacked graph in ONNX Runtime (float and W8A8), the checker, the
quantization plan, and graphs where nothing should change."""

from __future__ import annotations

import collections
import dataclasses
import shutil

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphq.calibrate import CalibrationConfig
from graphq.config import RECIPES, W8A8Recipe
from graphq.errors import GraphqError
from graphq.passes.fusion import FusionConfig, FusionPass
from graphq.passes.keep_float import keep_float_violations, kept_nodes
from graphq.passes.pack_matmuls import (
    PackMatMulsPass,
    pack_planned_matmuls,
    packed_name,
)
from graphq.passes.qdq_insert import INT8
from graphq.quantize import quantize_model
from graphq.runtime import GraphSignature, build_feeds, next_cache
from graphq.verify import cpu_session

LAYERS = 2  # TinyModelSpec
FLOAT_TOLERANCE = 1e-5  # max |packed - unpacked| (logits and cache; float32 GEMMs block differently)


@pytest.fixture(scope="module")
def fused_past(tiny_llama_past_onnx, tmp_path_factory) -> ir.Model:
    return FusionPass(FusionConfig(max_positions=1024))(ir.load(tiny_llama_past_onnx)).model


def _save(model: ir.Model, path):
    ir.save(model, path)
    return path


def _outputs(path, steps: int = 2) -> list[dict[str, np.ndarray]]:
    """All outputs of a 9-token prompt and ``steps`` decode steps (each fed its own cache)."""
    session = cpu_session(path)
    signature = GraphSignature.of(session)
    names = list(signature.output_names)
    rng = np.random.default_rng(1)
    outputs = [dict(zip(names, session.run(names, build_feeds(signature, rng.integers(4, 250, (1, 9))))))]
    for _ in range(steps):
        feeds = build_feeds(signature, rng.integers(4, 250, (1, 1)), next_cache(signature, outputs[-1]))
        outputs.append(dict(zip(names, session.run(names, feeds))))
    return outputs


def _max_diff(a: list[dict], b: list[dict]) -> float:
    return max(float(np.max(np.abs(x[k] - y[k]))) for x, y in zip(a, b) for k in x)


def test_fused_graph_packs_qkv_into_gqa_and_gate_up_behind_a_split(fused_past, tmp_path):
    unpacked = _save(fused_past, tmp_path / "unpacked.onnx")
    model = ir.load(unpacked)
    pack = PackMatMulsPass()
    result = pack(model)

    assert result.modified
    ops = collections.Counter(n.op_type for n in result.model.graph)
    assert ops["MatMul"] == 4 * LAYERS + 1  # packed qkv, o, packed gate/up, down; the LM head
    assert ops["Split"] == LAYERS  # gate/up only: attention reads q/k/v packed
    assert sorted(pack.packed) == sorted(
        [f"/model/layers.{i}/self_attn/q_proj+k_proj+v_proj/MatMul" for i in range(LAYERS)]
        + [f"/model/layers.{i}/mlp/gate_proj+up_proj/MatMul" for i in range(LAYERS)])
    for node in result.model.graph:
        if node.op_type == "GroupQueryAttention":
            producer = node.inputs[0].producer()
            assert producer.name.endswith("q_proj+k_proj+v_proj/MatMul")
            assert node.inputs[1] is None and node.inputs[2] is None
    path = _save(result.model, tmp_path / "packed.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert _max_diff(_outputs(unpacked), _outputs(path)) < FLOAT_TOLERANCE


def test_unfused_graph_packs_behind_splits(tiny_llama_onnx, tmp_path):
    model = ir.load(tiny_llama_onnx)
    pack = PackMatMulsPass()
    assert pack(model).modified
    assert collections.Counter(n.op_type for n in model.graph)["Split"] == 2 * LAYERS
    path = _save(model, tmp_path / "packed.onnx")
    onnx.checker.check_model(str(path), full_check=True)
    assert _max_diff(_outputs(tiny_llama_onnx, 0), _outputs(path, 0)) < FLOAT_TOLERANCE


def test_w8a8_packed_equals_unpacked(fused_past, tiny_llama_past_onnx, tmp_path):
    """Packing is exact after quantization too: per-column weight scales and per-token activation
    scales are unchanged, int32 accumulation is exact."""
    (tmp_path / "fused").mkdir()
    for side in tiny_llama_past_onnx.parent.iterdir():
        if side.suffix != ".onnx" and side.is_file():
            shutil.copy(side, tmp_path / "fused" / side.name)
    source = _save(fused_past, tmp_path / "fused" / "model.onnx")
    recipe = dataclasses.replace(RECIPES["w8a8"], calibration=CalibrationConfig(windows=2, window_tokens=64))
    assert recipe.pack_matmuls
    packed = quantize_model(source, tmp_path / "p" / "model.onnx", recipe, progress=False)
    plain = quantize_model(source, tmp_path / "u" / "model.onnx", dataclasses.replace(recipe, pack_matmuls=False),
                           progress=False)

    assert packed.plan == plain.plan  # the plan names the original projections
    assert plain.integer_kernels == {"MatMulIntegerToFloat": 7 * LAYERS}
    assert packed.integer_kernels == {"MatMulIntegerToFloat": 4 * LAYERS}
    quantized = ir.load(packed.model_path)
    ops = collections.Counter(n.op_type for n in quantized.graph)
    # one per-token quantizer per activation (4 per layer, the LM head float); one shared zero point
    assert ops["QuantizeLinear"] == 4 * LAYERS and ops["Expand"] == 1
    kept = {n.name for n in kept_nodes(fused_past)}
    assert keep_float_violations(n for n in quantized.graph if n.name in kept) == []
    onnx.checker.check_model(str(packed.model_path), full_check=True)
    assert _max_diff(_outputs(plain.model_path), _outputs(packed.model_path)) < FLOAT_TOLERANCE


def test_plan_restricts_packing_and_maps_names(fused_past):
    copy = ir.serde.deserialize_model(ir.serde.serialize_model(fused_past))
    names = [n.name for n in copy.graph if n.op_type == "MatMul"]
    q, k = "/model/layers.0/self_attn/q_proj/MatMul", "/model/layers.0/self_attn/k_proj/MatMul"
    plan = {name: INT8 if name in (q, k) else "float" for name in names}

    packed, new_plan, ranges = pack_planned_matmuls(copy, plan, {q: np.ones(192), k: np.full(64, 2.0)})

    pair = "/model/layers.0/self_attn/q_proj+k_proj/MatMul"
    assert new_plan[pair] == INT8 and q not in new_plan and k not in new_plan
    assert np.array_equal(ranges[pair], np.concatenate([np.ones(192), np.full(64, 2.0)]))
    ops = collections.Counter(n.op_type for n in packed.graph)
    assert ops["Split"] == 1 and ops["MatMul"] == len(names) - 1  # q+k packed; v stays, GQA reads the split


def test_nothing_shared_changes_nothing():
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 4]))
    y = ir.Value(name="y", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 8]))
    w1 = ir.Value(name="w1", const_value=ir.tensor(np.ones((4, 2), np.float32)))
    w2 = ir.Value(name="w2", const_value=ir.tensor(np.ones((8, 2), np.float32)))
    w3 = ir.Value(name="w3", const_value=ir.tensor(np.ones((8, 2), np.float16)))
    a = ir.node("MatMul", [x, w1], name="a")
    b = ir.node("MatMul", [y, w2], name="b")  # another input
    cast = ir.node("Cast", [y], attributes={"to": ir.DataType.FLOAT16}, name="cast")
    c = ir.node("MatMul", [cast.outputs[0], w3], name="c")
    d = ir.node("Relu", [x], name="d")
    graph = ir.Graph([x, y], [a.outputs[0], b.outputs[0], c.outputs[0], d.outputs[0]], nodes=[a, b, cast, c, d],
                     initializers=[w1, w2, w3], opset_imports={"": 18}, name="g")
    model = ir.Model(graph, ir_version=10)
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not PackMatMulsPass()(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before

    # a second MatMul on x: packable, but both outputs are graph outputs (names kept): left alone;
    # and with a plan that names neither, nothing is considered
    e = ir.node("MatMul", [x, w1], name="e")
    model.graph.append(e)
    model.graph.outputs.append(e.outputs[0])
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not PackMatMulsPass()(model).modified
    assert not PackMatMulsPass(["nothing"])(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_packed_name():
    assert packed_name(["/m/l.0/attn/q_proj/MatMul", "/m/l.0/attn/k_proj/MatMul"]) == "/m/l.0/attn/q_proj+k_proj/MatMul"
    assert packed_name(["a", "b"]) == "a+b"


def test_recipe_refuses_packing_with_peg_or_cube_root():
    with pytest.raises(GraphqError, match="pack_matmuls"):
        dataclasses.replace(RECIPES["w8a8-peg"], pack_matmuls=True)
    with pytest.raises(GraphqError, match="pack_matmuls"):
        dataclasses.replace(RECIPES["w8a8-cuberoot"], pack_matmuls=True)
    assert isinstance(RECIPES["w8a8"], W8A8Recipe) and RECIPES["w8a8"].pack_matmuls
