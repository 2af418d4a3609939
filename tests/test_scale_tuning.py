"""End-to-end scale tuning: kernels against their formulas, and the weight-only pipeline with tuning on
the tiny model (codes kept, scales moved, loss down, verified output; a guard that reverts; refusals)."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch

from graphq.calibrate import CalibrationConfig
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.numerics.scale_tuning import distillation_loss, tuned_weight
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn
from graphq.scale_tuning import ScaleTuningConfig
from graphq.weight_only import WeightOnlyRecipe, quantize_weights

SMALL = CalibrationConfig(windows=3, window_tokens=128)
W4 = WeightQuantConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float16")


def test_tuned_weight_at_zero_is_the_dequantized_weight():
    w = np.random.default_rng(0).normal(size=(80, 6)).astype(np.float32)
    q = quantize_rtn(w, dataclasses.replace(W4, symmetric=False), pad=True)
    rows = q.group_of_rows()
    codes = torch.from_numpy((q.q.astype(np.int16) - q.zero_points[rows].astype(np.int16)).astype(np.int8))
    scales = torch.from_numpy(q.scales)
    got = tuned_weight(codes, scales, torch.zeros_like(scales), torch.from_numpy(rows))
    np.testing.assert_allclose(got.numpy(), q.dequantize(), rtol=1e-6, atol=1e-7)
    theta = torch.full_like(scales, 0.5)
    np.testing.assert_allclose(tuned_weight(codes, scales, theta, torch.from_numpy(rows)).numpy(), 1.5 * q.dequantize(), rtol=1e-6)


def test_tuned_weight_gradient_is_the_product_rule():
    rng = np.random.default_rng(2)
    codes = torch.from_numpy(rng.integers(-8, 8, size=(10, 3)).astype(np.int8))
    rows = torch.from_numpy(np.arange(10) // 4)  # groups of 4, the last one short
    base = torch.from_numpy(rng.uniform(0.5, 1.5, size=(3, 3)))
    theta = torch.from_numpy(rng.normal(scale=0.1, size=(3, 3))).requires_grad_(True)
    upstream = torch.from_numpy(rng.normal(size=(10, 3)))
    (tuned_weight(codes, base, theta, rows) * upstream).sum().backward()
    reference = theta.detach().clone().requires_grad_(True)
    (codes.double() * (base * (1 + reference)).index_select(0, rows) * upstream).sum().backward()
    torch.testing.assert_close(theta.grad, reference.grad, rtol=1e-12, atol=1e-12)
    assert torch.autograd.gradcheck(lambda t: tuned_weight(codes, base, t, rows), (theta.detach().clone().requires_grad_(True),))


def test_distillation_loss_is_the_mean_token_kl():
    rng = np.random.default_rng(1)
    student, teacher = (torch.from_numpy(rng.normal(size=(2, 5, 7))) for _ in range(2))
    p = torch.softmax(teacher, -1)
    expected = (p * (torch.log_softmax(teacher, -1) - torch.log_softmax(student, -1))).sum(-1).mean()
    torch.testing.assert_close(distillation_loss(student, teacher), expected.float())
    assert distillation_loss(teacher, teacher).item() == pytest.approx(0.0, abs=1e-6)


def _codes_and_scales(path):
    model = ir.load(path)
    out = {}
    for node in model.graph:
        if node.op_type == "MatMulNBits":
            out[node.name] = (node.inputs[1].const_value.numpy().copy(), node.inputs[2])
    return model, out


def _scale_values(model, value):
    """The float32 scales behind a MatMulNBits scales input (a float16 initializer read through a Cast)."""
    producer = value.producer()
    source = producer.inputs[0] if producer is not None else value
    return np.asarray(source.const_value.numpy(), dtype=np.float32)


@pytest.fixture(scope="module")
def untuned(tiny_llama_onnx, tmp_path_factory):
    recipe = WeightOnlyRecipe(name="w4", method="rtn", weights=W4, calibration=SMALL)
    out = tmp_path_factory.mktemp("untuned") / "model.onnx"
    return quantize_weights(tiny_llama_onnx, out, recipe, progress=False)


def test_tuning_moves_scales_keeps_codes_and_lowers_the_loss(tiny_llama_onnx, untuned, tmp_path):
    tuning = ScaleTuningConfig(steps=12, learning_rate=0.01, window_tokens=64, held_out=2)
    recipe = dataclasses.replace(untuned.recipe, name="w4-tuned", tuning=tuning)
    result = quantize_weights(tiny_llama_onnx, tmp_path / "t" / "model.onnx", recipe, progress=False)

    report = result.tuning
    assert report.kept and report.loss_after < 0.9 * report.loss_before
    assert report.tuned_weights == 14  # every linear layer; the tied head keeps the embedding's codes
    onnx.checker.check_model(str(result.model_path))
    plain_model, plain = _codes_and_scales(untuned.model_path)
    tuned_model, tuned = _codes_and_scales(result.model_path)
    assert plain.keys() == tuned.keys()
    moved = 0
    for name, (codes, scales) in tuned.items():
        np.testing.assert_array_equal(codes, plain[name][0])  # same codes, same bytes
        before, after = _scale_values(plain_model, plain[name][1]), _scale_values(tuned_model, scales)
        moved += not np.array_equal(before, after)
        if name.startswith("/lm_head/"):
            np.testing.assert_array_equal(before, after)
    assert moved == 14
    assert result.weight_bits == untuned.weight_bits  # the same storage; the file differs by the recipe metadata
    assert abs(result.file_bytes - untuned.file_bytes) < 200
    # Closer to the float model on the evaluation text than the untuned scales (random tiny model).
    config = EvalConfig(windows=2, window_tokens=128, measure_speed=False)
    floating = evaluate_model(tiny_llama_onnx, config, progress=False).perplexity
    gap = lambda path: abs(np.log(evaluate_model(path, config, progress=False).perplexity / floating))  # noqa: E731
    assert gap(result.model_path) < gap(untuned.model_path)


def test_a_step_that_makes_things_worse_is_reverted(tiny_llama_onnx, untuned, tmp_path):
    tuning = ScaleTuningConfig(steps=2, learning_rate=0.9, window_tokens=64, held_out=2)  # steps far too large
    recipe = dataclasses.replace(untuned.recipe, tuning=tuning)
    result = quantize_weights(tiny_llama_onnx, tmp_path / "r" / "model.onnx", recipe, progress=False)
    assert not result.tuning.kept and result.tuning.loss_after > result.tuning.loss_before
    plain_model, plain = _codes_and_scales(untuned.model_path)
    tuned_model, tuned = _codes_and_scales(result.model_path)
    for name, (codes, scales) in tuned.items():
        np.testing.assert_array_equal(_scale_values(tuned_model, scales), _scale_values(plain_model, plain[name][1]))


def test_no_steps_no_tuning(untuned):
    assert untuned.tuning is None and untuned.recipe.tuning.steps == 0


@pytest.mark.parametrize("change, message", [
    ({"weights": dataclasses.replace(W4, symmetric=False, float_zero_points=True)}, "float zero points"),
    ({"grid": "cuberoot", "weights": WeightQuantConfig(bits=4, group_size=32, symmetric=True), "emit": None}, "cube-root"),
])
def test_tuning_refuses_what_it_cannot_train(change, message):
    from graphq.passes.weight_only_emit import WeightOnlyEmitConfig

    if change.get("emit", 0) is None:
        change["emit"] = WeightOnlyEmitConfig(format="codebook")
    with pytest.raises(GraphqError, match=message):
        WeightOnlyRecipe(tuning=ScaleTuningConfig(steps=1), **change)


@pytest.mark.parametrize("field, value", [("steps", -1), ("learning_rate", 0.0), ("held_out", 0), ("window_tokens", 1)])
def test_bad_tuning_settings_are_refused(field, value):
    with pytest.raises(GraphqError):
        ScaleTuningConfig(**{field: value})


def test_streamed_quantization_refuses_tuning(tiny_llama_onnx, tmp_path):
    recipe = WeightOnlyRecipe(method="rtn", weights=W4, tuning=ScaleTuningConfig(steps=1))
    with pytest.raises(GraphqError, match="streamed"):
        quantize_weights(tiny_llama_onnx, tmp_path / "s" / "model.onnx", recipe, progress=False, streamed=True)
    assert not (tmp_path / "s" / "model.onnx").exists()


def test_cli_tune_steps(tiny_llama_onnx, tmp_path, capsys):
    import json

    from graphq.cli import main

    out = tmp_path / "cli" / "model.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "w4-rtn", "--group-size", "32",
                 "--tune-steps", "3", "--calib-windows", "2"]) == 0
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["recipe"]["tuning"]["steps"] == 3 and report["tuning"]["tuned_weights"] == 14
    assert "scale tuning: held-out distillation loss" in capsys.readouterr().out
    for args in (["--recipe", "w4-rtn-g32-fzp", "--tune-steps", "3"], ["--recipe", "w8a8", "--tune-steps", "3"],
                 ["--recipe", "mixed", "--tune-steps", "3"],
                 ["--recipe", "w4-rtn", "--tune-steps", "-1"]):
        assert main(["quantize", str(tiny_llama_onnx), "-o", str(tmp_path / "bad" / "model.onnx"), *args]) == 1
        assert not (tmp_path / "bad" / "model.onnx").exists()


def test_tuning_is_deterministic(tiny_llama_onnx, untuned, tmp_path):
    from conftest import sha256_tree

    recipe = dataclasses.replace(untuned.recipe, tuning=ScaleTuningConfig(steps=3, window_tokens=64, held_out=2))
    digests = []
    for run in ("a", "b"):
        out = tmp_path / run / "model.onnx"
        quantize_weights(tiny_llama_onnx, out, recipe, progress=False)
        digests.append(list(sha256_tree(out).values()))
    assert digests[0] == digests[1]
