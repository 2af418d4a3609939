"""Cube-root recipes end to end on the tiny model (w4-cuberoot, w8a8-cuberoot), the CLI, and bad input."""

import collections
import dataclasses
import json

import onnx
import onnx_ir as ir
import pytest
from conftest import sha256_tree

from graphq.calibrate import CalibrationConfig
from graphq.cli import main
from graphq.config import RECIPES
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.numerics.weight_only import WeightQuantConfig
from graphq.quantize import quantize_model
from graphq.weight_only import WeightOnlyRecipe, quantize_weights

SMALL = CalibrationConfig(windows=3, window_tokens=128)


@pytest.fixture(scope="module")
def float_ppl(tiny_llama_onnx):
    return evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity


@pytest.mark.parametrize("form", ["codebook", "dq-cube"])
def test_w4_cuberoot_end_to_end(form, tiny_llama_onnx, float_ppl, tmp_path):
    base = RECIPES["w4-cuberoot"]
    recipe = dataclasses.replace(base, weights=dataclasses.replace(base.weights, group_size=32),
                                 emit=dataclasses.replace(base.emit, format=form))
    before = sha256_tree(tiny_llama_onnx.parent)
    out = tmp_path / "w" / "model.onnx"

    result = quantize_weights(tiny_llama_onnx, out, recipe, progress=False)

    assert sha256_tree(tiny_llama_onnx.parent) == before
    onnx.checker.check_model(str(out))
    model = ir.load(out)
    ops = collections.Counter(n.op_type for n in model.graph)
    # 14 linear layers cube-root; the tied LM head stays uniform 8-bit, sharing codes with the lookup
    assert ops["MatMulNBits"] == 1 and ops["GatherBlockQuantized"] == 1
    assert ops["Pow" if form == "dq-cube" else "Gather"] >= 14
    codes = [v.const_value for n, v in model.graph.initializers.items() if n.endswith(".qweight") and "lm_head" not in n]
    assert len(codes) == 14 and {c.dtype for c in codes} == {ir.DataType.UINT4 if form == "codebook" else ir.DataType.INT4}
    size = result.size_breakdown()
    assert size["quantized_weights"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 64 * 260
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.03)  # random tiny model: the int4 error budget
    assert json.loads(model.metadata_props["graphq.recipe"])["grid"] == "cuberoot"


def test_w4_cuberoot_gptq_end_to_end(tiny_llama_onnx, float_ppl, tmp_path):
    base = RECIPES["w4-cuberoot-gptq"]
    recipe = dataclasses.replace(base, weights=dataclasses.replace(base.weights, group_size=32), calibration=SMALL)
    before = sha256_tree(tiny_llama_onnx.parent)
    out = tmp_path / "g" / "model.onnx"

    quantize_weights(tiny_llama_onnx, out, recipe, progress=False)

    assert sha256_tree(tiny_llama_onnx.parent) == before
    onnx.checker.check_model(str(out))
    model = ir.load(out)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["MatMulNBits"] == 1 and ops["GatherBlockQuantized"] == 1 and ops["Gather"] >= 14
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.03)
    stored = json.loads(model.metadata_props["graphq.recipe"])
    assert stored["grid"] == "cuberoot" and stored["method"] == "gptq"


@pytest.mark.parametrize("scheme", ["dynamic-token"])  # static: tests/test_cuberoot_qdq.py (the calibration is the slow part)
def test_w8a8_cuberoot_end_to_end(scheme, tiny_llama_onnx, float_ppl, tmp_path):
    recipe = dataclasses.replace(RECIPES["w8a8-cuberoot"], calibration=SMALL,
                                 activations=dataclasses.replace(RECIPES["w8a8-cuberoot"].activations, activation_scheme=scheme))
    out = tmp_path / "q" / "model.onnx"

    result = quantize_model(tiny_llama_onnx, out, recipe, progress=False)

    onnx.checker.check_model(str(out), full_check=True)
    assert result.integer_kernels == {}  # cubed values: no integer kernel, stated in the report
    model = ir.load(out)
    ops = collections.Counter(n.op_type for n in model.graph)
    assert ops["Sign"] == 8  # one companding per distinct activation: (qkv, o, gate/up, down) x 2 layers
    assert ops["QuantizeLinear"] == (8 if scheme == "static" else 0)
    # every planned weight is stored as 8-bit codes (+ one scale per column); the float matrix left is the embedding
    assert [n for n, v in model.graph.initializers.items()
            if v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2 and v.const_value.shape[0] > 1] \
        == ["model.embed_tokens.weight"]
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.01)


@pytest.mark.parametrize("args, message", [
    (["--recipe", "w4-cuberoot", "--bits", "2"], "supports 4 or 8 bits"),
    (["--recipe", "w4-cuberoot", "--bits", "3"], "supports 4 or 8 bits"),
    (["--recipe", "w4-cuberoot", "--asym"], "symmetric"),
    (["--recipe", "w4-cuberoot", "--format", "matmulnbits"], "cube-root weights are emitted as"),
    (["--recipe", "w4-rtn", "--format", "codebook"], "is for cube-root weights"),
])
def test_cli_bad_cuberoot_options_write_nothing(args, message, tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "bad" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), *args])
    assert code == 1 and message in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_cuberoot_with_awq_is_refused():
    with pytest.raises(GraphqError, match="not with AWQ scales"):
        WeightOnlyRecipe(method="awq", grid="cuberoot", weights=RECIPES["w4-cuberoot"].weights, emit=RECIPES["w4-cuberoot"].emit)
    with pytest.raises(GraphqError, match="not with AWQ scales"):
        dataclasses.replace(RECIPES["w4-cuberoot-gptq"], gptq=dataclasses.replace(RECIPES["w4-gptq"].gptq, awq_scales=True))
    with pytest.raises(GraphqError, match="supports 4 or 8 bits"):
        dataclasses.replace(RECIPES["w4-cuberoot"], weights=WeightQuantConfig(bits=6, group_size=128))


def test_cli_w4_cuberoot_report(tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "w4-cuberoot", "--group-size", "32"]) == 0
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["recipe"]["grid"] == "cuberoot" and report["recipe"]["emit"]["format"] == "codebook"
    # linear layers 4 + 32/32 bits, the shared 8-bit head/embedding 8 + 32/32: same bound as w4-rtn
    linear, head = 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3), 64 * 260
    assert report["size_breakdown"]["bits_per_quantized_weight"] == pytest.approx((linear * 5 + head * 9) / (linear + head), abs=1e-4)
    assert "codebook" in capsys.readouterr().out
