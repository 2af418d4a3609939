import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_model, single_matmul_model
from graphq.errors import GraphqError
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn
from graphq.passes.qdq_insert import new_initializer
from graphq.passes.weight_only_emit import WeightOnlyEmissionPass, WeightOnlyEmitConfig

RNG = np.random.default_rng(1)
K, N = 96, 40  # K is not a multiple of 64: the last group is shorter
W = (RNG.normal(size=(K, N)) * 0.1).astype(np.float32)
X = RNG.normal(size=(3, 7, K)).astype(np.float32)


def _model(tied: bool = False) -> ir.Model:
    return single_matmul_model(W, X.shape[:-1], tied=tied)


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("tied", [False, True])
def test_matmul_nbits(symmetric, tied, tmp_path):
    qw = quantize_rtn(W, WeightQuantConfig(bits=4, group_size=64, symmetric=symmetric), pad=True)

    result = WeightOnlyEmissionPass({"proj": qw})(_model(tied))

    graph = result.model.graph
    assert result.modified
    (node,) = [n for n in graph]
    assert (node.op_type, node.domain) == ("MatMulNBits", "com.microsoft")
    assert node.attributes["K"].value == K and node.attributes["N"].value == N and node.attributes["block_size"].value == 64
    assert "accuracy_level" not in node.attributes
    assert node.outputs[0].name == "y"
    assert (len(node.inputs) == 4) == (not symmetric)
    assert not any(v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2 for v in graph.initializers.values())
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=1e-4, atol=1e-4)


def test_matmul_nbits_float_zero_points(tmp_path):
    qw = quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True), pad=True)

    result = WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(float_zero_points="native"))(_model())

    (node,) = [n for n in result.model.graph]
    assert node.op_type == "MatMulNBits" and len(node.inputs) == 4
    assert node.inputs[3].const_value.dtype == ir.DataType.FLOAT and node.inputs[3].const_value.shape == (N * K // 32,)
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=1e-4, atol=1e-4)
    with pytest.raises(GraphqError, match="integer zero points"):
        WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(format="qdq"))(_model())


def test_blockwise_dequantize_linear(tmp_path):
    qw = quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32, symmetric=False))

    result = WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(format="qdq"))(_model())

    graph = result.model.graph
    assert [n.op_type for n in graph] == ["DequantizeLinear", "MatMul"]
    dq = graph.node(0)
    assert dq.attributes["block_size"].value == 32 and dq.attributes["axis"].value == 0
    assert dq.inputs[0].const_value.dtype == ir.DataType.UINT4
    assert result.model.opset_imports[""] == 21
    onnx.checker.check_model(ir.serde.serialize_model(result.model), full_check=True)
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=1e-5, atol=1e-5)


def test_nothing_to_emit_changes_nothing():
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    assert not WeightOnlyEmissionPass({})(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_bad_requests_are_refused():
    qw = quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32))
    with pytest.raises(GraphqError, match="not a MatMul"):
        WeightOnlyEmissionPass({"elsewhere": qw})(_model())
    with pytest.raises(GraphqError):
        WeightOnlyEmitConfig(format="gguf")
    with pytest.raises(GraphqError):
        WeightOnlyEmitConfig(accuracy_level=7)


def test_float_zero_points_as_symmetric_kernel_plus_offsets(tmp_path):
    """By default float zero points become a symmetric MatMulNBits (the fast kernels) plus the exact offset
    term: Add(MatMulNBits(x), MatMul(MatMul(x, P), O)); two MatMuls reading one input share the group sums."""
    from graphq.numerics.weight_only import split_float_zero_points

    config = WeightQuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True)
    qw = quantize_rtn(W, config)
    symmetric, offsets = split_float_zero_points(qw)
    np.testing.assert_allclose(symmetric.dequantize() + np.repeat(offsets, 32, axis=0), qw.dequantize(), rtol=1e-5, atol=1e-6)
    second = quantize_rtn(W[:, ::-1] * 0.5, config)
    model = single_matmul_model(W, X.shape[:-1])
    graph = model.graph
    twin = ir.node("MatMul", [graph.inputs[0], new_initializer(graph, "w2", np.ascontiguousarray(W[:, ::-1] * 0.5))], name="twin")
    twin.outputs[0].name = "y2"
    twin.outputs[0].dtype, twin.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([*X.shape[:-1], N])
    graph.append(twin)
    graph.outputs.append(twin.outputs[0])

    result = WeightOnlyEmissionPass({"proj": qw, "twin": second})(model)

    ops = [n.op_type for n in result.model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("MatMul") == 3 and ops.count("Add") == 2  # 1 shared group sum
    assert all(len(n.inputs) == 3 for n in result.model.graph if n.op_type == "MatMulNBits")  # no zero points
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    actual, actual2 = run_model(result.model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(actual2, X @ second.dequantize(), rtol=1e-4, atol=1e-4)
    with pytest.raises(GraphqError, match="float_zero_points"):
        WeightOnlyEmitConfig(float_zero_points="fused")


@pytest.mark.parametrize("bits, level, expected", [(4, None, None), (8, None, 4), (8, 0, None), (4, 4, 4)])
def test_accuracy_level_default_is_4_for_8_bit_weights(bits, level, expected, tmp_path):
    """ORT 1.32's float path for 8-bit MatMulNBits is ~90x slower than its int8 one, so 8-bit weights get
    accuracy_level 4 unless the recipe names a level; an explicit level applies to every node."""
    qw = quantize_rtn(W, WeightQuantConfig(bits=bits, group_size=32))
    result = WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(accuracy_level=level))(_model())
    (node,) = [n for n in result.model.graph]
    attribute = node.attributes.get("accuracy_level")
    assert (attribute.value if attribute is not None else None) == expected
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    budget = 0.02 if expected else 1e-4  # level 4 quantizes the activations to int8 per block inside the kernel
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=budget, atol=budget * np.abs(X @ qw.dequantize()).max())


@pytest.mark.parametrize("level", [None, 4])
@pytest.mark.parametrize("float_zero_points", [False, True])
def test_float16_scales_behind_a_cast_that_onnx_runtime_folds(level, float_zero_points, tmp_path):
    """scale_dtype float16 in a float32 graph: scales (and offsets) are float16 initializers read through a
    Cast placed first in the graph; the output equals X @ W_hat at float32 precision (the stored values are the
    numerics' own), and ONNX Runtime's basic optimisation level leaves no Cast (folded into constants, which
    MatMulNBits pre-packs). With float32 storage there is no Cast."""
    config = WeightQuantConfig(bits=4, group_size=32, symmetric=not float_zero_points, float_zero_points=float_zero_points,
                               scale_dtype="float16")
    qw = quantize_rtn(W, config, pad=True)

    result = WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(accuracy_level=level))(_model())

    graph = result.model.graph
    casts = [n for n in graph if n.op_type == "Cast"]
    assert [n.op_type for n in graph][:len(casts)] == ["Cast"] * len(casts)
    stored = {v.name: v.const_value.dtype for v in graph.initializers.values()}
    assert stored["proj.scales"] == ir.DataType.FLOAT16
    assert len(casts) == (2 if float_zero_points and K % 32 == 0 else 1)
    assert [name for name, dtype in stored.items() if dtype == ir.DataType.FLOAT] == (["group_indicator_96x32"] if float_zero_points else [])
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    expected = X @ qw.dequantize()
    budget = 0.02 if level else 1e-5  # level 4 quantizes the activations to int8 per block inside the kernel
    np.testing.assert_allclose(actual, expected, rtol=budget, atol=budget * np.abs(expected).max())
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ir.save(result.model, tmp_path / "model.onnx")
    ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    assert "Cast" not in [n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node]

    plain = WeightOnlyEmissionPass({"proj": quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32), pad=True)})(_model())
    assert "Cast" not in [n.op_type for n in plain.model.graph]


@pytest.mark.parametrize("symmetric,float_zero_points,fmt", [(True, False, "matmulnbits"), (False, True, "matmulnbits"),
                                                             (False, False, "matmulnbits"), (False, False, "qdq")])
def test_q8_pow2_scales_stored_as_codes_and_exponents_that_onnx_runtime_folds(symmetric, float_zero_points, fmt, tmp_path):
    """scale_dtype q8-pow2: scales (and offsets) are stored as 8-bit codes (uint8 when none is negative, else
    int8) with one int8 exponent per column, read through Cast/Pow/Mul placed first; the output equals
    X @ W_hat at float32 precision (c 2^e is exact), ONNX Runtime folds the chain at its basic level, and the
    stored bytes are one byte per scale plus one per column."""
    config = WeightQuantConfig(bits=4, group_size=32, symmetric=symmetric, float_zero_points=float_zero_points,
                               scale_dtype="q8-pow2")
    qw = quantize_rtn(W, config)  # K = 96: whole groups of 32 (the offset form needs them)

    result = WeightOnlyEmissionPass({"proj": qw}, WeightOnlyEmitConfig(format=fmt))(_model())

    graph = result.model.graph
    stored = {v.name: v.const_value for v in graph.initializers.values()}
    assert stored["proj.scales"].dtype == (ir.DataType.INT8 if symmetric else ir.DataType.UINT8)  # sign trick: negative scales
    assert stored["proj.scales"].size == qw.scales.size and stored["proj.scales.exponents"].size == N
    if float_zero_points:
        assert stored["proj.offsets"].dtype == ir.DataType.INT8 and stored["proj.offsets.exponents"].size == N
    assert not [name for name, value in stored.items() if value.dtype == ir.DataType.FLOAT
                and name not in ("pow2_scales_base", "group_indicator_96x32")]
    ops = [n.op_type for n in graph]
    chain = (5 if fmt == "matmulnbits" else 4) + (4 if float_zero_points else 0)  # Cast, Cast, Pow, Mul (, Reshape) each
    assert set(ops[:chain]) <= {"Cast", "Pow", "Mul", "Reshape"} and ops.count("Pow") == chain // 4
    onnx.checker.check_model(ir.serde.serialize_model(result.model))
    (actual,) = run_model(result.model, {"x": X}, tmp_path)
    expected = X @ qw.dequantize()
    np.testing.assert_allclose(actual, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    ir.save(result.model, tmp_path / "model.onnx")
    ort.InferenceSession(str(tmp_path / "model.onnx"), options, providers=["CPUExecutionProvider"])
    left = {n.op_type for n in onnx.load(str(tmp_path / "optimized.onnx")).graph.node}
    assert not left & {"Cast", "Pow", "Mul", "Reshape"}


def test_q8_pow2_storage_refuses_values_off_its_grid():
    """Values that are not 8-bit codes times a power of two per column are refused, not silently rounded."""
    qw = quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32, symmetric=True, scale_dtype="float16"))
    graph = _model().graph
    with pytest.raises(GraphqError, match="not 8-bit codes times a power of two"):
        from graphq.passes.weight_only_emit import stored_float
        stored_float(graph, "s", qw.scales * np.float32(1.0 + 2**-12), "q8-pow2", ir.DataType.FLOAT)
