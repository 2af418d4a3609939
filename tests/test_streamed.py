"""Layer-streamed quantization (graphq.streaming): the same output as the in-memory path, one block
of weights held at a time, outputs verified from the file."""

from __future__ import annotations

import dataclasses
import importlib.util
import sys
import weakref
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import numpy_helper

from graphq.config import RECIPES
from graphq.errors import GraphqError
from graphq.modelio import ExternalDataSink, load_model, save_streamed
from graphq.numerics.weight_only import WeightQuantConfig
from graphq.quantize import quantize_model
from graphq.streaming import should_stream, verify_streamed
from graphq.weight_only import quantize_weights

TOOL = Path(__file__).resolve().parents[1] / "tools" / "make_synthetic.py"
TINY = {"layers": 3, "hidden": 64, "intermediate": 128, "vocab": 300, "heads": 4, "kv_heads": 2, "max_positions": 256}


def _make_synthetic(folder: Path, **overrides) -> Path:
    spec = importlib.util.spec_from_file_location("make_synthetic", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    try:
        spec.loader.exec_module(module)
        return module.make_synthetic(folder, module.SyntheticSpec(**{**TINY, **overrides})).model_path
    finally:
        sys.modules.pop(spec.name, None)


@pytest.fixture(scope="module")
def synthetic_fp16(tmp_path_factory) -> Path:
    return _make_synthetic(tmp_path_factory.mktemp("synthetic-fp16"), dtype="float16")


@pytest.fixture(scope="module")
def synthetic_fp32(tmp_path_factory) -> Path:
    return _make_synthetic(tmp_path_factory.mktemp("synthetic-fp32"), dtype="float32")


def _small(recipe):
    calibration = dataclasses.replace(recipe.calibration, windows=2, window_tokens=32)
    if hasattr(recipe, "weights"):
        return dataclasses.replace(recipe, weights=WeightQuantConfig(4, 32), calibration=calibration)
    return dataclasses.replace(recipe, calibration=calibration)


def _assert_same_model(a: Path, b: Path) -> None:
    """Same nodes (names, ops, inputs, attributes) and bit-identical initializers, wherever stored."""
    pa, pb = onnx.load(str(a)), onnx.load(str(b))
    assert [(n.name, n.op_type, list(n.input), list(n.output)) for n in pa.graph.node] == \
           [(n.name, n.op_type, list(n.input), list(n.output)) for n in pb.graph.node]
    assert [n.attribute for n in pa.graph.node] == [n.attribute for n in pb.graph.node]
    ta = {t.name: numpy_helper.to_array(t) for t in pa.graph.initializer}
    tb = {t.name: numpy_helper.to_array(t) for t in pb.graph.initializer}
    assert sorted(ta) == sorted(tb)
    for name, array in ta.items():
        assert array.dtype == tb[name].dtype and np.array_equal(array, tb[name]), name


def _external(path: Path) -> int:
    proto = onnx.load(str(path), load_external_data=False)
    return sum(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)


@pytest.mark.parametrize("recipe", ["w4-rtn", "w4-gptq"])
def test_weight_only_streamed_matches_in_memory(synthetic_fp16, tmp_path, recipe):
    recipe = _small(RECIPES[recipe])
    memory = quantize_weights(synthetic_fp16, tmp_path / "m" / "model.onnx", recipe, progress=False, streamed=False)
    streamed = quantize_weights(synthetic_fp16, tmp_path / "s" / "model.onnx", recipe, progress=False, streamed=True)
    _assert_same_model(memory.model_path, streamed.model_path)
    assert streamed.quantized_nodes == memory.quantized_nodes and streamed.weight_bits == memory.weight_bits
    assert _external(streamed.model_path) > 0 and (tmp_path / "s" / "model.onnx.data").is_file()
    onnx.checker.check_model(str(streamed.model_path))
    scales = [t for t in onnx.load(str(streamed.model_path)).graph.initializer if t.name.endswith(".scales")]
    assert scales and all(t.data_type == onnx.TensorProto.FLOAT16 for t in scales)  # float16 model, float16 scales


def test_asymmetric_gptq_streamed_matches_in_memory(synthetic_fp16, tmp_path):
    """The float reference of asymmetric GPTQ swaps the block's (memory-mapped) float weights back in."""
    recipe = _small(RECIPES["w4-gptq"])
    recipe = dataclasses.replace(recipe, gptq=dataclasses.replace(recipe.gptq, true_sequential=True, asymmetric=True))
    memory = quantize_weights(synthetic_fp16, tmp_path / "m" / "model.onnx", recipe, progress=False, streamed=False)
    streamed = quantize_weights(synthetic_fp16, tmp_path / "s" / "model.onnx", recipe, progress=False, streamed=True)
    _assert_same_model(memory.model_path, streamed.model_path)
    plain = quantize_weights(synthetic_fp16, tmp_path / "p" / "model.onnx",
                             dataclasses.replace(recipe, gptq=dataclasses.replace(recipe.gptq, asymmetric=False)),
                             progress=False, streamed=True)
    with pytest.raises(AssertionError):  # the option did something
        _assert_same_model(plain.model_path, streamed.model_path)


def test_w8a8_streamed_matches_in_memory(synthetic_fp32, tmp_path):
    recipe = _small(RECIPES["w8a8"])
    memory = quantize_model(synthetic_fp32, tmp_path / "m" / "model.onnx", recipe, progress=False, streamed=False)
    streamed = quantize_model(synthetic_fp32, tmp_path / "s" / "model.onnx", recipe, progress=False, streamed=True)
    _assert_same_model(memory.model_path, streamed.model_path)
    assert streamed.smoothing == memory.smoothing
    # 3 layers x (packed q/k/v, o, packed gate/up, down), head float; one per-token quantizer per input
    assert streamed.integer_kernels == {"MatMulIntegerToFloat": 3 * 4, "QuantizeLinear": 3 * 4}


def test_w8a8_streamed_float16_runs(synthetic_fp16, tmp_path):
    """Float16 graphs keep float16 through SmoothQuant folds and the per-token quantizer."""
    result = quantize_model(synthetic_fp16, tmp_path / "s" / "model.onnx", _small(RECIPES["w8a8"]), progress=False,
                            streamed=True)
    assert verify_streamed(result.model_path).output_names == ("logits",)


def _track_maps(monkeypatch) -> dict:
    """Peak bytes of external tensors memory-mapped at once (a map closes on release or collection)."""
    mapped: dict[int, int] = {}
    peak = {"bytes": 0}
    load, release = ir.ExternalTensor._load, ir.ExternalTensor.release

    def tracked_load(self):
        load(self)
        mapped[id(self)] = self.nbytes
        weakref.finalize(self, mapped.pop, id(self), None)  # a collected tensor's map is closed too
        peak["bytes"] = max(peak["bytes"], sum(mapped.values()))

    def tracked_release(self):
        mapped.pop(id(self), None)
        release(self)

    monkeypatch.setattr(ir.ExternalTensor, "_load", tracked_load)
    monkeypatch.setattr(ir.ExternalTensor, "release", tracked_release)
    return peak


def _block_bytes(path: Path) -> tuple[int, int]:
    """Bytes of block 0's initializers and of the largest initializer."""
    model = load_model(path)
    block = sum(v.const_value.nbytes for v in model.graph.initializers.values() if v.name.startswith("model.layers.0."))
    return block, max(v.const_value.nbytes for v in model.graph.initializers.values())


def test_streamed_holds_one_block(synthetic_fp16, tmp_path, monkeypatch):
    """At most one block's float weights are memory-mapped at a time, and each block's quantized
    weights are emitted (and written out) before the next block is calibrated."""
    peak = _track_maps(monkeypatch)
    from graphq.passes import weight_only_emit

    batches = []
    emit_call = weight_only_emit.WeightOnlyEmissionPass.call
    monkeypatch.setattr(weight_only_emit.WeightOnlyEmissionPass, "call",
                        lambda self, model: (batches.append(sorted(self.quantized)), emit_call(self, model))[1])
    quantize_weights(synthetic_fp16, tmp_path / "s" / "model.onnx", _small(RECIPES["w4-gptq"]), progress=False, streamed=True)
    block, largest = _block_bytes(synthetic_fp16)
    assert 0 < peak["bytes"] <= max(block, largest)
    assert len(batches) == TINY["layers"] + 1  # one emission per block, then the LM head
    assert all(len({name.split("/")[2] for name in batch}) == 1 for batch in batches[:-1])  # one block each


def test_w8a8_streamed_holds_one_block(synthetic_fp16, tmp_path, monkeypatch):
    """W8A8 replaces the float MatMuls it quantizes: neither their memory maps nor the float weights
    SmoothQuant rescaled in memory may outlive their block (a 7B run grew ~0.4 GB per layer)."""
    import gc

    from graphq import modelio

    peak = _track_maps(monkeypatch)
    save = modelio.save_streamed
    live = {}
    gc.collect()
    # tensors that other tests (session fixtures, caches) keep alive are not this run's
    before = {id(o) for o in gc.get_objects() if type(o) is ir.Tensor}

    def counting_save(model, path, sink):  # after the last block, before the graph is written
        gc.collect()
        live["bytes"] = sum(o.nbytes for o in gc.get_objects()
                            if type(o) is ir.Tensor and o.nbytes >= 1024 and id(o) not in before)
        return save(model, path, sink)

    monkeypatch.setattr(modelio, "save_streamed", counting_save)
    quantize_model(synthetic_fp16, tmp_path / "s" / "model.onnx", _small(RECIPES["w8a8"]), progress=False, streamed=True)
    block, largest = _block_bytes(synthetic_fp16)
    assert 0 < peak["bytes"] <= max(block, largest)
    assert live["bytes"] <= max(block, largest)  # in-memory tensors left: at most the last stage's


def test_sink_embeds_small_external_tensors(synthetic_fp16, tmp_path):
    """Small tensors read from the input's external data are embedded, never left pointing beside the input."""
    model = load_model(synthetic_fp16)
    folder = tmp_path / "out"
    folder.mkdir()
    save_streamed(model, folder / "model.onnx", ExternalDataSink(folder, "model.onnx.data"))
    for tensor in onnx.load(str(folder / "model.onnx"), load_external_data=False).graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            assert {e.key: e.value for e in tensor.external_data}["location"] == "model.onnx.data"
            assert tensor.name.endswith("weight") and len(tensor.dims) in (1, 2)
    assert verify_streamed(folder / "model.onnx").output_names == ("logits",)
    original = onnx.load(str(synthetic_fp16))
    copied = onnx.load(str(folder / "model.onnx"))
    for a, b in zip(original.graph.initializer, copied.graph.initializer):
        assert np.array_equal(numpy_helper.to_array(a), numpy_helper.to_array(b))


def test_small_models_are_not_streamed(synthetic_fp16):
    assert not should_stream(load_model(synthetic_fp16))


def test_streamed_static_after_smoothquant_is_refused(synthetic_fp32, tmp_path):
    with pytest.raises(GraphqError, match="static activations after SmoothQuant"):
        quantize_model(synthetic_fp32, tmp_path / "s" / "model.onnx", _small(RECIPES["w8a8-static"]), progress=False,
                       streamed=True)
    assert not (tmp_path / "s").exists()


def test_release_keeps_a_viewed_map_open(synthetic_fp16):
    """A weight whose array a caller still holds (SmoothQuant reads gamma, then replaces it) releases
    without error; the view stays valid."""
    from graphq.modelio import release

    value = load_model(synthetic_fp16).graph.initializers["model.layers.0.input_layernorm.weight"]
    view = value.const_value.numpy()
    expected = view.copy()
    release(value)
    np.testing.assert_array_equal(view, expected)


def test_verify_by_stage(synthetic_fp16, tmp_path, monkeypatch, caplog):
    """Outputs above WHOLE_SESSION_MAX_BYTES run one stage (block) per ONNX Runtime session: a good W8A8
    output passes with the same report as one session; a non-finite block fails either way."""
    import logging

    from graphq import streaming
    from graphq.errors import VerificationError

    result = quantize_model(synthetic_fp16, tmp_path / "s" / "model.onnx", _small(RECIPES["w8a8"]), progress=False,
                            streamed=True)
    whole = verify_streamed(result.model_path, by_stage=False)
    monkeypatch.setattr(streaming, "WHOLE_SESSION_MAX_BYTES", 0)  # default dispatch: by stage
    with caplog.at_level(logging.INFO, logger="graphq.streaming"):
        staged = verify_streamed(result.model_path)
    assert any("stages ran" in record.message for record in caplog.records)
    assert (staged.input_names, staged.output_names) == (whole.input_names, whole.output_names)

    model = load_model(synthetic_fp16)  # a float model whose last block gives NaN
    down = model.graph.initializers["model.layers.2.mlp.down_proj.weight"]
    down.const_value = ir.tensor(np.full(down.const_value.shape, np.nan, dtype=np.float16), name=down.name)
    folder = tmp_path / "broken"
    folder.mkdir()
    save_streamed(model, folder / "model.onnx", ExternalDataSink(folder, "model.onnx.data"))
    for by_stage in (True, False):
        with pytest.raises(VerificationError, match="not finite"):
            verify_streamed(folder / "model.onnx", by_stage=by_stage)
