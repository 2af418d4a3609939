"""Sensitivity analysis on the tiny model: structure of the result, the cache (hit, recompute on a new
config, refusal of another model's file), the CLI."""

import json
import math
import time

import pytest

import graphq.sensitivity as sensitivity
from graphq.cli import main
from graphq.errors import GraphqError
from graphq.sensitivity import AnalysisConfig, analyze_model, load_analysis
from graphq.numerics.head_rows import split_bits

SMALL = AnalysisConfig(windows=3, window_tokens=32, batch=3, threads=1, measured_others=4, lens_nodes=2,
                       head_hot_fraction=0.05)  # row tiers are off by default; tested here


@pytest.fixture(scope="module")
def analysed(tiny_llama_onnx, tmp_path_factory):
    path = tmp_path_factory.mktemp("analysis") / "analysis.json"
    return analyze_model(tiny_llama_onnx, SMALL, output=path, progress=False), path


def test_analysis_structure(analysed, tiny_llama_onnx):
    analysis, path = analysed
    assert analysis.model_sha256 == sensitivity.model_digest(tiny_llama_onnx)
    assert len(analysis.nodes) == 15 and analysis.tokens == 3 * 31
    assert math.isfinite(analysis.float_nll)
    for node in analysis.nodes:
        assert set(node.damage) == {"int4", "int4-g32-asym", "int4-g32-fzp", "int8"}
        assert node.damage["int4"].measured
        assert node.damage["int4"].kl > -1e-6  # float32 KL: tiny negatives are rounding
        assert node.damage["int4"].local_error > node.damage["int4-g32-asym"].local_error > node.damage["int8"].local_error > 0
        # int4 precisions, q8-pow2 scales: 4 + 8 / 128 + 8 / K (an int8 exponent per column); int8, float16 ones:
        # 8 + 16 / 128; a tied head's group is 64 and 5 % of its rows (those the calibration text uses most)
        # stay int8 at every lower precision
        hot, k = len(node.hot_rows), node.k
        assert hot == (math.ceil(0.05 * node.n) if node.tied else 0)
        assert node.damage["int8"].bits == (8.25 if node.tied else 8.125)
        assert node.damage["int4"].bits == pytest.approx(split_bits(node.n, hot, 8.25, 4 + 8 / 64 + 8 / k) if node.tied
                                                         else 4 + 8 / 128 + 8 / k)
        assert node.damage["int4-g32-asym"].bits == pytest.approx(split_bits(node.n, hot, 8.25, 4 + 8 / 32 + 4 / 32 + 8 / k))
        # float zero points: 4 + 16 / 32 + 16 / K bits (8-bit scale and offset) and a finer grid; a tied head keeps
        # integer ones (the shared lookup)
        fzp, asym = node.damage["int4-g32-fzp"], node.damage["int4-g32-asym"]
        if node.tied:
            assert (fzp.bits, fzp.local_error) == (asym.bits, asym.local_error)
        else:
            assert fzp.bits == pytest.approx(4.5 + 16 / k) and 0 < fzp.local_error < asym.local_error
        assert set(node.scales) == {"int4", "int4-g32-asym", "int4-g32-fzp", "int8"} and node.scales["int4"]["max"] >= node.scales["int4"]["min"] > 0
        assert node.weight["abs_max"] > 0 and node.role in node.name
    head = analysis.node("/lm_head/MatMul")
    assert head.tied and head.block is None and head.role == "lm_head"
    # The 4 nodes with most int4 damage are replayed at the other precisions; the others estimated from the local error ratio.
    ranked = sorted(analysis.nodes, key=lambda n: -n.damage["int4"].kl)
    for other in ("int4-g32-asym", "int4-g32-fzp", "int8"):
        assert [n.damage[other].measured for n in ranked] == [True] * 4 + [False] * 11
        for node in ranked[4:]:
            ratio = node.damage[other].local_error / node.damage["int4"].local_error
            assert node.damage[other].kl == pytest.approx(node.damage["int4"].kl * ratio)
    lensed = [n for n in analysis.nodes if n.lens]
    assert len(lensed) == 2 and lensed[0].lens["real"] == lensed[0].damage["int4"].kl
    assert all(n.lens["gaussian"] > -1e-6 and n.lens["uniform"] > -1e-6 and n.lens["error_rms"] > 0 for n in lensed)
    # Every MatMul input, and the residual stream entering each block and the final norm.
    assert sorted(n for t in analysis.activations for n in t.nodes) == sorted(n.name for n in analysis.nodes)
    assert len(analysis.activations) == 4 * 2 + 1
    assert [r.block for r in analysis.residual] == [0, 1, None]
    for stats in (*analysis.activations, *analysis.residual):
        assert stats.abs_max == max(abs(stats.min), abs(stats.max)) == max(stats.channel_abs_max)
        assert stats.std > 0 and stats.kurtosis > 1
        assert len(stats.channel_abs_max) == (128 if "mlp/Mul" in stats.tensor else 64)
    assert analysis.timing["replays"] == 15 + 3 * 4 + 2 * 2  # int4 everywhere, 4 each at the other three, the lens
    assert load_analysis(path) == analysis


def test_cache_hit_is_instant_and_identical(analysed, tiny_llama_onnx, monkeypatch):
    analysis, path = analysed
    before = path.read_bytes()

    def no_recompute(*args, **kwargs):
        raise AssertionError("the cached analysis was recomputed")

    monkeypatch.setattr(sensitivity, "_run_analysis", no_recompute)
    start = time.perf_counter()
    again = analyze_model(tiny_llama_onnx, SMALL, output=path, progress=False)
    assert time.perf_counter() - start < 5
    assert again == analysis and path.read_bytes() == before
    # Without -o the cache folder has it too.
    assert analyze_model(tiny_llama_onnx, SMALL, progress=False) == analysis


def test_cache_of_another_model_is_refused(analysed, tiny_llama_past_onnx):
    _, path = analysed
    before = path.read_bytes()
    with pytest.raises(GraphqError, match="holds the analysis of another model"):
        analyze_model(tiny_llama_past_onnx, SMALL, output=path, progress=False)
    assert path.read_bytes() == before


def test_a_new_config_is_recomputed(analysed, tiny_llama_onnx, tmp_path):
    analysis, path = analysed
    copy = tmp_path / "a.json"
    copy.write_bytes(path.read_bytes())
    other = AnalysisConfig(windows=2, window_tokens=16, batch=2, threads=1, precisions=("int4",), lens_nodes=0)
    result = analyze_model(tiny_llama_onnx, other, output=copy, progress=False)
    assert result.config == other and result.tokens == 2 * 15
    assert all(set(n.damage) == {"int4"} and n.lens is None for n in result.nodes)
    assert load_analysis(copy) == result


def test_bad_configs_and_files_are_refused(tmp_path):
    with pytest.raises(GraphqError, match="must include int4"):
        AnalysisConfig(precisions=("int8",))
    with pytest.raises(GraphqError, match="precisions must be among"):
        AnalysisConfig(precisions=("int4", "float"))
    with pytest.raises(GraphqError, match="windows must be at least 1"):
        AnalysisConfig(windows=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"kind": "something else"}))
    with pytest.raises(GraphqError, match="not a graphq analysis"):
        load_analysis(bad)


def test_cli_analyze(analysed, tiny_llama_onnx, tmp_path, capsys):
    out = tmp_path / "cli.json"
    args = ["analyze", str(tiny_llama_onnx), "-o", str(out), "--windows", "3", "--window-tokens", "32", "--threads", "1",
            "--measured-others", "4", "--lens", "2", "--head-hot-fraction", "0.05"]
    assert main(args) == 0  # the same config as the fixture: from the cache
    printed = capsys.readouterr().out
    assert "analysed 15 MatMuls" in printed and "most sensitive at int4" in printed
    assert load_analysis(out) == analysed[0]
    assert main(["analyze", str(tiny_llama_onnx), "-o", str(tiny_llama_onnx)]) == 1
    assert "is the input" in capsys.readouterr().err
