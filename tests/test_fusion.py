"""Fusion into ONNX Runtime's contrib ops: structure, exact agreement with the unfused graph, checker,
the keep-float policy and quantizer views, the CLI, and generation through optimum."""

from __future__ import annotations

import collections
import logging
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphq.cli import main
from graphq.errors import GraphqError
from graphq.passes.fusion import FUSED_OP_TYPES, STEP_NAMES, FusionConfig, FusionPass, causal_mask_problem, fusion_steps
from graphq.passes.fusion_canonicalize import FusionCanonicalizePass
from graphq.passes.keep_float import KEEP_FLOAT_OP_TYPES, keep_float_violations, kept_nodes
from graphq.passes.qdq_insert import INT8, QdqConfig, QdqInsertionPass, quantizable_matmuls
from graphq.runtime import GraphSignature, build_feeds, next_cache
from graphq.verify import cpu_session

TOLERANCE = 1e-4  # max |fused - unfused| on logits and the KV cache (float32, ORT CPU)
TINY_MAX_POSITIONS = 1024  # TinyModelSpec.max_positions


def _ops(model: ir.Model) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph)


def _save(model: ir.Model, path: Path) -> Path:
    ir.save(model, path)
    return path


def _fuse(path: Path, config: FusionConfig = FusionConfig(max_positions=TINY_MAX_POSITIONS)) -> tuple[ir.Model, FusionPass]:
    fusion = FusionPass(config)
    result = fusion(ir.load(path))
    assert result.modified
    return result.model, fusion


def _max_diffs(unfused: Path, fused: Path, prompt_tokens: int = 12, decode_steps: int = 3,
               optimization: str = "all") -> dict[str, float]:
    """Largest |difference| per output over a prompt and (with a KV cache) a few decode steps fed
    each graph's own cache; by default with ORT's full optimisation, as graphq eval runs them."""
    sessions = [cpu_session(unfused, optimization=optimization), cpu_session(fused, optimization=optimization)]
    signatures = [GraphSignature.of(s) for s in sessions]
    assert signatures[0].input_names == signatures[1].input_names
    assert signatures[0].output_names == signatures[1].output_names
    names = list(signatures[0].output_names)
    rng = np.random.default_rng(0)
    ids = rng.integers(4, 250, size=(1, prompt_tokens))
    outputs = [dict(zip(names, s.run(names, build_feeds(sig, ids)))) for s, sig in zip(sessions, signatures)]
    diffs = {name: float(np.max(np.abs(outputs[0][name] - outputs[1][name]))) for name in names}
    if signatures[0].has_kv_cache:
        for _ in range(decode_steps):
            ids = rng.integers(4, 250, size=(1, 1))
            outputs = [dict(zip(names, s.run(names, build_feeds(sig, ids, next_cache(sig, out)))))
                       for s, sig, out in zip(sessions, signatures, outputs)]
            for name in names:
                diffs[name] = max(diffs[name], float(np.max(np.abs(outputs[0][name] - outputs[1][name]))))
    return diffs


@pytest.fixture(scope="module")
def fused_llama(tiny_llama_onnx, tmp_path_factory):
    model, fusion = _fuse(tiny_llama_onnx)
    return _save(model, tmp_path_factory.mktemp("fused") / "model.onnx"), fusion.report


@pytest.fixture(scope="module")
def fused_llama_past(tiny_llama_past_onnx, tmp_path_factory):
    model, fusion = _fuse(tiny_llama_past_onnx)
    folder = tmp_path_factory.mktemp("fused-past")
    for item in tiny_llama_past_onnx.parent.iterdir():  # config + tokenizer, so optimum can load the folder
        if item.is_file() and not item.name.startswith("model.onnx"):
            shutil.copy2(item, folder / item.name)
    return _save(model, folder / "model.onnx"), fusion.report


# A tiny decoder has 2 layers: 5 RMSNorms (2 per layer + final), 2 attentions with 2 rotary each.
EXPECTED_LLAMA = {"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4}


@pytest.mark.parametrize("fixture", ["fused_llama", "fused_llama_past"])
def test_llama_fuses_into_gqa_and_skip_norms(fixture, request):
    path, report = request.getfixturevalue(fixture)
    model = ir.load(path)
    ops = _ops(model)

    assert report.fused_ops == EXPECTED_LLAMA
    assert report.step_counts == {"rms_normalization": 5, "skip_rms_normalization": 4, "rotary_embedding": 4,
                                  "cos_sin_cache": 4, "sdpa": 2, "gqa": 2}
    assert report.left_unfused == ()
    assert {op: ops[op] for op in EXPECTED_LLAMA} == EXPECTED_LLAMA
    # The embedding norm has no residual Add: it stays as ops (ORT fuses them when it loads the graph).
    assert ops["ReduceMean"] == 1 and ops["SimplifiedLayerNormalization"] == 0
    for gone in ("Softmax", "Neg", "Sin", "Cos", "Expand", "IsNaN"):
        assert ops[gone] == 0, gone
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    assert gqa.domain == "com.microsoft"
    assert (gqa.attributes.get_int("num_heads"), gqa.attributes.get_int("kv_num_heads"), gqa.attributes.get_int("do_rotary")) == (4, 2, 1)
    # The rotary cos/sin cache is a constant [max_positions, head_dim / 2].
    cos_cache = gqa.inputs[7]
    assert cos_cache.const_value is not None and cos_cache.const_value.shape == (TINY_MAX_POSITIONS, 8)
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert model.metadata_props["graphq.fusion"] == '{"GroupQueryAttention": 2, "SkipSimplifiedLayerNormalization": 4}'


def test_fused_logits_match_unfused(tiny_llama_onnx, fused_llama):
    diffs = _max_diffs(tiny_llama_onnx, fused_llama[0])
    assert diffs["logits"] < TOLERANCE, diffs


def test_fused_logits_and_cache_match_unfused_over_decode_steps(tiny_llama_past_onnx, fused_llama_past):
    diffs = _max_diffs(tiny_llama_past_onnx, fused_llama_past[0])
    assert set(diffs) == {"logits"} | {f"present.{i}.{k}" for i in range(2) for k in ("key", "value")}
    assert max(diffs.values()) < TOLERANCE, diffs


def test_cos_sin_cache_computed_at_run_time_without_max_positions(tiny_llama_past_onnx, tmp_path):
    model, fusion = _fuse(tiny_llama_past_onnx, FusionConfig())
    assert fusion.report.fused_ops == EXPECTED_LLAMA
    # positions[n, 1] @ inv_freq[1, m] became a Mul: no MatMul beyond the linear layers and the LM head.
    assert _ops(model)["MatMul"] == 2 * 7 + 1
    assert max(_max_diffs(tiny_llama_past_onnx, _save(model, tmp_path / "m.onnx")).values()) < TOLERANCE


def test_quantizers_see_the_same_linear_layers(tiny_llama_past_onnx, fused_llama_past):
    before = {n.name for n in quantizable_matmuls(ir.load(tiny_llama_past_onnx))}
    after = {n.name for n in quantizable_matmuls(ir.load(fused_llama_past[0]))}
    assert len(before) == 2 * 7 + 1  # q, k, v, o, gate, up, down per layer + LM head
    assert after == before


def test_keep_float_policy_holds_on_fused_graph(fused_llama_past):
    model = ir.load(fused_llama_past[0])
    assert {"GroupQueryAttention", "SkipSimplifiedLayerNormalization", "RotaryEmbedding", "MultiHeadAttention",
            "SkipLayerNormalization", "SimplifiedLayerNormalization"} <= KEEP_FLOAT_OP_TYPES
    fused = [n for n in model.graph if n.op_type in FUSED_OP_TYPES]
    assert set(fused) <= kept_nodes(model)
    plan = {n.name: INT8 for n in quantizable_matmuls(model)}
    kept_names = frozenset(n.name for n in kept_nodes(model))
    quantized = QdqInsertionPass(plan, QdqConfig(activation_scheme="dynamic-token"), kept_node_names=kept_names)(model).model
    assert keep_float_violations(n for n in quantized.graph if n.name in kept_names) == []


def test_encoder_fuses_skip_layer_norm_attention_and_bias_gelu(tiny_bert_dir, tmp_path):
    from graphq.export import export_model

    exported = export_model(str(tiny_bert_dir), tmp_path / "bert").model_path
    model, fusion = _fuse(exported, FusionConfig())
    assert fusion.report.fused_ops == {"BiasGelu": 2, "MultiHeadAttention": 2, "SkipLayerNormalization": 4}
    assert fusion.report.left_unfused == ()
    onnx.checker.check_model(ir.to_proto(model), full_check=True)
    assert _max_diffs(exported, _save(model, tmp_path / "fused.onnx"))["last_hidden_state"] < TOLERANCE


def _tiny_mistral_sliding_window(folder: Path) -> Path:
    import torch
    from transformers import MistralConfig, MistralForCausalLM

    from graphq.models.tiny import byte_tokenizer

    tokenizer = byte_tokenizer()
    config = MistralConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, sliding_window=4,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    MistralForCausalLM(config).eval().save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


def test_sliding_window_mask_is_not_fused_into_gqa(tmp_path, caplog):
    """onnxscript's GQA rule drops any mask; graphq's check keeps a sliding window out of GQA."""
    from graphq.export import ExportConfig, export_model

    exported = export_model(str(_tiny_mistral_sliding_window(tmp_path / "hf")), tmp_path / "onnx",
                            ExportConfig(with_past=True)).model_path
    with caplog.at_level(logging.DEBUG, logger="graphq.passes.fusion"):
        model, fusion = _fuse(exported, FusionConfig(max_positions=256))
    assert "GroupQueryAttention" not in fusion.report.fused_ops
    assert fusion.report.fused_ops["MultiHeadAttention"] == 2  # the mask is kept
    assert "not a plain causal + padding mask" in caplog.text
    # 12 prompt tokens and 3 decode steps: a window of 4 masks most keys.
    assert max(_max_diffs(exported, _save(model, tmp_path / "fused.onnx")).values()) < TOLERANCE


def test_causal_mask_check_on_the_exported_mask(tiny_llama_past_onnx):
    model = ir.load(tiny_llama_past_onnx)
    softmax_input = next(n for n in model.graph if n.op_type == "Softmax").inputs[0]
    mask = next(v for v in softmax_input.producer().inputs if v.producer().op_type != "MatMul")
    assert causal_mask_problem(mask) is None
    assert causal_mask_problem(None) == "attention has no mask (not causal)"
    weights = softmax_input.producer().inputs[0]  # q k^T: does not derive from attention_mask
    assert "does not derive" in causal_mask_problem(weights)


def _unfusable_rms_norm() -> ir.Model:
    """An RMSNorm whose epsilon is a graph input: onnxscript's rule needs a constant."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([1, 3, 8]))
    eps = ir.Value(name="eps", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([]))
    two = ir.Value(name="two", const_value=ir.tensor(np.array(2.0, dtype=np.float32)))
    axes = ir.Value(name="axes", const_value=ir.tensor(np.array([-1], dtype=np.int64)))
    gamma = ir.Value(name="gamma", const_value=ir.tensor(np.linspace(0.5, 1.5, 8, dtype=np.float32)))
    square = ir.node("Pow", [x, two], name="pow")
    mean = ir.node("ReduceMean", [square.outputs[0], axes], attributes={"keepdims": 1}, name="mean")
    add = ir.node("Add", [mean.outputs[0], eps], name="add")
    root = ir.node("Sqrt", [add.outputs[0]], name="sqrt")
    inverse = ir.node("Reciprocal", [root.outputs[0]], name="reciprocal")
    normalized = ir.node("Mul", [x, inverse.outputs[0]], name="mul")
    scaled = ir.node("Mul", [normalized.outputs[0], gamma], name="mul_gamma")
    scaled.outputs[0].name = "y"
    scaled.outputs[0].dtype = ir.DataType.FLOAT
    scaled.outputs[0].shape = ir.Shape([1, 3, 8])
    graph = ir.Graph([x, eps], [scaled.outputs[0]], nodes=[square, mean, add, root, inverse, normalized, scaled],
                     initializers=[two, axes, gamma], opset_imports={"": 18}, name="unfusable")
    return ir.Model(graph, ir_version=10)


def test_nothing_to_fuse_leaves_the_graph_unchanged_and_says_why(caplog):
    model = _unfusable_rms_norm()
    before = ir.to_proto(model).SerializeToString()
    with caplog.at_level(logging.INFO, logger="graphq.passes.fusion"):
        fusion = FusionPass()
        result = fusion(model)
    assert not result.modified
    assert ir.to_proto(result.model).SerializeToString() == before
    assert ir.to_proto(model).SerializeToString() == before  # the input was not touched either
    assert fusion.report.fused_ops == {}
    assert "nothing fused; the graph is unchanged" in caplog.text
    (left,) = fusion.report.left_unfused
    assert left.startswith("1 ReduceMean (normalization): rms_normalization: rule RmsNormFusion")
    assert "Epsilon is not a float value" in left
    assert f"left unfused: {left}" in caplog.text


def test_canonicalisation_is_exact(tiny_llama_past_onnx, tmp_path):
    model = ir.load(tiny_llama_past_onnx)
    canonical = FusionCanonicalizePass()
    assert canonical(model).modified
    assert canonical.counts["DivOneToReciprocal"] == 5 and canonical.counts["WhereScalarBranch"] == 4
    # Bit-identical op by op (ORT's own fusions at session load would see different ops).
    diffs = _max_diffs(tiny_llama_past_onnx, _save(model, tmp_path / "canonical.onnx"), optimization="disable")
    assert max(diffs.values()) == 0.0


def test_config_validation_and_step_table():
    assert tuple(step.name for step in fusion_steps(FusionConfig())) == STEP_NAMES
    with pytest.raises(GraphqError, match="unknown fusion steps"):
        FusionConfig(skip_steps=frozenset({"nope"}))
    with pytest.raises(GraphqError, match="max_positions"):
        FusionConfig(max_positions=0)


def test_skipped_attention_steps_leave_attention_and_say_so(tiny_llama_onnx, caplog):
    with caplog.at_level(logging.INFO, logger="graphq.passes.fusion"):
        _, fusion = _fuse(tiny_llama_onnx, FusionConfig(max_positions=TINY_MAX_POSITIONS, skip_steps=frozenset({"sdpa"})))
    assert "GroupQueryAttention" not in fusion.report.fused_ops
    assert fusion.report.fused_ops["RotaryEmbedding"] == 4  # rotary stays fused on its own
    assert any(line.startswith("2 Softmax (attention)") for line in fusion.report.left_unfused)
    assert "left unfused: 2 Softmax (attention)" in caplog.text


def test_cli_optimize_fuse(tiny_llama_past_onnx, tmp_path, capsys):
    out = tmp_path / "fused.onnx"
    assert main(["optimize", str(tiny_llama_past_onnx), "-o", str(out), "--fuse"]) == 0
    printed = capsys.readouterr().out
    assert "fused: 2 GroupQueryAttention, 4 SkipSimplifiedLayerNormalization" in printed
    gqa = next(n for n in ir.load(out).graph if n.op_type == "GroupQueryAttention")
    assert gqa.inputs[7].const_value.shape == (TINY_MAX_POSITIONS, 8)  # from config.json beside the input
    assert main(["optimize", str(tiny_llama_past_onnx), "-o", str(tmp_path / "x.onnx"), "--max-positions", "8"]) == 1


def test_export_with_fuse_checks_parity_on_the_fused_graph(tiny_llama_dir, tmp_path):
    from graphq.export import ExportConfig, export_model

    result = export_model(str(tiny_llama_dir), tmp_path / "out", ExportConfig(with_past=True, fuse=True))
    assert result.parity_max_abs_diff < 1e-4
    assert [r.name for r in result.passes][-1] == "FusionPass" and result.passes[-1].modified
    assert _ops(ir.load(result.model_path))["GroupQueryAttention"] == 2


def test_optimum_generates_the_same_tokens(tiny_llama_past_onnx, fused_llama_past):
    import torch
    from optimum.onnxruntime import ORTModelForCausalLM

    prompt = torch.tensor([[5 + (7 * i) % 250 for i in range(10)]])
    runs = []
    for folder in (tiny_llama_past_onnx.parent, fused_llama_past[0].parent):
        model = ORTModelForCausalLM.from_pretrained(folder, use_cache=True, provider="CPUExecutionProvider")
        runs.append(model.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=16,
                                   do_sample=False, output_scores=True, return_dict_in_generate=True))
    assert runs[0].sequences.tolist() == runs[1].sequences.tolist()
    scores = [torch.stack(run.scores).numpy() for run in runs]
    assert np.max(np.abs(scores[0] - scores[1])) < TOLERANCE


@pytest.mark.real_model
def test_default_model_fuses_every_layer(tmp_path):
    from graphq.evaluate import EvalConfig, evaluate_model
    from graphq.export import ExportConfig, export_model

    result = export_model(None, tmp_path / "smollm2", ExportConfig(with_past=True, fuse=True))
    assert result.parity_max_abs_diff < 1e-3  # against PyTorch, on the fused graph
    ops = _ops(ir.load(result.model_path))
    assert (ops["GroupQueryAttention"], ops["SkipSimplifiedLayerNormalization"], ops["Softmax"]) == (30, 60, 0)
    evaluation = evaluate_model(result.model_path, EvalConfig(windows=2, decode_new_tokens=16, decode_repeats=1,
                                                              prefill_repeats=1), progress=False)
    assert evaluation.has_kv_cache and evaluation.decode_tokens_per_s > 0
    assert 10 < evaluation.perplexity < 60
