"""Hostile and broken input through the command line (``graphq.cli.main``, in process).

Every case must end with exit status 1 and exactly one line on stderr, ``graphq: error: ...`` naming
the problem (no traceback, no library log lines: ONNX Runtime's C++ log goes to the captured file
descriptor too), leave its inputs byte-identical, and leave nothing behind: no output, no staging
folder, no temporary file (the temporary folder is redirected into the test's own folder and must be
empty again). test_bad_input.py holds the first 17 cases (through a subprocess); these extend them.
Cases marked "regression" crashed or misbehaved before the fix that came with them.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import pickle
import shutil
import struct
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import sha256_tree
from graphq.cli import main

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json")


@dataclasses.dataclass(frozen=True)
class Env:
    """What a case may build on: the exported tiny Llama (read-only!), its HF folder, monkeypatch."""

    tiny: Path
    hf: Path
    monkeypatch: pytest.MonkeyPatch


@dataclasses.dataclass(frozen=True)
class Case:
    args: tuple[str, ...]
    expected: str  # text the error line must contain
    inputs: tuple[Path, ...] = ()  # files or folders that must stay byte-identical
    absent: tuple[Path, ...] = ()  # paths that must not exist afterwards (markers of code that ran)


CASES: dict[str, Callable[[Path, Env], Case]] = {}


def case(name: str):
    def register(build: Callable[[Path, Env], Case]) -> Callable[[Path, Env], Case]:
        assert name not in CASES, name
        CASES[name] = build
        return build
    return register


# ---------------------------------------------------------------------------------------------
# Builders


def _copy_model(env: Env, folder: Path, *, external: bool = False, data_name: str = "model.onnx.data") -> Path:
    """A private copy of the tiny model (and its tokenizer files) in ``folder``, optionally with its
    weights in external data."""
    folder.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        shutil.copy(env.tiny.parent / name, folder / name)
    proto = onnx.load(str(env.tiny))
    path = folder / "model.onnx"
    if external:
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data_name, size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))
    return path


def _edit(path: Path, change: Callable[[onnx.ModelProto], None]) -> Path:
    proto = onnx.load(str(path), load_external_data=False)
    change(proto)
    path.write_bytes(proto.SerializeToString())
    return path


def _external_tensor(proto: onnx.ModelProto) -> onnx.TensorProto:
    return next(t for t in proto.graph.initializer if t.data_location == TensorProto.EXTERNAL)


def _set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
    for entry in tensor.external_data:
        if entry.key == key:
            entry.value = value
            return
    tensor.external_data.add(key=key, value=value)


def _external_edit(key: str, value: str) -> Callable[[Path, Env], Case]:
    def build(tmp: Path, env: Env) -> Case:
        model = _copy_model(env, tmp / "m", external=True)
        _edit(model, lambda p: _set_entry(_external_tensor(p), key, value))
        return Case(("optimize", str(model), "-o", str(tmp / "out.onnx")), "", (model.parent,))
    return build


def _set_weight(proto: onnx.ModelProto, name_part: str, change: Callable[[np.ndarray], None]) -> None:
    """Apply ``change`` to the first initializer whose name contains ``name_part`` (embedded data)."""
    tensor = next(t for t in proto.graph.initializer if name_part in t.name)
    array = numpy_helper.to_array(tensor).copy()
    change(array)
    tensor.CopyFrom(numpy_helper.from_array(array, tensor.name))


def _matmul_weight_name(proto: onnx.ModelProto) -> str:
    """The initializer a q_proj MatMul of the tiny model reads."""
    node = next(n for n in proto.graph.node if n.op_type == "MatMul" and "q_proj" in n.name)
    return node.input[1]


def _small_graph(folder: Path, nodes, initializers=(), *, opset: int = 18, ir_version: int = 9,
                 name: str = "model.onnx") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)
    path = folder / name
    path.write_bytes(model.SerializeToString())
    return path


def _weight(name: str = "w") -> onnx.TensorProto:
    return numpy_helper.from_array(np.eye(4, dtype=np.float32), name)


def _recipe(tmp: Path, env: Env, text: str | bytes, suffix: str = ".yaml") -> Case:
    path = tmp / f"recipe{suffix}"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    args = ("quantize", str(env.tiny), "-o", str(tmp / "q" / "model.onnx"), "--recipe", str(path))
    return Case(args, "", (path, env.tiny.parent))


def _quantize(env_model: Path, tmp: Path, *extra: str) -> tuple[str, ...]:
    return ("quantize", str(env_model), "-o", str(tmp / "q" / "model.onnx"), *extra)


# ---------------------------------------------------------------------------------------------
# Corrupt protobuf


@case("protobuf cut after 10 bytes")
def _(tmp, env):
    (tmp / "cut.onnx").write_bytes(env.tiny.read_bytes()[:10])
    return Case(("eval", str(tmp / "cut.onnx")), "not a valid ONNX model", (tmp / "cut.onnx",))


@case("protobuf with trailing garbage")
def _(tmp, env):
    (tmp / "tail.onnx").write_bytes(env.tiny.read_bytes() + bytes(range(64)))
    return Case(_quantize(tmp / "tail.onnx", tmp), "not a valid ONNX model", (tmp / "tail.onnx",))


@case("invalid UTF-8 in a node name (regression: fuzz finding, crashed on save)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_weight()])
    data = path.read_bytes().replace(b"mm", b"m\x80")
    path.write_bytes(data)
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "not valid UTF-8", (path,))


@case("raw_data shorter than the shape (regression: internal error)")
def _(tmp, env):
    short = TensorProto(name="w", data_type=TensorProto.FLOAT, dims=[4, 4], raw_data=b"\0" * 8)
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [short])
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "needs 64 bytes but holds 8", (path,))


@case("string tensor with raw_data (regression: fuzz finding, crashed when read)")
def _(tmp, env):
    odd = TensorProto(name="w", data_type=TensorProto.STRING, dims=[4, 4], raw_data=b"\0" * 64)
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [odd])
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "stores raw_data", (path,))


@case("tensor of a type graphq cannot read without raw_data (regression: quantized garbage)")
def _(tmp, env):
    odd = TensorProto(name="w", data_type=TensorProto.FLOAT8E8M0, dims=[4, 4])
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [odd])
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "outside raw_data", (path,))


@case("attribute of undefined type (regression: fuzz finding, crashed on save)")
def _(tmp, env):
    constant = helper.make_node("Constant", [], ["w"], value=numpy_helper.from_array(np.eye(4, dtype=np.float32)))
    constant.attribute[0].type = onnx.AttributeProto.UNDEFINED
    path = _small_graph(tmp / "m", [constant, helper.make_node("MatMul", ["x", "w"], ["y"])])
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "undefined or unknown type", (path,))


@case("unknown tensor data type (regression: unclear message)")
def _(tmp, env):
    odd = TensorProto(name="w", data_type=99, dims=[4, 4], raw_data=b"\0" * 64)
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [odd])
    return Case(_quantize(path, tmp, "--recipe", "w4-rtn"), "unknown or undefined data type", (path,))


@case("node reads an undefined tensor (regression: library warnings on stderr)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "nowhere"], ["y"])], [_weight()])
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "reads 'nowhere'", (path,))


@case("initializer defined twice (regression: silently took one)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight(), _weight()])
    return Case(_quantize(path, tmp, "--recipe", "w4-rtn"), "defined more than once", (path,))


@case("IR version from the future (regression: was quantized anyway)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight()], ir_version=99)
    return Case(("optimize", str(path), "-o", str(tmp / "out.onnx")), "IR version 99", (path,))


@case("default-domain opset 99 (regression: left an empty output folder)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"])], [_weight()], opset=99)
    return Case(_quantize(path, tmp, "--recipe", "w4-rtn"), "opset 99", (path,))


# ---------------------------------------------------------------------------------------------
# External data


def _expect(build: Callable[[Path, Env], Case], expected: str) -> Callable[[Path, Env], Case]:
    def with_expected(tmp: Path, env: Env) -> Case:
        return dataclasses.replace(build(tmp, env), expected=expected)
    return with_expected


case("external data offset past the end of the file (regression: crashed)")(
    _expect(_external_edit("offset", str(10**9)), "which has only"))
case("external data length does not match the shape (regression: loaded garbage)")(
    _expect(_external_edit("length", "8"), "external data length is 8"))
case("negative external data offset")(_expect(_external_edit("offset", "-64"), "non-negative integer"))
case("external data offset that is not a number")(_expect(_external_edit("offset", "abc"), "non-negative integer"))
case("external data naming the model file itself (regression: loaded garbage)")(
    _expect(_external_edit("location", "model.onnx"), "the model file itself"))
case("external data escaping through a nested ../")(
    _expect(_external_edit("location", "sub/../../secret.bin"), "outside the model folder"))
case("external data location with a NUL byte")(_expect(_external_edit("location", "model.onnx.data\0x"), "NUL byte"))
case("external data location that is a folder")(_expect(_external_edit("location", "."), "is missing"))


@case("absolute external data path inside the model folder")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True)
    _edit(model, lambda p: _set_entry(_external_tensor(p), "location", str((tmp / "m" / "model.onnx.data").resolve())))
    return Case(("eval", str(model)), "absolute", (model.parent,))


@case("external data file truncated (regression: crashed)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True)
    data = tmp / "m" / "model.onnx.data"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return Case(_quantize(model, tmp, "--recipe", "w4-rtn"), "which has only", (model.parent,))


# ---------------------------------------------------------------------------------------------
# Weights and graphs that cannot be quantized


def _broken_weight(value: float, where: str | None = None) -> Callable[[Path, Env], Case]:
    def build(tmp: Path, env: Env) -> Case:
        model = _copy_model(env, tmp / "m")

        def change(proto: onnx.ModelProto) -> None:
            def poison(array: np.ndarray) -> None:
                array.flat[7] = value
            _set_weight(proto, where or _matmul_weight_name(proto), poison)
        _edit(model, change)
        return Case((), "NaN or infinity", (model.parent,))
    return build


def _with_args(build: Callable[[Path, Env], Case], *args: str) -> Callable[[Path, Env], Case]:
    def built(tmp: Path, env: Env) -> Case:
        made = build(tmp, env)
        model = made.inputs[0] / "model.onnx"
        return dataclasses.replace(made, args=_quantize(model, tmp, *args))
    return built


case("NaN in a MatMul weight, w8a8 (regression: wrote a NaN model)")(
    _with_args(_broken_weight(np.nan), "--recipe", "w8a8", "--calib-windows", "1"))
case("infinity in a MatMul weight, w4-rtn (regression: internal error)")(
    _with_args(_broken_weight(np.inf), "--recipe", "w4-rtn"))
case("NaN in the embedding, w4-gptq (regression: internal error)")(
    _with_args(_broken_weight(np.nan, "embed_tokens"), "--recipe", "w4-gptq", "--calib-windows", "1"))


@case("unknown op domain")
def _(tmp, env):
    model = _copy_model(env, tmp / "m")

    def change(proto: onnx.ModelProto) -> None:
        index, node = next((i, n) for i, n in enumerate(proto.graph.node) if n.op_type == "Cast")
        produced = node.output[0]
        node.output[0] = produced + "_raw"
        proto.graph.node.insert(index + 1, helper.make_node("Frobnicate", [produced + "_raw"], [produced],
                                                            domain="com.example.evil", name="evil"))
        proto.opset_import.append(helper.make_opsetid("com.example.evil", 1))
    _edit(model, change)
    return Case(_quantize(model, tmp, "--calib-windows", "1"), "is not a registered function/op", (model.parent,))


@case("model without a MatMul, w4-rtn")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("Relu", ["x"], ["y"])])
    return Case(_quantize(path, tmp, "--recipe", "w4-rtn"), "no MatMul with a constant weight", (path,))


@case("model without a MatMul, w8a8")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("Add", ["x", "x"], ["y"])])
    return Case(_quantize(path, tmp), "no MatMul with a constant weight", (path,))


@case("MatMul graph that is no language model (regression: internal error)")
def _(tmp, env):
    path = _small_graph(tmp / "m", [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")], [_weight()])
    for name in TOKENIZER_FILES:
        shutil.copy(env.tiny.parent / name, tmp / "m" / name)
    return Case(_quantize(path, tmp, "--calib-windows", "1"), "not one graphq knows how to feed", (path.parent,))


# ---------------------------------------------------------------------------------------------
# Calibration text and tokenizers


def _calib_text(content: bytes | None) -> Callable[[Path, Env], Case]:
    def build(tmp: Path, env: Env) -> Case:
        text = tmp / "calib.txt"
        if content is None:
            os.mkfifo(text)  # reading it would block forever
            inputs = (env.tiny.parent,)
        else:
            text.write_bytes(content)
            inputs = (text, env.tiny.parent)
        return Case(_quantize(env.tiny, tmp, "--calib-text", str(text)), "", inputs)
    return build


case("empty calibration text")(_expect(_calib_text(b""), "the text file is empty"))
case("whitespace-only calibration text")(_expect(_calib_text(b" \n\t\n"), "the text file is empty"))
case("non-UTF-8 calibration text")(_expect(_calib_text("caf\xe9 ".encode("latin-1") * 200), "not UTF-8"))
case("calibration text shorter than one window")(_expect(_calib_text(b"hello world"), "gives only 0 windows"))
case("calibration text is a FIFO (regression: hung forever)")(_expect(_calib_text(None), "not a regular file"))


def _offset_tokenizer(folder: Path) -> Path:
    """A byte tokenizer whose ids start at 1000: larger than the tiny model's 260 embeddings."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<extra_{i}>": i for i in range(1000)}
    for symbol in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[symbol] = len(vocab)
    vocab["<unk>"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>").save_pretrained(folder)
    return folder


@case("tokenizer of another model, eval (regression: internal error)")
def _(tmp, env):
    tokenizer = _offset_tokenizer(tmp / "tok")
    args = ("eval", str(env.tiny), "--tokenizer", str(tokenizer), "--windows", "1", "--window-tokens", "64", "--no-speed")
    return Case(args, "does not belong to this model", (tokenizer, env.tiny.parent))


@case("tokenizer of another model, w8a8 (regression: ONNX Runtime log on stderr)")
def _(tmp, env):
    tokenizer = _offset_tokenizer(tmp / "tok")
    return Case(_quantize(env.tiny, tmp, "--tokenizer", str(tokenizer), "--calib-windows", "1"),
                "does not belong to this model", (tokenizer, env.tiny.parent))


@case("tokenizer of another model, w4-gptq (regression: ONNX Runtime log on stderr)")
def _(tmp, env):
    tokenizer = _offset_tokenizer(tmp / "tok")
    return Case(_quantize(env.tiny, tmp, "--recipe", "w4-gptq", "--tokenizer", str(tokenizer), "--calib-windows", "1"),
                "does not belong to this model", (tokenizer, env.tiny.parent))


@case("corrupt tokenizer.json")
def _(tmp, env):
    (tmp / "tok").mkdir()
    (tmp / "tok" / "tokenizer.json").write_text("{not json")
    return Case(("eval", str(env.tiny), "--tokenizer", str(tmp / "tok")), "cannot load the tokenizer",
                (tmp / "tok", env.tiny.parent))


@case("eval with 100000 threads (regression: the process died silently)")
def _(tmp, env):
    return Case(("eval", str(env.tiny), "--threads", "100000"), "threads must be at most", (env.tiny.parent,))


# ---------------------------------------------------------------------------------------------
# Output paths


@case("quantize output equal to input")
def _(tmp, env):
    model = _copy_model(env, tmp / "m")
    return Case(("quantize", str(model), "-o", str(model), "--overwrite"), "is the input", (model.parent,))


@case("output whose .data would overwrite the input's external data (regression: unchecked)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True, data_name="q.onnx.data")
    return Case(("quantize", str(model), "-o", str(tmp / "m" / "q.onnx"), "--recipe", "w4-rtn"),
                "would overwrite", (model.parent,))


@case("output whose report would overwrite the input's external data (regression: clobbered the input)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True, data_name="q.graphq.json")
    return Case(("quantize", str(model), "-o", str(tmp / "m" / "q.onnx"), "--recipe", "w4-rtn"),
                "would overwrite", (model.parent,))


@case("--save-recipe onto the input model (regression: clobbered the input)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m")
    return Case(_quantize(model, tmp, "--recipe", "w4-rtn", "--save-recipe", str(model)), "is the input", (model.parent,))


@case("--save-recipe onto the input's external data (regression)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True)
    return Case(_quantize(model, tmp, "--recipe", "w4-rtn", "--save-recipe", str(tmp / "m" / "model.onnx.data")),
                "would overwrite", (model.parent,))


@case("--save-recipe onto the output (regression: overwrote the model just written)")
def _(tmp, env):
    return Case(_quantize(env.tiny, tmp, "--recipe", "w4-rtn", "--save-recipe", str(tmp / "q" / "model.onnx")),
                "is one of the output files", (env.tiny.parent,))


@case("eval --json onto the external data (regression: clobbered the input)")
def _(tmp, env):
    model = _copy_model(env, tmp / "m", external=True)
    return Case(("eval", str(model), "--json", str(tmp / "m" / "model.onnx.data")), "would overwrite", (model.parent,))


@case("output folder is a regular file")
def _(tmp, env):
    (tmp / "file").write_text("x")
    return Case(("quantize", str(env.tiny), "-o", str(tmp / "file" / "q.onnx"), "--recipe", "w4-rtn"),
                "cannot write to", (tmp / "file", env.tiny.parent))


@case("read-only output folder")
def _(tmp, env):
    folder = tmp / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    if os.geteuid() == 0:  # root ignores permissions: make the folder refuse new entries the way EACCES does
        real = tempfile.mkdtemp

        def refusing(*args, **kwargs):
            if Path(kwargs.get("dir") or tempfile.gettempdir()).resolve() == folder.resolve():
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(folder))
            return real(*args, **kwargs)
        env.monkeypatch.setattr(tempfile, "mkdtemp", refusing)
    return Case(("quantize", str(env.tiny), "-o", str(folder / "q.onnx"), "--recipe", "w4-rtn"),
                "Permission denied", (folder, env.tiny.parent))


@case("disk full while saving the model (regression: left an empty output folder)")
def _(tmp, env):
    def full_disk(model, path, **kwargs):
        Path(path).write_bytes(b"\0" * 1000)  # a partial file, then the device is full
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    env.monkeypatch.setattr(ir, "save", full_disk)
    return Case(("quantize", str(env.tiny), "-o", str(tmp / "q" / "q.onnx"), "--recipe", "w4-rtn"),
                "No space left on device", (env.tiny.parent,))


@case("disk full while writing the report (regression: left the model behind)")
def _(tmp, env):
    real = tempfile.mkstemp
    out_dir = tmp / "q"

    def full_disk(*args, **kwargs):
        if Path(kwargs.get("dir") or ".").resolve() == out_dir.resolve():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(*args, **kwargs)
    env.monkeypatch.setattr(tempfile, "mkstemp", full_disk)
    return Case(("quantize", str(env.tiny), "-o", str(out_dir / "q.onnx"), "--recipe", "w4-rtn"),
                "No space left on device", (env.tiny.parent,))


# ---------------------------------------------------------------------------------------------
# Recipe files


def _recipe_case(text: str | bytes, expected: str, suffix: str = ".yaml") -> Callable[[Path, Env], Case]:
    def build(tmp: Path, env: Env) -> Case:
        return dataclasses.replace(_recipe(tmp, env, text, suffix), expected=expected)
    return build


case("recipe: malformed YAML")(_recipe_case("kind: w8a8\nsmoothquant: {alpha: 0.5\n", "cannot parse the recipe"))
case("recipe: truncated JSON")(_recipe_case('{"kind": ', "cannot parse the recipe", ".json"))
case("recipe: unknown nested key")(_recipe_case("kind: w8a8\nsmoothquant: {alpha: 0.5, beta: 1}\n", "unknown key(s) ['beta']"))
case("recipe: a number as text (regression: unclear message)")(
    _recipe_case("kind: w8a8\nsmoothquant: {alpha: high}\n", "'recipe.smoothquant.alpha' must be a number"))
case("recipe: text where a list belongs (regression: split into characters)")(
    _recipe_case("kind: w8a8\nfloat_nodes: lm_head\n", "'recipe.float_nodes' must be a list"))
case("recipe: a set as text (regression: split into characters)")(
    _recipe_case("kind: w8a8\nkeep_float: {op_types: Softmax}\n", "'recipe.keep_float.op_types' must be a list"))
case("recipe: 'no' as text for a flag (regression: read as true)")(
    _recipe_case("kind: weight-only\nsequential: 'no'\n", "'recipe.sequential' must be true or false"))
case("recipe: fractional window count (regression: internal error)")(
    _recipe_case("kind: w8a8\ncalibration: {windows: 2.5}\n", "'recipe.calibration.windows' must be an integer"))
case("recipe: alpha out of range")(_recipe_case("kind: w8a8\nsmoothquant: {alpha: 5}\n", "alpha must lie in [0, 1]"))
case("recipe: NaN alpha")(_recipe_case("kind: w8a8\nsmoothquant: {alpha: .nan}\n", "must be a number"))
case("recipe: 1-bit weights")(_recipe_case("kind: weight-only\nweights: {bits: 1}\n", "weight bits must be an integer"))
case("recipe: zero calibration windows")(_recipe_case("kind: w8a8\ncalibration: {windows: 0}\n", "windows must be at least 1"))
case("recipe: 100000 threads (regression: the process died silently)")(
    _recipe_case("kind: w8a8\ncalibration: {threads: 100000}\n", "threads must be at most"))
case("recipe: invalid regular expression (regression: internal error)")(
    _recipe_case("kind: w8a8\nfloat_nodes: ['(']\n", "not a valid regular expression"))
case("recipe: a list instead of a mapping")(_recipe_case("- w8a8\n", "must hold a mapping"))
case("recipe: not UTF-8 (regression: internal error)")(_recipe_case(b"kind: w8a8\nname: caf\xe9\n", "not UTF-8"))
case("recipe: unknown format version")(_recipe_case("format_version: 99\n", "format_version 99"))


@case("recipe: YAML that asks to run code")
def _(tmp, env):
    marker = tmp / "PWNED"
    made = _recipe(tmp, env, f"!!python/object/apply:os.system ['touch {marker}']\n")
    return dataclasses.replace(made, expected="cannot parse the recipe", absent=(marker,))


# ---------------------------------------------------------------------------------------------
# Model folders and GGUF files for export


class _Exploit:
    """Unpickling this creates ``marker``: proof that a pickle was loaded."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def _forbid_unpickling(env: Env) -> None:
    """Make any unpickling an internal error (exit 70), so the case fails if one is attempted."""
    import torch

    def refuse(*args, **kwargs):
        raise AssertionError("graphq attempted to unpickle")
    for module, name in ((pickle, "load"), (pickle, "loads"), (torch, "load")):
        env.monkeypatch.setattr(module, name, refuse)


@case("exploit pickle as the only weights")
def _(tmp, env):
    folder, marker = tmp / "hf", tmp / "UNPICKLED"
    folder.mkdir()
    shutil.copy(env.hf / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    _forbid_unpickling(env)
    return Case(("export", str(folder), "-o", str(tmp / "out")), "safetensors only", (folder,), (marker,))


@case("exploit pickle beside a decoy .safetensors (regression: reached transformers' loader)")
def _(tmp, env):
    folder, marker = tmp / "hf", tmp / "UNPICKLED"
    folder.mkdir()
    shutil.copy(env.hf / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps(_Exploit(marker)))
    (folder / "adapter.safetensors").write_bytes(b"")
    _forbid_unpickling(env)
    return Case(("export", str(folder), "-o", str(tmp / "out")), "safetensors only", (folder,), (marker,))


@case("config.json with auto_map and an unknown model type")
def _(tmp, env):
    folder, marker = tmp / "hf", tmp / "CODE_RAN"
    folder.mkdir()
    config = {"architectures": ["EvilForCausalLM"], "model_type": "evil", "trust_remote_code": True,
              "auto_map": {"AutoConfig": "configuration_evil.EvilConfig",
                           "AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}}
    (folder / "config.json").write_text(json.dumps(config))
    for module in ("configuration_evil.py", "modeling_evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    shutil.copy(env.hf / "model.safetensors", folder / "model.safetensors")
    return Case(("export", str(folder), "-o", str(tmp / "out")), "never runs code", (folder,), (marker,))


@case("config.json that is a JSON list (regression: internal error)")
def _(tmp, env):
    folder = tmp / "hf"
    folder.mkdir()
    (folder / "config.json").write_text("[1, 2]")
    shutil.copy(env.hf / "model.safetensors", folder / "model.safetensors")
    return Case(("export", str(folder), "-o", str(tmp / "out")), "must hold a JSON object", (folder,))


@case("random bytes named .gguf")
def _(tmp, env):
    path = tmp / "model.gguf"
    path.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    return Case(("export", str(path), "-o", str(tmp / "out")), "not a GGUF file", (path,))


@case("GGUF header claiming 2^62 tensors")
def _(tmp, env):
    path = tmp / "model.gguf"
    path.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 2**62, 2**62))
    return Case(("export", str(path), "-o", str(tmp / "out")), "not a readable GGUF", (path,))


# ---------------------------------------------------------------------------------------------
# The test


def _listing(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def test_corpus_is_large_enough():
    assert len(CASES) >= 30


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_input_fails_cleanly(name, tmp_path, tiny_llama_onnx, tiny_llama_dir, monkeypatch, capfd):
    work, scratch = tmp_path / "work", tmp_path / "tmp"
    work.mkdir()
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    built = CASES[name](work, Env(tiny_llama_onnx, tiny_llama_dir, monkeypatch))
    before = {path: sha256_tree(path) for path in built.inputs}
    listing = _listing(tmp_path)
    capfd.readouterr()

    code = main(["-q", *built.args])

    out, err = capfd.readouterr()
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 1, err
    assert "Traceback" not in out + err
    assert len(lines) == 1, err
    assert lines[0].startswith("graphq: error: "), err
    assert built.expected in lines[0]
    assert {path: sha256_tree(path) for path in built.inputs} == before, "an input changed"
    assert _listing(tmp_path) == listing, "partial output or temporary files left behind"
    for path in built.absent:
        assert not path.exists(), f"{path} exists: code from the input ran"


# ---------------------------------------------------------------------------------------------
# Hostile input that must succeed, safely


def _zeroed_model(env_tiny: Path, folder: Path) -> Path:
    """The tiny model with an all-zero q_proj weight and an all-zero input norm in layer 0 (so the
    activations into q/k/v are exactly zero): zero ranges must give finite, positive scales."""
    folder.mkdir()
    for name in TOKENIZER_FILES:
        shutil.copy(env_tiny.parent / name, folder / name)
    proto = onnx.load(str(env_tiny))
    _set_weight(proto, _matmul_weight_name(proto), lambda a: a.fill(0))
    norm = next(n for n in proto.graph.node if n.op_type == "Mul" and "layers.0/input_layernorm" in n.name
                and any(i in {t.name for t in proto.graph.initializer} for i in n.input))
    gamma = next(i for i in norm.input if i in {t.name for t in proto.graph.initializer})
    _set_weight(proto, gamma, lambda a: a.fill(0))
    path = folder / "model.onnx"
    onnx.save_model(proto, str(path))
    return path


@pytest.mark.parametrize("recipe", ["w8a8", "w8a8-static", "w4-rtn", "w4-gptq"])
def test_all_zero_tensors_give_finite_scales(recipe, tiny_llama_onnx, tmp_path):
    model = _zeroed_model(tiny_llama_onnx, tmp_path / "m")
    out = tmp_path / "q" / "model.onnx"

    code = main(["-q", "quantize", str(model), "-o", str(out), "--recipe", recipe, "--calib-windows", "2"])

    assert code == 0
    quantized = ir.load(out)
    scales = 0
    for name, value in quantized.graph.initializers.items():
        array = value.const_value.numpy()
        if np.issubdtype(array.dtype, np.floating):
            assert np.isfinite(array).all(), name
            if "scale" in name.lower():  # weight-only symmetric scales carry a sign; none may be zero
                scales += 1
                assert (array != 0).all(), name
    assert scales > 0


def test_auto_map_with_a_builtin_model_type_never_runs_its_code(tiny_llama_dir, tmp_path):
    folder, marker = tmp_path / "hf", tmp_path / "CODE_RAN"
    shutil.copytree(tiny_llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForCausalLM": "modeling_evil.Evil"}
    (folder / "config.json").write_text(json.dumps(config))
    tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
    tokenizer_config["auto_map"] = {"AutoTokenizer": ["tokenization_evil.EvilTokenizer", None]}
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
    for module in ("configuration_evil.py", "modeling_evil.py", "tokenization_evil.py"):
        (folder / module).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")

    code = main(["-q", "export", str(folder), "-o", str(tmp_path / "out")])

    assert code == 0  # exported with transformers' own LlamaForCausalLM
    assert not marker.exists()
    assert (tmp_path / "out" / "model.onnx").is_file()


def test_file_size_limit_fails_cleanly(tiny_llama_onnx, tmp_path):
    """A real write failure (RLIMIT_FSIZE: every write past 64 kB fails with EFBIG, as on a full disk)."""
    import subprocess
    import sys

    out = tmp_path / "out" / "q.onnx"
    script = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
        "from graphq.cli import main\n"
        f"sys.exit(main(['-q', 'quantize', {str(tiny_llama_onnx)!r}, '-o', {str(out)!r}, '--recipe', 'w4-rtn']))\n"
    )
    before = sha256_tree(tiny_llama_onnx.parent)
    (tmp_path / "tmp").mkdir()
    env = {**os.environ, "TMPDIR": str(tmp_path / "tmp"), "PYTHONWARNINGS": "ignore"}
    env.pop("GRAPHQ_DEBUG", None)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300,
                            check=False)

    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("graphq: error: cannot write"), result.stderr
    assert "File too large" in lines[0]
    assert not (tmp_path / "out").exists(), "partial output left behind"
    # ONNX Runtime keeps a telemetry session id (.ses) in TMPDIR; nothing else may be left there.
    assert [p.name for p in (tmp_path / "tmp").iterdir() if p.name != ".ses"] == []
    assert sha256_tree(tiny_llama_onnx.parent) == before


def test_fuzz_load_quick():
    """tools/fuzz_load.py for a few seconds with a fixed seed: no crash in the loading path."""
    import importlib.util
    import sys

    tool = Path(__file__).resolve().parents[1] / "tools" / "fuzz_load.py"
    spec = importlib.util.spec_from_file_location("fuzz_load", tool)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        report = module.fuzz(60, seed=0, batch=40, max_examples=120)
    finally:
        sys.modules.pop(spec.name, None)
    assert report.examples >= 120
    assert report.findings == (), report.table()
