"""genai_config.json: written beside with-past decoder graphs, and onnxruntime-genai generates with it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from graphq.errors import UnsupportedModelError
from graphq.evaluate import greedy_decode
from graphq.genai_config import GENAI_CONFIG, genai_config, write_genai_config
from graphq.modelio import load_model
from graphq.runtime import signature_of_model
from graphq.verify import cpu_session

# genai masks pad tokens (tiny config: pad 3) in a prompt, so none appear here.
PROMPT = np.array([5, 17, 42, 7, 99, 31], dtype=np.int64)
NEW_TOKENS = 12


def _hf_config(model_dir):
    return json.loads((model_dir / "config.json").read_text())


def test_config_names_and_shapes(tiny_llama_past_onnx):
    hf = _hf_config(tiny_llama_past_onnx.parent)
    content = genai_config(signature_of_model(load_model(tiny_llama_past_onnx)), hf, "model.onnx")
    decoder = content["model"]["decoder"]
    assert decoder["filename"] == "model.onnx"
    assert decoder["num_hidden_layers"] == hf["num_hidden_layers"]
    assert decoder["num_key_value_heads"] == hf["num_key_value_heads"]
    assert decoder["head_size"] * hf["num_attention_heads"] == hf["hidden_size"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert content["search"]["past_present_share_buffer"] is False  # the graph concatenates its cache
    assert content["model"]["type"] == "llama" and content["model"]["vocab_size"] == hf["vocab_size"]


def test_export_writes_it_for_the_cache_graph_only(tiny_llama_past_onnx, tiny_llama_onnx):
    written = json.loads((tiny_llama_past_onnx.parent / GENAI_CONFIG).read_text())
    assert written["model"]["decoder"]["filename"] == "model.onnx"
    assert not (tiny_llama_onnx.parent / GENAI_CONFIG).exists()  # no KV cache: genai cannot run it


def test_unknown_inputs_and_model_types_get_no_config(tiny_llama_past_onnx, tiny_llama_onnx, tmp_path, caplog):
    hf = _hf_config(tiny_llama_past_onnx.parent)
    signature = signature_of_model(load_model(tiny_llama_past_onnx))
    with pytest.raises(UnsupportedModelError, match="no KV cache"):
        genai_config(signature_of_model(load_model(tiny_llama_onnx)), hf, "model.onnx")
    with pytest.raises(UnsupportedModelError, match="no model type for 'bert'"):
        genai_config(signature, {**hf, "model_type": "bert"}, "model.onnx")
    odd = signature.__class__(signature.input_names + ("past_key_values.0.key_scale",), signature.output_names,
                              signature.past_inputs, signature.past_shapes, signature.past_dtypes)
    with pytest.raises(UnsupportedModelError, match="cannot feed the graph input"):
        genai_config(odd, hf, "model.onnx")
    with caplog.at_level(logging.INFO, logger="graphq.genai_config"):
        assert not write_genai_config(signature, "model.onnx", [tmp_path], tmp_path)  # no config.json there
    assert "no config.json" in caplog.text and not (tmp_path / GENAI_CONFIG).exists()


def _genai_greedy(model_dir):
    og = pytest.importorskip("onnxruntime_genai")
    model = og.Model(str(model_dir))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(PROMPT.astype(np.int32))
    tokens = []
    while not generator.is_done():
        generator.generate_next_token()
        tokens.append(int(generator.get_next_tokens()[0]))
    return tokens


@pytest.mark.parametrize("recipe", ["w4-rtn", "w8a8"])
def test_genai_generates_what_onnx_runtime_does_on_quantized_graphs(tiny_llama_past_onnx, tmp_path, recipe):
    from graphq.cli import main

    out = tmp_path / "q" / "model.onnx"
    assert main(["quantize", str(tiny_llama_past_onnx), "-o", str(out), "--recipe", recipe, "--calib-windows", "2"]) in (0, None)
    written = json.loads((out.parent / GENAI_CONFIG).read_text())
    assert written["model"]["decoder"]["filename"] == "model.onnx"
    expected, _ = greedy_decode(cpu_session(out), PROMPT, NEW_TOKENS)
    assert _genai_greedy(out.parent) == expected


def test_fused_graph_runs_in_genai(tiny_llama_dir, tmp_path):
    from graphq.export import ExportConfig, export_model

    fused = export_model(str(tiny_llama_dir), tmp_path / "fused", ExportConfig(with_past=True, fuse=True)).model_path
    assert "GroupQueryAttention" in {node.op_type for node in load_model(fused).graph}
    expected, _ = greedy_decode(cpu_session(fused), PROMPT, NEW_TOKENS)
    assert _genai_greedy(fused.parent) == expected
