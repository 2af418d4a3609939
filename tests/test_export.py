import json

import numpy as np
import onnx
import pytest

from conftest import sha256_tree
from graphq.errors import OutputPathError, UnsupportedModelError
from graphq.export import ExportConfig, export_model
from graphq.runtime import GraphSignature
from graphq.verify import cpu_session


def test_tiny_llama_export_without_cache(tiny_llama_onnx):
    folder = tiny_llama_onnx.parent
    onnx.checker.check_model(str(tiny_llama_onnx), full_check=True)
    signature = GraphSignature.of(cpu_session(tiny_llama_onnx))
    assert not signature.has_kv_cache
    assert signature.output_names == ("logits",)
    assert (folder / "tokenizer.json").is_file() and (folder / "config.json").is_file()
    report = json.loads((folder / "graphq_export.json").read_text())
    assert report["task"] == "text-generation"
    assert report["parity_max_abs_diff"] < 1e-4
    assert [p["name"] for p in report["passes"]] == ["CleanupPass", "DeduplicateInitializersPass", "ShapeInferencePass"]
    # No staging folders are left next to the output.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_tiny_llama_export_with_cache(tiny_llama_past_onnx):
    signature = GraphSignature.of(cpu_session(tiny_llama_past_onnx))
    assert len(signature.past_inputs) == 2 * 2  # layers x (key, value)
    assert {"present.0.key", "present.1.value"} <= set(signature.output_names)
    metadata = {p.key: p.value for p in onnx.load(str(tiny_llama_past_onnx), load_external_data=False).metadata_props}
    assert metadata["graphq.task"] == "text-generation-with-past"


def test_tied_embedding_is_stored_once(tiny_llama_onnx, tiny_llama_dir):
    model = onnx.load(str(tiny_llama_onnx))
    vocab_by_hidden = [t for t in model.graph.initializer if sorted(t.dims) == [64, 260]]
    assert len(vocab_by_hidden) == 1


def test_tiny_bert_exports_as_encoder(tiny_bert_dir, tmp_path):
    result = export_model(str(tiny_bert_dir), tmp_path / "bert")
    assert result.task == "feature-extraction"
    assert result.parity_max_abs_diff < 1e-4
    signature = GraphSignature.of(cpu_session(result.model_path))
    assert "last_hidden_state" in signature.output_names
    assert "token_type_ids" in signature.input_names


def test_encoder_has_no_cache_export(tiny_bert_dir, tmp_path):
    with pytest.raises(UnsupportedModelError, match="--with-past needs a decoder"):
        export_model(str(tiny_bert_dir), tmp_path / "bert", ExportConfig(with_past=True))
    assert not (tmp_path / "bert").exists()


def test_existing_output_needs_overwrite(tiny_llama_dir, tiny_llama_onnx, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(OutputPathError, match="--overwrite"):
        export_model(str(tiny_llama_dir), out)
    assert (out / "keep.txt").read_text() == "user data"


def test_overwrite_replaces_output_and_leaves_input(tiny_llama_dir, tmp_path):
    before = sha256_tree(tiny_llama_dir)
    out = tmp_path / "out"
    out.mkdir()
    (out / "stale.onnx").write_bytes(b"old")
    export_model(str(tiny_llama_dir), out, ExportConfig(overwrite=True))
    assert not (out / "stale.onnx").exists() and (out / "model.onnx").is_file()
    assert sha256_tree(tiny_llama_dir) == before


def test_output_inside_the_model_folder_is_refused(tiny_llama_dir):
    before = sha256_tree(tiny_llama_dir)
    with pytest.raises(OutputPathError):
        export_model(str(tiny_llama_dir), tiny_llama_dir)
    with pytest.raises(OutputPathError):
        export_model(str(tiny_llama_dir), tiny_llama_dir / "onnx")
    assert sha256_tree(tiny_llama_dir) == before


def test_export_is_deterministic(tiny_llama_dir, tiny_llama_onnx, tmp_path):
    again = export_model(str(tiny_llama_dir), tmp_path / "again").model_path
    first = onnx.load(str(tiny_llama_onnx))
    second = onnx.load(str(again))
    for a, b in zip(first.graph.initializer, second.graph.initializer):
        np.testing.assert_array_equal(onnx.numpy_helper.to_array(a), onnx.numpy_helper.to_array(b))
