import json

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import sha256_tree
from graphq.attention_quant import AttentionQuantConfig, quantize_attention
from graphq.cli import main
from graphq.errors import GraphqError
from graphq.evaluate import chunked_perplexity, greedy_decode, perplexity
from graphq.modelio import load_model
from graphq.numerics.kv_cache import dequantize_int8, quantize_int8
from graphq.passes.kv_cache_int8 import KvCacheInt8Pass
from graphq.runtime import GraphSignature, build_feeds, next_cache
from graphq.verify import cpu_session

IDS = np.random.default_rng(0).integers(3, 120, size=(1, 40))


@pytest.fixture(scope="module")
def kv_int8(tiny_llama_past_onnx, tmp_path_factory):
    out = tmp_path_factory.mktemp("kv") / "model.onnx"
    result = quantize_attention(tiny_llama_past_onnx, out, AttentionQuantConfig(kv_cache="int8"))
    return result


def _step(session, ids, cache=None):
    signature = GraphSignature.of(session)
    names = [o.name for o in session.get_outputs()]
    return dict(zip(names, session.run(names, build_feeds(signature, ids, cache)))), signature


def test_structure_and_cache_size(kv_int8):
    proto = onnx.load(str(kv_int8.model_path))
    onnx.checker.check_model(proto, full_check=True)
    inputs = {v.name: v.type.tensor_type for v in proto.graph.input}
    outputs = {v.name: v.type.tensor_type for v in proto.graph.output}
    for layer in range(2):
        for kind in ("key", "value"):
            assert inputs[f"past_key_values.{layer}.{kind}"].elem_type == onnx.TensorProto.INT8
            assert inputs[f"past_key_values.{layer}.{kind}_scale"].elem_type == onnx.TensorProto.FLOAT
            assert outputs[f"present.{layer}.{kind}"].elem_type == onnx.TensorProto.INT8
            assert [d.dim_value for d in outputs[f"present.{layer}.{kind}_scale"].shape.dim][-1] == 1
    assert kv_int8.cache_tensors == 4
    # tiny head_dim 16: (16 + 4) / 64; SmolLM2's 64: 68 / 256 (test_kv_cache_numerics).
    assert kv_int8.to_json()["cache_ratio_vs_float32"] == pytest.approx(20 / 64)
    assert not (kv_int8.model_path.parent / "genai_config.json").exists()


def test_cache_is_quantized_once_and_the_rest_is_exact(tiny_llama_past_onnx, kv_int8):
    float_session, int8_session = cpu_session(tiny_llama_past_onnx), cpu_session(kv_int8.model_path)
    # Prefill from an empty cache: same logits; the cache is the per-token quantization of the float one.
    f_out, f_sig = _step(float_session, IDS[:, :24])
    q_out, q_sig = _step(int8_session, IDS[:, :24])
    np.testing.assert_allclose(q_out["logits"], f_out["logits"], atol=1e-6)
    codes, scales = quantize_int8(f_out["present.1.key"])
    np.testing.assert_array_equal(q_out["present.1.key"], codes)
    np.testing.assert_allclose(q_out["present.1.key_scale"], scales, rtol=1e-6)
    # Next chunk: identical to the float graph fed the dequantized cache; past codes carried byte for byte.
    dequantized = {name: dequantize_int8(q_out[name.replace("past_key_values", "present")],
                                         q_out[name.replace("past_key_values", "present") + "_scale"])
                   for name in f_sig.past_inputs}
    f_next, _ = _step(float_session, IDS[:, 24:], dequantized)
    q_next, _ = _step(int8_session, IDS[:, 24:], next_cache(q_sig, q_out))
    np.testing.assert_allclose(q_next["logits"], f_next["logits"], atol=1e-5)
    np.testing.assert_array_equal(q_next["present.0.value"][:, :, :24], q_out["present.0.value"])
    # Error budget against the float cache: int8 per-token keys/values move the logits by < 2 % of their range.
    f_exact, _ = _step(float_session, IDS[:, 24:], next_cache(f_sig, f_out))
    spread = np.ptp(f_exact["logits"])
    assert np.abs(q_next["logits"] - f_exact["logits"]).max() < 0.02 * spread


def test_chunked_perplexity_and_greedy_generation(tiny_llama_past_onnx, kv_int8):
    float_session, int8_session = cpu_session(tiny_llama_past_onnx), cpu_session(kv_int8.model_path)
    windows = np.random.default_rng(1).integers(3, 120, size=(2, 48))
    one_pass = perplexity(float_session, windows, progress=False)
    assert chunked_perplexity(float_session, windows, 16, 8, progress=False) == pytest.approx(one_pass, rel=1e-5)
    assert chunked_perplexity(int8_session, windows, 16, 8, progress=False) == pytest.approx(one_pass, rel=0.01)
    prompt = IDS[0, :8]
    assert greedy_decode(int8_session, prompt, 16)[0] == greedy_decode(float_session, prompt, 16)[0]


def test_fused_group_query_attention(tiny_llama_past_onnx, tmp_path):
    from graphq.passes.fusion import FusionConfig, FusionPass

    fused = FusionPass(FusionConfig(max_positions=64))(load_model(tiny_llama_past_onnx)).model
    assert any(n.op_type == "GroupQueryAttention" for n in fused.graph)
    float_path, int8_path = tmp_path / "fused.onnx", tmp_path / "fused-int8.onnx"
    ir.save(fused, float_path)
    assert KvCacheInt8Pass()(fused).modified
    ir.save(fused, int8_path)
    float_session, int8_session = cpu_session(float_path), cpu_session(int8_path)
    q_out, q_sig = _step(int8_session, IDS[:, :24])
    f_sig = GraphSignature.of(float_session)
    dequantized = {name: dequantize_int8(q_out[name.replace("past_key_values", "present")],
                                         q_out[name.replace("past_key_values", "present") + "_scale"])
                   for name in f_sig.past_inputs}
    f_next, _ = _step(float_session, IDS[:, 24:], dequantized)
    q_next, _ = _step(int8_session, IDS[:, 24:], next_cache(q_sig, q_out))
    np.testing.assert_allclose(q_next["logits"], f_next["logits"], atol=1e-5)
    assert q_next["present.0.key"].dtype == np.int8 and q_next["present.0.key"].shape[2] == 40


def test_graph_without_past_or_with_int8_cache_is_refused(tiny_llama_onnx, kv_int8):
    model = load_model(tiny_llama_onnx)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(GraphqError, match="no past_key_values"):
        KvCacheInt8Pass()(model)
    assert ir.serde.serialize_model(model).SerializeToString() == before
    with pytest.raises(GraphqError, match="already quantized"):
        KvCacheInt8Pass()(load_model(kv_int8.model_path))


def test_cli_alone_combined_and_bad_input(tiny_llama_onnx, tiny_llama_past_onnx, tmp_path, capsys):
    out = tmp_path / "combined" / "model.onnx"
    assert main(["quantize", str(tiny_llama_past_onnx), "-o", str(out), "--recipe", "w4-rtn", "--kv-cache", "int8"]) == 0
    report = json.loads(out.with_suffix(".graphq.json").read_text())
    assert report["attention_quant"]["kv_cache"] == "int8" and report["model_path"] == str(out)
    ops = {n.op_type for n in onnx.load(str(out)).graph.node}
    assert "MatMulNBits" in ops
    assert sorted(p.name for p in out.parent.iterdir() if p.name.startswith(".")) == []  # no staging left
    assert "bytes/token" in capsys.readouterr().out

    source = sha256_tree(tiny_llama_onnx.parent)
    for args, message in [([str(tiny_llama_onnx), "--kv-cache", "int8"], "no past_key_values"),
                          ([str(tiny_llama_onnx), "--kv-cache", "int8", "--recipe", "w4-rtn"], "no past_key_values"),
                          ([str(tiny_llama_past_onnx), "--kv-cache", "int8", "--bits", "4"], "needs a weight recipe")]:
        bad = tmp_path / "bad" / "model.onnx"
        assert main(["quantize", args[0], "-o", str(bad), *args[1:]]) == 1
        assert message in capsys.readouterr().err
        assert not bad.parent.exists() or not any(bad.parent.iterdir())
    assert sha256_tree(tiny_llama_onnx.parent) == source
