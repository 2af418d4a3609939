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
float16 behind a ``Cast`` to float32, and with ``scale_dtype = "q8-pow2"`` as 8-bit codes and an int8
exponent per column behind ``Cast``/``Pow``/``Mul`` (:func:`stored_float`); ONNX Runtime folds both at
session start.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.numerics.weight_only import (
    POW2_SCALES,
    QuantizedWeight,
    pack_matmul_nbits,
    pow2_split,
    split_float_zero_points,
)
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


def stored_float(graph: ir.Graph, name: str, values: np.ndarray, storage: str, float_type: ir.DataType, *,
                 group_axis: int = 0, flatten: bool = False) -> ir.Value:
    """``values`` as a ``float_type`` input, stored as ``storage`` (a ``scale_dtype``).

    - float32 (or a float16 graph): an initializer of ``float_type``.
    - float16 in a graph that computes in another float type: a float16 initializer read through a ``Cast``.
    - q8-pow2: ``values`` is 2-D with the groups of a column along ``group_axis``; stored as its 8-bit codes
      and one int8 exponent per column (:func:`~graphq.numerics.weight_only.pow2_split`, exact: the values
      must be on that grid), read as ``Cast(codes) * Pow(2, Cast(e))`` (then a ``Cast`` to ``float_type``
      when it is not float32).

    ``flatten``: the input is the 1-D ``values.reshape(-1)`` (MatMulNBits' scales). The nodes read
    constants and go first in the graph; ONNX Runtime folds them into a constant of ``float_type`` when
    the session starts, so kernels that pre-pack their constant inputs (MatMulNBits,
    GatherBlockQuantized) still do, and run as fast as with that type stored. That needs ORT's basic
    optimisation level or above (its default): with ``ORT_DISABLE_ALL``, ONNX Runtime 1.32's MatMulNBits at
    ``accuracy_level`` 4 pre-packs ``B`` without the (not yet constant) scales and outputs zeros."""
    if storage == POW2_SCALES:
        return _stored_pow2(graph, name, values, float_type, group_axis=group_axis, flatten=flatten)
    if flatten:
        values = values.reshape(-1)
    if storage != "float16" or float_type == ir.DataType.FLOAT16:
        return new_initializer(graph, name, values.astype(float_type.numpy()))
    half = new_initializer(graph, name, values.astype(np.float16))
    return _first_nodes(graph, [ir.node("Cast", [half], attributes={"to": float_type}, name=f"{name}/Cast")],
                        f"{name}_as_{float_type.name.lower()}", float_type, half.shape)


def _first_nodes(graph: ir.Graph, nodes: list[ir.Node], output_name: str, dtype: ir.DataType, shape) -> ir.Value:
    """Insert ``nodes`` (a chain over constants, in order) at the start of the graph; name and type the
    last one's output."""
    first = next(iter(graph), None)
    for node in nodes:
        if first is None:
            graph.append(node)
        else:
            graph.insert_before(first, node)
    output = nodes[-1].outputs[0]
    output.name, output.dtype, output.shape = output_name, dtype, ir.Shape(list(shape))
    return output


def _stored_pow2(graph: ir.Graph, name: str, values: np.ndarray, float_type: ir.DataType, *, group_axis: int,
                 flatten: bool) -> ir.Value:
    if np.ndim(values) != 2 or group_axis not in (0, 1):
        raise ValueError(f"q8-pow2 storage takes a 2-D array with its groups on axis 0 or 1, got shape {np.shape(values)}")
    columns_last = np.asarray(values, dtype=np.float32) if group_axis == 0 else np.asarray(values, dtype=np.float32).T
    try:
        codes, exponents = pow2_split(columns_last)
    except ValueError as error:
        raise GraphqError(f"{name}: {error}") from error
    if group_axis == 1:
        codes, exponent_shape = codes.T, (exponents.shape[0], 1)
    else:
        exponent_shape = (1, exponents.shape[0])
    stored_codes = new_initializer(graph, name, np.ascontiguousarray(codes))
    stored_exponents = new_initializer(graph, f"{name}.exponents", exponents.reshape(exponent_shape))
    two = graph_constant(graph, "pow2_scales_base", np.array(2.0, dtype=np.float32))
    f32 = ir.DataType.FLOAT
    nodes = [ir.node("Cast", [stored_codes], attributes={"to": f32}, name=f"{name}/codes_Cast"),
             ir.node("Cast", [stored_exponents], attributes={"to": f32}, name=f"{name}/exponents_Cast")]
    nodes.append(ir.node("Pow", [two, nodes[1].outputs[0]], name=f"{name}/Pow"))
    nodes.append(ir.node("Mul", [nodes[0].outputs[0], nodes[2].outputs[0]], name=f"{name}/Mul"))
    shape = codes.shape
    if flatten:
        target = graph_constant(graph, "pow2_scales_flat_shape", np.array([-1], dtype=np.int64))
        nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], target], name=f"{name}/Reshape"))
        shape = (codes.size,)
    if float_type != f32:
        nodes.append(ir.node("Cast", [nodes[-1].outputs[0]], attributes={"to": float_type}, name=f"{name}/Cast"))
    for node in nodes[:-1]:  # the last output is named and typed by _first_nodes
        node.outputs[0].name, node.outputs[0].dtype = f"{node.name}_out", f32
    return _first_nodes(graph, nodes, f"{name}_as_{float_type.name.lower()}", float_type, shape)


def graph_constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer ``name`` of ``graph``, registered from ``array`` the first time: one copy of a constant
    that many emitted nodes read (an emission may run more than once into one graph, e.g. streamed blocks)."""
    existing = graph.initializers.get(name)
    return existing if existing is not None else new_initializer(graph, name, array)


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
                  stored_float(graph, f"{stem}.scales", packed["scales"].reshape(packed["N"], -1), storage, float_type,
                               group_axis=1, flatten=True)]
        zero_points = packed["zero_points"]
        if zero_points is not None:  # float zero points z = c - O / s are not on the q8-pow2 grid: float32 there
            inputs.append(stored_float(graph, f"{stem}.zero_points", zero_points, "float32" if storage == POW2_SCALES else storage,
                                       float_type) if zero_points.dtype.kind == "f"
                          else new_initializer(graph, f"{stem}.zero_points", zero_points))
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
                indicator = (np.arange(k)[:, None] // group == np.arange(k // group)[None, :]).astype(float_type.numpy())
                self._indicators[(k, group)] = graph_constant(graph, f"group_indicator_{k}x{group}", indicator)
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
