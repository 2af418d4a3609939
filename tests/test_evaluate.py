import json
import math

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graphq.cli import main
from graphq.data import WIKITEXT_TEST
from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, evaluate_model, greedy_decode, token_windows
from graphq.verify import cpu_session

WINDOWS = 3


def _torch_perplexity(hf_dir, windows: np.ndarray) -> float:
    """Independent reference: PyTorch model, torch's cross-entropy."""
    model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    losses = []
    with torch.no_grad():
        for window in windows:
            ids = torch.from_numpy(window)[None, :]
            losses.append(model(input_ids=ids, labels=ids).loss.item())
    return math.exp(float(np.mean(losses)))


@pytest.fixture(scope="module")
def windows(tiny_llama_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_llama_dir))
    ids = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    return token_windows(ids, EvalConfig(windows=WINDOWS))


@pytest.mark.parametrize("graph", ["tiny_llama_onnx", "tiny_llama_past_onnx"])
def test_perplexity_matches_pytorch(graph, request, tiny_llama_dir, windows):
    model_path = request.getfixturevalue(graph)
    result = evaluate_model(model_path, EvalConfig(windows=WINDOWS, measure_speed=False), progress=False)
    reference = _torch_perplexity(tiny_llama_dir, windows)
    assert result.perplexity == pytest.approx(reference, rel=1e-4)
    assert result.tokens_scored == WINDOWS * 511
    assert result.prefill_seconds is None and result.decode_tokens_per_s is None


def test_greedy_decode_with_cache_matches_pytorch(tiny_llama_past_onnx, tiny_llama_dir, windows):
    prompt = windows[0][:32]
    tokens, seconds = greedy_decode(cpu_session(tiny_llama_past_onnx), prompt, 20)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_llama_dir), dtype=torch.float32).eval()
    reference = model.generate(torch.from_numpy(prompt)[None, :], max_new_tokens=20, do_sample=False,
                               attention_mask=torch.ones(1, 32, dtype=torch.long))
    assert tokens == reference[0, 32:].tolist()
    assert seconds > 0


def test_speed_and_size_are_measured(tiny_llama_past_onnx):
    result = evaluate_model(tiny_llama_past_onnx, EvalConfig(windows=1, prefill_repeats=2, decode_new_tokens=16, decode_repeats=1), progress=False)
    assert result.has_kv_cache
    assert result.prefill_seconds > 0 and result.prefill_tokens_per_s == pytest.approx(512 / result.prefill_seconds)
    assert result.decode_tokens_per_s > 0
    assert result.file_bytes == tiny_llama_past_onnx.stat().st_size
    assert "decode tokens/s" in result.table()


def test_graph_without_cache_reports_no_decode(tiny_llama_onnx):
    result = evaluate_model(tiny_llama_onnx, EvalConfig(windows=1, prefill_repeats=1), progress=False)
    assert result.decode_tokens_per_s is None and result.prefill_seconds > 0
    assert "export with --with-past" in result.table()


def test_cli_eval_writes_json(tiny_llama_past_onnx, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code = main(["eval", str(tiny_llama_past_onnx), "--windows", "2", "--no-speed", "--json", str(out)])
    assert code == 0
    numbers = json.loads(out.read_text())
    assert {"perplexity", "windows", "file_bytes"} <= set(numbers)
    assert numbers["windows"] == 2 and numbers["perplexity"] > 1
    assert f"{numbers['perplexity']:.4f}" in capsys.readouterr().out


def test_too_many_windows_is_a_clear_error(tiny_llama_onnx, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("a few words only")
    with pytest.raises(GraphqError, match="only 0 windows"):
        evaluate_model(tiny_llama_onnx, EvalConfig(windows=1, text_path=short), progress=False)


def test_non_positive_settings_are_refused():
    with pytest.raises(GraphqError, match="windows must be at least 1"):
        EvalConfig(windows=0)
    with pytest.raises(GraphqError, match="threads"):
        EvalConfig(threads=0)
