"""Bad input through the real command line: one clear error line, non-zero exit, no traceback,
nothing written, the input untouched."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from onnx import TensorProto, helper

from conftest import sha256_tree


def graphq(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    env.pop("GRAPHQ_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "graphq", *args], capture_output=True, text=True,
                          cwd=cwd, env=env, timeout=300, check=False)


def assert_clean_failure(result: subprocess.CompletedProcess, expected: str) -> None:
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("graphq: error: ")
    assert expected in lines[0]


def _external_data_model(folder: Path, location: str) -> Path:
    """A valid graph whose one initializer claims to live in external file ``location``."""
    weight = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4])
    weight.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), ("offset", "0"), ("length", "16")):
        weight.external_data.add(key=key, value=value)
    graph = helper.make_graph(
        [helper.make_node("Add", ["x", "w"], ["y"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])], [weight])
    path = folder / "model.onnx"
    path.write_bytes(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]).SerializeToString())
    return path


def _gguf(path: Path, architecture: str) -> Path:
    import gguf

    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _case(name, tmp_path, tiny_llama_onnx, tiny_llama_dir):
    """Build case ``name``: returns (args, the inputs that must stay untouched, expected text)."""
    if name == "missing file":
        return ["eval", str(tmp_path / "nope.onnx")], [], "no such file"
    if name == "empty file":
        (tmp_path / "empty.onnx").write_bytes(b"")
        return ["eval", str(tmp_path / "empty.onnx")], [tmp_path / "empty.onnx"], "empty"
    if name == "non-ONNX file":
        (tmp_path / "notes.onnx").write_text("this is not a model\n" * 50)
        return ["eval", str(tmp_path / "notes.onnx")], [tmp_path / "notes.onnx"], "not a valid ONNX model"
    if name == "truncated ONNX":
        data = tiny_llama_onnx.read_bytes()
        (tmp_path / "cut.onnx").write_bytes(data[: len(data) // 2])
        return ["optimize", str(tmp_path / "cut.onnx"), "-o", str(tmp_path / "out.onnx")], [tmp_path / "cut.onnx"], "truncated"
    if name == "external data outside the folder":
        (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
        (tmp_path / "m").mkdir()
        model = _external_data_model(tmp_path / "m", "../secret.bin")
        return ["optimize", str(model), "-o", str(tmp_path / "out.onnx")], [tmp_path / "m"], "outside the model folder"
    if name == "absolute external data path":
        (tmp_path / "m").mkdir()
        model = _external_data_model(tmp_path / "m", "/etc/passwd")
        return ["optimize", str(model), "-o", str(tmp_path / "out.onnx")], [tmp_path / "m"], "absolute"
    if name == "external data through a symlink":
        (tmp_path / "secret.bin").write_bytes(b"\0" * 16)
        (tmp_path / "m").mkdir()
        (tmp_path / "m" / "w.bin").symlink_to(tmp_path / "secret.bin")
        model = _external_data_model(tmp_path / "m", "w.bin")
        return ["optimize", str(model), "-o", str(tmp_path / "out.onnx")], [tmp_path / "m"], "outside the model folder"
    if name == "missing external data":
        (tmp_path / "m").mkdir()
        model = _external_data_model(tmp_path / "m", "weights.bin")
        return ["eval", str(model)], [tmp_path / "m"], "is missing"
    if name == "GGUF of an unsupported architecture":
        gguf_path = _gguf(tmp_path / "odd.gguf", "graphq-unknown-arch")
        return ["export", str(gguf_path), "-o", str(tmp_path / "out")], [gguf_path], "cannot be loaded by transformers"
    if name == "corrupt GGUF":
        (tmp_path / "bad.gguf").write_bytes(b"GGUF" + b"\xff" * 64)
        return ["export", str(tmp_path / "bad.gguf"), "-o", str(tmp_path / "out")], [tmp_path / "bad.gguf"], "not a readable GGUF"
    if name == "export output equal to input":
        return ["export", str(tiny_llama_dir), "-o", str(tiny_llama_dir)], [tiny_llama_dir], "is the input"
    if name == "optimize output equal to input":
        return ["optimize", str(tiny_llama_onnx), "-o", str(tiny_llama_onnx)], [tiny_llama_onnx.parent], "is the input"
    if name == "eval json onto the model":
        return ["eval", str(tiny_llama_onnx), "--json", str(tiny_llama_onnx)], [tiny_llama_onnx.parent], "is the input"
    if name == "pickled weights only":
        (tmp_path / "pickled").mkdir()
        (tmp_path / "pickled" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
        (tmp_path / "pickled" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
        return ["export", str(tmp_path / "pickled"), "-o", str(tmp_path / "out")], [tmp_path / "pickled"], "safetensors only"
    if name == "folder without config":
        (tmp_path / "bare").mkdir()
        return ["export", str(tmp_path / "bare"), "-o", str(tmp_path / "out")], [tmp_path / "bare"], "config.json"
    if name == "unknown model name":
        return ["export", "no-such-model", "-o", str(tmp_path / "out")], [], "not a bundled model"
    if name == "non-UTF-8 evaluation text":
        (tmp_path / "latin1.txt").write_bytes("caf\xe9 ".encode("latin-1") * 100)
        return ["eval", str(tiny_llama_onnx), "--text", str(tmp_path / "latin1.txt")], [tmp_path / "latin1.txt"], "not UTF-8"
    raise AssertionError(name)


CASES = [
    "missing file", "empty file", "non-ONNX file", "truncated ONNX", "external data outside the folder",
    "absolute external data path", "external data through a symlink", "missing external data",
    "GGUF of an unsupported architecture", "corrupt GGUF", "export output equal to input",
    "optimize output equal to input", "eval json onto the model", "pickled weights only",
    "folder without config", "unknown model name", "non-UTF-8 evaluation text",
]


@pytest.mark.parametrize("name", CASES)
def test_bad_input_fails_cleanly(name, tmp_path, tiny_llama_onnx, tiny_llama_dir):
    args, inputs, expected = _case(name, tmp_path, tiny_llama_onnx, tiny_llama_dir)
    before = {path: sha256_tree(path) for path in inputs}
    listing = sorted(p.name for p in tmp_path.iterdir())

    result = graphq(*args, cwd=tmp_path)

    assert_clean_failure(result, expected)
    assert {path: sha256_tree(path) for path in inputs} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == listing, "partial output left behind"
