"""Embedding lookups as GatherBlockQuantized: own codes, codes shared with a tied MatMulNBits head,
exact agreement with the RTN reference in ONNX Runtime, and lookups that must stay float."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import run_model
from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn
from graphq.passes.embedding_quant import EmbeddingQuantConfig, EmbeddingQuantizationPass, embedding_group
from graphq.passes.weight_only_emit import WeightOnlyEmissionPass

VOCAB, DIM = 40, 64
IDS = np.array([[0, 7, 39, 7, 12]], dtype=np.int64)


def _model(*, tied_head: bool, float_head: bool = False) -> ir.Model:
    """ids -> Gather(E) -> x; optionally logits = x @ Transpose(E) (a tied LM head)."""
    table = np.random.default_rng(0).standard_normal((VOCAB, DIM)).astype(np.float32)
    ids = ir.Value(name="ids", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([1, "n"]))
    embed = ir.Value(name="embed", const_value=ir.tensor(table, name="embed"))
    gather = ir.node("Gather", [embed, ids], attributes={"axis": 0}, name="/model/embed_tokens/Gather")
    gather.outputs[0].name = "hidden"
    gather.outputs[0].dtype, gather.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([1, "n", DIM])
    nodes, outputs = [gather], [gather.outputs[0]]
    if tied_head or float_head:
        transpose = ir.node("Transpose", [embed], attributes={"perm": [1, 0]}, name="/lm_head/Transpose")
        head = ir.node("MatMul", [gather.outputs[0], transpose.outputs[0]], name="/lm_head/MatMul")
        head.outputs[0].name, head.outputs[0].dtype = "logits", ir.DataType.FLOAT
        head.outputs[0].shape = ir.Shape([1, "n", VOCAB])
        nodes += [transpose, head]
        outputs = [head.outputs[0], gather.outputs[0]]
    graph = ir.Graph([ids], outputs, nodes=nodes, initializers=[embed], opset_imports={"": 21}, name="embedding")
    return ir.Model(graph, ir_version=10)


def _table(model):
    return model.graph.initializers["embed"].const_value.numpy()


@pytest.mark.parametrize("scale_dtype", ["float32", "float16"])
@pytest.mark.parametrize("symmetric", [True, False])
def test_own_codes_reproduce_rtn_rows_exactly(symmetric, scale_dtype, tmp_path):
    model = _model(tied_head=False)
    table = _table(model)
    config = WeightQuantConfig(4, 32, symmetric, scale_dtype=scale_dtype)

    result = EmbeddingQuantizationPass(EmbeddingQuantConfig(config))(model)

    assert result.modified
    *casts, node = list(model.graph)  # float16 scales: read through a Cast to float32 (folded by ORT at load)
    assert [c.op_type for c in casts] == (["Cast"] if scale_dtype == "float16" else [])
    assert model.graph.initializers[node.inputs[2].name if not casts else casts[0].inputs[0].name].const_value.dtype == (
        ir.DataType.FLOAT16 if casts else ir.DataType.FLOAT)
    assert (node.op_type, node.domain) == ("GatherBlockQuantized", "com.microsoft")
    assert node.attributes.get_int("block_size") == 32 and node.attributes.get_int("bits") == 4
    assert "embed" not in model.graph.initializers  # the float table is gone
    (hidden,) = run_model(model, {"ids": IDS}, tmp_path)
    reference = quantize_rtn(table.T, config).dequantize().T
    np.testing.assert_array_equal(hidden, reference[IDS])
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_tied_head_and_lookup_share_one_set_of_codes(tmp_path):
    model = _model(tied_head=True)
    table = _table(model)
    config = WeightQuantConfig(4, 32, True)
    quantized = quantize_rtn(table.T, config)
    WeightOnlyEmissionPass({"/lm_head/MatMul": quantized})(model)
    assert "embed" in model.graph.initializers  # still read by the float Gather

    pass_ = EmbeddingQuantizationPass(EmbeddingQuantConfig(config), shared={"embed": "/lm_head/MatMul_Q4"})
    assert pass_(model).modified
    assert pass_.rewritten == {"/model/embed_tokens/Gather": "shared"}
    assert "embed" not in model.graph.initializers
    packed = [v for v in model.graph.initializers.values() if v.const_value.dtype == ir.DataType.UINT8]
    assert len(packed) == 1  # one copy of the 4-bit codes, read by both ops
    assert {u.node.op_type for u in packed[0].uses()} == {"MatMulNBits", "Reshape"}
    logits, hidden = run_model(model, {"ids": IDS}, tmp_path)
    dequantized = quantized.dequantize()  # [DIM, VOCAB]
    np.testing.assert_array_equal(hidden, dequantized.T[IDS])
    np.testing.assert_allclose(logits, hidden @ dequantized, rtol=1e-4, atol=1e-4)
    onnx.checker.check_model(ir.serde.serialize_model(model))


def test_lookups_that_stay_float(caplog):
    # The table is also read by a float LM head: quantizing the lookup would store it twice.
    model = _model(tied_head=False, float_head=True)
    with caplog.at_level("INFO"):
        assert not EmbeddingQuantizationPass()(model).modified
    assert "lookup left float" in caplog.text
    # No power-of-two group of 16 or more divides the hidden size.
    assert embedding_group(36, 128) is None and embedding_group(576, 128) == 64 and embedding_group(64, 0) == 64
    model = _model(tied_head=False)
    assert not EmbeddingQuantizationPass(EmbeddingQuantConfig(WeightQuantConfig(2, 32)))(model).modified
    assert [n.op_type for n in model.graph] == ["Gather"]


def test_constant_indices_are_not_a_lookup():
    model = _model(tied_head=False)
    gather = next(iter(model.graph))
    constant_ids = ir.Value(name="const_ids", const_value=ir.tensor(np.array([1, 2], dtype=np.int64)))
    model.graph.register_initializer(constant_ids)
    gather.replace_input_with(1, constant_ids)  # Gather(data, indices)
    assert not EmbeddingQuantizationPass()(model).modified


def test_weight_only_recipe_quantizes_the_tied_embedding_once(tiny_llama_onnx, tmp_path):
    from graphq.calibrate import CalibrationConfig
    from graphq.config import RECIPES
    from graphq.weight_only import quantize_weights

    recipe = dataclasses.replace(RECIPES["w4-rtn"], calibration=CalibrationConfig(windows=1, window_tokens=32))
    result = quantize_weights(tiny_llama_onnx, tmp_path / "e" / "model.onnx", recipe, progress=False)
    model = ir.load(result.model_path)
    ops = [n.op_type for n in model.graph]
    assert "GatherBlockQuantized" in ops and "Gather" not in [n.op_type for n in model.graph if n.name.startswith("/model/embed")]
    assert result.size_breakdown()["float_initializer_bytes"] < 64 * 260 * 4  # no float copy of the table left
    float_only = quantize_weights(tiny_llama_onnx, tmp_path / "f" / "model.onnx",
                                  dataclasses.replace(recipe, embedding="float"), progress=False)
    assert result.file_bytes < float_only.file_bytes
