"""tools/bench_speed.py on the tiny Llama (with KV cache): the JSON rows and ratios, skipped and failed
peers as rows, the float input untouched. No timing is asserted, only how the numbers relate."""

import importlib.util
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import sha256_tree

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_speed.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_speed", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_speed_rows_on_tiny_model(bench, tiny_llama_past_onnx, tiny_llama_onnx, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(bench, "genai_importable", lambda python: "ModuleNotFoundError: No module named 'x'")
    model_dir = tiny_llama_past_onnx.parent
    before = sha256_tree(model_dir)
    json_path = tmp_path / "speed.json"
    status = bench.main([
        "--model", str(model_dir), "--work-dir", str(tmp_path / "speed"), "--json", str(json_path),
        "--windows", "1", "--repeats", "2", "--threads", "1", "--recipe", "w4-rtn",
        "--graphq", f"no-cache={tiny_llama_onnx}", "--graphq", f"missing={tmp_path / 'none.onnx'}",
    ])
    assert status == 0
    assert sha256_tree(model_dir) == before

    document = json.loads(json_path.read_text())
    assert {"decode", "prefill", "rounds", "threads", "repeats", "onnxruntime_version"} <= set(document["protocol"])
    rows = {row["peer"]: row for row in document["rows"]}
    assert list(rows) == ["float", "ort-dynamic", "ort-nbits-rtn-g128", "genai-int4", "genai-int4-og",
                          "graphq:w4-rtn", "no-cache", "missing"]
    measured = ("float", "ort-dynamic", "ort-nbits-rtn-g128", "graphq:w4-rtn")
    float_row = rows["float"]
    assert float_row["decode_ratio"] == 1.0 and float_row["prefill_ratio"] == 1.0
    assert float_row["perplexity_ratio"] == 1.0 and float_row["size_ratio"] == 1.0 and float_row["greedy_match"] == 129
    for name in measured:
        row = rows[name]
        assert row["status"] == "ok", row
        assert len(row["decode_rounds"]) == len(row["prefill_rounds"]) == 2
        assert row["decode_tokens_per_s"] == statistics.median(row["decode_rounds"]) > 0
        assert row["prefill_tokens_per_s"] == statistics.median(row["prefill_rounds"]) > 0
        per_round = [a / b for a, b in zip(row["decode_rounds"], float_row["decode_rounds"])]
        assert row["decode_ratio"] == pytest.approx(statistics.median(per_round))
        per_round = [a / b for a, b in zip(row["prefill_rounds"], float_row["prefill_rounds"])]
        assert row["prefill_ratio"] == pytest.approx(statistics.median(per_round))
        assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / float_row["perplexity"])
        assert 0 <= row["greedy_match"] <= 129 and row["file_bytes"] > 0
    for name in measured[1:]:
        assert rows[name]["size_ratio"] < 1 and rows[name]["build_seconds"] > 0
        assert Path(rows[name]["model_path"]).parent == tmp_path / "speed" / name.replace(":", "-")
    assert rows["ort-dynamic"]["kernels"]["MatMulInteger"] > 0
    assert rows["ort-nbits-rtn-g128"]["kernels"]["matmulnbits_block_size"] == [128]
    assert rows["ort-nbits-rtn-g128"]["kernels"]["matmulnbits_accuracy_level"] == [0]
    assert rows["genai-int4"]["status"].startswith("skipped: onnxruntime-genai is not installed")
    assert rows["genai-int4-og"]["status"].startswith("skipped: ")
    assert rows["no-cache"]["status"].startswith("failed: load: ") and "KV cache" in rows["no-cache"]["status"]
    assert rows["missing"]["status"].startswith("failed: no such file")
    for name in ("genai-int4", "genai-int4-og", "no-cache", "missing"):
        assert rows[name]["decode_tokens_per_s"] is None and rows[name]["decode_ratio"] is None

    table = capsys.readouterr().out
    assert "decode tok/s" in table and "graphq:w4-rtn" in table and "skipped: " in table


def genai_python() -> str:
    return os.environ.get("GRAPHQ_GENAI_PYTHON", sys.executable)


def builder_imports(python: str) -> bool:
    done = subprocess.run([python, "-c", "import onnxruntime_genai.models.builder"], capture_output=True)
    return done.returncode == 0


@pytest.mark.skipif(not builder_imports(genai_python()),
                    reason="onnxruntime-genai's model builder does not import here (set GRAPHQ_GENAI_PYTHON)")
def test_genai_peer_on_tiny_model(bench, tiny_llama_past_onnx, tmp_path):
    json_path = tmp_path / "speed.json"
    status = bench.main([
        "--model", str(tiny_llama_past_onnx.parent), "--work-dir", str(tmp_path / "speed"), "--json", str(json_path),
        "--windows", "1", "--repeats", "1", "--threads", "1", "--peers", "float,genai-int4,genai-int4-og",
        "--genai-python", genai_python(),
    ])
    assert status == 0
    rows = {row["peer"]: row for row in json.loads(json_path.read_text())["rows"]}
    genai = rows["genai-int4"]
    assert genai["status"] == "ok", genai
    assert genai["kernels"]["GroupQueryAttention"] > 0 and genai["kernels"]["MatMulNBits"] > 0
    assert genai["decode_ratio"] > 0 and genai["perplexity"] > 1 and genai["runtime"] == "onnxruntime"
    if importlib.util.find_spec("onnxruntime_genai") is not None:
        og = rows["genai-int4-og"]
        assert og["status"] == "ok" and og["runtime"] == "onnxruntime-genai" and og["perplexity"] is None
        assert og["decode_ratio"] > 0 and og["prefill_ratio"] > 0 and og["greedy_match"] is not None


def test_pure_helpers(bench):
    assert bench.rotated(("a", "b", "c"), 1) == ("b", "c", "a") and bench.rotated(("a", "b", "c"), 3) == ("a", "b", "c")
    assert bench.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0]) == 2.0
    assert bench.paired_ratio([], []) is None
    assert bench.greedy_match([1, 2, 3, 4], [1, 2, 5, 4]) == 2
    stderr = "Traceback (most recent call last):\n  File \"x\", line 1\nImportError: cannot import name 'X'\n"
    assert bench.child_error(stderr, 1) == "ImportError: cannot import name 'X'"


@pytest.mark.parametrize("argv", [["--peers", "float,nope"], ["--graphq", "nameonly"], ["--windows", "0"],
                                  ["--recipe", "../x"], ["--recipe", "w4-rtn", "--graphq", "graphq:w4-rtn=x.onnx"],
                                  ["--no-such-option"], ["--prefill-tokens", "0"], ["--prefill-tokens", "513"]])
def test_bad_arguments_exit_2(bench, argv, tiny_llama_past_onnx, tmp_path):
    assert bench.main(["--model", str(tiny_llama_past_onnx.parent), "--work-dir", str(tmp_path), *argv]) == 2


def test_missing_model_is_a_usage_error(bench, tmp_path):
    assert bench.main(["--model", str(tmp_path / "none"), "--work-dir", str(tmp_path)]) == 2
