"""W8A8 end to end on the tiny model: every recipe, the CLI, recipe files, and bad input."""

import dataclasses
import json
from pathlib import Path

import onnx
import onnx_ir as ir
import pytest

from conftest import sha256_tree
from graphq.calibrate import CalibrationConfig
from graphq.cli import main
from graphq.config import RECIPES, W8A8Recipe, dump_recipe, load_recipe, recipe_from_dict, recipe_to_dict
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.passes.keep_float import keep_float_violations, kept_nodes
from graphq.quantize import quantize_model

SMALL_CALIBRATION = CalibrationConfig(windows=3, window_tokens=128)
# Integer-kernel recipes; cube-root W8A8 (float MatMuls) is tested in tests/test_cuberoot_quantize.py.
W8A8 = sorted(n for n, r in RECIPES.items() if isinstance(r, W8A8Recipe) and r.grid == "uniform")


@pytest.fixture(scope="module")
def float_ppl(tiny_llama_onnx):
    return evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity


@pytest.mark.parametrize("name", W8A8)
def test_recipe_end_to_end(name, tiny_llama_onnx, float_ppl, tmp_path):
    recipe = dataclasses.replace(RECIPES[name], calibration=SMALL_CALIBRATION)
    source_digest = sha256_tree(tiny_llama_onnx.parent)
    out = tmp_path / "q" / "model.onnx"

    result = quantize_model(tiny_llama_onnx, out, recipe, progress=False)

    assert sha256_tree(tiny_llama_onnx.parent) == source_digest
    onnx.checker.check_model(str(out), full_check=True)
    quantized = sum(1 for p in result.plan.values() if p == "int8")
    # q, k, v, o, gate, up, down per layer, and the LM head unless the recipe keeps it float.
    assert quantized == 2 * 7 + (0 if recipe.float_nodes else 1)
    assert all(p == "float" for n, p in result.plan.items() if n.startswith("/lm_head/")) == bool(recipe.float_nodes)
    kernel = "MatMulIntegerToFloat"
    # int8 activations with zero point 0 (TensorRT) fuse on the CPU EP only where a quantized tensor
    # has one consumer: o_proj and down_proj in each layer. Packed recipes: one MatMul per q/k/v and
    # per gate/up group (7 -> 4 per layer).
    expected_fused = quantized if recipe.activations.target == "cpu" else 4
    if recipe.pack_matmuls:
        expected_fused -= 3 * 2
    if recipe.peg is not None:  # one integer MatMul per channel group
        expected_fused *= recipe.peg.groups
    assert result.integer_kernels.get(kernel) == expected_fused
    model = ir.load(out)
    original_kept = {n.name for n in kept_nodes(ir.load(tiny_llama_onnx))}
    assert keep_float_violations(n for n in model.graph if n.name in original_kept) == []
    assert json.loads(model.metadata_props["graphq.recipe"])["name"] == name
    assert (out.parent / "tokenizer.json").is_file()
    # Error budget: int8 weights and activations on a random tiny model cost well under 1 %.
    ppl = evaluate_model(out, EvalConfig(windows=2, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.01)
    # Every quantized weight is stored as int8 only; the one float matrix left is the embedding.
    float_matrices = [n for n, v in model.graph.initializers.items()
                      if v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2]
    assert float_matrices == ["model.embed_tokens.weight"]  # a float LM head reads it through Transpose
    assert out.stat().st_size < tiny_llama_onnx.stat().st_size


def test_recipe_files_round_trip(tmp_path):
    for name, recipe in RECIPES.items():
        assert recipe_from_dict(json.loads(json.dumps(recipe_to_dict(recipe)))) == recipe
        for suffix in (".json", ".yaml"):
            path = tmp_path / f"{name}{suffix}"
            path.write_text(dump_recipe(recipe, path))
            assert load_recipe(str(path)) == recipe
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({**recipe_to_dict(RECIPES["w8a8"]), "smoothquant": {"alpha": 0.5, "beta": 1}}))
    with pytest.raises(GraphqError, match="unknown key"):
        load_recipe(str(bad))
    with pytest.raises(GraphqError, match="unknown recipe"):
        load_recipe("w3a3")


def test_partial_recipe_mappings_keep_the_field_defaults():
    """A recipe file's nested mapping overrides only what it names: ``weights: {bits: 8}`` keeps the weight-only
    recipe's group, symmetry and float16 scales (not the bare WeightQuantConfig defaults)."""
    recipe = recipe_from_dict({"kind": "weight-only", "name": "w8", "weights": {"bits": 8}})
    assert recipe.weights == dataclasses.replace(RECIPES["w4-rtn"].weights, bits=8)
    assert recipe.weights.scale_dtype == "float16"
    control = load_recipe(str(Path(__file__).parents[1] / "tools" / "recipes" / "w4-rtn-f32.yaml"))
    assert control.weights == dataclasses.replace(RECIPES["w4-rtn"].weights, scale_dtype="float32")


def test_cli_quantize_writes_model_report_and_recipe(tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "cli" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "w8a8", "--calib-windows", "2",
                 "--alpha", "0.4", "--save-recipe", str(tmp_path / "used.yaml")])
    assert code == 0
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["recipe"]["smoothquant"]["alpha"] == 0.4
    assert len(report["quantized_nodes"]) == 14 and report["float_nodes"] == ["/lm_head/MatMul"]
    assert report["integer_kernels_in_ort_graph"] == {"MatMulIntegerToFloat": 8}  # q/k/v and gate/up packed
    assert load_recipe(str(tmp_path / "used.yaml")).calibration.windows == 2
    assert "MatMulIntegerToFloat" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--alpha", "1.5"], "alpha must lie in [0, 1]"),
    (["--calib-windows", "0"], "windows must be at least 1"),
    (["--calib-text", "EMPTY"], "empty"),
    (["--calib-text", "SHORT"], "only 0 windows"),
    (["--calib-text", "MISSING"], "no such text file"),
    (["--recipe", "nope"], "unknown recipe"),
])
def test_cli_bad_input_writes_nothing(args, message, tiny_llama_onnx, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "short.txt").write_text("too short for a window")
    args = [{"EMPTY": str(tmp_path / "empty.txt"), "SHORT": str(tmp_path / "short.txt"),
             "MISSING": str(tmp_path / "missing.txt")}.get(a, a) for a in args]
    out = tmp_path / "out" / "model.onnx"
    code = main(["quantize", str(tiny_llama_onnx), "-o", str(out), *args])
    assert code == 1
    assert message in capsys.readouterr().err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_model_without_matmul_is_refused(tmp_path):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4]))
    relu = ir.node("Relu", [x], name="relu")
    relu.outputs[0].name = "y"
    relu.outputs[0].dtype, relu.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([4])
    path = tmp_path / "relu" / "model.onnx"
    path.parent.mkdir()
    ir.save(ir.Model(ir.Graph([x], [relu.outputs[0]], nodes=[relu], opset_imports={"": 18}, name="g"), ir_version=10), path)
    with pytest.raises(GraphqError, match="no MatMul with a constant weight"):
        quantize_model(path, tmp_path / "out.onnx", RECIPES["w8a8"], progress=False)
    assert not (tmp_path / "out.onnx").exists()


def test_output_equal_to_input_is_refused(tiny_llama_onnx):
    with pytest.raises(GraphqError, match="is the input"):
        quantize_model(tiny_llama_onnx, tiny_llama_onnx, RECIPES["w8a8"], progress=False)
