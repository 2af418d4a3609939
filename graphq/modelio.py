"""Loading, validating and atomically saving ONNX models.

Loading is defensive: the file must exist and parse as an ONNX ``ModelProto`` with a non-empty
graph, and every external-data reference must resolve to an existing regular file *inside* the
model's folder (no ``..``, absolute paths or symlinks that lead out of it). Nothing is executed and
nothing is written while loading.

Saving never touches the destination until the whole model has been serialised: the model (and its
external data, for models whose weights exceed the 2 GB protobuf limit) is written into a fresh
temporary folder beside the destination and then moved into place with ``os.replace``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import onnx
import onnx_ir as ir
from google.protobuf.message import DecodeError

from graphq.errors import InvalidModelError, OutputPathError

logger = logging.getLogger(__name__)

# Above this many bytes of initializers a model is saved with its weights in a side file
# (`<name>.data`): a single protobuf cannot exceed 2 GiB.
EXTERNAL_DATA_THRESHOLD_BYTES = 1536 * 1024 * 1024

ONNX_SUFFIXES = frozenset({".onnx"})


def _iter_tensor_protos(graph: onnx.GraphProto) -> Iterator[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type == onnx.AttributeProto.TENSOR:
                yield attribute.t
            elif attribute.type == onnx.AttributeProto.GRAPH:
                yield from _iter_tensor_protos(attribute.g)
            elif attribute.type == onnx.AttributeProto.GRAPHS:
                for subgraph in attribute.graphs:
                    yield from _iter_tensor_protos(subgraph)


def _check_external_data(proto: onnx.ModelProto, model_path: Path) -> None:
    """Refuse external-data locations that escape the model folder or do not exist."""
    model_dir = model_path.parent.resolve()
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = next((e.value for e in tensor.external_data if e.key == "location"), None)
        if not location:
            raise InvalidModelError(
                f"{model_path}: tensor '{tensor.name}' is stored externally but names no location"
            )
        if os.path.isabs(location) or Path(location).drive:
            raise InvalidModelError(
                f"{model_path}: tensor '{tensor.name}' points to an absolute external-data path "
                f"'{location}'; external data must lie inside the model folder"
            )
        target = (model_dir / location).resolve()
        if not target.is_relative_to(model_dir):
            raise InvalidModelError(
                f"{model_path}: tensor '{tensor.name}' external data '{location}' resolves outside "
                f"the model folder {model_dir}"
            )
        if not target.is_file():
            raise InvalidModelError(
                f"{model_path}: external data file '{location}' for tensor '{tensor.name}' is missing"
            )


def read_model_proto(path: str | os.PathLike) -> onnx.ModelProto:
    """Parse an ONNX file without loading external data, with clear errors for bad input."""
    model_path = Path(path)
    if not model_path.exists():
        raise InvalidModelError(f"{model_path}: no such file")
    if model_path.is_dir():
        candidate = model_path / "model.onnx"
        if candidate.is_file():
            model_path = candidate
        else:
            raise InvalidModelError(f"{model_path}: is a folder without a model.onnx in it")
    if not model_path.is_file():
        raise InvalidModelError(f"{model_path}: not a regular file")
    if model_path.stat().st_size == 0:
        raise InvalidModelError(f"{model_path}: the file is empty")
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except (DecodeError, RuntimeError, ValueError, UnicodeDecodeError) as error:
        raise InvalidModelError(
            f"{model_path}: not a valid ONNX model (protobuf parse failed: {_one_line(error)}); "
            "the file may be truncated or not ONNX at all"
        ) from error
    except OSError as error:
        raise InvalidModelError(f"{model_path}: cannot read ({error.strerror or error})") from error
    if not proto.HasField("graph") or len(proto.graph.node) == 0:
        raise InvalidModelError(
            f"{model_path}: not a usable ONNX model (no graph or an empty graph); "
            "the file may be truncated or not ONNX at all"
        )
    if not proto.opset_import:
        raise InvalidModelError(f"{model_path}: the model declares no opset imports")
    _check_external_data(proto, model_path)
    return proto


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The .onnx file a user meant: the path itself, or ``model.onnx`` inside a folder."""
    model_path = Path(path)
    if model_path.is_dir() and (model_path / "model.onnx").is_file():
        return model_path / "model.onnx"
    return model_path


def load_model(path: str | os.PathLike) -> ir.Model:
    """Load an ONNX file into an ``onnx_ir`` model (external data stays memory-mapped, lazily)."""
    model_path = resolve_model_file(path)
    proto = read_model_proto(model_path)
    try:
        model = ir.serde.deserialize_model(proto)
    except Exception as error:  # onnx_ir raises several types for malformed graphs
        raise InvalidModelError(
            f"{model_path}: the graph cannot be read ({_one_line(error)})"
        ) from error
    ir.external_data.set_base_dir(model.graph, str(model_path.parent.resolve()))
    return model


def initializer_bytes(model: ir.Model) -> int:
    """Total bytes of the main graph's initializers."""
    return sum(
        value.const_value.nbytes
        for value in model.graph.initializers.values()
        if value.const_value is not None
    )


def check_output_path(output: str | os.PathLike, inputs: list[Path]) -> Path:
    """Refuse an output path that is one of the inputs, lies inside an input folder, or contains one."""
    out = Path(output).resolve()
    for source in inputs:
        src = source.resolve()
        if out == src:
            raise OutputPathError(f"output path {output} is the input; choose another path")
        if src.is_dir() and out.is_relative_to(src):
            raise OutputPathError(f"output path {output} lies inside the input folder {source}")
        if out.exists() and out.is_dir() and src.is_relative_to(out):
            raise OutputPathError(f"output folder {output} contains the input {source}")
    return out


@contextlib.contextmanager
def staging_dir(near: Path) -> Iterator[Path]:
    """A temporary folder on the same filesystem as ``near``, removed afterwards whatever happens."""
    parent = near.parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.tmp-", dir=parent))
    except OSError as error:
        raise OutputPathError(f"cannot write to {parent} ({error.strerror or error})") from error
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def save_model(model: ir.Model, path: str | os.PathLike) -> list[Path]:
    """Write ``model`` to ``path`` atomically; returns the files written.

    Large models get their weights in ``<name>.data`` beside the .onnx file. Files are first written
    to a staging folder and only moved into place once complete.
    """
    destination = Path(path)
    if destination.suffix not in ONNX_SUFFIXES:
        raise OutputPathError(f"output path {destination} must end in .onnx")
    if destination.is_dir():
        raise OutputPathError(f"output path {destination} is a folder; name the .onnx file")
    external = initializer_bytes(model) > EXTERNAL_DATA_THRESHOLD_BYTES
    data_name = destination.name + ".data"
    with staging_dir(destination) as tmp:
        staged = tmp / destination.name
        try:
            if external:
                ir.save(model, staged, external_data=data_name, size_threshold_bytes=1024)
            else:
                # Tensors still referencing the input's external data must be embedded, or the
                # saved file would point at files beside the input.
                ir.external_data.load_to_model(model)
                ir.save(model, staged)
        except OSError as error:
            raise OutputPathError(
                f"cannot write {destination} ({error.strerror or error})"
            ) from error
        written = [destination]
        if external:
            os.replace(tmp / data_name, destination.parent / data_name)
            written.append(destination.parent / data_name)
        os.replace(staged, destination)
    logger.info("saved %s (%s)", destination, "with external data" if external else "single file")
    return written


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write a small text file via a temporary file in the same folder and ``os.replace``."""
    destination = Path(path)
    try:
        destination.parent.mkdir(parents=True, exist_ok=True)
        handle, tmp = tempfile.mkstemp(prefix=f".{destination.name}.", dir=destination.parent)
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            file.write(text)
        os.replace(tmp, destination)
    except OSError as error:
        raise OutputPathError(f"cannot write {destination} ({error.strerror or error})") from error
