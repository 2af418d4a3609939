"""Mixed-precision quantization on the tiny model: the plan is applied node by node (MatMulNBits with 4 or
8 bits, float MatMuls), metadata is readable from the saved model, bad plans and foreign analyses are
refused, the CLI path works."""

import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import sha256_tree
from graphq.cli import main
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model
from graphq.calibrate import CalibrationConfig
from graphq.mixed import MixedRecipe, gptq_columns, quantize_mixed
from graphq.numerics.sensitivity import precision_config
from graphq.planner import PrecisionPlan
from graphq.sensitivity import AnalysisConfig, analyze_model

SMALL = AnalysisConfig(windows=3, window_tokens=32, batch=3, threads=1, measured_others=4, lens_nodes=2,
                       head_hot_fraction=0.05)  # row tiers are off by default; tested here
CALIBRATION = CalibrationConfig(windows=2, window_tokens=64)
RECIPE = MixedRecipe(analysis=SMALL, calibration=CALIBRATION)


@pytest.fixture(scope="module")
def analysis_file(tiny_llama_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("mixed") / "analysis.json"
    analyze_model(tiny_llama_onnx, SMALL, output=path, progress=False)
    return path


def _metadata(path):
    """Node name -> metadata_props, read with the onnx package (what Netron reads)."""
    model = onnx.load(str(path))
    return {node.name: {p.key: p.value for p in node.metadata_props} for node in model.graph.node}, model


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_budget_plan_end_to_end(method, analysis_file, tiny_llama_onnx, tmp_path):
    before = sha256_tree(tiny_llama_onnx.parent)
    out = tmp_path / "m" / "model.onnx"
    recipe = MixedRecipe(budget_bits=5.0, analysis=SMALL, calibration=CALIBRATION, method=method)
    result = quantize_mixed(tiny_llama_onnx, out, recipe, analysis=analysis_file, progress=False)
    assert sha256_tree(tiny_llama_onnx.parent) == before
    plan = result.plan
    assert plan.average_bits <= 5.0 and len(set(plan.counts()) - {"float"}) >= 2
    metadata, model = _metadata(out)
    bits = {n.name[: -len("_Q4")]: next(a.i for a in n.attribute if a.name == "bits") for n in model.graph.node
            if n.op_type == "MatMulNBits"}
    for name, precision in plan.assignments.items():
        if precision == "float":
            assert name in metadata  # still a float MatMul
        else:
            config = precision_config(precision)
            assert bits[name] == config.bits
            meta = metadata[f"{name}_Q{config.bits}"]
            assert meta["graphq.precision"] == precision
            assert float(meta["graphq.kl.int4"].split()[0]) == pytest.approx(_kl(analysis_file, name), rel=1e-3, abs=1e-12)
            assert meta["graphq.scales"].startswith("|s| min")
            planned_bits = _damage(analysis_file, name)[precision]["bits"]  # q8-pow2 int4 scales: 8 / G + 8 / K per quantity
            assert float(meta["graphq.bits_per_weight"]) == pytest.approx(planned_bits, abs=5e-4)
    summary = json.loads({p.key: p.value for p in model.metadata_props}["graphq.plan"])
    assert summary["average_bits"] == pytest.approx(plan.average_bits) and summary["budget_bits"] == 5.0
    # The tied head is int4 or int8: the embedding lookup reads its codes.
    assert [n.op_type for n in model.graph.node if "embed_tokens" in n.name and n.op_type.startswith("Gather")] == ["GatherBlockQuantized"]
    ppl = evaluate_model(out, EvalConfig(windows=2, window_tokens=128, measure_speed=False), progress=False).perplexity
    float_ppl = evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, window_tokens=128, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.03)


def test_gptq_in_column_blocks_equals_one_call():
    from graphq.numerics.weight_only import gptq_quantize
    from graphq.numerics.sensitivity import precision_config

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 96)) * rng.lognormal(0, 1, 96)
    hessian = 2 * x.T @ x / 300
    weight = rng.standard_normal((96, 50)).astype(np.float32)
    for act_order in (False, True):
        whole = gptq_quantize(weight, hessian, precision_config("int4"), damp=0.01, act_order=act_order, pad=True)
        blocks = gptq_columns(weight, hessian, precision_config("int4"), damp=0.01, act_order=act_order, columns=16)
        np.testing.assert_array_equal(blocks.q, whole.q)
        np.testing.assert_array_equal(blocks.scales, whole.scales)


def _damage(path, name):
    data = json.loads(path.read_text())
    return next(n for n in data["nodes"] if n["name"] == name)["damage"]


def _kl(path, name):
    return _damage(path, name)["int4"]["kl"]


def test_plan_file_with_float_head_keeps_a_float_lookup(tiny_llama_onnx, tmp_path):
    model = ir.load(tiny_llama_onnx)
    names = [n.name for n in model.graph if n.op_type == "MatMul" and n.name.endswith("proj/MatMul")] + ["/lm_head/MatMul"]
    assignments = {name: ("int8" if "down_proj" in name else "int4") for name in names}
    assignments["/lm_head/MatMul"] = "float"
    out = tmp_path / "p" / "model.onnx"
    result = quantize_mixed(tiny_llama_onnx, out, RECIPE, plan=PrecisionPlan(assignments, 0, 0.0, 0.0), progress=False)
    ops = {n.name: n.op_type for n in onnx.load(str(out)).graph.node}
    assert ops["/lm_head/MatMul"] == "MatMul" and "/model/embed_tokens/Gather" in ops
    assert sum(op == "MatMulNBits" for op in ops.values()) == 14
    assert result.plan.counts() == {"int4": 12, "int8": 2, "float": 1}
    # int4: 4 + 8 / 128 + 8 / K (q8-pow2 scales), int8: 8.125 (float16 scales), the float head 32
    assert result.plan.average_bits == pytest.approx(
        (sum((4 + 8 / 128 + 8 / k) * w for n, (w, k) in _shapes(model).items() if assignments[n] == "int4")
         + sum(8.125 * w for n, w in _sizes(model).items() if assignments[n] == "int8") + 32 * 64 * 260) / sum(_sizes(model).values()))


def _shapes(model):
    from graphq.mixed import planned_nodes

    return {n.name: (int(n.weight.size), n.weight.shape[0]) for n in planned_nodes(model)}


def _sizes(model):
    return {name: size for name, (size, _) in _shapes(model).items()}


def test_plans_naming_nonexistent_nodes_are_refused(tiny_llama_onnx, tmp_path, capsys):
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"/model/layers.7/mlp/up_proj/MatMul": "int8", "/lm_head/MatMul": "int4"}))
    out = tmp_path / "x" / "model.onnx"
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "mixed", "--plan", str(plan)]) == 1
    err = capsys.readouterr().err
    assert "names 1 node(s) that are not quantizable MatMuls of the model: '/model/layers.7/mlp/up_proj/MatMul'" in err
    assert not out.parent.exists() or not any(out.parent.iterdir())


def test_budget_below_the_smallest_precision_is_refused(analysis_file, tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "y" / "model.onnx"
    args = ["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "mixed", "--analysis", str(analysis_file)]
    assert main([*args, "--budget-bits", "4"]) == 1
    assert "budget 4.0 bits per weight is below the smallest plan for this model" in capsys.readouterr().err
    assert not out.exists()


def test_analysis_of_another_model_is_refused(analysis_file, tiny_llama_past_onnx, tmp_path):
    with pytest.raises(GraphqError, match="is the analysis of another model"):
        quantize_mixed(tiny_llama_past_onnx, tmp_path / "z" / "model.onnx", RECIPE, analysis=analysis_file, progress=False)


def test_cli_mixed_with_target_ratio(analysis_file, tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "t" / "model.onnx"
    args = ["quantize", str(tiny_llama_onnx), "-o", str(out), "--recipe", "mixed", "--analysis", str(analysis_file),
            "--calib-windows", "2", "--method", "gptq", "--target-ratio", "1.00001"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "bits per weight" in printed and "predicted KL" in printed
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["plan"]["target_ratio"] == 1.00001 and report["plan"]["predicted_kl"] <= np.log(1.00001) + 1e-12
    assert main([*args[:-2], "--bits", "4"]) == 1
    assert "does not apply to the mixed recipe" in capsys.readouterr().err
    assert main(["quantize", str(tiny_llama_onnx), "-o", str(tmp_path / "u.onnx"), "--recipe", "w4-rtn", "--budget-bits", "4.5"]) == 1
    assert "applies to the mixed recipe only" in capsys.readouterr().err


def test_unknown_gptq_precision_is_refused():
    with pytest.raises(GraphqError, match="precision"):
        MixedRecipe(precision="float16")


def test_float_zero_points_need_matmul_nbits():
    """Blockwise DequantizeLinear takes integer zero points: the default candidates drop int4-g32-fzp, a
    precision list naming it is refused."""
    from graphq.passes.weight_only_emit import WeightOnlyEmitConfig

    qdq = WeightOnlyEmitConfig(format="qdq")
    assert "int4-g32-fzp" in MixedRecipe().precisions
    assert "int4-g32-fzp" not in MixedRecipe(emit=qdq).precisions
    with pytest.raises(GraphqError, match="MatMulNBits only"):
        MixedRecipe(emit=qdq, precisions=("int4", "int4-g32-fzp", "float"))


@pytest.mark.parametrize("precision", ["int4-g32-asym", "int4-g32-fzp"])
def test_int4_g32_asym_nodes_and_a_shared_head_carry_zero_points(precision, tiny_llama_onnx, tmp_path):
    """``int4-g32-asym``: MatMulNBits with blocks of 32 and uint4 zero points; a tied head at that precision
    shares its codes and zero points with the lookup (GatherBlockQuantized), and the model stays close.
    ``int4-g32-fzp``: float zero points, emitted as a symmetric MatMulNBits plus the offset term (no zero
    points on the kernel); the tied head keeps integer ones (the lookup reads no float ones)."""
    model = ir.load(tiny_llama_onnx)
    names = [n.name for n in model.graph if n.op_type == "MatMul" and n.name.endswith("proj/MatMul")] + ["/lm_head/MatMul"]
    assignments = {name: (precision if "mlp" in name or name == "/lm_head/MatMul" else "int4") for name in names}
    out = tmp_path / "g32" / "model.onnx"
    recipe = MixedRecipe(analysis=SMALL, calibration=CALIBRATION, method="rtn")
    result = quantize_mixed(tiny_llama_onnx, out, recipe, plan=PrecisionPlan(assignments, 0, 0.0, 0.0), progress=False)
    proto = onnx.load(str(out))
    onnx.checker.check_model(proto)
    nbits = {n.name[: -len("_Q4")]: n for n in proto.graph.node if n.op_type == "MatMulNBits"}
    assert set(nbits) == set(names)
    offsets = {n.name[: -len("_add_offsets")] for n in proto.graph.node if n.name.endswith("_add_offsets")}
    for name, node in nbits.items():
        block = next(a.i for a in node.attribute if a.name == "block_size")
        has_zero_points = len(node.input) > 3 and node.input[3] != ""
        float_zero_points = assignments[name] == "int4-g32-fzp" and name != "/lm_head/MatMul"
        expected = (128, False) if assignments[name] == "int4" else (32, not float_zero_points)
        assert (block, has_zero_points) == expected, name
        assert (name in offsets) == float_zero_points, name
    (lookup,) = [n for n in proto.graph.node if n.op_type == "GatherBlockQuantized"]
    assert len(lookup.input) == 4 and next(a.i for a in lookup.attribute if a.name == "block_size") == 32
    assert result.plan.counts() == {"int4": sum(v == "int4" for v in assignments.values()),
                                    precision: sum(v == precision for v in assignments.values())}
    config = EvalConfig(windows=2, window_tokens=128, measure_speed=False)
    ppl = evaluate_model(out, config, progress=False).perplexity
    assert ppl == pytest.approx(evaluate_model(tiny_llama_onnx, config, progress=False).perplexity, rel=0.03)


@pytest.mark.parametrize("method", ["gptq", "rtn"])
def test_int4_head_keeps_its_hot_rows_at_int8(method, analysis_file, tiny_llama_onnx, tmp_path):
    """The analysis gave the tied head hot rows: an int4 head is emitted in two tiers (hot rows int8, the rest
    int4), the lookup reads both, the bits in the metadata are the split's, and the model stays close to float.
    An int8 head is one tier."""
    model = ir.load(tiny_llama_onnx)
    names = [n.name for n in model.graph if n.op_type == "MatMul" and (n.name.endswith("proj/MatMul") or n.name == "/lm_head/MatMul")]
    analysis = json.loads(analysis_file.read_text())
    head = next(n for n in analysis["nodes"] if n["name"] == "/lm_head/MatMul")
    assert len(head["hot_rows"]) == int(np.ceil(0.05 * head["n"]))
    out = tmp_path / "h" / "model.onnx"
    recipe = MixedRecipe(analysis=SMALL, calibration=CALIBRATION, method=method)
    quantize_mixed(tiny_llama_onnx, out, recipe, plan=PrecisionPlan({name: "int4" for name in names}, 0, 0.0, 0.0),
                   analysis=analysis_file, progress=False)
    metadata, saved = _metadata(out)
    ops = {n.name: n.op_type for n in saved.graph.node}
    assert ops["/lm_head/MatMul_hot_rows_Q8"] == ops["/lm_head/MatMul_cold_rows_Q4"] == "MatMulNBits"
    assert [op for name, op in ops.items() if name.startswith("/model/embed_tokens/Gather_")] == ["GatherBlockQuantized"] * 2
    meta = metadata["/lm_head/MatMul_cold_rows_Q4"]
    assert meta["graphq.hot_rows"] == f"{len(head['hot_rows'])} of {head['n']} rows at int8"
    assert float(meta["graphq.bits_per_weight"]) == pytest.approx(head["damage"]["int4"]["bits"], rel=1e-3)
    ppl = evaluate_model(out, EvalConfig(windows=2, window_tokens=128, measure_speed=False), progress=False).perplexity
    float_ppl = evaluate_model(tiny_llama_onnx, EvalConfig(windows=2, window_tokens=128, measure_speed=False), progress=False).perplexity
    assert ppl == pytest.approx(float_ppl, rel=0.05)

    int8_head = tmp_path / "h8" / "model.onnx"
    quantize_mixed(tiny_llama_onnx, int8_head, recipe, analysis=analysis_file, progress=False,
                   plan=PrecisionPlan({**{name: "int4" for name in names}, "/lm_head/MatMul": "int8"}, 0, 0.0, 0.0))
    assert "/lm_head/MatMul_Q8" in {n.name for n in onnx.load(str(int8_head)).graph.node}
