"""tools/make_synthetic.py at a tiny size: the graph is a real Llama (same logits as transformers'
LlamaForCausalLM with the same weights), loads in ONNX Runtime, has optimum's node names and patterns
for graphq's passes, is built in bounded memory, and quantizes."""

from __future__ import annotations

import importlib.util
import json
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import onnx
import pytest

from graphq.blockwise import partition
from graphq.cli import main
from graphq.modelio import load_model
from graphq.passes.keep_float import kept_nodes
from graphq.passes.qdq_insert import quantizable_matmuls
from graphq.verify import cpu_session, verify_model_file

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic.py"
TINY = dict(layers=2, hidden=64, intermediate=128, vocab=300, heads=4, kv_heads=2, max_positions=256)


@pytest.fixture(scope="module")
def synthetic():
    spec = importlib.util.spec_from_file_location("make_synthetic", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def tiny_synthetic(synthetic, tmp_path_factory) -> Path:
    return synthetic.make_synthetic(tmp_path_factory.mktemp("synthetic"), synthetic.SyntheticSpec(**TINY)).model_path


def _feeds(tokens: np.ndarray) -> dict[str, np.ndarray]:
    return {"input_ids": tokens, "attention_mask": np.ones_like(tokens),
            "position_ids": np.arange(tokens.shape[1], dtype=np.int64)[None].repeat(tokens.shape[0], 0)}


def _torch_llama(model_path: Path):
    """transformers' LlamaForCausalLM with the synthetic model's config.json and weights."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = json.loads((model_path.parent / "config.json").read_text())
    config.pop("graphq_synthetic")
    model = LlamaForCausalLM(LlamaConfig(**config)).eval()
    weights = {t.name: onnx.numpy_helper.to_array(t, base_dir=str(model_path.parent))
               for t in onnx.load(str(model_path), load_external_data=False).graph.initializer
               if t.data_location == onnx.TensorProto.EXTERNAL}
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            array = weights[name]
            transposed = array.ndim == 2 and name != "model.embed_tokens.weight"  # MatMul weights are [in, out]
            parameter.copy_(torch.from_numpy(np.array(array.T if transposed else array)))
    return model


def test_same_logits_as_transformers_llama(tiny_synthetic):
    import torch

    tokens = np.random.default_rng(0).integers(0, TINY["vocab"], size=(2, 12), dtype=np.int64)
    (logits,) = cpu_session(tiny_synthetic).run(["logits"], _feeds(tokens))
    with torch.no_grad():
        reference = _torch_llama(tiny_synthetic)(input_ids=torch.from_numpy(tokens)).logits.numpy()
    assert logits.shape == (2, 12, TINY["vocab"])
    np.testing.assert_allclose(logits, reference, atol=1e-4, rtol=1e-4)


def test_graph_has_optimum_names_and_patterns(tiny_synthetic):
    verify_model_file(tiny_synthetic)
    model = load_model(tiny_synthetic)
    names = {node.name for node in model.graph}
    for layer in range(TINY["layers"]):
        for proj in ("self_attn/q_proj", "self_attn/k_proj", "self_attn/v_proj", "self_attn/o_proj",
                     "mlp/gate_proj", "mlp/up_proj", "mlp/down_proj"):
            assert f"/model/layers.{layer}/{proj}/MatMul" in names
    assert len(quantizable_matmuls(model)) == 7 * TINY["layers"] + 1  # and the LM head
    kept = {node.op_type for node in kept_nodes(model)}
    assert {"Softmax", "Pow", "ReduceMean", "Sqrt", "Div"} <= kept  # RMSNorm chains and attention
    stages = partition(model)
    assert stages is not None and {s.key[0] for s in stages} >= set(range(TINY["layers"]))
    initializers = onnx.load(str(tiny_synthetic), load_external_data=False).graph.initializer
    external = [t for t in initializers if t.data_location == onnx.TensorProto.EXTERNAL]
    assert {int(next(e.value for e in t.external_data if e.key == "offset")) % 4096 for t in external} == {0}


@pytest.mark.parametrize("options", [dict(dtype="float16"), dict(norm="simplified"), dict(tied=True, kv_heads=4)])
def test_variants_run_in_onnx_runtime(synthetic, tmp_path, options):
    result = synthetic.make_synthetic(tmp_path, synthetic.SyntheticSpec(**{**TINY, **options}), tokenizer=False)
    (logits,) = cpu_session(result.model_path).run(["logits"], _feeds(np.arange(9, dtype=np.int64)[None]))
    assert logits.shape == (1, 9, TINY["vocab"]) and np.isfinite(logits).all()


def test_memory_stays_bounded(synthetic, tmp_path):
    """Peak Python-heap memory while building (numpy buffers included) stays near one chunk, far below
    the size of the weights."""
    spec = synthetic.SyntheticSpec(layers=6, hidden=256, intermediate=768, vocab=2048, heads=8, kv_heads=8, chunk_mb=1)
    tracemalloc.start()
    try:
        result = synthetic.make_synthetic(tmp_path, spec, tokenizer=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.data_bytes >= 4 * spec.parameters
    assert peak < result.data_bytes / 8, (peak, result.data_bytes)


def test_quantizes_with_graphq(tiny_synthetic, tmp_path):
    out = tmp_path / "q" / "model.onnx"
    assert main(["-q", "quantize", str(tiny_synthetic), "-o", str(out), "--recipe", "w4-rtn", "--group-size", "32"]) == 0
    assert main(["-q", "quantize", str(tiny_synthetic), "-o", str(tmp_path / "q8" / "model.onnx"), "--calib-windows", "2"]) == 0
