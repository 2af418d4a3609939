"""Stage replays: the float replay reproduces the reference exactly, a perturbed replay measures the same
KL as the whole perturbed model (a tied head changes the embedding lookup too), KV-cache graphs work."""

import numpy as np
import onnx_ir as ir
import pytest

from graphq.errors import GraphqError
from graphq.replay import StageReplay
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import cpu_session

WINDOWS = np.random.default_rng(0).integers(0, 250, size=(3, 24))


def _log_softmax(x):
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _whole_model_kl(reference_path, model: ir.Model, tmp_path) -> float:
    path = tmp_path / "perturbed.onnx"
    ir.save(model, path)
    perturbed, reference = cpu_session(path, threads=1), cpu_session(reference_path, threads=1)
    signature = GraphSignature.of(reference)
    kls = []
    for row in WINDOWS:
        feeds = build_feeds(signature, row[None])
        lp = _log_softmax(reference.run(["logits"], feeds)[0][0])
        lq = _log_softmax(perturbed.run(["logits"], feeds)[0][0])
        kls.append((np.exp(lp) * (lp - lq)).sum(-1)[:-1])
    return float(np.mean(kls))


@pytest.fixture(scope="module")
def replay(tiny_llama_onnx):
    runner = StageReplay(ir.load(tiny_llama_onnx), WINDOWS, batch=2, threads=1)
    runner.float_pass()
    return runner


def test_quantizable_nodes_and_where_replays_start(replay):
    names = [n.name for n in replay.nodes]
    assert len(names) == 15 and names[-1] == "/lm_head/MatMul"
    head = replay.nodes[-1]
    assert head.transposed and head.first_stage == 0 and head.stage == len(replay.stages) - 1
    assert (head.k, head.n) == (64, 260)
    down = next(n for n in replay.nodes if n.name == "/model/layers.1/mlp/down_proj/MatMul")
    assert down.first_stage == down.stage == 2 and down.block == 1 and (down.k, down.n) == (128, 64)


def test_float_replay_reproduces_the_reference_exactly(replay):
    for start in range(len(replay.stages)):
        result = replay.replay({}, start=start)
        assert result.kl.shape == (3, 23)
        assert np.all(result.kl == 0)
        np.testing.assert_array_equal(result.nll, replay.float_nll)


@pytest.mark.parametrize("index", [0, 13, 14])  # block 0 q_proj, block 1 down_proj, the tied head
def test_perturbed_replay_equals_the_whole_perturbed_model(replay, index, tiny_llama_onnx, tmp_path):
    node = replay.nodes[index]
    weight = replay.weights[node.weight]
    perturbed = weight + 0.05 * np.random.default_rng(index).standard_normal(weight.shape).astype(np.float32)
    result = replay.replay({node.weight: perturbed})
    model = ir.load(tiny_llama_onnx)
    model.graph.initializers[node.weight].const_value = ir.tensor(perturbed, name=node.weight)
    assert result.kl.mean() > 0
    assert result.kl.mean() == pytest.approx(_whole_model_kl(tiny_llama_onnx, model, tmp_path), rel=1e-3, abs=1e-7)


def test_kv_cache_graph_replays(tiny_llama_past_onnx):
    runner = StageReplay(ir.load(tiny_llama_past_onnx), WINDOWS[:2], batch=2, threads=1)
    runner.float_pass()
    assert np.all(runner.replay({}).kl == 0)
    node = runner.nodes[3]
    assert runner.replay({node.weight: runner.weights[node.weight] * 1.1}).kl.mean() > 0


def test_bad_replays_are_refused(replay):
    with pytest.raises(GraphqError, match="not an analysed weight"):
        replay.replay({"nope": np.zeros(3)})
    node = replay.nodes[0]
    with pytest.raises(GraphqError, match="not an analysed weight"):
        replay.replay({node.weight: np.zeros((2, 2), dtype=np.float32)})
