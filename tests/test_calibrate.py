import dataclasses
import logging
import tempfile

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from transformers import AutoTokenizer

from conftest import sha256_tree
from graphq.calibrate import CalibrationConfig, calibration_windows, collect_statistics
from graphq.data import WIKITEXT_VALID
from graphq.errors import GraphqError
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import cpu_session

WINDOWS = 3
WINDOW_TOKENS = 64


@pytest.fixture(scope="module")
def tokenizer(tiny_llama_dir):
    return AutoTokenizer.from_pretrained(str(tiny_llama_dir))


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    """The first ~8 KB of the calibration text: enough for a few windows of the byte tokenizer."""
    path = tmp_path_factory.mktemp("text") / "calib.txt"
    path.write_text(WIKITEXT_VALID.read_text(encoding="utf-8")[:8000], encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def windows(tokenizer, text_file):
    config = CalibrationConfig(windows=WINDOWS, window_tokens=WINDOW_TOKENS, text_path=text_file)
    return calibration_windows(tokenizer, config)


@pytest.fixture(autouse=True)
def private_tempdir(tmp_path, monkeypatch):
    """Every temporary folder lands here, so tests can check none is left behind."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def _matmul_activations(model_path, limit: int = 4) -> list[str]:
    """The non-constant first input of the linear-layer MatMuls (weights are initializers)."""
    graph = ir.load(str(model_path)).graph
    names = []
    for node in graph:
        if node.op_type == "MatMul" and node.inputs[1].name in graph.initializers:
            name = node.inputs[0].name
            if name not in names:
                names.append(name)
    assert len(names) >= limit
    return names[: limit - 1] + names[-1:]


def _reference_outputs(model_path, names, windows, tmp_path) -> dict[str, list[np.ndarray]]:
    """Independent path: the onnx protobuf API adds the outputs, every window's arrays are kept."""
    proto = onnx.load(str(model_path))
    for name in names:
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    path = tmp_path / "reference.onnx"
    onnx.save(proto, str(path))
    session = cpu_session(path, threads=2)
    signature = GraphSignature.of(session)
    kept = {name: [] for name in names}
    for window in windows:
        for name, output in zip(names, session.run(names, build_feeds(signature, window[None, :]))):
            kept[name].append(output)
    return kept


def test_windows_are_the_tokenised_text_in_order(tokenizer, text_file, windows):
    ids = tokenizer(text_file.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
    assert windows.shape == (WINDOWS, WINDOW_TOKENS) and windows.dtype == np.int64
    np.testing.assert_array_equal(windows.ravel(), ids[: WINDOWS * WINDOW_TOKENS])


def test_default_text_is_the_validation_split():
    config = CalibrationConfig()
    assert config.text == WIKITEXT_VALID and config.text_path is None
    assert (config.windows, config.window_tokens, config.threads, config.histogram_bins) == (32, 512, 2, 2048)


@pytest.mark.parametrize("graph", ["tiny_llama_onnx", "tiny_llama_past_onnx"])
def test_statistics_match_an_independent_run(graph, request, windows, tmp_path):
    model_path = request.getfixturevalue(graph)
    names = _matmul_activations(model_path)
    before = sha256_tree(model_path.parent)

    stats = collect_statistics(model_path, names, windows, histogram_bins=256, progress=False)

    assert list(stats) == names
    reference = _reference_outputs(model_path, names, windows, tmp_path)
    for name in names:
        data = np.concatenate([a.reshape(-1, a.shape[-1]) for a in reference[name]]).astype(np.float64)
        got = stats[name]
        assert got.count == data.size and got.channels == data.shape[1]
        np.testing.assert_allclose([got.min, got.max], [data.min(), data.max()], rtol=1e-6)
        np.testing.assert_allclose(got.channel_abs_max, np.abs(data).max(axis=0), rtol=1e-6)
        assert got.mean == pytest.approx(data.mean(), rel=1e-5, abs=1e-6)
        assert got.std == pytest.approx(data.std(), rel=1e-5)
        assert got.histogram.sum() == data.size
    assert sha256_tree(model_path.parent) == before


def test_memory_does_not_grow_with_windows(tiny_llama_past_onnx, tokenizer, text_file):
    names = _matmul_activations(tiny_llama_past_onnx)
    config = CalibrationConfig(windows=6, window_tokens=32, text_path=text_file)
    many = calibration_windows(tokenizer, config)
    few_stats = collect_statistics(tiny_llama_past_onnx, names, many[:2], progress=False)
    many_stats = collect_statistics(tiny_llama_past_onnx, names, many, progress=False)
    assert sum(s.nbytes for s in few_stats.values()) == sum(s.nbytes for s in many_stats.values())
    assert all(many_stats[n].count == 3 * few_stats[n].count for n in names)


def test_temporary_model_is_removed(tiny_llama_onnx, windows, private_tempdir):
    collect_statistics(tiny_llama_onnx, _matmul_activations(tiny_llama_onnx), windows[:1], progress=False)
    assert list(private_tempdir.iterdir()) == []
    # A failure while running (a token id outside the vocabulary) also leaves nothing behind.
    bad = np.full((1, 8), 10_000, dtype=np.int64)
    with pytest.raises(GraphqError, match="ONNX Runtime failed on calibration window 0"):
        collect_statistics(tiny_llama_onnx, _matmul_activations(tiny_llama_onnx), bad, progress=False)
    assert list(private_tempdir.iterdir()) == []


def test_unknown_tensor_names_are_listed(tiny_llama_onnx, windows):
    names = [f"/no/such/tensor_{i}" for i in range(7)]
    with pytest.raises(GraphqError, match=r"no tensor named '/no/such/tensor_0'.* and 2 more .*7 of 8") as error:
        collect_statistics(tiny_llama_onnx, names + ["logits"], windows, progress=False)
    assert "\n" not in str(error.value)


def test_constants_and_integer_tensors_are_refused(tiny_llama_onnx, windows):
    graph = ir.load(str(tiny_llama_onnx)).graph
    weight = next(name for name in graph.initializers)
    with pytest.raises(GraphqError, match="is an initializer"):
        collect_statistics(tiny_llama_onnx, [weight], windows, progress=False)
    with pytest.raises(GraphqError, match="'input_ids' is INT64, not a floating-point activation"):
        collect_statistics(tiny_llama_onnx, ["input_ids"], windows, progress=False)
    with pytest.raises(GraphqError, match="no tensors to calibrate"):
        collect_statistics(tiny_llama_onnx, [], windows, progress=False)


def test_short_text_uses_what_there_is(tokenizer, text_file, caplog):
    config = CalibrationConfig(windows=1000, window_tokens=WINDOW_TOKENS, text_path=text_file)
    with caplog.at_level(logging.WARNING, logger="graphq.calibrate"):
        windows = calibration_windows(tokenizer, config)
    assert 1 <= windows.shape[0] < 1000 and windows.shape[1] == WINDOW_TOKENS
    assert f"only {windows.shape[0]} windows" in caplog.text


def test_text_shorter_than_one_window(tokenizer, tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("too short", encoding="utf-8")
    with pytest.raises(GraphqError, match=r"calibration text gives only 0 windows of 64 tokens \(9 tokens"):
        calibration_windows(tokenizer, CalibrationConfig(window_tokens=64, text_path=path))


@pytest.mark.parametrize(
    "content, message",
    [(None, "no such text file"), ("  \n", "the text file is empty"), (b"\xff\xfe\x00bad", "not UTF-8 text")],
)
def test_bad_text_files(tokenizer, tmp_path, content, message):
    path = tmp_path / "calib.txt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(GraphqError, match=message):
        calibration_windows(tokenizer, CalibrationConfig(text_path=path))


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("windows", 0, "windows must be at least 1, got 0"),
        ("window_tokens", -5, "window-tokens must be at least 1, got -5"),
        ("threads", 0, "threads must be at least 1"),
        ("histogram_bins", 0, "histogram-bins must be at least 1"),
        ("histogram_bins", 7, "histogram-bins must be an even number"),
    ],
)
def test_config_validation(field, value, message):
    with pytest.raises(GraphqError, match=message):
        CalibrationConfig(**{field: value})
    config = CalibrationConfig(text_path="some/where.txt")
    assert dataclasses.is_dataclass(config) and config.text_path.name == "where.txt"


def test_bad_arguments_to_collect_statistics(tiny_llama_onnx, windows, tmp_path):
    names = _matmul_activations(tiny_llama_onnx)
    with pytest.raises(GraphqError, match="threads must be at least 1"):
        collect_statistics(tiny_llama_onnx, names, windows, threads=0, progress=False)
    with pytest.raises(GraphqError, match="histogram-bins must be an even number"):
        collect_statistics(tiny_llama_onnx, names, windows, histogram_bins=3, progress=False)
    with pytest.raises(GraphqError, match=r"\[windows, tokens\]"):
        collect_statistics(tiny_llama_onnx, names, windows[0], progress=False)
    with pytest.raises(GraphqError, match="no such file"):
        collect_statistics(tmp_path / "missing.onnx", names, windows, progress=False)
