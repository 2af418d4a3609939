"""tools/bench_quality.py on the tiny Llama (with KV cache): every row is produced, a failing method
becomes a row instead of a crash, and the float input is left untouched."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import onnx
import pytest

from conftest import sha256_tree

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_quality.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_quality", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_compares_methods_on_tiny_model(bench, tiny_llama_past_onnx, tmp_path, capsys):
    model_dir = tiny_llama_past_onnx.parent
    before = sha256_tree(model_dir)
    json_path = tmp_path / "bench.json"
    status = bench.main([
        "--model", str(model_dir), "--work-dir", str(tmp_path / "bench"), "--json", str(json_path),
        "--windows", "2", "--calib-windows", "2", "--repeats", "1", "--threads", "1",
        "--methods", "float,ort-dynamic,ort-static-qdq,graphq:does-not-exist",
    ])
    assert status == 0
    assert sha256_tree(model_dir) == before

    rows = {row["method"]: row for row in json.loads(json_path.read_text())["rows"]}
    assert list(rows) == ["float", "ort-dynamic", "ort-static-qdq", "graphq:does-not-exist"]
    assert rows["float"]["perplexity_ratio"] == 1.0 and rows["float"]["speed_ratio"] == 1.0
    assert rows["float"]["size_ratio"] == 1.0
    for method in ("float", "ort-dynamic", "ort-static-qdq"):
        row = rows[method]
        assert row["status"] == "ok", row
        assert math.isfinite(row["perplexity"]) and row["perplexity"] > 1
        assert row["prefill_seconds"] > 0 and row["speed_ratio"] > 0 and row["file_bytes"] > 0
    for method in ("ort-dynamic", "ort-static-qdq"):
        assert Path(rows[method]["model_path"]).parent == tmp_path / "bench" / method
        assert rows[method]["quantize_seconds"] > 0
    failed = rows["graphq:does-not-exist"]
    assert failed["status"].startswith("failed: ") and failed["perplexity"] is None

    table = capsys.readouterr().out
    assert "ort-static-qdq" in table and "failed: " in table and "wiki.test.raw" in table


def test_ort_int4_weight_only_peers_on_tiny_model(bench, tiny_llama_past_onnx, tmp_path):
    model_dir = tiny_llama_past_onnx.parent
    json_path = tmp_path / "bench.json"
    status = bench.main([
        "--model", str(model_dir), "--work-dir", str(tmp_path / "bench"), "--json", str(json_path),
        "--windows", "1", "--calib-windows", "1", "--repeats", "1", "--threads", "1",
        "--methods", "float," + ",".join(bench.NBITS_METHODS),
    ])
    assert status == 0
    document = json.loads(json_path.read_text())
    rows = {row["method"]: row for row in document["rows"]}
    assert list(rows) == ["float", "ort-nbits-rtn-g128", "ort-nbits-hqq-g128", "ort-nbits-gptq-g128"]
    assert set(document["protocol"]["ort_nbits"]) == set(bench.NBITS_METHODS)
    for method in bench.NBITS_METHODS:
        row = rows[method]
        assert row["status"] == "ok", row
        assert math.isfinite(row["perplexity"]) and row["size_ratio"] < 1 and row["speed_ratio"] > 0
        proto = onnx.load(row["model_path"])
        nbits = [n for n in proto.graph.node if n.op_type == "MatMulNBits"]
        assert nbits, method
        for node in nbits:
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            assert attributes["bits"] == 4 and attributes["block_size"] == 128
            # symmetric RTN/GPTQ carry no zero point; HQQ is asymmetric by construction
            assert (len(node.input) > 3) == (method == "ort-nbits-hqq-g128"), (method, node.input)


def test_unavailable_peer_is_a_skipped_row(bench, monkeypatch, capsys):
    def unavailable(*args):
        raise bench.PeerUnavailable("this onnxruntime has no MatMulNBits quantizer")

    monkeypatch.setattr(bench, "ort_quantize", unavailable)
    assert bench.worker_main(["ort-nbits-gptq-g128", "in.onnx", "out.onnx", "1", "."]) == bench.EXIT_SKIPPED
    stderr = capsys.readouterr().err
    assert stderr.startswith("bench_quality: skipped: this onnxruntime has no MatMulNBits quantizer")
    assert bench.error_line(stderr, bench.EXIT_SKIPPED).endswith("has no MatMulNBits quantizer")


@pytest.mark.parametrize("argv", [["--methods", "float,nope"], ["--methods", "graphq:../x"], ["--windows", "0"],
                                  ["--methods", "float,float"], ["--no-such-option"]])
def test_bad_arguments_exit_2(bench, argv, tmp_path):
    assert bench.main([*argv, "--work-dir", str(tmp_path)]) == 2


def test_missing_model_folder_is_a_usage_error(bench, tmp_path):
    assert bench.main(["--model", str(tmp_path / "none"), "--work-dir", str(tmp_path), "--methods", "float"]) == 2


def test_error_line_prefers_the_error_message(bench):
    stderr = "Usage: graphq [OPTIONS] COMMAND\nTry 'graphq -h' for help.\n\nError: No such command 'quantize'.\n"
    assert bench.error_line(stderr, 2) == "Error: No such command 'quantize'."
    assert bench.error_line("", -9) == "killed by signal 9 (out of memory?)"
