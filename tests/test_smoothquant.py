import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_model
from graphq.errors import GraphqError
from graphq.numerics.smoothing import smoothing_scales
from graphq.passes.qdq_insert import quantizable_matmuls
from graphq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import cpu_session

IDS = np.array([[5, 17, 99, 3, 42, 250, 7, 8, 120, 64, 33, 2]], dtype=np.int64)


def _feeds(path):
    return build_feeds(GraphSignature.of(cpu_session(path)), IDS)


def _channel_ranges(model: ir.Model, seed: int = 0) -> dict[str, np.ndarray]:
    """Made-up activation ranges with a few outlier channels, for every MatMul input."""
    rng = np.random.default_rng(seed)
    ranges = {}
    for node in quantizable_matmuls(model):
        width = node.inputs[1].const_value.shape[0] if node.inputs[1].const_value is not None else 64
        values = rng.uniform(0.5, 2.0, size=width).astype(np.float32)
        values[rng.choice(width, 3, replace=False)] *= 40.0
        ranges[node.inputs[0].name] = values
    return ranges


def test_smoothing_scales_formula():
    a = np.array([4.0, 1.0, 0.0, 9.0], dtype=np.float32)
    w = np.array([1.0, 4.0, 2.0, 0.0], dtype=np.float32)
    s = smoothing_scales(a, w, alpha=0.5)
    np.testing.assert_allclose(s, [2.0, 0.5, 1.0, 1.0], rtol=1e-6)
    np.testing.assert_allclose(smoothing_scales(a[:2], w[:2], alpha=1.0), a[:2], rtol=1e-6)
    with pytest.raises(ValueError):
        smoothing_scales(a, w, alpha=1.5)
    with pytest.raises(GraphqError):
        SmoothQuantConfig(alpha=-0.1)


def test_fold_keeps_the_float_function(tiny_llama_onnx, tmp_path):
    model = ir.load(tiny_llama_onnx)
    ir.external_data.load_to_model(model)
    feeds = _feeds(tiny_llama_onnx)
    (expected,) = cpu_session(tiny_llama_onnx).run(["logits"], feeds)
    norm_weight_before = model.graph.initializers["model.layers.0.input_layernorm.weight"].const_value.numpy().copy()
    ranges = _channel_ranges(model)

    smooth = SmoothQuantPass(ranges, SmoothQuantConfig(alpha=0.5))
    result = smooth(model)

    assert result.modified
    kinds = sorted(smooth.applied.values())
    # Per layer: two norm outputs fold into the norm weight, the MLP product into up_proj's columns,
    # the attention output (no foldable producer) gets an explicit Mul. The LM head's weight is the
    # tied embedding (a Transpose), so the final norm is left alone.
    assert kinds == sorted(["norm-weight"] * 4 + ["producer-columns"] * 2 + ["explicit-mul"] * 2)
    assert len([n for n in result.model.graph if n.name.endswith("/smooth_mul")]) == 2
    norm_value = next(n for n in result.model.graph if n.name == "/model/layers.0/input_layernorm/Mul_1").inputs[0]
    scales = smooth.factors["/model/layers.0/input_layernorm/Mul_1_output_0"]
    np.testing.assert_allclose(norm_value.const_value.numpy(), norm_weight_before / scales, rtol=1e-6)
    path = tmp_path / "smoothed.onnx"
    ir.save(result.model, path)
    onnx.checker.check_model(str(path), full_check=True)
    (actual,) = cpu_session(path).run(["logits"], feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_fold_into_fused_skip_norms(tiny_llama_dir, tmp_path):
    from graphq.export import ExportConfig, export_model

    fused = export_model(str(tiny_llama_dir), tmp_path / "fused", ExportConfig(fuse=True)).model_path
    model = ir.load(fused)
    ir.external_data.load_to_model(model)
    feeds = _feeds(fused)
    (expected,) = cpu_session(fused).run(["logits"], feeds)
    smooth = SmoothQuantPass(_channel_ranges(model), SmoothQuantConfig(alpha=0.5))
    result = smooth(model)
    producers = {name: value.producer().op_type for node in result.model.graph for value in node.outputs
                 for name in [value.name] if name in smooth.applied and value.producer() is not None}
    folded_into_skip = [name for name, how in smooth.applied.items() if how == "norm-op"
                        and producers.get(name) == "SkipSimplifiedLayerNormalization"]
    assert len(folded_into_skip) >= 3  # post-attention norms and the next layer's input norm
    assert "explicit-mul" not in {smooth.applied[name] for name in folded_into_skip}
    path = tmp_path / "smoothed.onnx"
    ir.save(result.model, path)
    onnx.checker.check_model(str(path), full_check=True)
    (actual,) = cpu_session(path).run(["logits"], feeds)
    np.testing.assert_allclose(actual, expected, rtol=1e-4, atol=1e-4)


def test_nothing_to_smooth_leaves_the_model_alone(tiny_llama_onnx):
    model = ir.load(tiny_llama_onnx)
    before = ir.serde.serialize_model(model).SerializeToString()
    result = SmoothQuantPass({}, SmoothQuantConfig())(model)
    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


def test_activation_with_other_consumers_is_skipped(tmp_path):
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 4]))
    gamma = ir.Value(name="gamma", const_value=ir.tensor(np.ones(4, dtype=np.float32)))
    w = ir.Value(name="w", const_value=ir.tensor(np.ones((4, 3), dtype=np.float32)))
    scaled = ir.node("Mul", [x, gamma], name="norm_scale")
    matmul = ir.node("MatMul", [scaled.outputs[0], w], name="matmul")
    relu = ir.node("Relu", [scaled.outputs[0]], name="relu")  # reads the values: folding would change it
    scaled.outputs[0].name = "h"
    matmul.outputs[0].name, relu.outputs[0].name = "y", "z"
    for out, shape in ((matmul.outputs[0], [2, 3]), (relu.outputs[0], [2, 4])):
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape(shape)
    graph = ir.Graph([x], [matmul.outputs[0], relu.outputs[0]], nodes=[scaled, matmul, relu],
                     initializers=[gamma, w], opset_imports={"": 18}, name="skip")
    model = ir.Model(graph, ir_version=10)
    config = SmoothQuantConfig(shared_mul=False)
    result = SmoothQuantPass({"h": np.array([8.0, 1.0, 1.0, 1.0], dtype=np.float32)}, config)(model)
    assert not result.modified
    np.testing.assert_array_equal(gamma.const_value.numpy(), np.ones(4, dtype=np.float32))


def test_shared_activation_gets_a_mul_on_the_matmul_branch_only(tmp_path):
    """Post-norm encoders (BERT): the norm output feeds the MatMuls and the residual Add. The norm is
    left alone; ``x / s`` is an explicit Mul read by the MatMuls only; the function is unchanged."""
    rng = np.random.default_rng(0)
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([5, 4]))
    gamma = ir.Value(name="gamma", const_value=ir.tensor(rng.normal(size=4).astype(np.float32)))
    beta = ir.Value(name="beta", const_value=ir.tensor(rng.normal(size=4).astype(np.float32)))
    w = ir.Value(name="w", const_value=ir.tensor(rng.normal(size=(4, 4)).astype(np.float32)))
    norm = ir.node("LayerNormalization", [x, gamma, beta], attributes={"axis": -1}, name="ln")
    matmul = ir.node("MatMul", [norm.outputs[0], w], name="matmul")
    residual = ir.node("Add", [matmul.outputs[0], norm.outputs[0]], name="residual")
    norm.outputs[0].name, matmul.outputs[0].name, residual.outputs[0].name = "h", "y", "z"
    for out in (norm.outputs[0], matmul.outputs[0], residual.outputs[0]):
        out.dtype, out.shape = ir.DataType.FLOAT, ir.Shape([5, 4])
    graph = ir.Graph([x], [residual.outputs[0]], nodes=[norm, matmul, residual],
                     initializers=[gamma, beta, w], opset_imports={"": 18}, name="shared")
    model = ir.Model(graph, ir_version=10)
    feeds = {"x": rng.normal(size=(5, 4)).astype(np.float32)}
    before = run_model(model, feeds, tmp_path)[0]
    gamma_before = gamma.const_value.numpy().copy()
    smooth = SmoothQuantPass({"h": np.array([8.0, 1.0, 2.0, 1.0], dtype=np.float32)})
    assert smooth(model).modified
    assert smooth.applied == {"h": "explicit-mul-shared"}
    np.testing.assert_array_equal(gamma.const_value.numpy(), gamma_before)
    assert matmul.inputs[0].producer().op_type == "Mul" and residual.inputs[1] is norm.outputs[0]
    np.testing.assert_allclose(run_model(model, feeds, tmp_path)[0], before, rtol=1e-5, atol=1e-5)
