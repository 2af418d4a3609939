"""PEG: channel groups by range (numerics), the exact grouping rewrite, per-group QDQ, w8a8-peg end to end."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_model, sha256_tree

from graphq.calibrate import CalibrationConfig
from graphq.config import RECIPES
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.numerics.calibration import RangeEstimator
from graphq.numerics.peg import (
    embedding_groups,
    group_ranges,
    peg_fake_quantize,
    range_permutation,
)
from graphq.numerics.quantize import per_column_weight_quantization, symmetric_scale
from graphq.passes.peg import PegConfig, PegGroupingPass
from graphq.passes.qdq_insert import QdqConfig, QdqInsertionPass
from graphq.quantize import ort_kernel_counts, quantize_model

RNG = np.random.default_rng(1)
C, N = 16, 8
W = (RNG.normal(size=(C, N)) * 0.2).astype(np.float32)
X = RNG.normal(size=(2, 5, C)).astype(np.float32)
X[..., [2, 11]] *= 30.0  # two outlier channels in different contiguous groups
RANGES = np.abs(X).reshape(-1, C).max(axis=0)


def _matmul_model() -> ir.Model:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 5, C]))
    w = ir.Value(name="w", const_value=ir.tensor(W))
    matmul = ir.node("MatMul", [x, w], name="proj")
    relu = ir.node("Relu", [matmul.outputs[0]], name="relu")
    matmul.outputs[0].name, relu.outputs[0].name = "h", "y"
    relu.outputs[0].dtype, relu.outputs[0].shape = ir.DataType.FLOAT, ir.Shape(["batch", 5, N])
    graph = ir.Graph([x], [relu.outputs[0]], nodes=[matmul, relu], initializers=[w], opset_imports={"": 18}, name="mm")
    return ir.Model(graph, ir_version=10)


def test_range_permutation_groups_outliers_together():
    groups = embedding_groups(RANGES, 4, permute=True)
    assert [len(g) for g in groups] == [4] * 4
    assert {2, 11} <= set(groups[0].tolist())  # the two largest ranges share the first group
    assert np.array_equal(np.sort(np.concatenate(groups)), np.arange(C))
    assert np.array_equal(range_permutation(RANGES), np.argsort(-RANGES, kind="stable"))
    contiguous = embedding_groups(RANGES, 4, permute=False)
    assert [g.tolist() for g in contiguous] == [list(range(i, i + 4)) for i in range(0, C, 4)]
    np.testing.assert_array_equal(group_ranges(RANGES, groups), [RANGES[g].max() for g in groups])
    # Permuting lowers the sum of group ranges (every group but one is free of outliers).
    assert group_ranges(RANGES, groups).sum() < group_ranges(RANGES, contiguous).sum()
    with pytest.raises(ValueError, match="do not divide"):
        embedding_groups(RANGES, 3)


@pytest.mark.parametrize("groups, permute", [(1, True), (4, True), (4, False)])
def test_grouping_is_exact_in_float(groups, permute, tmp_path):
    (expected,) = run_model(_matmul_model(), {"x": X}, tmp_path)
    # One group holding the range permutation itself: the permutation alone (Gather + permuted rows).
    index = [range_permutation(RANGES)] if groups == 1 else embedding_groups(RANGES, groups, permute=permute)
    peg = PegGroupingPass({"x": index}, ["proj"])
    result = peg(_matmul_model())

    assert result.modified
    ops = [n.op_type for n in result.model.graph]
    assert ops == ["Gather"] * permute + ["Split"] + ["MatMul"] * groups + ["Sum", "Relu"]
    assert "w" not in result.model.graph.initializers
    assert sorted(peg.group_nodes) == sorted(f"proj/peg{g}" for g in range(groups))
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, expected, rtol=1e-6, atol=1e-5)


def test_per_group_qdq_matches_reference_and_fuses(tmp_path):
    index = embedding_groups(RANGES, 4)
    peg = PegGroupingPass({"x": index}, ["proj"])
    model = peg(_matmul_model()).model
    ranges = {value: float(group_ranges(RANGES, [index[g]])[0]) for value, (_, g) in peg.group_values.items()}
    full_ranges = np.abs(W).max(axis=0)
    qdq = QdqInsertionPass({n: "int8" for n in peg.group_nodes}, QdqConfig("static"), activation_abs_max=ranges,
                           weight_abs_max={n: full_ranges for n in peg.group_nodes})
    model = qdq(model).model
    onnx.checker.check_model(ir.serde.serialize_model(model), full_check=True)

    (actual,) = run_model(model, {"x": X}, tmp_path)
    wq, ws = per_column_weight_quantization(W)  # the same weight grid as per-tensor W8A8
    scales = symmetric_scale(group_ranges(RANGES, index))
    expected = np.maximum(peg_fake_quantize(X, index, scales) @ (wq.astype(np.float32) * ws), 0)
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5)
    # Error budget: per-group scales beat one per-tensor scale on outlier channels.
    exact = np.maximum(X @ W, 0)
    per_tensor = np.maximum(peg_fake_quantize(X, [np.arange(C)], symmetric_scale([RANGES.max()])) @ (wq.astype(np.float32) * ws), 0)
    assert np.abs(actual - exact).mean() < 0.75 * np.abs(per_tensor - exact).mean()
    path = tmp_path / "peg.onnx"
    ir.save(model, path)
    assert ort_kernel_counts(path).get("MatMulIntegerToFloat") == 4


def test_nothing_planned_changes_nothing():
    model = _matmul_model()
    before = ir.serde.serialize_model(model).SerializeToString()
    result = PegGroupingPass({}, [])(model)
    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


def test_bad_groups_are_refused():
    with pytest.raises(GraphqError, match="not an equal-size partition"):
        PegGroupingPass({"x": [np.arange(8), np.arange(8, 15)]}, ["proj"])(_matmul_model())
    with pytest.raises(GraphqError, match="no channel groups"):
        PegGroupingPass({}, ["proj"])(_matmul_model())
    with pytest.raises(GraphqError, match="positive integer"):
        PegConfig(groups=0)
    with pytest.raises(GraphqError, match="needs static activations"):
        dataclasses.replace(RECIPES["w8a8-peg"], activations=QdqConfig("dynamic-token"))


SMALL = CalibrationConfig(windows=2, window_tokens=128)


@pytest.mark.parametrize("peg, activation_range", [
    (PegConfig(groups=4), RangeEstimator()),
    (PegConfig(groups=2, permute=False), RangeEstimator(method="k_sigma_search")),
    (PegConfig(groups=4, float_outlier_group=True), RangeEstimator()),
])
def test_w8a8_peg_end_to_end(peg, activation_range, tiny_llama_onnx, tmp_path):
    recipe = dataclasses.replace(RECIPES["w8a8-peg"], peg=peg, activation_range=activation_range, calibration=SMALL)
    out = tmp_path / "peg" / "model.onnx"
    result = quantize_model(tiny_llama_onnx, out, recipe, progress=False)
    onnx.checker.check_model(str(out), full_check=True)
    # q, k, v, o, gate, up, down in 2 layers, each split into `groups` integer MatMuls (but the widest
    # group of each of the 8 activations stays float: one group MatMul per original MatMul, 14).
    float_groups = 14 if peg.float_outlier_group else 0
    assert result.integer_kernels == {"MatMulIntegerToFloat": 14 * peg.groups - float_groups}
    float_ppl = evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.01)


def test_groups_that_do_not_divide_are_refused(tiny_llama_onnx, tmp_path):
    source = sha256_tree(tiny_llama_onnx.parent)
    recipe = dataclasses.replace(RECIPES["w8a8-peg"], peg=PegConfig(groups=3), calibration=SMALL)
    out = tmp_path / "bad" / "model.onnx"
    with pytest.raises(GraphqError, match="3 groups do not divide the hidden size 64"):
        quantize_model(tiny_llama_onnx, out, recipe, progress=False)
    assert not out.parent.exists() or not any(out.parent.iterdir())
    assert sha256_tree(tiny_llama_onnx.parent) == source
