"""Replay a decoder graph from any stage with substituted weights: the engine of sensitivity analysis.

The graph is cut into stages by :func:`graphq.blockwise.partition` (the prelude, one stage per
decoder block, the final norm and LM head). Each stage becomes one ONNX Runtime session in which
the weights of the quantizable MatMuls (constant ``W [K, N]``, or the constant ``E`` a tied LM head
reads as ``Transpose(E)``) are graph *inputs*, so any weight can be swapped per run without
rebuilding a session.

**Float pass.** For each batch of calibration windows every stage runs once with the float weights;
every tensor that crosses a stage boundary is kept (per batch; tensors computed from constants only,
such as the transposed tied embedding, once), and so are the float model's next-token
log-probabilities ``log p`` (float32 ``[B, T, V]``). Callers may also ask for statistics of tensors
computed inside the stages (MatMul inputs), streamed into accumulators.

**Replay.** Perturbing weights first read in stage ``s`` changes nothing before ``s``: stages
``s .. end`` run again, fed the cached inputs of stage ``s`` (and the cached outputs of earlier
stages that later stages read, e.g. rotary tables). The stage that produces the logits is extended
by a few ops so that ONNX Runtime returns, per position ``t``,

    KL_t  = sum_v p_{t,v} (log p_{t,v} - log q_{t,v})      (float reference p, perturbed q)
    NLL_t = -log q_t(x_{t+1})

instead of the ``[B, T, V]`` logits; the last position (no next token) is dropped. Replaying with the
float weights reproduces the reference bit for bit (same sessions, same inputs), so ``KL = 0``
exactly and any non-zero value is the perturbation's.

Cost: one forward of stages ``s .. end`` per batch and replay. Memory: the float weights (fed, not
copied, to the sessions), the cached boundary tensors, and ``log p`` (``windows x T x V`` float32).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphq.blockwise import Stage, block_of, partition, stage_model
from graphq.errors import GraphqError
from graphq.runtime import build_feeds, signature_of_model

logger = logging.getLogger(__name__)

REF_LOGP, TARGETS = "graphq_ref_logp", "graphq_targets"
LOGP, KL, NLL = "graphq_logp", "graphq_kl", "graphq_nll"
MIN_OPSET = 13  # ReduceSum / Unsqueeze with axes as inputs


@dataclasses.dataclass(frozen=True)
class QuantizableNode:
    """A MatMul ``x @ W`` with a constant weight, and where its weight enters the staged graph."""

    name: str
    weight: str  # the initializer fed as a stage input: W itself, or E for W = Transpose(E)
    transposed: bool  # True for a tied LM head reading Transpose(E)
    activation: str  # the MatMul's input x
    stage: int  # index of the stage the MatMul runs in
    first_stage: int  # index of the first stage that reads ``weight`` (where a replay starts)
    block: int | None
    k: int
    n: int

    @property
    def weights(self) -> int:
        return self.k * self.n


def quantizable_nodes(model: ir.Model, stages: list[Stage]) -> list[QuantizableNode]:
    """Every MatMul whose weight is a 2-D float constant or the transpose of one, in graph order."""
    stage_of = {id(node): index for index, stage in enumerate(stages) for node in stage.nodes}
    found = []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2 or node.inputs[0] is None:
            continue
        value, transposed = node.inputs[1], False
        if value is None or value.is_graph_input():
            continue
        if value.const_value is None:
            producer = value.producer()
            if (producer is None or producer.op_type != "Transpose"
                    or list(producer.attributes.get_ints("perm", [1, 0])) != [1, 0]):
                continue
            value, transposed = producer.inputs[0], True
            if value is None or value.const_value is None or value.is_graph_input():
                continue
        shape = tuple(value.const_value.shape)
        if len(shape) != 2 or value.const_value.dtype != ir.DataType.FLOAT:
            continue
        k, n = (shape[1], shape[0]) if transposed else shape
        first = min(stage_of[id(use.node)] for use in value.uses())
        found.append(QuantizableNode(node.name, value.name, transposed, node.inputs[0].name, stage_of[id(node)], first,
                                     block_of(node.name), int(k), int(n)))
    return found


@dataclasses.dataclass(frozen=True)
class ReplayResult:
    """Per-position KL and NLL ``[windows, T - 1]`` of one replay."""

    kl: np.ndarray
    nll: np.ndarray


def _extend_with_divergence(proto: onnx.ModelProto, logits: str, reference: bool) -> None:
    """Append ``log q = LogSoftmax(logits)`` and either output it (reference) or KL/NLL against a fed
    ``log p`` and next-token ids (module docstring). The ``logits`` output itself is dropped."""
    graph, make = proto.graph, onnx.helper.make_node
    kept = [output for output in graph.output if output.name != logits]
    del graph.output[:]
    graph.output.extend(kept)
    graph.node.append(make("LogSoftmax", [logits], [LOGP], axis=-1, name="graphq/LogSoftmax"))
    if reference:
        graph.output.append(onnx.helper.make_tensor_value_info(LOGP, onnx.TensorProto.FLOAT, None))
        return
    graph.input.append(onnx.helper.make_tensor_value_info(REF_LOGP, onnx.TensorProto.FLOAT, None))
    graph.input.append(onnx.helper.make_tensor_value_info(TARGETS, onnx.TensorProto.INT64, None))
    last = onnx.helper.make_tensor("graphq_last_axis", onnx.TensorProto.INT64, [1], [-1])
    graph.initializer.append(last)
    graph.node.extend([
        make("Sub", [REF_LOGP, LOGP], ["graphq_log_ratio"], name="graphq/Sub"),
        make("Exp", [REF_LOGP], ["graphq_p"], name="graphq/Exp"),
        make("Mul", ["graphq_p", "graphq_log_ratio"], ["graphq_kl_terms"], name="graphq/Mul"),
        make("ReduceSum", ["graphq_kl_terms", last.name], [KL], keepdims=0, name="graphq/ReduceSum"),
        make("Unsqueeze", [TARGETS, last.name], ["graphq_targets_1"], name="graphq/Unsqueeze"),
        make("GatherElements", [LOGP, "graphq_targets_1"], ["graphq_target_logp"], axis=-1, name="graphq/GatherElements"),
        make("Squeeze", ["graphq_target_logp", last.name], ["graphq_target_logp_0"], name="graphq/Squeeze"),
        make("Neg", ["graphq_target_logp_0"], [NLL], name="graphq/Neg"),
    ])
    graph.output.extend([onnx.helper.make_tensor_value_info(KL, onnx.TensorProto.FLOAT, None),
                         onnx.helper.make_tensor_value_info(NLL, onnx.TensorProto.FLOAT, None)])


class StageReplay:
    """Float pass and replays of ``model`` over token ``windows`` ``[W, T]`` (module docstring)."""

    def __init__(self, model: ir.Model, windows: np.ndarray, *, batch: int = 1, threads: int = 2) -> None:
        windows = np.asarray(windows, dtype=np.int64)
        if windows.ndim != 2 or windows.shape[1] < 2:
            raise GraphqError(f"replay windows must be [windows, tokens >= 2], got shape {windows.shape}")
        stages = partition(model)
        if stages is None:
            raise GraphqError("sensitivity analysis needs a decoder graph that can be cut into blocks "
                              "(node names like /model/layers.<i>/...); this graph cannot")
        if model.opset_imports.get("", 0) < MIN_OPSET:
            raise GraphqError(f"sensitivity analysis needs default-domain opset >= {MIN_OPSET}, "
                              f"the model has {model.opset_imports.get('', 0)}")
        signature = signature_of_model(model)
        if signature.main_output != "logits":
            raise GraphqError("sensitivity analysis needs a causal language model with a 'logits' output")
        self.model = model
        self.stages = stages
        self.nodes = quantizable_nodes(model, stages)
        if not self.nodes:
            raise GraphqError("the model has no MatMul with a constant weight to analyse")
        self.threads = threads
        self.windows = windows
        self.batches = [windows[i:i + batch] for i in range(0, len(windows), batch)]
        self.weights: dict[str, np.ndarray] = {}
        for node in self.nodes:
            if node.weight not in self.weights:
                value = next(v for v in _initializer_values(model) if v.name == node.weight)
                self.weights[node.weight] = np.ascontiguousarray(value.const_value.numpy(), dtype=np.float32)
        self._fed: dict[int, list[str]] = {}
        for index, stage in enumerate(stages):
            read = {v.name for n in stage.nodes for v in n.inputs if v is not None}
            self._fed[index] = [name for name in self.weights if name in read]
        self.logits_stage = next(i for i, s in enumerate(stages) if any(v.name == "logits" for n in s.nodes for v in n.outputs))
        self._feeds = [build_feeds(signature, ids) for ids in self.batches]
        self._targets = [np.concatenate([ids[:, 1:], np.zeros((len(ids), 1), dtype=np.int64)], axis=1) for ids in self.batches]
        self._cache: list[dict[str, np.ndarray]] = []
        self._shared: dict[str, np.ndarray] = {}
        self._ref_logp: list[np.ndarray] = []
        self._sessions: dict[tuple[int, str], ort.InferenceSession] = {}
        self._later_inputs = [set().union(*(s.inputs for s in stages[i + 1:])) for i in range(len(stages))]
        self.float_nll: np.ndarray | None = None

    # -- sessions --------------------------------------------------------------------------------

    def _session(self, index: int, kind: str, env: Mapping[str, np.ndarray], extra: Iterable[str] = ()) -> ort.InferenceSession:
        key = (index, kind)
        if key not in self._sessions:
            stage = self.stages[index]
            types = {name: env[name].dtype for name in stage.inputs}
            if kind == "compare":
                outputs = ["logits"]
            else:
                outputs = list(dict.fromkeys([*(["logits"] if kind == "reference" else stage.outputs), *extra]))
            proto = onnx.load_from_string(stage_model(self.model, stage, outputs, types, as_inputs=self._fed[index]))
            if kind in ("reference", "compare"):
                _extend_with_divergence(proto, "logits", reference=kind == "reference")
            options = ort.SessionOptions()
            options.intra_op_num_threads = self.threads
            options.inter_op_num_threads = 1
            options.log_severity_level = 3
            # No per-session arena: 30+ sessions would each keep their peak (the logits stage's
            # [B, T, V] buffers included) for the whole analysis.
            options.enable_cpu_mem_arena = False
            try:
                self._sessions[key] = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
            except Exception as error:  # ORT raises its own exception types from C++
                raise GraphqError(f"replay: ONNX Runtime cannot load {stage.label}: {_first_line(error)}") from error
        return self._sessions[key]

    def _run(self, index: int, kind: str, env: Mapping[str, np.ndarray], weights: Mapping[str, np.ndarray],
             outputs: list[str], extra_feeds: Mapping[str, np.ndarray] | None = None,
             extra_outputs: Iterable[str] = ()) -> list[np.ndarray]:
        session = self._session(index, kind, env, extra_outputs)
        feeds = {name: env[name] for name in self.stages[index].inputs}
        feeds.update({name: weights.get(name, self.weights[name]) for name in self._fed[index]})
        feeds.update(extra_feeds or {})
        try:
            return session.run(outputs, feeds)
        except Exception as error:
            raise GraphqError(f"replay: {self.stages[index].label} failed: {_first_line(error)}") from error

    # -- float pass -------------------------------------------------------------------------------

    def float_pass(self, tensors: Iterable[str] = (), on_tensor: Callable[[str, np.ndarray], None] | None = None,
                   on_stage_inputs: Callable[[int, Mapping[str, np.ndarray]], None] | None = None,
                   progress: Callable[[], None] | None = None) -> None:
        """Run every stage with the float weights over every batch; cache what replays need.

        ``tensors`` computed inside stages are passed to ``on_tensor(name, array)``; each stage's
        inputs to ``on_stage_inputs(stage_index, env)``."""
        wanted = set(tensors)
        produced = {index: [v.name for n in s.nodes for v in n.outputs if v.name in wanted] for index, s in enumerate(self.stages)}
        self._cache, self._ref_logp, nll = [], [], []
        for b, feeds in enumerate(self._feeds):
            env = collections.ChainMap({}, self._shared, dict(feeds))
            for index, stage in enumerate(self.stages[: self.logits_stage + 1]):
                if on_stage_inputs is not None:
                    on_stage_inputs(index, env)
                if index == self.logits_stage:
                    logp, *arrays = self._run(index, "reference", env, {}, [LOGP, *produced[index]],
                                              extra_outputs=produced[index])
                    self._ref_logp.append(logp)
                    tgt = self._targets[b]
                    nll.append(-np.take_along_axis(logp, tgt[..., None], axis=-1)[..., 0][:, :-1])
                    for name, array in zip(produced[index], arrays):
                        if on_tensor is not None:
                            on_tensor(name, array)
                    break
                names = list(dict.fromkeys([*stage.outputs, *produced[index]]))
                arrays = self._run(index, "float", env, {}, names, extra_outputs=produced[index])
                for name, array in zip(names, arrays):
                    if name in stage.outputs:
                        if name in stage.window_independent:
                            self._shared.setdefault(name, array)
                        else:
                            env.maps[0][name] = array
                    if name in produced[index] and on_tensor is not None:
                        on_tensor(name, array)
            self._cache.append(env.maps[0])
            if progress is not None:
                progress()
        self.float_nll = np.concatenate(nll)
        self._session(self.logits_stage, "compare", env)  # every session exists now: release_model() is safe

    def probability_sums(self) -> np.ndarray:
        """The float model's next-token probabilities summed over every scored position (the last of
        each window has no next token), float64 ``[V]``."""
        if not self._ref_logp:
            raise GraphqError("replay: run the float pass first")
        return sum(np.exp(logp[:, :-1].astype(np.float64)).sum(axis=(0, 1)) for logp in self._ref_logp)

    # -- replays ----------------------------------------------------------------------------------

    def first_stage(self, weights: Iterable[str]) -> int:
        """The first stage that reads any of ``weights`` (initializer names)."""
        starts = [i for i, names in self._fed.items() if set(names) & set(weights)]
        if not starts:
            raise GraphqError(f"replay: none of {sorted(weights)} is a weight of an analysed MatMul")
        return min(starts)

    def replay(self, weights: Mapping[str, np.ndarray], *, start: int | None = None) -> ReplayResult:
        """KL and NLL per position with ``weights`` (initializer name -> array) replacing the float ones,
        running from stage ``start`` (default: the first stage that reads one of them; 0 if none)."""
        if not self._cache:
            raise GraphqError("replay: run the float pass first")
        for name, array in weights.items():
            if name not in self.weights or array.shape != self.weights[name].shape:
                raise GraphqError(f"replay: {name} is not an analysed weight of shape {self.weights.get(name, np.empty(0)).shape}")
        weights = {name: np.ascontiguousarray(array, dtype=np.float32) for name, array in weights.items()}
        if start is None:
            start = self.first_stage(weights) if weights else 0
        elif weights and start > self.first_stage(weights):
            raise GraphqError(f"replay: start stage {start} comes after the first stage reading the weights")
        kl, nll = [], []
        for b, feeds in enumerate(self._feeds):
            env = collections.ChainMap({}, self._cache[b], self._shared, dict(feeds))
            for index in range(start, self.logits_stage + 1):
                stage = self.stages[index]
                if index == self.logits_stage:
                    kl_b, nll_b = self._run(index, "compare", env, weights, [KL, NLL],
                                            {REF_LOGP: self._ref_logp[b], TARGETS: self._targets[b]})
                    kl.append(kl_b[:, :-1])
                    nll.append(nll_b[:, :-1])
                    break
                # Window-independent outputs too: a replay from the prelude recomputes Transpose(E_hat).
                outputs = [name for name in stage.outputs if name in self._later_inputs[index]]
                if outputs:
                    env.maps[0].update(zip(outputs, self._run(index, "float", env, weights, outputs)))
        return ReplayResult(np.concatenate(kl), np.concatenate(nll))

    def release_model(self) -> None:
        """Drop the IR model (and the stages' nodes, which reference it) once every session exists: the
        weights replays feed are in :attr:`weights`, the rest lives in the sessions."""
        self.model = None
        self.stages = [dataclasses.replace(stage, nodes=[]) for stage in self.stages]


def _initializer_values(model: ir.Model) -> Iterable[ir.Value]:
    yield from model.graph.initializers.values()
    for node in model.graph:
        for value in node.inputs:
            if value is not None and value.const_value is not None and value.name not in model.graph.initializers:
                yield value


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
