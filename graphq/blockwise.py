"""Block-by-block (sequential) calibration: each decoder block sees the outputs of the blocks before
it *as already quantized*, and only one block runs at a time.

GPTQ and AWQ (seed 003) quantize a network one block after another so that block ``b``'s inputs
``X_b`` are the ones the deployed model will really produce: ``X_b = f_{b-1}^Q(... f_0^Q(x))`` with
``f^Q`` the already-quantized blocks. Running the whole graph for every block costs ``O(L^2)``
forwards; instead, the graph is cut into *stages* and each stage runs alone on cached inputs:

- A node belongs to block ``b`` when its name matches one of :data:`BLOCK_NAME_PATTERNS`
  (``/model/layers.<b>/...`` for optimum's exports): model knowledge as data.
- Any other node goes with the latest stage it reads from: nodes that read only graph inputs and
  constants (embedding, rotary tables, attention mask) form the prelude, stage ``(-1, 1)``; the final
  norm and the LM head read block ``L-1`` and form stage ``(L-1, 1)``, run right after it. An unnamed
  node that a block's own nodes read from within that block is pulled into the block.
- For each stage, in order: a small ONNX model holding only that stage's nodes and constants is
  built in memory, with the stage's external inputs (the residual stream, masks, rotary tables,
  graph inputs) as graph inputs fed from a per-window cache. :meth:`StagedCalibration.calibrate`
  runs it with the float weights of the stage to collect statistics of chosen tensors (Hessians for
  GPTQ/AWQ); the caller quantizes and writes fake-quantized (dequantized) weights back into the
  graph; :meth:`StagedCalibration.advance` runs it again to produce the stage's outputs for the
  stages after it, and drops cached tensors no later stage reads.

With ``reference=True`` (asymmetric calibration, :mod:`graphq.numerics.asymmetric`) a second cache
follows the *float* model: :meth:`StagedCalibration.hold_reference` keeps the stage's constants as
they are before the caller rounds its weights; :meth:`StagedCalibration.calibrate` with
``reference=True`` feeds each accumulator the pair (tensor in the current model, the same tensor in
the float model: a session built with the held constants swapped in, run on the float cache) window by
window, and :meth:`StagedCalibration.advance` advances the float cache the same way. A stage the caller
did not hold (nothing quantized in it) runs on its current weights; while both caches hold the same
arrays for its inputs (the prelude) the float cache shares the outputs instead of computing them again.
Memory: a second copy of one stage's weights (the held tensors) and a second cache of boundary tensors.

A stage model keeps only the nodes its requested outputs depend on, so calibrating the input of an
early MatMul of a block runs only the part of the block before it.

Cost: two forwards of the model per window in total, whatever the depth (plus one session per stage).
Memory: the weights of one stage (external data is read into the stage's protobuf, then its memory
map is released, so a model larger than RAM calibrates stage by stage) and, per window, the tensors that cross a stage boundary (those
computed from constants alone, such as a transposed tied embedding, are kept once for all windows).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from tqdm.auto import tqdm

from graphq.calibrate import Accumulator
from graphq.errors import GraphqError
from graphq.modelio import release
from graphq.runtime import build_feeds, signature_of_model

logger = logging.getLogger(__name__)

# A node name that matches gives the index of the decoder block the node belongs to.
BLOCK_NAME_PATTERNS: tuple[str, ...] = (
    r"^/model/layers\.(\d+)/",  # optimum llama / mistral / qwen / phi3
    r"^/model/decoder/layers\.(\d+)/",  # opt
    r"^/transformer/h\.(\d+)/",  # gpt2, bloom
    r"^/gpt_neox/layers\.(\d+)/",
    r"/encoder/layer\.(\d+)/",  # bert-like encoders
)
_PATTERNS = tuple(re.compile(p) for p in BLOCK_NAME_PATTERNS)

StageKey = tuple[int, int]  # (block, 0) for a block's own nodes, (block, 1) for what runs after it


def block_of(name: str) -> int | None:
    for pattern in _PATTERNS:
        match = pattern.search(name or "")
        if match:
            return int(match.group(1))
    return None


@dataclass
class Stage:
    key: StageKey
    nodes: list[ir.Node]
    inputs: list[str]  # tensors read from outside the stage (graph inputs or earlier stages)
    outputs: list[str]  # tensors later stages read
    window_independent: frozenset[str] = frozenset()  # outputs computed from constants only

    @property
    def label(self) -> str:
        block, after = self.key
        if block < 0:
            return "prelude"
        return f"block {block}" if not after else f"after block {block}"


def partition(model: ir.Model) -> list[Stage] | None:
    """The stages of ``model`` in execution order, or None when the graph has no block structure
    this module can cut (no named blocks, subgraphs, or a block reading a later stage)."""
    graph = model.graph
    if any(attr.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
           for node in graph for attr in node.attributes.values()):
        logger.info("blockwise: the graph has control-flow subgraphs; not cut into stages")
        return None
    key_of: dict[ir.Node, StageKey] = {}
    for node in graph:
        block = block_of(node.name)
        producers = [key_of[v.producer()] for v in node.inputs if v is not None and v.producer() in key_of]
        if block is not None:
            key_of[node] = (block, 0)
            for value in node.inputs:  # unnamed helpers of this block computed in between
                _pull_into_block(value, block, key_of)
        else:
            latest = max(producers, default=(-1, 1))
            key_of[node] = (latest[0], 1)
    if not any(k[1] == 0 for k in key_of.values()):
        logger.info("blockwise: no node name matches a block pattern; not cut into stages")
        return None
    for node in graph:
        key = key_of[node]
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and key_of[producer] > key:
                logger.info("blockwise: %s (%s) reads %s from a later stage; not cut into stages",
                            node.name, key, value.name)
                return None
    keys = sorted(set(key_of.values()))
    nodes_of: dict[StageKey, list[ir.Node]] = {k: [] for k in keys}
    for node in graph:
        nodes_of[key_of[node]].append(node)
    last_reader: dict[str, StageKey] = {}
    for node in graph:
        for value in node.inputs:
            if value is not None and not _is_constant(value):
                last_reader[value.name] = max(last_reader.get(value.name, key_of[node]), key_of[node])
    constant_derived = set()
    for node in graph:
        if (node.op_type == "Constant" and node.domain == "") or (
                node.inputs and all(v is None or _is_constant(v) or v.name in constant_derived for v in node.inputs)):
            constant_derived.update(v.name for v in node.outputs)
    stages = []
    for key in keys:
        nodes = nodes_of[key]
        produced = {v.name for n in nodes for v in n.outputs}
        inputs = list(dict.fromkeys(v.name for n in nodes for v in n.inputs
                                    if v is not None and not _is_constant(v) and v.name not in produced))
        outputs = [name for name in dict.fromkeys(produced) if last_reader.get(name, key) > key]
        stages.append(Stage(key, nodes, inputs, outputs, frozenset(outputs) & constant_derived))
    return stages


def _pull_into_block(value: ir.Value | None, block: int, key_of: dict[ir.Node, StageKey]) -> None:
    producer = value.producer() if value is not None else None
    if producer is None or key_of.get(producer) != (block, 1):
        return
    key_of[producer] = (block, 0)
    for upstream in producer.inputs:
        _pull_into_block(upstream, block, key_of)


def _is_constant(value: ir.Value) -> bool:
    return value.const_value is not None and not value.is_graph_input()


def _needed_nodes(nodes: list[ir.Node], outputs: Sequence[str]) -> list[ir.Node]:
    """The nodes of ``nodes`` (in order) that ``outputs`` depend on: a stage run for a tensor early in a
    block (q/k/v's input) runs only the nodes before it."""
    needed, kept = set(outputs), []
    for node in reversed(nodes):
        if any(v is not None and v.name in needed for v in node.outputs):
            kept.append(node)
            needed.update(v.name for v in node.inputs if v is not None)
    return kept[::-1]


def stage_model(model: ir.Model, stage: Stage, outputs: Sequence[str], input_types: dict[str, np.dtype], *,
                as_inputs: Iterable[str] = ()) -> bytes:
    """A serialized ONNX model of ``stage``'s nodes and constants, with the stage's external tensors
    as inputs (typed from the arrays that will feed them) and ``outputs`` as outputs. Only the nodes
    ``outputs`` depend on are kept (the stage's inputs all stay graph inputs).

    Constants named in ``as_inputs`` become graph inputs too (after the stage's own inputs, typed and
    shaped from their values), so a caller can feed other values for them at each run."""
    fed = set(as_inputs)
    constants, constant_inputs = {}, {}
    nodes = _needed_nodes(stage.nodes, outputs)
    for node in nodes:
        for value in node.inputs:
            if value is None or not _is_constant(value) or value.name in constants or value.name in constant_inputs:
                continue
            if value.name in fed:
                constant_inputs[value.name] = onnx.helper.make_tensor_value_info(
                    value.name, int(value.const_value.dtype), list(value.const_value.shape))
                continue
            const = value.const_value
            if isinstance(const, ir.ExternalTensor):  # a session built from bytes cannot read external data
                const = ir.Tensor(const.numpy(), name=value.name)
            tensor = ir.serde.serialize_tensor(const)
            tensor.name = value.name
            constants[value.name] = tensor
            del const
            release(value)
    graph = onnx.helper.make_graph(
        [ir.serde.serialize_node(node) for node in nodes],
        f"stage_{stage.key[0]}_{stage.key[1]}",
        [onnx.helper.make_tensor_value_info(name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(input_types[name])), None)
         for name in stage.inputs] + list(constant_inputs.values()),
        [onnx.ValueInfoProto(name=name) for name in outputs],
        initializer=list(constants.values()),
    )
    proto = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid(domain, version) for domain, version in model.opset_imports.items()],
        ir_version=model.ir_version,
    )
    for function in model.functions.values():
        proto.functions.append(ir.serde.serialize_function(function))
    return proto.SerializeToString()


class StagedCalibration:
    """Runs ``model`` one stage at a time over calibration ``windows`` (module docstring).

    The model is read at each stage, so weights the caller changes in place (fake quantization,
    folded scales) are what later stages see. Iterate :meth:`stages`; for each stage, optionally
    :meth:`calibrate`, then always :meth:`advance`.
    """

    def __init__(self, model: ir.Model, stages: list[Stage], windows: np.ndarray, *, threads: int = 2,
                 progress: bool = True, reference: bool = False) -> None:
        self.model = model
        self._stages = stages
        self.threads = threads
        self.progress = progress
        signature = signature_of_model(model)
        self.cache: list[dict[str, np.ndarray]] = [build_feeds(signature, row[None, :].astype(np.int64)) for row in windows]
        # the float model's tensors at the stage boundaries (module docstring), or None
        self.reference: list[dict[str, np.ndarray]] | None = [dict(c) for c in self.cache] if reference else None
        self._held: tuple[StageKey, list[tuple[ir.Value, ir.TensorProtocol | None]]] | None = None

    def stages(self) -> Iterator[Stage]:
        bar = tqdm(total=len(self._stages), desc="blockwise calibration", unit="stage", disable=not self.progress or None)
        try:
            for stage in self._stages:
                bar.set_postfix_str(stage.label)
                yield stage
                bar.update()
        finally:
            bar.close()

    def _session(self, stage: Stage, outputs: Sequence[str]) -> ort.InferenceSession:
        types = {name: self.cache[0][name].dtype for name in stage.inputs}
        options = ort.SessionOptions()
        options.intra_op_num_threads = self.threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 4  # errors surface as exceptions; ORT's log would add stderr lines
        try:
            return ort.InferenceSession(stage_model(self.model, stage, outputs, types), options,
                                        providers=["CPUExecutionProvider"])
        except Exception as error:  # ORT raises its own exception types from C++
            raise GraphqError(f"blockwise calibration: ONNX Runtime cannot load {stage.label}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from error

    def _run(self, stage: Stage, outputs: Sequence[str], *, session: ort.InferenceSession | None = None,
             cache: list[dict[str, np.ndarray]] | None = None) -> Iterator[tuple[int, list[np.ndarray]]]:
        session = session or self._session(stage, outputs)
        for index, cached in enumerate(self.cache if cache is None else cache):
            try:
                yield index, session.run(list(outputs), {name: cached[name] for name in stage.inputs})
            except GraphqError:
                raise
            except Exception as error:
                raise GraphqError(f"blockwise calibration: {stage.label} failed on window {index}: "
                                  f"{str(error).strip().splitlines()[0]}") from error

    def hold_reference(self, stage: Stage) -> None:
        """Keep ``stage``'s current constants (before the caller rounds its weights) as its float
        reference, used by :meth:`calibrate` (``reference=True``) and :meth:`advance`: references to the
        tensors, which the caller replaces rather than changes (one extra copy of the stage's weights)."""
        if self.reference is None:
            raise GraphqError("blockwise calibration: hold_reference needs a StagedCalibration built with reference=True")
        values = dict.fromkeys(v for n in stage.nodes for v in n.inputs if v is not None and _is_constant(v))
        self._held = (stage.key, [(value, value.const_value) for value in values])

    def _reference_session(self, stage: Stage, outputs: Sequence[str]) -> ort.InferenceSession:
        """A session of ``stage`` built with the held float constants swapped in (then swapped back)."""
        if self._held is None or self._held[0] != stage.key:
            raise GraphqError(f"blockwise calibration: no float reference held for {stage.label} (call hold_reference first)")
        current = [(value, value.const_value) for value, _ in self._held[1]]
        try:
            for value, tensor in self._held[1]:
                value.const_value = tensor
            return self._session(stage, outputs)
        finally:
            for value, tensor in current:
                value.const_value = tensor

    def calibrate(self, stage: Stage, tensor_names: Iterable[str], make_accumulator: Callable[[], Accumulator], *,
                  reference: bool = False) -> dict[str, Accumulator]:
        """Statistics of ``tensor_names`` (computed inside ``stage``) over every window. ``reference``: each
        accumulator's ``update(array, reference_array)`` also gets the tensor of the float model
        (:meth:`hold_reference`), window by window."""
        names = list(dict.fromkeys(tensor_names))
        stats = {name: make_accumulator() for name in names}
        if not names:
            return stats
        references = (self._run(stage, names, session=self._reference_session(stage, names), cache=self.reference)
                      if reference else None)
        for index, arrays in self._run(stage, names):
            paired = next(references)[1] if references is not None else None
            for position, (name, array) in enumerate(zip(names, arrays)):
                try:
                    if paired is None:
                        stats[name].update(array)
                    else:
                        stats[name].update(array, paired[position])
                except ValueError as error:
                    raise GraphqError(f"tensor '{name}' in calibration window {index}: {error}") from error
        return stats

    def _store_outputs(self, stage: Stage, cache: list[dict[str, np.ndarray]], *,
                       session: ort.InferenceSession | None = None,
                       also: list[dict[str, np.ndarray]] | None = None) -> None:
        """Run ``stage`` on ``cache`` and add its outputs to it (and to ``also``, window by window)."""
        for index, arrays in self._run(stage, stage.outputs, session=session, cache=cache):
            computed = dict(zip(stage.outputs, arrays))
            for name in stage.window_independent:  # e.g. a transposed weight: keep one copy, not one per window
                computed[name] = cache[0].get(name, computed[name])
            cache[index].update(computed)
            if also is not None:
                also[index].update(computed)

    def advance(self, stage: Stage) -> None:
        """Compute ``stage``'s outputs with the model's current weights (and the float cache's with the
        held reference); forget what no later stage reads."""
        if stage.outputs:
            held = self._held if self._held is not None and self._held[0] == stage.key else None
            shared = self.reference is not None and held is None and all(
                ref.get(name) is cached.get(name) for ref, cached in zip(self.reference, self.cache) for name in stage.inputs)
            self._store_outputs(stage, self.cache, also=self.reference if shared else None)
            if self.reference is not None and not shared:
                session = self._reference_session(stage, stage.outputs) if held is not None else None
                self._store_outputs(stage, self.reference, session=session)
        self._held = None
        later = {name for s in self._stages if s.key > stage.key for name in s.inputs}
        for cache in (self.cache, self.reference or []):
            for cached in cache:
                for name in [n for n in cached if n not in later]:
                    del cached[name]
