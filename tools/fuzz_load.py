"""Fuzz graphq's ONNX loading and validation path on mutated small ONNX files, for a bounded time.

Each example starts from a small valid seed model (a MatMul + Add graph, embedded or with its weights in
``model.onnx.data``, or any ``--seed-model``), applies mutations drawn by hypothesis (byte flips,
truncations, inserted bytes; and structured ones: external-data ``location`` / ``offset`` / ``length``
entries, dims, data types, ``raw_data``, node inputs and outputs, opset and IR versions; a truncated,
removed or replaced data file) and runs what ``graphq optimize`` / ``quantize`` / ``eval`` run on a model
before touching it:

    resolve_model_file -> load_model -> every initializer read as numpy -> save_model -> verify_model_file

Any exception other than :class:`~graphq.errors.GraphqError` is a crash, and so is a process that dies
(the target runs in a forked child, so a segfault in a native library is reported, not fatal). Each
distinct crash (exception type and the line of graphq code it escaped from) is shrunk by hypothesis and
its reproducer written to ``--findings`` (``<n>/model.onnx`` and ``<n>/model.onnx.data``).

    python tools/fuzz_load.py --minutes 10 [--seed 0] [--findings runs/fuzz] [--seed-model M.onnx]

The table of findings goes to stdout; the exit status is 1 when anything crashed. ``fuzz(...)`` is the
same run as a function (the tests call it for a few seconds with a fixed seed).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import pickle
import shutil
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

logger = logging.getLogger("fuzz_load")

MODEL = "model.onnx"
DATA = "model.onnx.data"
HOSTILE_LOCATIONS = ("../outside.bin", "/etc/passwd", "", ".", "model.onnx", "sub/../../outside.bin", "a\0b",
                     "missing.bin", "model.onnx.data/../../x", "C:\\windows\\x", "~/x", "model.onnx.data\n")
HOSTILE_NUMBERS = ("0", "-1", "-64", "abc", "", "1e3", "18446744073709551616", " 16", "0x10", "99999999999")


@dataclasses.dataclass(frozen=True)
class Example:
    """The files of one fuzzed model: ``model.onnx`` bytes and, optionally, ``model.onnx.data`` bytes."""

    model: bytes
    data: bytes | None


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What the target did: ``ok`` (loaded, or refused with a GraphqError), else the crash."""

    ok: bool
    kind: str = ""  # exception type, or "signal N"
    where: str = ""  # the innermost graphq frame it escaped from
    message: str = ""

    @property
    def key(self) -> tuple[str, str]:
        return (self.kind, self.where)


@dataclasses.dataclass(frozen=True)
class Finding:
    outcome: Outcome
    example: Example


class Crash(Exception):
    """Raised inside the hypothesis test so that it shrinks the example."""

    def __init__(self, outcome: Outcome) -> None:
        super().__init__(f"{outcome.kind} at {outcome.where}: {outcome.message}")
        self.outcome = outcome


# ------------------------------------------------------------------------------------------------
# Seeds


def _seed_graph(external: bool) -> Example:
    """y = (x @ W) + b with W [8, 4] and b [4]; with ``external``, W and b live in ``model.onnx.data``."""
    rng = np.random.default_rng(0)
    weight = rng.standard_normal((8, 4)).astype(np.float32)
    bias = rng.standard_normal(4).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="/model/layers.0/mlp/MatMul"),
             helper.make_node("Add", ["h", "b"], ["y"], name="/model/layers.0/mlp/Add")]
    initializers = [numpy_helper.from_array(weight, "W"), numpy_helper.from_array(bias, "b")]
    data = None
    if external:
        blob = b""
        for tensor in initializers:
            raw = tensor.raw_data
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            for key, value in (("location", DATA), ("offset", str(len(blob))), ("length", str(len(raw)))):
                tensor.external_data.add(key=key, value=value)
            blob += raw
        data = blob
    graph = helper.make_graph(nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    return Example(model.SerializeToString(), data)


def seed_examples(seed_model: Path | None = None) -> list[Example]:
    """The seeds: the small graph embedded and external, and ``seed_model`` (with its data file) if given."""
    seeds = [_seed_graph(external=False), _seed_graph(external=True)]
    if seed_model is not None:
        proto = onnx.load(str(seed_model), load_external_data=True)
        onnx.external_data_helper.convert_model_to_external_data(proto, location=DATA, size_threshold=256)
        with tempfile.TemporaryDirectory() as tmp:
            onnx.save_model(proto, str(Path(tmp) / MODEL))
            data_path = Path(tmp) / DATA
            seeds.append(Example((Path(tmp) / MODEL).read_bytes(), data_path.read_bytes() if data_path.exists() else None))
    return seeds


# ------------------------------------------------------------------------------------------------
# Mutations (hypothesis strategies over functions Example -> Example)


def _bytes_mutation(draw) -> Callable[[bytes], bytes]:
    kind = draw(st.sampled_from(["flip", "truncate", "insert", "overwrite"]))
    position = draw(st.floats(0, 1, allow_nan=False))
    if kind == "flip":
        masks = draw(st.lists(st.integers(1, 255), min_size=1, max_size=8))

        def flip(data: bytes) -> bytes:
            out = bytearray(data)
            start = int(position * max(len(out) - 1, 0))
            for offset, mask in enumerate(masks):
                if start + offset < len(out):
                    out[start + offset] ^= mask
            return bytes(out)
        return flip
    if kind == "truncate":
        return lambda data: data[: int(position * len(data))]
    chunk = draw(st.binary(min_size=1, max_size=16))
    if kind == "insert":
        return lambda data: data[: int(position * len(data))] + chunk + data[int(position * len(data)):]
    return lambda data: data[: int(position * len(data))] + chunk + data[int(position * len(data)) + len(chunk):]


def _tensor_mutation(draw) -> Callable[[onnx.TensorProto], None]:
    kind = draw(st.sampled_from(["location", "offset", "length", "drop_entry", "duplicate_entry", "dims",
                                 "data_type", "raw_data", "to_external", "to_embedded", "typed_data"]))
    text = draw(st.one_of(st.sampled_from(HOSTILE_NUMBERS), st.integers(-2**40, 2**40).map(str)))
    location = draw(st.one_of(st.sampled_from(HOSTILE_LOCATIONS), st.text(max_size=12)))
    dims = draw(st.lists(st.integers(-3, 2**33), max_size=4))
    data_type = draw(st.integers(0, 30))
    cut = draw(st.integers(0, 64))

    def set_entry(tensor: onnx.TensorProto, key: str, value: str) -> None:
        for entry in tensor.external_data:
            if entry.key == key:
                entry.value = value
                return
        tensor.external_data.add(key=key, value=value)

    def mutate(tensor: onnx.TensorProto) -> None:
        if kind == "location":
            set_entry(tensor, "location", location)
        elif kind in ("offset", "length"):
            set_entry(tensor, kind, text)
        elif kind == "drop_entry" and tensor.external_data:
            del tensor.external_data[cut % len(tensor.external_data)]
        elif kind == "duplicate_entry" and tensor.external_data:
            entry = tensor.external_data[cut % len(tensor.external_data)]
            tensor.external_data.add(key=entry.key, value=entry.value)
        elif kind == "dims":
            del tensor.dims[:]
            tensor.dims.extend(dims)
        elif kind == "data_type":
            tensor.data_type = data_type
        elif kind == "raw_data":
            tensor.raw_data = tensor.raw_data[: max(len(tensor.raw_data) - cut, 0)]
        elif kind == "to_external":
            tensor.ClearField("raw_data")
            tensor.data_location = TensorProto.EXTERNAL
            set_entry(tensor, "location", location or DATA)
        elif kind == "to_embedded":
            tensor.data_location = TensorProto.DEFAULT
        elif kind == "typed_data":
            tensor.ClearField("raw_data")
            tensor.float_data.extend([0.0] * (cut % 7))
    return mutate


def _graph_mutation(draw) -> Callable[[onnx.ModelProto], None]:
    kind = draw(st.sampled_from(["rename_input", "rename_output", "swap_nodes", "drop_node", "op_type", "domain",
                                 "opset", "ir_version", "drop_opsets", "drop_graph_output", "attribute"]))
    name = draw(st.sampled_from(["x", "W", "b", "h", "y", "", "nowhere"]))
    number = draw(st.integers(-5, 40))
    op_type = draw(st.sampled_from(["MatMul", "Add", "Frobnicate", "If", "Loop", "Gather", "", "Constant"]))
    domain = draw(st.sampled_from(["com.microsoft", "com.example.evil", "ai.onnx.ml", "x" * 40]))

    def mutate(model: onnx.ModelProto) -> None:
        nodes = model.graph.node
        if not nodes:
            return
        node = nodes[abs(number) % len(nodes)]
        if kind == "rename_input" and node.input:
            node.input[abs(number) % len(node.input)] = name
        elif kind == "rename_output" and node.output:
            node.output[abs(number) % len(node.output)] = name
        elif kind == "swap_nodes" and len(nodes) > 1:
            first, second = onnx.NodeProto(), onnx.NodeProto()
            first.CopyFrom(nodes[0])
            second.CopyFrom(nodes[-1])
            nodes[0].CopyFrom(second)
            nodes[-1].CopyFrom(first)
        elif kind == "drop_node":
            del nodes[abs(number) % len(nodes)]
        elif kind == "op_type":
            node.op_type = op_type
        elif kind == "domain":
            node.domain = domain
        elif kind == "opset" and model.opset_import:
            model.opset_import[0].version = number
        elif kind == "ir_version":
            model.ir_version = number
        elif kind == "drop_opsets":
            del model.opset_import[:]
        elif kind == "drop_graph_output":
            del model.graph.output[:]
        elif kind == "attribute":
            node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(np.zeros(2, np.float32))))

    return mutate


@st.composite
def mutated_examples(draw, seeds: list[Example]) -> Example:
    """A seed with 1-3 structured mutations, then possibly byte-level ones on either file."""
    example = draw(st.sampled_from(seeds))
    proto = onnx.ModelProto()
    proto.ParseFromString(example.model)
    for _ in range(draw(st.integers(0, 3))):
        if draw(st.booleans()) and len(proto.graph.initializer):
            tensor = proto.graph.initializer[draw(st.integers(0, len(proto.graph.initializer) - 1))]
            _tensor_mutation(draw)(tensor)
        else:
            _graph_mutation(draw)(proto)
    model = proto.SerializeToString()
    data = example.data
    if draw(st.booleans()):
        model = _bytes_mutation(draw)(model)
    data_action = draw(st.sampled_from(["keep", "keep", "mutate", "remove", "empty"]))
    if data_action == "mutate" and data is not None:
        data = _bytes_mutation(draw)(data)
    elif data_action == "remove":
        data = None
    elif data_action == "empty":
        data = b""
    return Example(model, data)


# ------------------------------------------------------------------------------------------------
# The target


def _innermost_graphq_frame(error: BaseException) -> str:
    frames = [frame for frame in traceback.extract_tb(error.__traceback__) if "graphq" in frame.filename
              or "/passes/" in frame.filename or "/models/" in frame.filename]
    frame = frames[-1] if frames else traceback.extract_tb(error.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno} ({frame.name})"


def load_path(folder: Path) -> None:
    """What graphq does with a model before working on it; raises GraphqError for bad input."""
    from graphq.modelio import load_model, resolve_model_file, save_model
    from graphq.verify import verify_model_file

    source = resolve_model_file(folder)
    model = load_model(source)
    for value in model.graph.initializers.values():
        if value.const_value is not None:
            value.const_value.numpy()
    saved = folder / "out" / MODEL
    save_model(model, saved)
    verify_model_file(saved)


def _run_in_process(folder: Path) -> Outcome:
    from graphq.errors import GraphqError

    try:
        load_path(folder)
    except GraphqError:
        return Outcome(ok=True)
    except Exception as error:  # everything else is what the fuzzer looks for
        root = error
        while root.__cause__ is not None:  # onnx_ir wraps the real error in SerdeError
            root = root.__cause__
        message = str(root).strip().splitlines()[0][:300] if str(root).strip() else ""
        kind = type(error).__name__ + (f" <- {type(root).__name__}" if root is not error else "")
        return Outcome(ok=False, kind=kind, where=_innermost_graphq_frame(error), message=message)
    return Outcome(ok=True)


def run_target(example: Example, *, fork: bool = True) -> Outcome:
    """Write ``example`` to a fresh folder and run :func:`load_path` on it (in a forked child with ``fork``)."""
    with tempfile.TemporaryDirectory(prefix="graphq-fuzz-") as tmp:
        folder = Path(tmp) / "m"
        folder.mkdir()
        (folder / MODEL).write_bytes(example.model)
        if example.data is not None:
            (folder / DATA).write_bytes(example.data)
        (Path(tmp) / "outside.bin").write_bytes(b"\0" * 64)
        if not fork:
            return _run_in_process(folder)
        return _run_forked(folder)


def _run_forked(folder: Path) -> Outcome:
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: run, send the outcome, leave without running the parent's cleanup
        os.close(read_end)
        code = 0
        try:
            outcome = _run_in_process(folder)
            os.write(write_end, pickle.dumps(outcome))
        except BaseException:  # noqa: BLE001 - the child must always reach os._exit
            code = 1
        finally:
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as pipe:
        payload = pipe.read()
    _, status = os.waitpid(pid, 0)
    if payload:
        return pickle.loads(payload)
    if os.WIFSIGNALED(status):
        return Outcome(ok=False, kind=f"signal {os.WTERMSIG(status)}", where="native code", message="the process died")
    return Outcome(ok=False, kind=f"exit {os.WEXITSTATUS(status)}", where="child", message="no outcome reported")


# ------------------------------------------------------------------------------------------------
# The run


@dataclasses.dataclass(frozen=True)
class FuzzReport:
    examples: int
    seconds: float
    findings: tuple[Finding, ...]

    def table(self) -> str:
        lines = [f"{self.examples} examples in {self.seconds:.0f}s; {len(self.findings)} distinct crash(es)"]
        for index, finding in enumerate(self.findings):
            o = finding.outcome
            lines.append(f"  [{index}] {o.kind} at {o.where}: {o.message}")
        return "\n".join(lines)


def fuzz(seconds: float, *, seed: int = 0, batch: int = 50, seed_model: Path | None = None, fork: bool = True,
         max_examples: int | None = None) -> FuzzReport:
    """Run batches of ``batch`` examples (hypothesis seeds ``seed``, ``seed + 1``, ...) until ``seconds``
    have passed (or ``max_examples`` were tried); every distinct crash is shrunk and kept."""
    seeds = seed_examples(seed_model)
    for example in seeds:  # imports graphq once, before forking, and checks that every seed loads
        outcome = run_target(example, fork=False)
        if not outcome.ok:
            raise RuntimeError(f"a seed model does not load: {outcome}")
    findings: dict[tuple[str, str], Finding] = {}
    counter = {"examples": 0}
    failing: dict[str, Example] = {}  # hypothesis replays the minimal example last
    start = time.monotonic()
    round_index = 0
    while time.monotonic() - start < seconds and (max_examples is None or counter["examples"] < max_examples):
        @hypothesis_seed(seed + round_index)
        @settings(max_examples=batch, deadline=None, database=None, derandomize=False,
                  phases=[Phase.generate, Phase.shrink], suppress_health_check=list(HealthCheck))
        @given(mutated_examples(seeds))
        def one(example: Example) -> None:
            counter["examples"] += 1
            outcome = run_target(example, fork=fork)
            if not outcome.ok and outcome.key not in findings:
                failing["example"] = example
                raise Crash(outcome)

        try:
            one()
        except Crash as crash:  # already shrunk by hypothesis: the minimal example is the last one raised
            findings[crash.outcome.key] = Finding(crash.outcome, failing.get("example"))
            logger.warning("crash: %s", crash)
        round_index += 1
    return FuzzReport(counter["examples"], time.monotonic() - start, tuple(findings.values()))


def write_findings(report: FuzzReport, folder: Path) -> None:
    """Each finding's reproducer as ``folder/<n>/model.onnx`` (+ ``model.onnx.data``) and a summary JSON."""
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    summary = []
    for index, finding in enumerate(report.findings):
        case = folder / str(index)
        case.mkdir()
        if finding.example is not None:
            (case / MODEL).write_bytes(finding.example.model)
            if finding.example.data is not None:
                (case / DATA).write_bytes(finding.example.data)
        summary.append(dataclasses.asdict(finding.outcome))
    (folder / "findings.json").write_text(json.dumps({"examples": report.examples, "seconds": round(report.seconds, 1),
                                                      "findings": summary}, indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to fuzz")
    parser.add_argument("--seed", type=int, default=0, help="hypothesis seed of the first batch")
    parser.add_argument("--batch", type=int, default=50, help="examples per hypothesis run")
    parser.add_argument("--seed-model", type=Path, default=None, help="an extra seed .onnx file (e.g. the tiny Llama)")
    parser.add_argument("--findings", type=Path, default=None, help="folder for reproducers and findings.json")
    parser.add_argument("--no-fork", action="store_true", help="run the target in this process (faster; a native crash ends the run)")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")  # onnx_ir and hypothesis warn about the very inputs this feeds them
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s")
    for noisy in ("onnx_ir", "graphq"):
        logging.getLogger(noisy).setLevel(logging.CRITICAL)
    report = fuzz(args.minutes * 60, seed=args.seed, batch=args.batch, seed_model=args.seed_model, fork=not args.no_fork)
    print(report.table())
    if args.findings is not None:
        write_findings(report, args.findings)
    return 1 if report.findings else 0


if __name__ == "__main__":
    sys.exit(main())
