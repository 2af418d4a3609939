"""Weight-only recipes end to end on the tiny model, generation from the quantized KV-cache graph,
and bad input."""

import dataclasses
import json

import onnx
import onnx_ir as ir
import pytest

from conftest import sha256_tree
from graphq.calibrate import CalibrationConfig
from graphq.cli import main
from graphq.config import RECIPES, load_recipe
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.numerics.weight_only import WeightQuantConfig
from graphq.passes.weight_only_emit import WeightOnlyEmitConfig
from graphq.weight_only import GptqConfig, WeightOnlyRecipe, quantize_weights

SMALL = CalibrationConfig(windows=3, window_tokens=128)
# Uniform grids (MatMulNBits); cube-root recipes are tested in tests/test_cuberoot_quantize.py.
WEIGHT_ONLY = sorted(n for n, r in RECIPES.items() if isinstance(r, WeightOnlyRecipe) and r.grid == "uniform")


@pytest.fixture(scope="module")
def float_ppl(tiny_llama_onnx):
    return evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity


@pytest.mark.parametrize("name", WEIGHT_ONLY)
def test_recipe_end_to_end(name, tiny_llama_onnx, float_ppl, tmp_path):
    recipe = dataclasses.replace(RECIPES[name], calibration=SMALL,
                                 weights=dataclasses.replace(RECIPES[name].weights, group_size=min(RECIPES[name].weights.group_size, 32)),
                                 tuning=dataclasses.replace(RECIPES[name].tuning, steps=min(RECIPES[name].tuning.steps, 3), window_tokens=64))
    before = sha256_tree(tiny_llama_onnx.parent)
    out = tmp_path / "w" / "model.onnx"

    result = quantize_weights(tiny_llama_onnx, out, recipe, progress=False)

    assert sha256_tree(tiny_llama_onnx.parent) == before
    onnx.checker.check_model(str(out))
    model = ir.load(out)
    fused = [n for n in model.graph if n.op_type == "MatMulNBits"]
    assert len(fused) == len(result.quantized_nodes) == 15
    # The tied LM head shares its codes with the embedding lookup, in embedding_bits (8 by default).
    assert {n.attributes["bits"].value for n in fused if not n.name.startswith("/lm_head/")} == {recipe.weights.bits}
    assert {n.attributes["bits"].value for n in fused if n.name.startswith("/lm_head/")} == {recipe.embedding_config.bits}
    # Attention and rotary MatMuls have no constant weight: reported and left float. Float zero points add
    # the offset term's MatMuls (group sums, offsets) beside each symmetric kernel.
    added = [n for n in model.graph if n.name.endswith("_zero_point_offsets") or "/group_sums_" in n.name]
    # 14 offsets (the head keeps integer zero points) and 4 group sums per block (q/k/v and gate/up share theirs)
    assert len(added) == (14 + 2 * 4 if recipe.weights.float_zero_points else 0)
    assert len(result.float_nodes) == 5
    assert all(n.op_type != "MatMul" or n.name in result.float_nodes for n in model.graph if n not in added)
    assert json.loads(model.metadata_props["graphq.recipe"])["name"] == name
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    budget = 0.002 if recipe.weights.bits == 8 else 0.03  # random tiny model: error budget of the bit width
    assert ppl == pytest.approx(float_ppl, rel=budget)
    assert result.size_breakdown()["quantized_weights"] == 2 * (64 * 64 * 2 + 64 * 32 * 2 + 64 * 128 * 3) + 64 * 260


def test_generation_from_quantized_kv_cache_graph(tiny_llama_past_onnx, tmp_path):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    out = tmp_path / "gen" / "model.onnx"
    quantize_weights(tiny_llama_past_onnx, out, dataclasses.replace(RECIPES["w4-rtn"], weights=WeightQuantConfig(4, 32)), progress=False)
    model = ORTModelForCausalLM.from_pretrained(str(out.parent), local_files_only=True, use_io_binding=False)
    prompt = torch.tensor([[5, 17, 99, 3, 42]])
    generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=12, do_sample=False)
    assert generated.shape == (1, 17) and torch.equal(generated[:, :5], prompt)
    # The same greedy tokens as graphq's own decode loop on the quantized graph.
    from graphq.evaluate import greedy_decode
    from graphq.verify import cpu_session

    tokens, _ = greedy_decode(cpu_session(out), prompt[0].numpy(), 12)
    assert tokens == generated[0, 5:].tolist()


def test_cli_weight_only_options_and_report(tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "w4-rtn", "--group-size", "32", "--asym",
                 "--format", "qdq"])
    assert code == 0
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["recipe"]["weights"] == {"bits": 4, "group_size": 32, "symmetric": False, "float_zero_points": False,
                                           "scale_dtype": "float32"}  # --format qdq keeps float32 scales
    assert report["size_breakdown"]["file_over_bound"] > 0
    assert "size:" in capsys.readouterr().out
    assert sum(1 for n in ir.load(out).graph if n.op_type == "DequantizeLinear") == 15


@pytest.mark.parametrize("args, message", [
    (["--recipe", "w4-rtn", "--bits", "9"], "bits"),
    (["--recipe", "w4-rtn", "--alpha", "0.5"], "does not apply"),
    (["--recipe", "w8a8", "--bits", "4"], "does not apply"),
    (["--recipe", "w4-rtn", "--float-zero-points"], "asymmetric"),
    (["--recipe", "w4-rtn-g32-fzp", "--format", "qdq"], "MatMulNBits only"),
    (["--recipe", "w4-rtn", "--group-size", "48", "--format", "qdq"], ""),
])
def test_cli_bad_options(args, message, tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "bad" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), *args])
    if message:
        assert code == 1 and message in capsys.readouterr().err
        assert not out.exists()
    else:  # 48 does not divide K = 128 for the MLP: refused clearly or padded, never a crash
        assert code in (0, 1)
        err = capsys.readouterr().err
        assert "Traceback" not in err and (code == 0 or "group" in err)


def test_non_dividing_group_without_padding_is_refused(tiny_llama_onnx, tmp_path):
    recipe = dataclasses.replace(RECIPES["w4-rtn"], weights=WeightQuantConfig(4, 48), pad_groups=False)
    with pytest.raises(GraphqError, match="does not divide"):
        quantize_weights(tiny_llama_onnx, tmp_path / "x.onnx", recipe, progress=False)
    assert not (tmp_path / "x.onnx").exists()


def test_bad_gptq_settings_are_refused():
    with pytest.raises(GraphqError):
        GptqConfig(damp=0)
    with pytest.raises(GraphqError, match="precision"):
        GptqConfig(precision="float16")
    with pytest.raises(GraphqError):
        WeightOnlyRecipe(method="awq-ish")
    fzp = WeightQuantConfig(4, 32, False, float_zero_points=True)
    with pytest.raises(GraphqError, match="MatMulNBits only"):
        WeightOnlyRecipe(weights=fzp, emit=WeightOnlyEmitConfig(format="qdq"))
    # the embedding table (GatherBlockQuantized) takes integer zero points
    assert not WeightOnlyRecipe(weights=fzp).embedding_config.float_zero_points
    with pytest.raises(GraphqError):
        load_recipe("w3-magic")
