"""A tied embedding / LM head with hot rows at int8 and the rest at int4: structure, exact agreement with
the two quantized halves in ONNX Runtime (lookup and logits in vocabulary order), the checker, one copy of
every row, and no change without hot rows."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from graphq.errors import GraphqError
from graphq.numerics.head_rows import hot_rows, row_positions, row_usage, split_bits
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn
from graphq.passes.tied_head_split import TiedHeadSplitPass
from graphq.passes.weight_only_emit import WeightOnlyEmitConfig
from conftest import run_model
from test_embedding_quant import IDS, VOCAB, _model, _table

HOT = np.array([0, 7, 12, 30], dtype=np.int64)  # IDS reads rows 0, 7, 39, 12: 39 is a cold one


def _parts(table, scale_dtype="float16"):
    cold = np.setdiff1d(np.arange(VOCAB), HOT)
    hot_q = quantize_rtn(table.T[:, HOT], WeightQuantConfig(8, 64, True, scale_dtype=scale_dtype))
    cold_q = quantize_rtn(table.T[:, cold], WeightQuantConfig(4, 32, False, scale_dtype=scale_dtype))
    reference = np.empty_like(table.T)
    reference[:, HOT], reference[:, cold] = hot_q.dequantize(), cold_q.dequantize()
    return hot_q, cold_q, reference


@pytest.mark.parametrize("scale_dtype", ["float16", "float32"])
def test_hot_rows_int8_cold_rows_int4_in_vocabulary_order(scale_dtype, tmp_path):
    model = _model(tied_head=True)
    table = _table(model)
    hot_q, cold_q, reference = _parts(table, scale_dtype)

    # accuracy_level 0: float activations in both kernels (the default 4 for 8 bits quantizes them per block)
    split = TiedHeadSplitPass("/lm_head/MatMul", HOT, hot_q, cold_q, WeightOnlyEmitConfig(accuracy_level=0))
    assert split(model).modified

    ops = [n.op_type for n in model.graph]
    assert ops.count("MatMulNBits") == 2 and ops.count("GatherBlockQuantized") == 2 and ops.count("Where") == 1
    assert "MatMul" not in ops and "Transpose" not in ops and "embed" not in model.graph.initializers
    assert split.lookups == ["/model/embed_tokens/Gather"]
    assert all(v.dtype is not None for n in model.graph for v in n.outputs)  # exports without value_info serialize too
    codes = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8]
    assert sorted(v.const_value.shape[0] for v in codes if len(v.const_value.shape) == 3) == [len(HOT), VOCAB - len(HOT)]
    onnx.checker.check_model(ir.serde.serialize_model(model))
    logits, hidden = run_model(model, {"ids": IDS}, tmp_path)
    np.testing.assert_array_equal(hidden, reference.T[IDS])  # each id from its own half, exactly
    np.testing.assert_allclose(logits, hidden @ reference, rtol=1e-5, atol=1e-5)


def test_no_hot_rows_changes_nothing_and_bad_parts_are_refused():
    model = _model(tied_head=True)
    table = _table(model)
    before = ir.serde.serialize_model(model).SerializeToString()
    hot_q, cold_q, _ = _parts(table)
    assert not TiedHeadSplitPass("/lm_head/MatMul", np.array([], dtype=np.int64), hot_q, cold_q)(model).modified
    assert ir.serde.serialize_model(model).SerializeToString() == before
    with pytest.raises(GraphqError, match="expected a quantized"):
        TiedHeadSplitPass("/lm_head/MatMul", HOT[:2], hot_q, cold_q)(model)
    with pytest.raises(GraphqError, match="MatMulNBits"):
        TiedHeadSplitPass("/lm_head/MatMul", HOT, hot_q, cold_q, WeightOnlyEmitConfig(format="qdq"))
    with pytest.raises(GraphqError, match="not a MatMul"):
        TiedHeadSplitPass("missing", HOT, hot_q, cold_q)(model)


def test_row_usage_ranking_and_positions():
    probabilities = np.array([0.0, 5.0, 1.0, 0.0, 2.0])
    counts = np.array([3, 0, 0, 0, 1])
    usage = row_usage(probabilities, counts)
    np.testing.assert_allclose(usage, probabilities / 8 + counts / 4)
    assert hot_rows(usage, 0.4).tolist() == [0, 1]  # ceil(0.4 * 5) = 2 rows: 0.75 and 0.625
    assert hot_rows(usage, 0.0).size == 0
    position = row_positions(np.array([1, 3]), 5)
    assert position.tolist() == [2, 0, 3, 1, 4]  # hot rows first, each half in id order
    assert split_bits(100, 5, 8.25, 4.25) == pytest.approx(4.45)
    with pytest.raises(GraphqError):
        hot_rows(usage, 1.0)
    with pytest.raises(ValueError):
        row_positions(np.array([1, 1]), 5)
