"""tools/bench_prefill_profile.py: per-op times from ORT's profile of the tiny Llama, the optimised
graph's op counts, bad arguments. No timing is asserted, only how the numbers relate."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest
from conftest import sha256_tree

TOOL = Path(__file__).resolve().parents[1] / "tools" / "bench_prefill_profile.py"


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("bench_prefill_profile", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_op_times_skips_the_warm_up_and_averages(tool):
    trace = [
        {"cat": "Session", "name": "model_run", "ts": 0},
        {"cat": "Node", "name": "a_kernel_time", "ts": 1, "dur": 9000, "args": {"op_name": "MatMul"}},
        {"cat": "Session", "name": "model_run", "ts": 10},
        {"cat": "Node", "name": "a_kernel_time", "ts": 11, "dur": 4000, "args": {"op_name": "MatMul"}},
        {"cat": "Node", "name": "b_fence_before", "ts": 12, "dur": 500, "args": {"op_name": "Add"}},
        {"cat": "Node", "name": "b_kernel_time", "ts": 12, "dur": 1000, "args": {"op_name": "Add"}},
        {"cat": "Session", "name": "model_run", "ts": 20},
        {"cat": "Node", "name": "a_kernel_time", "ts": 21, "dur": 2000, "args": {"op_name": "MatMul"}},
    ]
    assert tool.op_times(trace, runs=2, skip_runs=1) == {"MatMul": 3.0, "Add": 0.5}


def test_profiles_the_tiny_model(tool, tiny_llama_past_onnx, tmp_path, capsys):
    digest = sha256_tree(tiny_llama_past_onnx.parent)
    out = tmp_path / "profile.json"
    code = tool.main([f"tiny={tiny_llama_past_onnx}", "--tokens", "4,8", "--runs", "1", "--threads", "1",
                      "--json", str(out)])
    assert code == 0
    result = json.loads(out.read_text())["graphs"]["tiny"]
    assert set(result["by_tokens"]) == {"4", "8"}
    ops = result["by_tokens"]["8"]["op_ms"]
    assert "MatMul" in ops and all(ms >= 0 for ms in ops.values())
    assert result["optimized_ops"]["MatMul"] >= 14
    assert "MatMul" in capsys.readouterr().out
    assert sha256_tree(tiny_llama_past_onnx.parent) == digest


def test_bad_graph_argument_exits_2(tool, tmp_path):
    assert tool.main([str(tmp_path / "missing.onnx")]) == 2
    assert tool.main([f"x={tmp_path / 'missing.onnx'}"]) == 2
