"""Loading, validating and atomically saving ONNX models.

Loading is defensive: the file must exist and parse as an ONNX ``ModelProto`` with a non-empty
graph, and every external-data reference must resolve to an existing regular file *inside* the
model's folder (no ``..``, absolute paths or symlinks that lead out of it). Then, from metadata only
(no tensor data is read, so this costs nothing for multi-GB models): IR and default-domain opset
versions this onnx knows; valid UTF-8 strings; attributes of a declared type; a main graph in SSA
form and topologically sorted; and every tensor's stored bytes matching its shape and data type
(external data: integer offset and length, within the file, never the model file itself). Anything
else surfaces as :class:`~graphq.errors.InvalidModelError` here rather than as a crash deep inside a
pass (``tools/fuzz_load.py`` fuzzes exactly this path). Nothing is executed and nothing is written
while loading.

Saving never touches the destination until the whole model has been serialised: the model (and its
external data, for models whose weights exceed the 2 GB protobuf limit) is written into a fresh
temporary folder beside the destination and then moved into place with ``os.replace``.

Layer-streamed saving (:class:`ExternalDataSink`) bounds memory for models larger than RAM: each
tensor is appended to the output's external-data file as soon as it is final (offset aligned to
4096 bytes) and its value becomes an ``ExternalTensor`` pointing there, so the process holds only the
tensors still being worked on; :func:`save_streamed` then appends what is left and writes the graph,
whose protobuf only references the data. Input weights are read through memory maps that
:func:`release` closes once a tensor is used, so their pages leave the process again.
"""

from __future__ import annotations

import collections
import contextlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


# TensorProto field that holds the values of each data type when they are not in ``raw_data``, and
# how many entries one element takes there, as a fraction (complex: 2/1; packed 4-bit: 1/2).
_TYPED_FIELDS: dict[int, tuple[str, int, int]] = {
    onnx.TensorProto.FLOAT: ("float_data", 1, 1), onnx.TensorProto.COMPLEX64: ("float_data", 2, 1),
    onnx.TensorProto.DOUBLE: ("double_data", 1, 1), onnx.TensorProto.COMPLEX128: ("double_data", 2, 1),
    onnx.TensorProto.INT64: ("int64_data", 1, 1), onnx.TensorProto.UINT32: ("uint64_data", 1, 1),
    onnx.TensorProto.UINT64: ("uint64_data", 1, 1), onnx.TensorProto.STRING: ("string_data", 1, 1),
    **{t: ("int32_data", 1, 1) for t in (
        onnx.TensorProto.INT32, onnx.TensorProto.INT16, onnx.TensorProto.INT8, onnx.TensorProto.UINT16,
        onnx.TensorProto.UINT8, onnx.TensorProto.BOOL, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
        onnx.TensorProto.FLOAT8E4M3FN, onnx.TensorProto.FLOAT8E4M3FNUZ, onnx.TensorProto.FLOAT8E5M2,
        onnx.TensorProto.FLOAT8E5M2FNUZ)},
    **{t: ("int32_data", 1, 2) for t in (onnx.TensorProto.INT4, onnx.TensorProto.UINT4, onnx.TensorProto.FLOAT4E2M1)},
}


def _tensor_label(tensor: onnx.TensorProto) -> str:
    return f"tensor '{tensor.name}'" if tensor.name else "an unnamed tensor"


def tensor_nbytes(tensor: onnx.TensorProto, model_path: Path) -> int | None:
    """Bytes the tensor's values take in ``raw_data`` / external data (None for strings).

    Raises :class:`InvalidModelError` for an unknown data type or a negative dimension."""
    if tensor.data_type == onnx.TensorProto.STRING:
        return None
    try:
        bits = ir.DataType(tensor.data_type).bitwidth
    except (ValueError, TypeError) as error:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} has an unknown or undefined data type ({tensor.data_type})"
        ) from error
    if any(d < 0 for d in tensor.dims):
        raise InvalidModelError(f"{model_path}: {_tensor_label(tensor)} has a negative dimension {list(tensor.dims)}")
    elements = 1
    for d in tensor.dims:
        elements *= d
    return -(-elements * bits // 8)


def _external_entry(tensor: onnx.TensorProto, key: str, model_path: Path) -> int | None:
    """A non-negative integer entry (``offset``, ``length``) of a tensor's external data, or None."""
    values = [e.value for e in tensor.external_data if e.key == key]
    if not values:
        return None
    if len(values) > 1:
        raise InvalidModelError(f"{model_path}: {_tensor_label(tensor)} names its external-data {key} twice")
    text = values[0]
    if not (text.isascii() and text.isdigit()):
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} has external-data {key} '{text[:40]}'; "
            "expected a non-negative integer"
        )
    return int(text)


def _check_external_tensor(tensor: onnx.TensorProto, model_path: Path, model_dir: Path) -> None:
    """Refuse an external-data reference that escapes the folder, is missing, or does not fit its file."""
    locations = [e.value for e in tensor.external_data if e.key == "location"]
    location = locations[0] if len(locations) == 1 else None
    if not location:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} is stored externally but names "
            f"{'no location' if not locations else 'several locations'}"
        )
    if "\0" in location:
        raise InvalidModelError(f"{model_path}: {_tensor_label(tensor)} has an external-data location with a NUL byte")
    if os.path.isabs(location) or Path(location).drive:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} points to an absolute external-data path "
            f"'{location}'; external data must lie inside the model folder"
        )
    target = (model_dir / location).resolve()
    if not target.is_relative_to(model_dir):
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} external data '{location}' resolves outside "
            f"the model folder {model_dir}"
        )
    if not target.is_file():
        raise InvalidModelError(
            f"{model_path}: external data file '{location}' for {_tensor_label(tensor)} is missing"
        )
    if tensor.data_type == onnx.TensorProto.STRING:
        raise InvalidModelError(f"{model_path}: string {_tensor_label(tensor)} is stored externally, which ONNX forbids")
    if target == model_path.resolve():
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} names the model file itself as its external data"
        )
    offset = _external_entry(tensor, "offset", model_path) or 0
    length = _external_entry(tensor, "length", model_path)
    expected = tensor_nbytes(tensor, model_path)
    if expected is not None and length is not None and length != expected:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} of shape {list(tensor.dims)} needs {expected} bytes "
            f"but its external data length is {length}"
        )
    needed = length if length is not None else expected
    size = target.stat().st_size
    if needed is not None and offset + needed > size:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} reads bytes {offset}..{offset + needed} of '{location}', "
            f"which has only {size} bytes; the external data is truncated or does not belong to this model"
        )


def _check_embedded_tensor(tensor: onnx.TensorProto, model_path: Path) -> None:
    """Refuse a tensor whose stored values do not match its shape and data type."""
    expected = tensor_nbytes(tensor, model_path)
    if tensor.data_type == onnx.TensorProto.STRING and tensor.HasField("raw_data"):
        raise InvalidModelError(f"{model_path}: string {_tensor_label(tensor)} stores raw_data, which ONNX forbids")
    if tensor.HasField("raw_data"):
        if expected is not None and len(tensor.raw_data) != expected:
            raise InvalidModelError(
                f"{model_path}: {_tensor_label(tensor)} of shape {list(tensor.dims)} needs {expected} bytes "
                f"but holds {len(tensor.raw_data)}; the file is corrupt"
            )
        return
    elements = 1
    for d in tensor.dims:
        elements *= d
    if tensor.data_type not in _TYPED_FIELDS:
        if elements:
            raise InvalidModelError(
                f"{model_path}: {_tensor_label(tensor)} of data type {tensor.data_type} stores its values "
                "outside raw_data, which graphq does not read"
            )
        return
    field, numerator, denominator = _TYPED_FIELDS[tensor.data_type]
    wanted = -(-elements * numerator // denominator)
    stored = len(getattr(tensor, field))
    if stored != wanted:
        raise InvalidModelError(
            f"{model_path}: {_tensor_label(tensor)} of shape {list(tensor.dims)} needs {wanted} values "
            f"but holds {stored}; the file is corrupt"
        )


def _check_tensors(proto: onnx.ModelProto, model_path: Path) -> None:
    """Check every tensor's stored bytes (embedded or external) against its shape and data type.

    Done once at load time, from metadata only: no tensor data is read, so the check costs nothing
    for multi-GB models, and a corrupt tensor is reported here instead of deep inside a pass."""
    model_dir = model_path.parent.resolve()
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            _check_external_tensor(tensor, model_path, model_dir)
        else:
            _check_embedded_tensor(tensor, model_path)


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
    _check_versions(proto, model_path)
    _check_strings(proto, model_path)
    _check_graph_structure(proto.graph, model_path)
    _check_attributes(proto.graph, model_path)
    _check_tensors(proto, model_path)
    return proto


def _check_strings(proto: onnx.ModelProto, model_path: Path) -> None:
    """Refuse string fields that are not valid UTF-8 (protobuf then hands out bytes, and serialising
    the model again fails). Tensors are not walked field by field: that would copy their raw data."""
    stack: list = [proto]
    while stack:
        message = stack.pop()
        if isinstance(message, onnx.TensorProto):
            strings = [message.name, *(e.key for e in message.external_data), *(e.value for e in message.external_data)]
            if any(not isinstance(text, str) for text in strings):
                raise InvalidModelError(f"{model_path}: a tensor name or external-data entry is not valid UTF-8")
            continue
        for field, value in message.ListFields():
            repeated = field.is_repeated if hasattr(field, "is_repeated") else field.label == field.LABEL_REPEATED
            values = value if repeated else [value]
            if field.type == field.TYPE_STRING:
                if any(not isinstance(text, str) for text in values):
                    raise InvalidModelError(
                        f"{model_path}: a '{field.name}' field of a {message.DESCRIPTOR.name} is not valid UTF-8; "
                        "the file is corrupt"
                    )
            elif field.type == field.TYPE_MESSAGE:
                stack.extend(values)


_ATTRIBUTE_TYPES = frozenset(onnx.AttributeProto.AttributeType.values()) - {onnx.AttributeProto.UNDEFINED}


def _check_attributes(graph: onnx.GraphProto, model_path: Path) -> None:
    """Every node attribute (in subgraphs too) must declare one of ONNX's attribute types."""
    for node in graph.node:
        for attribute in node.attribute:
            if attribute.type not in _ATTRIBUTE_TYPES:
                raise InvalidModelError(
                    f"{model_path}: attribute '{attribute.name}' of node '{node.name or node.op_type}' has an "
                    f"undefined or unknown type ({attribute.type}); the file is corrupt"
                )
            for subgraph in [attribute.g] if attribute.type == onnx.AttributeProto.GRAPH else attribute.graphs:
                _check_attributes(subgraph, model_path)


def _check_versions(proto: onnx.ModelProto, model_path: Path) -> None:
    """Refuse IR and default-domain opset versions newer than the installed onnx knows."""
    if proto.ir_version > onnx.IR_VERSION:
        raise InvalidModelError(
            f"{model_path}: IR version {proto.ir_version} is newer than this onnx {onnx.__version__} supports "
            f"({onnx.IR_VERSION})"
        )
    latest = onnx.defs.onnx_opset_version()
    for opset in proto.opset_import:
        if opset.domain in ("", "ai.onnx") and not 1 <= opset.version <= latest:
            raise InvalidModelError(
                f"{model_path}: opset {opset.version} of the default domain is not one this onnx "
                f"{onnx.__version__} knows (1..{latest})"
            )


def _check_graph_structure(graph: onnx.GraphProto, model_path: Path) -> None:
    """The main graph must be in SSA form and topologically sorted, as the ONNX spec requires: every
    node input is a graph input, an initializer or an earlier node's output, and every tensor name is
    defined once. (Nodes inside subgraphs may read outer-scope names; they are not checked here.)"""
    initializers = [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]
    repeated = next((name for name, count in collections.Counter(initializers).items() if count > 1), None)
    if repeated is not None:
        raise InvalidModelError(f"{model_path}: initializer '{repeated}' is defined more than once")
    defined = {value.name for value in graph.input} | set(initializers)
    for index, node in enumerate(graph.node):
        label = f"node '{node.name}'" if node.name else f"node #{index} ({node.op_type})"
        missing = next((name for name in node.input if name and name not in defined), None)
        if missing is not None:
            raise InvalidModelError(
                f"{model_path}: {label} reads '{missing}', which no graph input, initializer or earlier "
                "node defines (the graph is invalid or not topologically sorted)"
            )
        for name in node.output:
            if name and name in defined:
                raise InvalidModelError(f"{model_path}: tensor '{name}' is defined more than once ({label})")
            defined.add(name)
    missing = next((value.name for value in graph.output if value.name not in defined), None)
    if missing is not None:
        raise InvalidModelError(f"{model_path}: graph output '{missing}' is never computed")


def resolve_model_file(path: str | os.PathLike) -> Path:
    """The .onnx file a user meant: the path itself, or ``model.onnx`` inside a folder."""
    model_path = Path(path)
    if model_path.is_dir() and (model_path / "model.onnx").is_file():
        return model_path / "model.onnx"
    return model_path


def max_positions_beside(model_path: str | os.PathLike) -> int | None:
    """``max_position_embeddings`` of the Hugging Face ``config.json`` beside a model file, if any."""
    import json

    config_path = resolve_model_file(model_path).parent / "config.json"
    try:
        value = json.loads(config_path.read_text(encoding="utf-8")).get("max_position_embeddings")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, int) and value > 0 else None


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


def referenced_files(model_path: Path) -> list[Path]:
    """The model file and every external-data file it names, resolved; just the file if it cannot be read."""
    files = [model_path.resolve()]
    try:
        proto = onnx.load(str(model_path), load_external_data=False)
    except Exception:  # unreadable input: loading it later gives the user the real error
        return files
    for tensor in _iter_tensor_protos(proto.graph):
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            for entry in tensor.external_data:
                if entry.key == "location" and entry.value and "\0" not in entry.value:
                    files.append((model_path.parent / entry.value).resolve())
    return list(dict.fromkeys(files))


def output_files(output: Path) -> list[Path]:
    """Every file a graphq command may write for ``output``: for an .onnx file also its external
    data (``<name>.data``) and the CLI's report (``<stem>.graphq.json``)."""
    if output.suffix in ONNX_SUFFIXES:
        return [output, output.with_name(output.name + ".data"), output.with_suffix(".graphq.json")]
    return [output]


def check_output_path(output: str | os.PathLike, inputs: list[Path]) -> Path:
    """Refuse an output path that is one of the inputs, lies inside an input folder, or contains one,
    or whose companion files (see :func:`output_files`) would overwrite a file an input model reads."""
    out = Path(output).resolve()
    for source in inputs:
        src = source.resolve()
        if out == src:
            raise OutputPathError(f"output path {output} is the input; choose another path")
        if src.is_dir() and out.is_relative_to(src):
            raise OutputPathError(f"output path {output} lies inside the input folder {source}")
        if out.exists() and out.is_dir() and src.is_relative_to(out):
            raise OutputPathError(f"output folder {output} contains the input {source}")
    existing = [path for path in output_files(out) if path.exists()]
    if existing:  # only then can writing destroy an input: look at what the input models read
        for source in inputs:
            if not source.is_file():
                continue
            read = set(referenced_files(source))
            clobbered = next((path for path in existing if path in read), None)
            if clobbered is not None:
                raise OutputPathError(
                    f"output path {output} would overwrite {clobbered}, which the input {source} reads; "
                    "choose another path"
                )
    return out


def missing_folders(folder: Path) -> list[Path]:
    """``folder`` and its ancestors that do not exist yet, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


@contextlib.contextmanager
def staging_dir(near: Path) -> Iterator[Path]:
    """A temporary folder on the same filesystem as ``near``, removed afterwards whatever happens.

    Folders created to hold it are removed again (when empty) if the body fails, so a failed command
    leaves nothing behind."""
    parent = near.parent
    created = missing_folders(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{near.name}.tmp-", dir=parent))
    except OSError as error:
        remove_empty(created)
        raise OutputPathError(f"cannot write to {parent} ({error.strerror or error})") from error
    succeeded = False
    try:
        yield tmp
        succeeded = True
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if not succeeded:
            remove_empty(created)


def remove_empty(folders: list[Path]) -> None:
    for folder in folders:  # deepest first
        try:
            folder.rmdir()
        except OSError:
            return


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
        try:
            if external:
                os.replace(tmp / data_name, destination.parent / data_name)
                written.append(destination.parent / data_name)
            os.replace(staged, destination)
        except OSError as error:
            raise OutputPathError(f"cannot move {destination} into place ({error.strerror or error})") from error
    logger.info("saved %s (%s)", destination, "with external data" if external else "single file")
    return written


def release(value: ir.Value | None) -> None:
    """Close the memory map behind ``value``'s external tensor (if any): the pages it touched stop
    counting in the process; the tensor maps its file again if read later."""
    tensor = value.const_value if value is not None else None
    if isinstance(tensor, ir.ExternalTensor):
        release_tensor(tensor)


def release_tensor(tensor: ir.ExternalTensor) -> None:
    """``tensor.release()``; while a caller still holds an array view of the map, the map stays open
    and closes when the last view is collected."""
    try:
        tensor.release()
    except BufferError:
        logger.debug("%s: memory map still in use; it closes with its last view", tensor.name)


def release_all(model: ir.Model) -> None:
    """:func:`release` every initializer of the main graph."""
    for value in model.graph.initializers.values():
        release(value)


STREAM_ALIGNMENT = 4096
STREAM_SIZE_THRESHOLD_BYTES = 1024  # smaller tensors stay inside the protobuf


class ExternalDataSink:
    """Appends final tensors to one external-data file (``folder/name``) as they are produced.

    :meth:`spill` writes a value's tensor at the next 4096-aligned offset and replaces the value's
    ``const_value`` by an ``ExternalTensor`` pointing there; the array is no longer referenced by the
    model. The file only grows; tensors spilled and later dropped from the graph stay as dead bytes,
    which callers avoid by spilling only final tensors."""

    def __init__(self, folder: Path, name: str) -> None:
        self.folder = Path(folder)
        self.name = name
        self.path = self.folder / name
        try:
            self._handle = open(self.path, "wb")  # noqa: SIM115 - closed by close()
        except OSError as error:
            raise OutputPathError(f"cannot write {self.path} ({error.strerror or error})") from error
        self.offset = 0
        self.spilled = 0  # tensors written

    def owns(self, tensor: object) -> bool:
        return isinstance(tensor, ir.ExternalTensor) and Path(tensor.path).resolve() == self.path.resolve()

    def spill(self, value: ir.Value) -> bool:
        """Write ``value``'s tensor to the file (if it is large enough and not there yet)."""
        tensor = value.const_value
        if tensor is None or self.owns(tensor):
            return False
        if tensor.nbytes < STREAM_SIZE_THRESHOLD_BYTES:
            if isinstance(tensor, ir.ExternalTensor):  # small, but stored beside the input: embed it
                value.const_value = ir.Tensor(tensor.numpy().copy(), name=value.name)
                release_tensor(tensor)
            return False
        padding = -self.offset % STREAM_ALIGNMENT
        try:
            if padding:
                self._handle.write(b"\0" * padding)
                self.offset += padding
            start = self.offset
            data = tensor.tobytes()
            self._handle.write(data)
        except OSError as error:
            raise OutputPathError(f"cannot write {self.path} ({error.strerror or error})") from error
        self.offset += len(data)
        del data
        release(value)
        value.const_value = ir.ExternalTensor(self.name, offset=start, length=tensor.nbytes, dtype=tensor.dtype,
                                              shape=tensor.shape, name=value.name, base_dir=self.folder)
        self.spilled += 1
        return True

    def spill_new(self, graph: ir.Graph) -> int:
        """Spill every initializer of ``graph`` that lives in memory (not memory-mapped from any file):
        the tensors a pass just created."""
        new = [v for v in graph.initializers.values()
               if v.const_value is not None and not isinstance(v.const_value, (ir.ExternalTensor, ir.TensorProtoTensor))]
        return sum(self.spill(value) for value in new)

    def close(self) -> None:
        try:
            self._handle.close()
        except OSError as error:
            raise OutputPathError(f"cannot write {self.path} ({error.strerror or error})") from error


def save_streamed(model: ir.Model, path: Path, sink: ExternalDataSink) -> Path:
    """Write ``model`` to ``path`` (in ``sink``'s folder) with every large initializer in ``sink``'s
    file: those not yet spilled (float weights still read from the input, in-memory tensors) are
    appended one at a time, so memory holds one tensor; the protobuf holds only references."""
    if Path(path).parent.resolve() != sink.folder.resolve():
        raise OutputPathError(f"{path}: a streamed model is saved beside its data file {sink.path}")
    for value in list(model.graph.initializers.values()):
        sink.spill(value)
    sink.close()
    proto = ir.serde.serialize_model(model)
    try:
        Path(path).write_bytes(proto.SerializeToString())
    except OSError as error:
        raise OutputPathError(f"cannot write {path} ({error.strerror or error})") from error
    logger.info("saved %s with %d tensors (%.2f GB) streamed into %s", path, sink.spilled, sink.offset / 1e9, sink.name)
    return Path(path)


def save_verified(model: ir.Model, path: str | os.PathLike, verify: Callable[[Path], object]) -> list[Path]:
    """Save ``model`` into a staging folder beside ``path``, run ``verify`` on the staged file, and only
    then move the files into place: a model that fails verification never appears at ``path``."""
    destination = Path(path)
    with staging_dir(destination) as staging:
        staged = staging / destination.name
        save_model(model, staged)
        verify(staged)
        return move_staged_into_place(staging, destination)


def move_staged_into_place(staging: Path, destination: Path) -> list[Path]:
    """Move every file of ``staging`` into ``destination``'s folder (``os.replace``: atomic per file);
    a failure is an :class:`OutputPathError`. Returns the paths written."""
    written = []
    try:
        for item in sorted(staging.iterdir()):
            os.replace(item, destination.parent / item.name)
            written.append(destination.parent / item.name)
    except OSError as error:
        raise OutputPathError(f"cannot move {destination} into place ({error.strerror or error})") from error
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
