"""CubeRootEmissionPass: structure, storage and agreement with ONNX Runtime (graphq.passes.cuberoot_emit)."""

import collections

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from conftest import run_model, single_matmul_model
from graphq.passes.cuberoot_emit import CubeRootEmissionPass

from graphq.errors import GraphqError
from graphq.numerics.companding import quantize_cuberoot
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn
from graphq.verify import cpu_session

RNG = np.random.default_rng(3)
K, N = 96, 40  # the last group of 64 is shorter
W = (RNG.standard_t(3, size=(K, N)) * 0.05).astype(np.float32)
X = RNG.normal(size=(3, 7, K)).astype(np.float32)


def _model(tied: bool = False) -> ir.Model:
    return single_matmul_model(W, X.shape[:-1], tied=tied)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("form, ops, storage", [
    ("codebook", {"Cast": 1, "Gather": 2, "Mul": 1, "MatMul": 1}, ir.DataType.UINT4),
    ("dq-cube", {"DequantizeLinear": 1, "Pow": 1, "MatMul": 1}, ir.DataType.INT4),
])
def test_forms_run_in_onnx_runtime_as_the_reference(form, ops, storage, tied, tmp_path):
    qw = quantize_cuberoot(W, WeightQuantConfig(bits=4, group_size=64), pad=True)

    result = CubeRootEmissionPass({"proj": qw}, form)(_model(tied))

    assert result.modified
    model = result.model
    assert dict(collections.Counter(n.op_type for n in model.graph)) == ops
    assert model.opset_imports[""] == 21
    codes = model.graph.initializers["proj.qweight"].const_value
    assert codes.dtype == storage and tuple(codes.shape) == (K, N)  # 4-bit codes, exactly K rows
    assert not any(v.const_value.dtype == ir.DataType.FLOAT and len(v.const_value.shape) == 2 and v.const_value.shape[0] >= K
                   for v in model.graph.initializers.values())  # the float weight is gone
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    stored = next(t for t in proto.graph.initializer if t.name == "proj.qweight")
    assert len(stored.raw_data) == K * N // 2  # two codes per byte in the file
    path = tmp_path / "m.onnx"
    ir.save(model, path)
    (actual,) = run_model(model, {"x": X}, tmp_path)
    w_hat = qw.dequantize() if form == "codebook" else qw.dequantize_cube_form()
    np.testing.assert_allclose(actual, X @ w_hat, rtol=1e-5, atol=1e-6)
    # with ORT's optimisations too (the codebook form is folded into a float weight at load)
    (optimised,) = cpu_session(path).run(None, {"x": X})
    np.testing.assert_allclose(optimised, X @ w_hat, rtol=1e-5, atol=1e-6)


def test_eight_bit_codebook(tmp_path):
    qw = quantize_cuberoot(W, WeightQuantConfig(bits=8, group_size=0))
    model = CubeRootEmissionPass({"proj": qw})(_model()).model
    assert model.graph.initializers["cuberoot.codebook_8bit"].const_value.shape == (256,)
    (actual,) = run_model(model, {"x": X}, tmp_path)
    np.testing.assert_allclose(actual, X @ qw.dequantize(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(actual, X @ W, rtol=0.05, atol=0.05 * np.abs(X @ W).max())


def test_nothing_to_emit_changes_nothing():
    model = _model()
    before = ir.serde.serialize_model(model).SerializeToString()
    result = CubeRootEmissionPass({})(model)
    assert not result.modified
    assert ir.serde.serialize_model(result.model).SerializeToString() == before


def test_bad_input_is_refused():
    qw = quantize_cuberoot(W, WeightQuantConfig(bits=4, group_size=32))
    with pytest.raises(GraphqError, match="not a MatMul"):
        CubeRootEmissionPass({"nope": qw})(_model())
    with pytest.raises(GraphqError, match="not cube-root"):
        CubeRootEmissionPass({"proj": quantize_rtn(W, WeightQuantConfig(bits=4, group_size=32))})
    with pytest.raises(GraphqError, match="form"):
        CubeRootEmissionPass({"proj": qw}, "matmulnbits")
