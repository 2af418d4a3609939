"""Emit weight-only quantized MatMuls (``y = x @ W_hat``, activations stay float).

Input: for each MatMul to rewrite (by node name), a
:class:`~graphq.numerics.weight_only.QuantizedWeight` ``(q, s, z)`` with
``W_hat[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]`` and groups ``g(k) = k // G`` along the input
dimension. Two output forms, chosen by :class:`WeightOnlyEmitConfig`:

- ``matmulnbits``: one ``com.microsoft.MatMulNBits`` node (ONNX Runtime CPU and CUDA EPs) with
  ``B`` packed two codes per byte (4 bits), ``scales`` and, for asymmetric groups, packed
  ``zero_points`` (float zero points go unpacked, in the scales' float type, which the operator
  accepts as well). ONNX Runtime 1.32's CPU kernel has no fast path for float zero points (SmolLM2
  with-past decode at ``accuracy_level`` 4: 0.25x float, against 1.88x with uint4 ones), so by
  default (``float_zero_points = "correction"``) they are emitted without them: a symmetric
  ``MatMulNBits`` of the same codes and scales plus the exact offset term ``S(x) O``
  (:func:`~graphq.numerics.weight_only.split_float_zero_points`), ``Add(MatMulNBits(x), MatMul(S(x), O))``,
  where the group sums ``S(x) = MatMul(x, P)`` with the 0/1 indicator ``P [K, n_groups]`` are computed
  once per input and group length (1.69x float). ``"native"`` passes the float zero points to the
  operator.

  ``accuracy_level`` (0 = unset: float activations; 4 = int8 activations inside the kernel, per
  block) is written on every node that has one. ``None`` (the default) means 4 for 8-bit weights and
  unset for the others: ONNX Runtime 1.32's CPU float path for 8-bit weights is pathologically slow
  (one token through SmolLM2's tied 576 x 49152 head at g64: 74.7 ms unset against 0.86 ms at level
  4, 2 threads), which made every recipe with an 8-bit head decode at 0.29x float.
- ``qdq``: standard ONNX ``DequantizeLinear(q, s, z, axis=0, block_size=G)`` (opset 21, uint4 for
  4 bits, uint8 for 8 bits) feeding the original ``MatMul``: the blockwise form TensorRT
  consumes. The model's default-domain opset is raised to 21 where it is lower. Its zero point must
  have the codes' integer type, so float zero points are refused here.

Weights that are the transpose of a constant (a tied LM head) are handled like plain constants;
the source constant stays for its other users (the embedding ``Gather``). Scales take the float
type of the weight they replace (float16 models get float16 scales: ``MatMulNBits`` and
``DequantizeLinear`` tie the scale type to the activation / output type). Weights quantized with
``scale_dtype = "float16"`` in a float32 graph store their scales (and offsets or float zero points) as
float16 behind a ``Cast`` to float32 (:func:`stored_float`), which ONNX Runtime folds at session start.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.numerics.weight_only import QuantizedWeight, pack_matmul_nbits, split_float_zero_points
from graphq.passes.qdq_insert import drop_unused_weight, new_initializer

logger = logging.getLogger(__name__)

# "codebook" and "dq-cube" are the forms of cube-root weights (graphq.passes.cuberoot_emit).
EMIT_FORMATS = ("matmulnbits", "qdq", "codebook", "dq-cube")
UNIFORM_FORMATS = ("matmulnbits", "qdq")
BLOCKWISE_DQ_OPSET = 21
ACCURACY_LEVELS = (0, 1, 2, 3, 4)
FLOAT_ZERO_POINT_FORMS = ("correction", "native")
_STORAGE = {4: ml_dtypes.uint4, 8: np.uint8}


@dataclasses.dataclass(frozen=True)
class WeightOnlyEmitConfig:
    format: str = "matmulnbits"
    accuracy_level: int | None = None  # None: 4 for 8-bit weights, unset for others (module docstring)
    float_zero_points: str = "correction"  # MatMulNBits: the offset term beside a symmetric kernel, or "native"

    def __post_init__(self) -> None:
        if self.float_zero_points not in FLOAT_ZERO_POINT_FORMS:
            raise GraphqError(f"float_zero_points must be one of {FLOAT_ZERO_POINT_FORMS}, got '{self.float_zero_points}'")
        if self.format not in EMIT_FORMATS:
            raise GraphqError(f"emit format must be one of {EMIT_FORMATS}, got '{self.format}'")
        if self.accuracy_level is not None and self.accuracy_level not in ACCURACY_LEVELS:
            raise GraphqError(f"accuracy_level must be one of {ACCURACY_LEVELS}, got {self.accuracy_level}")

    def level_for(self, bits: int) -> int:
        """The ``accuracy_level`` of a MatMulNBits with ``bits``-bit weights (0: the attribute is left out)."""
        if self.accuracy_level is not None:
            return self.accuracy_level
        return 4 if bits == 8 else 0


def weight_float_type(node: ir.Node) -> ir.DataType:
    """The float type of ``node``'s constant weight (or of the constant it transposes); FLOAT if unknown."""
    value = node.inputs[1]
    producer = value.producer() if value is not None else None
    if value is not None and value.const_value is None and producer is not None and producer.op_type == "Transpose":
        value = producer.inputs[0]
    dtype = value.const_value.dtype if value is not None and value.const_value is not None else None
    return dtype if dtype in (ir.DataType.FLOAT16, ir.DataType.BFLOAT16) else ir.DataType.FLOAT


def stored_float(graph: ir.Graph, name: str, values: np.ndarray, storage: str, float_type: ir.DataType) -> ir.Value:
    """``values`` as a ``float_type`` input: an initializer of that type, or, stored as float16 (``storage``)
    in a graph that computes in another float type, a float16 initializer read through a ``Cast``. The
    Cast reads a constant and goes first in the graph; ONNX Runtime folds it into a constant of
    ``float_type`` when the session starts, so kernels that pre-pack their constant inputs (MatMulNBits,
    GatherBlockQuantized) still do, and run as fast as with that type stored. That needs ORT's basic
    optimisation level or above (its default): with ``ORT_DISABLE_ALL``, ONNX Runtime 1.32's MatMulNBits at
    ``accuracy_level`` 4 pre-packs ``B`` without the (not yet constant) scales and outputs zeros."""
    if storage != "float16" or float_type == ir.DataType.FLOAT16:
        return new_initializer(graph, name, values.astype(float_type.numpy()))
    half = new_initializer(graph, name, values.astype(np.float16))
    cast = ir.node("Cast", [half], attributes={"to": float_type}, name=f"{name}/Cast")
    cast.outputs[0].name = f"{name}_as_{float_type.name.lower()}"
    cast.outputs[0].dtype, cast.outputs[0].shape = float_type, half.shape
    first = next(iter(graph), None)
    if first is None:
        graph.append(cast)
    else:
        graph.insert_before(first, cast)
    return cast.outputs[0]


def named_matmuls(graph: ir.Graph, names, who: str) -> dict[str, ir.Node]:
    """The MatMul nodes called ``names``; GraphqError (prefixed ``who``) naming the first that is not one."""
    nodes = {node.name: node for node in graph}
    missing = [name for name in names if name not in nodes or nodes[name].op_type != "MatMul"]
    if missing:
        raise GraphqError(f"{who}: {missing[0]} is not a MatMul of the graph")
    return {name: nodes[name] for name in names}


class WeightOnlyEmissionPass(ir.passes.InPlacePass):
    """Replace the weights of the named MatMuls by their quantized form."""

    def __init__(self, quantized: Mapping[str, QuantizedWeight], config: WeightOnlyEmitConfig = WeightOnlyEmitConfig()) -> None:
        super().__init__()
        if config.format not in UNIFORM_FORMATS:
            raise GraphqError(f"format '{config.format}' is for cube-root weights (graphq.passes.cuberoot_emit)")
        self.quantized = dict(quantized)
        self.config = config
        self.emitted: list[str] = []
        self._group_sums: dict[tuple[str, int], ir.Value] = {}
        self._indicators: dict[tuple[int, int], ir.Value] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = named_matmuls(graph, self.quantized, "weight-only")
        for name, qw in self.quantized.items():
            node = nodes[name]
            if self.config.format == "matmulnbits":
                self._matmul_nbits(graph, node, qw)
            else:
                self._blockwise_qdq(graph, node, qw)
            self.emitted.append(name)
        if self.emitted and self.config.format == "qdq" and model.opset_imports.get("", 1) < BLOCKWISE_DQ_OPSET:
            model.opset_imports[""] = BLOCKWISE_DQ_OPSET
        if self.emitted and self.config.format == "matmulnbits":
            model.opset_imports.setdefault("com.microsoft", 1)
        logger.info("weight-only: %d MatMuls emitted as %s", len(self.emitted), self.config.format)
        return ir.passes.PassResult(model, modified=bool(self.emitted))

    def _matmul_nbits(self, graph: ir.Graph, node: ir.Node, qw: QuantizedWeight) -> None:
        offsets = None
        if qw.config.float_zero_points and self.config.float_zero_points == "correction":
            if qw.q.shape[0] % qw.group_length == 0:
                qw, offsets = split_float_zero_points(qw)
            else:  # a padded last group has no whole-group sum: the operator reads the float zero points itself
                logger.info("weight-only: %s: K = %d is not a multiple of the group %d; float zero points passed "
                            "to MatMulNBits (its slow path on ORT 1.32's CPU EP)", node.name, qw.q.shape[0], qw.group_length)
        packed = pack_matmul_nbits(qw)
        stem = node.name.strip("/").replace("/", "_")
        float_type = weight_float_type(node)
        storage = qw.config.scale_dtype
        inputs = [node.inputs[0], new_initializer(graph, f"{stem}.qweight", packed["B"]),
                  stored_float(graph, f"{stem}.scales", packed["scales"], storage, float_type)]
        zero_points = packed["zero_points"]
        if zero_points is not None:
            inputs.append(stored_float(graph, f"{stem}.zero_points", zero_points, storage, float_type)
                          if zero_points.dtype.kind == "f" else new_initializer(graph, f"{stem}.zero_points", zero_points))
        attributes = {"K": packed["K"], "N": packed["N"], "bits": packed["bits"], "block_size": packed["block_size"]}
        level = self.config.level_for(qw.config.bits)
        if level:
            attributes["accuracy_level"] = level
        fused = ir.node("MatMulNBits", inputs, attributes=attributes, domain="com.microsoft", name=f"{node.name}_Q{qw.config.bits}")
        graph.insert_before(node, fused)
        output, result = node.outputs[0], fused.outputs[0]
        result.dtype, result.shape = output.dtype or float_type, output.shape
        if offsets is not None:
            sums = self._group_sum(graph, node.inputs[0], qw.q.shape[0], qw.group_length, float_type, before=node)
            offset_values = stored_float(graph, f"{stem}.offsets", offsets, storage, float_type)
            correction = ir.node("MatMul", [sums, offset_values], name=f"{node.name}_zero_point_offsets")
            total = ir.node("Add", [result, correction.outputs[0]], name=f"{node.name}_add_offsets")
            graph.insert_before(node, [correction, total])
            for value in (correction.outputs[0], total.outputs[0]):
                value.dtype, value.shape = result.dtype, output.shape
            result = total.outputs[0]
        old_weight = node.inputs[1]
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        name = output.name
        output.name, result.name = f"{name}/float_matmul", name
        drop_unused_weight(graph, old_weight)

    def _group_sum(self, graph: ir.Graph, x: ir.Value, k: int, group: int, float_type: ir.DataType, *,
                   before: ir.Node) -> ir.Value:
        """``S(x) = MatMul(x, P)`` for an input ``x [..., K]``, ``P[k, g] = 1`` where ``k // group == g``, inserted
        before its first user; one per input and group length (q/k/v and gate/up share theirs), one ``P`` per
        ``K`` and group length."""
        key = (x.name, group)
        if key not in self._group_sums:
            if (k, group) not in self._indicators:
                name = f"group_indicator_{k}x{group}"
                existing = graph.initializers.get(name)  # from an earlier emission into this graph (streamed blocks)
                if existing is None:
                    indicator = (np.arange(k)[:, None] // group == np.arange(k // group)[None, :]).astype(float_type.numpy())
                    existing = new_initializer(graph, name, indicator)
                self._indicators[(k, group)] = existing
            stem = (x.name or before.name).strip("/").replace("/", "_")
            sums = ir.node("MatMul", [x, self._indicators[(k, group)]], name=f"{stem}/group_sums_{group}")
            graph.insert_before(before, sums)
            sums.outputs[0].dtype = float_type
            if x.shape is not None:
                sums.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], k // group])
            self._group_sums[key] = sums.outputs[0]
        return self._group_sums[key]

    def _blockwise_qdq(self, graph: ir.Graph, node: ir.Node, qw: QuantizedWeight) -> None:
        bits = qw.config.bits
        if bits not in _STORAGE:
            raise GraphqError(f"blockwise DequantizeLinear is emitted for 4 or 8 bits, not {bits}")
        k = qw.q.shape[0]
        if k % qw.group_length:
            raise GraphqError(f"blockwise DequantizeLinear needs groups that divide K={k}, got {qw.group_length}")
        if qw.config.float_zero_points:
            raise GraphqError(f"{node.name}: DequantizeLinear takes integer zero points only; emit float zero points "
                              "as MatMulNBits (format matmulnbits) or use integer ones")
        stem = node.name.strip("/").replace("/", "_")
        codes = new_initializer(graph, f"{stem}.qweight", qw.q.astype(_STORAGE[bits]))
        scales = stored_float(graph, f"{stem}.scales", qw.scales, qw.config.scale_dtype, weight_float_type(node))
        zeros = new_initializer(graph, f"{stem}.zero_points", qw.zero_points.astype(_STORAGE[bits]))
        dq = ir.node("DequantizeLinear", [codes, scales, zeros], attributes={"axis": 0, "block_size": qw.group_length},
                     name=f"{stem}/weight_DequantizeLinear")
        dq.outputs[0].name = f"{stem}.weight_dequantized"
        graph.insert_before(node, dq)
        old_weight = node.inputs[1]
        node.replace_input_with(1, dq.outputs[0])
        drop_unused_weight(graph, old_weight)
