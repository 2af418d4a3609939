"""True-sequential and asymmetric (GPTAQ) GPTQ calibration: the kernels against reference formulas, the
float reference cache of block-by-block calibration, and both options end to end on the tiny model."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_model

from graphq.blockwise import StagedCalibration, partition, stage_model
from graphq.calibrate import CalibrationConfig
from graphq.config import RECIPES
from graphq.errors import GraphqError
from graphq.numerics.asymmetric import asymmetric_target, cross_accumulate
from graphq.numerics.weight_only import (
    WeightQuantConfig,
    gptq_factor,
    gptq_quantize,
    hessian_accumulate,
)
from graphq.weight_only import (
    GptqConfig,
    HessianAccumulator,
    PairedAccumulator,
    quantize_weights,
)

RNG = np.random.default_rng(7)
WINDOWS = np.random.default_rng(0).integers(0, 250, size=(3, 24))


def _inputs(k=24, n=300):
    x = RNG.standard_normal((n, k)) @ RNG.standard_normal((k, k)) * 0.5
    # the upstream error: mostly a function of the input (what a least-squares target can undo), plus noise
    x_float = x + 0.1 * x @ RNG.standard_normal((k, k)) / np.sqrt(k) + 0.01 * RNG.standard_normal((n, k))
    return x, x_float


def test_cross_accumulate_streams_the_reference_formula():
    x, x_float = _inputs()
    cross, count = None, 0
    for part in np.array_split(np.arange(len(x)), 4):
        cross, count = cross_accumulate(cross, x[part], x_float[part], count)
    np.testing.assert_allclose(cross, 2 * x.T @ (x_float - x) / len(x), rtol=1e-12, atol=1e-12)
    assert count == len(x)
    with pytest.raises(ValueError, match="one shape"):
        cross_accumulate(None, x, x_float[:, :3], 0)


@pytest.mark.parametrize("act_order", [False, True])
def test_asymmetric_target_is_the_ridge_least_squares_solution(act_order):
    """W' = argmin ||X V - X_f W||^2 + mu ||V - W||^2 with mu = n lambda / 2, lambda = damp mean(diag H)."""
    x, x_float = _inputs()
    n, k = x.shape
    w = RNG.standard_normal((k, 7))
    hessian, _ = hessian_accumulate(None, x, 0)
    cross, _ = cross_accumulate(None, x, x_float, 0)
    damp = 0.01
    target = asymmetric_target(w, cross, gptq_factor(hessian, damp=damp, act_order=act_order))
    mu = n * damp * np.mean(np.diag(hessian)) / 2
    expected = np.linalg.solve(x.T @ x + mu * np.eye(k), x.T @ x_float @ w + mu * w)
    np.testing.assert_allclose(target, expected, rtol=1e-9, atol=1e-9)
    # It matches the float output better than W does, and alpha interpolates.
    assert np.linalg.norm(x @ target - x_float @ w) < 0.5 * np.linalg.norm(x @ w - x_float @ w)
    half = asymmetric_target(w, cross, gptq_factor(hessian, damp=damp, act_order=act_order), alpha=0.5)
    np.testing.assert_allclose(half, (w + target) / 2, rtol=1e-12, atol=1e-12)


def test_without_upstream_error_asymmetric_gptq_is_plain_gptq_bit_for_bit():
    x, _ = _inputs()
    w = RNG.standard_normal((x.shape[1], 9)).astype(np.float32)
    hessian, _ = hessian_accumulate(None, x, 0)
    cross, _ = cross_accumulate(None, x, x, 0)
    assert not cross.any()
    factor = gptq_factor(hessian, act_order=True)
    target = asymmetric_target(w, cross, factor)
    np.testing.assert_array_equal(target, w.astype(np.float64))
    config = WeightQuantConfig(4, 8)
    plain = gptq_quantize(w, hessian, config, act_order=True, factor=factor)
    asym = gptq_quantize(target, hessian, config, act_order=True, factor=factor)
    np.testing.assert_array_equal(plain.q, asym.q)
    np.testing.assert_array_equal(plain.scales, asym.scales)


def test_paired_accumulator_and_bad_alpha():
    x, x_float = _inputs()
    paired, plain = PairedAccumulator(), HessianAccumulator()
    paired.update(x[:100], x_float[:100])
    paired.update(x[100:], x_float[100:])
    plain.update(x)
    np.testing.assert_allclose(paired.hessian, plain.hessian, rtol=1e-12)
    np.testing.assert_allclose(paired.cross, 2 * x.T @ (x_float - x) / len(x), rtol=1e-10, atol=1e-12)
    with pytest.raises(GraphqError, match="asymmetric_alpha"):
        GptqConfig(asymmetric_alpha=0.0)


def test_reference_cache_follows_the_float_model(tiny_llama_onnx):
    """With block 0 perturbed after hold_reference, block 1's float-side input equals the unperturbed
    model's, while the current-side input changes."""
    def block1_inputs(perturb: bool, reference: bool):
        model = ir.load(tiny_llama_onnx)
        stages = partition(model)
        runner = StagedCalibration(model, stages, WINDOWS, threads=1, progress=False, reference=reference)
        name = next(n for n in stages[2].nodes if n.name.endswith("q_proj/MatMul")).inputs[0].name
        found = None
        for stage in runner.stages():
            if stage.key == (0, 0) and reference:
                runner.hold_reference(stage)
            if stage.key == (0, 0) and perturb:
                down = next(n for n in stage.nodes if n.name.endswith("down_proj/MatMul"))
                down.inputs[1].const_value = ir.tensor(down.inputs[1].const_value.numpy() * 3.0)
            if stage.key == (1, 0):
                if reference:
                    runner.hold_reference(stage)
                    found = runner.calibrate(stage, [name], PairedAccumulator, reference=True)[name]
                else:
                    found = runner.calibrate(stage, [name], HessianAccumulator)[name]
            runner.advance(stage)
        return found

    float_side = block1_inputs(False, False).hessian
    paired = block1_inputs(True, True)
    assert not np.allclose(paired.hessian, float_side, rtol=1e-3)
    # C = 2 X_q^T (X_f - X_q) / n, so H + C = 2 X_q^T X_f / n: not zero, and X_f is the float input.
    assert np.abs(paired.cross).max() > 1e-3
    unperturbed = block1_inputs(False, True)
    assert not unperturbed.cross.any()  # no upstream change: X_f = X_q exactly
    np.testing.assert_array_equal(unperturbed.hessian, float_side)


def test_hold_reference_needs_a_reference_runner(tiny_llama_onnx):
    model = ir.load(tiny_llama_onnx)
    stages = partition(model)
    runner = StagedCalibration(model, stages, WINDOWS, threads=1, progress=False)
    with pytest.raises(GraphqError, match="reference=True"):
        runner.hold_reference(stages[1])


def _recipe(**gptq):
    base = RECIPES["w4-gptq"]
    return dataclasses.replace(base, calibration=CalibrationConfig(windows=2, window_tokens=64),
                               weights=dataclasses.replace(base.weights, group_size=32),
                               gptq=dataclasses.replace(base.gptq, **{"true_sequential": False, "asymmetric": False, **gptq}))


def _initializers(path):
    model = onnx.load(str(path))
    return {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}


def _packed(path) -> dict[str, np.ndarray]:
    """MatMulNBits node name -> its packed codes."""
    model = onnx.load(str(path))
    tensors = {t.name: t for t in model.graph.initializer}
    return {n.name: onnx.numpy_helper.to_array(tensors[n.input[1]]) for n in model.graph.node if n.op_type == "MatMulNBits"}


@pytest.fixture(scope="module")
def plain_w4(tiny_llama_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("plain") / "model.onnx"
    quantize_weights(tiny_llama_onnx, out, _recipe(), progress=False)
    return _packed(out)


@pytest.mark.parametrize("options", [{"true_sequential": True}, {"asymmetric": True},
                                     {"true_sequential": True, "asymmetric": True},
                                     {"true_sequential": True, "asymmetric": True, "awq_scales": True}])
def test_options_end_to_end(options, tiny_llama_onnx, plain_w4, tmp_path):
    out = tmp_path / "model.onnx"
    result = quantize_weights(tiny_llama_onnx, out, _recipe(**options), progress=False)
    onnx.checker.check_model(str(out))
    model = ir.load(out)
    assert sum(n.op_type == "MatMulNBits" for n in model.graph) == len(result.quantized_nodes)
    ids = WINDOWS[:1, :16].astype(np.int64)
    feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids), "position_ids": np.arange(16)[None, :]}
    feeds = {i.name: feeds[i.name] for i in ir.load(tiny_llama_onnx).graph.inputs}
    (reference,) = run_model(tiny_llama_onnx, feeds, tmp_path)[:1]
    (quantized,) = run_model(out, feeds, tmp_path)[:1]
    error = np.abs(quantized - reference).mean() / np.abs(reference).mean()
    assert error < 0.2, error  # random tiny model at W4 g32: the budget of test_weight_only_quantize's recipes
    changed = _packed(out)
    q = "/model/layers.0/self_attn/q_proj/"
    o = "/model/layers.0/self_attn/o_proj/"
    late = "/model/layers.1/mlp/down_proj/"

    def codes(packed, node):
        return next(v for name, v in packed.items() if name.startswith(node))

    if not options.get("awq_scales"):
        # The first group of block 0 sees the float model's own inputs either way: bit for bit the same.
        np.testing.assert_array_equal(codes(changed, q), codes(plain_w4, q))
    if options.get("true_sequential"):  # o_proj sees quantized q/k/v
        assert not np.array_equal(codes(changed, o), codes(plain_w4, o))
    assert not np.array_equal(codes(changed, late), codes(plain_w4, late))


def test_asymmetric_without_upstream_error_changes_nothing(tiny_llama_onnx, plain_w4, tmp_path):
    """Only block 0's q/k/v quantized: they read the float model's own inputs (X_f = X_q, C = 0), so
    asymmetric calibration must give the plain GPTQ model bit for bit."""
    recipe = dataclasses.replace(_recipe(asymmetric=True), float_nodes=(r"^(?!/model/layers\.0/self_attn/[qkv]_proj/)",))
    plain = dataclasses.replace(_recipe(), float_nodes=recipe.float_nodes)
    first = quantize_weights(tiny_llama_onnx, tmp_path / "a" / "model.onnx", recipe, progress=False)
    second = quantize_weights(tiny_llama_onnx, tmp_path / "p" / "model.onnx", plain, progress=False)
    assert len(first.quantized_nodes) == 3
    a, p = _initializers(first.model_path), _initializers(second.model_path)
    assert a.keys() == p.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], p[name])


def test_stage_model_keeps_only_the_nodes_an_output_needs(tiny_llama_onnx):
    """Calibrating q/k/v's input runs the block's first norm only, with the same values as the whole stage."""
    model = ir.load(tiny_llama_onnx)
    stages = partition(model)
    runner = StagedCalibration(model, stages, WINDOWS, threads=1, progress=False)
    for stage in runner.stages():
        if stage.key == (0, 0):
            break
        runner.advance(stage)
    name = next(n for n in stage.nodes if n.name.endswith("q_proj/MatMul")).inputs[0].name
    types = {i: runner.cache[0][i].dtype for i in stage.inputs}
    small = onnx.load_from_string(stage_model(model, stage, [name], types))
    full = onnx.load_from_string(stage_model(model, stage, [name, *stage.outputs], types))
    assert 0 < len(small.graph.node) < len(full.graph.node) // 4
    assert not any("MatMul" in n.op_type for n in small.graph.node)
    (alone,) = next(runner._run(stage, [name]))[1]
    together = next(runner._run(stage, [name, *stage.outputs]))[1][0]
    np.testing.assert_array_equal(alone, together)
