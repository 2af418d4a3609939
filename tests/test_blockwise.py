"""Block-by-block calibration: the stages of an exported decoder, staged execution equal to the whole
graph, statistics that see the already-quantized blocks, and graphs that cannot be cut."""

import dataclasses

import numpy as np
import onnx_ir as ir
import pytest

from graphq.blockwise import StagedCalibration, block_of, partition
from graphq.calibrate import CalibrationConfig
from graphq.config import RECIPES
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import cpu_session
from graphq.weight_only import HessianAccumulator, quantize_weights

WINDOWS = np.random.default_rng(0).integers(0, 250, size=(3, 24))


@pytest.mark.parametrize("fixture", ["tiny_llama_onnx", "tiny_llama_past_onnx"])
def test_stages_follow_the_decoder_blocks(fixture, request):
    model = ir.load(request.getfixturevalue(fixture))
    stages = partition(model)

    assert [s.label for s in stages] == ["prelude", "block 0", "block 1", "after block 1"]
    assert sum(len(s.nodes) for s in stages) == len(list(model.graph))
    assert all(block_of(n.name) == 1 for n in stages[2].nodes)
    assert {n.name for n in stages[-1].nodes} >= {"/lm_head/MatMul"}
    # Each block reads the residual stream from the stage before it, and nothing from a later one.
    produced_before = {i.name for i in model.graph.inputs}
    for stage in stages:
        assert set(stage.inputs) <= produced_before
        produced_before |= set(stage.outputs)
    assert not stages[-1].outputs


@pytest.mark.parametrize("fixture", ["tiny_llama_onnx", "tiny_llama_past_onnx"])
def test_staged_execution_equals_the_whole_graph(fixture, request):
    path = request.getfixturevalue(fixture)
    model = ir.load(path)
    stages = partition(model)
    runner = StagedCalibration(model, stages, WINDOWS, threads=1, progress=False)
    logits = []
    for stage in runner.stages():
        if stage is stages[-1]:
            logits = [arrays[0] for _, arrays in runner._run(stage, ["logits"])]
        runner.advance(stage)
        assert all(set(cached) <= {n for s in stages if s.key > stage.key for n in s.inputs} for cached in runner.cache)
        for name in stage.window_independent:  # e.g. the transposed tied embedding: one copy for all windows
            assert all(cached[name] is runner.cache[0][name] for cached in runner.cache)
    assert any(s.window_independent for s in stages)

    session = cpu_session(path, threads=1)
    signature = GraphSignature.of(session)
    for window, staged in zip(WINDOWS, logits):
        (reference,) = session.run(["logits"], build_feeds(signature, window[None, :]))
        np.testing.assert_allclose(staged, reference, rtol=0, atol=1e-4)


def test_statistics_see_the_quantized_blocks_before(tiny_llama_onnx):
    """Block 1's input Hessian changes when block 0's weights are replaced; block 0's does not."""
    model = ir.load(tiny_llama_onnx)
    stages = partition(model)
    q_input = {b: next(n for n in s.nodes if n.name.endswith("q_proj/MatMul")).inputs[0].name
               for b, s in ((0, stages[1]), (1, stages[2]))}

    def hessians(perturb: bool):
        model = ir.load(tiny_llama_onnx)
        stages = partition(model)
        runner = StagedCalibration(model, stages, WINDOWS, threads=1, progress=False)
        found = {}
        for stage in runner.stages():
            for block, name in q_input.items():
                if stage.key == (block, 0):
                    found[block] = runner.calibrate(stage, [name], HessianAccumulator)[name].hessian
                    if perturb and block == 0:
                        down = next(n for n in stage.nodes if n.name.endswith("down_proj/MatMul"))
                        down.inputs[1].const_value = ir.tensor(down.inputs[1].const_value.numpy() * 3.0)
            runner.advance(stage)
        return found

    plain, perturbed = hessians(False), hessians(True)
    np.testing.assert_array_equal(plain[0], perturbed[0])
    assert not np.allclose(plain[1], perturbed[1], rtol=1e-3)


def test_graph_without_blocks_is_not_cut(tiny_llama_onnx, caplog):
    model = ir.load(tiny_llama_onnx)
    for index, node in enumerate(model.graph):
        node.name = f"node_{index}"
    with caplog.at_level("INFO"):
        assert partition(model) is None
    assert "no node name matches a block pattern" in caplog.text


def test_sequential_gptq_differs_from_one_pass_and_both_verify(tiny_llama_onnx, tmp_path):
    calibration = CalibrationConfig(windows=2, window_tokens=64)
    recipe = dataclasses.replace(RECIPES["w4-gptq"], calibration=calibration,
                                 weights=dataclasses.replace(RECIPES["w4-gptq"].weights, group_size=32))
    sequential = quantize_weights(tiny_llama_onnx, tmp_path / "s" / "model.onnx", recipe, progress=False)
    one_pass = quantize_weights(tiny_llama_onnx, tmp_path / "o" / "model.onnx",
                                dataclasses.replace(recipe, sequential=False), progress=False)
    assert sequential.quantized_nodes == one_pass.quantized_nodes
    first = ir.load(sequential.model_path)
    second = ir.load(one_pass.model_path)

    def packed(model, name):
        node = next(n for n in model.graph if n.name.startswith(name) and n.op_type == "MatMulNBits")
        return node.inputs[1].const_value.numpy()

    # Block 0 sees the same (float) inputs either way; block 1 sees quantized block 0 only sequentially.
    np.testing.assert_array_equal(packed(first, "/model/layers.0/self_attn/q_proj"), packed(second, "/model/layers.0/self_attn/q_proj"))
    assert not np.array_equal(packed(first, "/model/layers.1/self_attn/q_proj"), packed(second, "/model/layers.1/self_attn/q_proj"))
