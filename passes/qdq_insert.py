"""Insert int8 quantization around the MatMuls a plan names.

Weights (constant ``W [K, N]``, or ``Transpose`` of a constant as for a tied LM head) are
quantized symmetrically per output column: ``W ~= s_w * Wq`` with ``Wq`` int8 in [-127, 127] and
zero point 0 (:func:`graphq.numerics.quantize.per_column_weight_quantization`).

Activations ``x`` (shared by every planned MatMul that reads them) follow one of two schemes:

- ``static`` (per tensor, QDQ): ``DequantizeLinear(QuantizeLinear(x, s_x, z), s_x, z)`` with
  ``s_x = r / 127`` for the calibrated range ``r``, feeding ``MatMul(., DQ(Wq))``. The zero point
  ``z`` depends on the target (:data:`ACTIVATION_ZERO_POINTS`): int8 0 for TensorRT, uint8 128 (the
  same symmetric grid, shifted) for ONNX Runtime's CPU EP, which then fuses every MatMul into
  ``MatMulIntegerToFloat``.
- ``dynamic-token`` (per token, computed at run time; CPU integer kernel): for each row ``t``
  (token), ``s_t = max_k |x[t, k]| / 127``, ``xq = round(x / s_t) + 128`` as uint8 (symmetric values
  shifted so ORT's fast u8 x s8 kernel applies), ``y = MatMulInteger(xq, Wq, 128) * s_t * s_w``.
  Per-token scales follow each token's own range, which tames outlier tokens. Float32 graphs get it
  as few kernels as ONNX Runtime allows: ``max |x| = max(ReduceMax(x), -ReduceMin(x))`` (no ``Abs``
  copy of ``x``), ``xq = QuantizeLinear(x, s_t, 128, axis=-1, block_size=K)`` (one block per row, the
  same codes as ``Div -> Round -> Add -> Cast``; opset 21, raised where lower) and
  ``y = com.microsoft.MatMulIntegerToFloat(xq, Wq, s_t, s_w, 128)`` (the column scales applied in the
  GEMM's output stage, the row scales in the same kernel). Float16 graphs keep the op-by-op form
  (``MatMulIntegerToFloat`` has no float16 CPU kernel).

A node listed in ``weight_abs_max`` uses those per-column ranges ``c_n`` instead of ``max |W[:, n]|``
(``s_n = c_n / 127``, values beyond ``c_n`` saturate: clipped weights, graphq.numerics.clipping).
Float16 graphs (weights float16) get float16 constants, rescaling and output in the dynamic scheme.

A plan maps node names to ``"int8"`` or ``"float"``; nodes absent from it stay float. A planned
node must be a MatMul with a constant 2-D weight and must not be kept in float by policy.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.numerics.quantize import per_column_weight_quantization, quantize_symmetric, symmetric_scale

logger = logging.getLogger(__name__)

ACTIVATION_SCHEMES = ("static", "dynamic-token")
# Zero point of static activations per deployment target. Both encode the same symmetric grid
# s * [-128, 127]: TensorRT requires int8 with zero point 0; ONNX Runtime's CPU EP fuses every
# DQ -> MatMul into MatMulIntegerToFloat with uint8 + 128, but with int8 only where the quantized
# tensor has a single consumer (its s8 -> u8 rewrite stops at shared tensors: measured 5 of 15).
ACTIVATION_ZERO_POINTS = {
    "cpu": np.array(128, dtype=np.uint8),
    "tensorrt": np.array(0, dtype=np.int8),
}
INT8, FLOAT = "int8", "float"
# Default-domain opset of QuantizeLinear with block_size (the per-token quantizer of float32 graphs).
BLOCKED_QUANTIZE_OPSET = 21
# Name prefix of the per-row uint8 zero points shared by activations with the same leading dims.
ROW_ZERO_POINT = "token_zero_point_u8"
# Guards the per-token scale of an all-zero row (x / s with s = 0).
MIN_TOKEN_SCALE = 1e-8


@dataclasses.dataclass(frozen=True)
class QdqConfig:
    activation_scheme: str = "static"
    target: str = "cpu"

    def __post_init__(self) -> None:
        if self.activation_scheme not in ACTIVATION_SCHEMES:
            raise GraphqError(f"activation scheme must be one of {ACTIVATION_SCHEMES}, got '{self.activation_scheme}'")
        if self.target not in ACTIVATION_ZERO_POINTS:
            raise GraphqError(f"target must be one of {tuple(ACTIVATION_ZERO_POINTS)}, got '{self.target}'")
        if self.target == "tensorrt" and self.activation_scheme != "static":
            raise GraphqError("the tensorrt target needs static activations (TensorRT consumes only QDQ)")


def _weight_tensor(node: ir.Node) -> tuple[ir.TensorProtocol, bool] | None:
    """(tensor, transposed) of ``MatMul(x, W)`` when W is a 2-D constant or the transpose of one; reads
    shapes only, no tensor data."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2:
        return None
    value = node.inputs[1]
    if value is None or value.is_graph_input():
        return None
    if value.const_value is not None:
        return (value.const_value, False) if len(value.const_value.shape) == 2 else None
    producer = value.producer()
    if producer is not None and producer.op_type == "Transpose":
        source = producer.inputs[0]
        perm = producer.attributes.get_ints("perm", [1, 0])
        if source.const_value is not None and not source.is_graph_input() and len(source.const_value.shape) == 2 and list(perm) == [1, 0]:
            return source.const_value, True
    return None


def _leading_dims(x: ir.Value) -> tuple | None:
    """``x``'s dims before the last as a hashable key when every one is known (an int or a named
    symbol), else None."""
    if x.shape is None or len(x.shape) < 2:
        return None
    dims = []
    for dim in list(x.shape)[:-1]:
        if isinstance(dim, int):
            dims.append(dim)
        elif isinstance(dim, ir.SymbolicDim) and dim.value:
            dims.append(str(dim.value))
        else:
            return None
    return tuple(dims)


def has_constant_weight(node: ir.Node) -> bool:
    """Whether :func:`constant_weight` would return an array (without reading any weight data)."""
    return _weight_tensor(node) is not None


def constant_weight(node: ir.Node) -> np.ndarray | None:
    """W of ``MatMul(x, W)`` when W is a 2-D constant, or the transpose of one; else None."""
    found = _weight_tensor(node)
    if found is None:
        return None
    tensor, transposed = found
    return tensor.numpy().T if transposed else tensor.numpy()


def quantizable_matmuls(model: ir.Model) -> list[ir.Node]:
    """MatMuls of the main graph whose second input is a constant 2-D weight (or its transpose)."""
    return [node for node in model.graph if has_constant_weight(node)]


def new_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """Register ``array`` as a typed, shaped initializer ``name`` of ``graph``."""
    value = ir.Value(name=name, const_value=ir.tensor(np.require(array, requirements="C"), name=name))
    value.dtype = value.const_value.dtype
    value.shape = ir.Shape(list(array.shape))
    graph.register_initializer(value)
    return value


def drop_unused_weight(graph: ir.Graph, value: ir.Value) -> None:
    """Remove a replaced weight that nothing reads any more: its initializer, and for a tied head read
    through ``Transpose(embedding)`` the Transpose too (the embedding stays while the lookup uses it)."""
    if value.uses() or value.is_graph_output():
        return
    producer = value.producer()
    if producer is not None:  # Transpose of a tied embedding
        source = producer.inputs[0]
        graph.remove(producer, safe=True)
        value = source
        if value.uses():
            return
    if value.name in graph.initializers:
        graph.initializers.pop(value.name)


class QdqInsertionPass(ir.passes.InPlacePass):
    """Quantize the planned MatMuls to int8 weights and int8 activations."""

    def __init__(self, plan: Mapping[str, str], config: QdqConfig = QdqConfig(), *,
                 activation_abs_max: Mapping[str, float] | None = None, kept_node_names: frozenset[str] = frozenset(),
                 weight_abs_max: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.plan = dict(plan)
        self.config = config
        self.activation_abs_max = dict(activation_abs_max or {})
        self.weight_abs_max = dict(weight_abs_max or {})
        self.kept_node_names = kept_node_names
        self.quantized: list[str] = []

    def check_plan(self, model: ir.Model) -> None:
        """Refuse a plan that names missing, kept or non-quantizable nodes (before anything changes)."""
        nodes = {node.name: node for node in model.graph}
        for name, precision in self.plan.items():
            if precision not in (INT8, FLOAT):
                raise GraphqError(f"plan: node '{name}' has precision '{precision}'; expected int8 or float")
            if precision != INT8:
                continue
            if name not in nodes:
                raise GraphqError(f"plan: node '{name}' is not in the graph")
            if name in self.kept_node_names:
                raise GraphqError(f"plan: node '{name}' ({nodes[name].op_type}) is kept in float by policy")
            if constant_weight(nodes[name]) is None:
                raise GraphqError(f"plan: node '{name}' ({nodes[name].op_type}) is not a MatMul with a constant weight")
            if self.config.activation_scheme == "static" and nodes[name].inputs[0].name not in self.activation_abs_max:
                raise GraphqError(f"plan: no calibrated range for '{nodes[name].inputs[0].name}' (input of '{name}')")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        self.check_plan(model)
        graph = model.graph
        if self.config.activation_scheme == "dynamic-token" and self._fused_token_kernels(model):
            if model.opset_imports.get("", 1) < BLOCKED_QUANTIZE_OPSET:
                model.opset_imports[""] = BLOCKED_QUANTIZE_OPSET  # QuantizeLinear with block_size
            model.opset_imports.setdefault("com.microsoft", 1)  # MatMulIntegerToFloat
        opset = model.opset_imports.get("", 18)
        quantized_inputs: dict[str, ir.Value] = {}
        # shared per-row zero points (see _blocked_token_quantizer), also those of an earlier run on this graph
        self._row_zero_points = {value.name: value for node in graph for value in node.outputs
                                 if value.name and value.name.startswith(ROW_ZERO_POINT)}
        for node in list(graph):
            if self.plan.get(node.name) != INT8:
                continue
            weight = constant_weight(node)
            if node.name in self.weight_abs_max:
                weight_scale = symmetric_scale(self.weight_abs_max[node.name])
                weight_q = quantize_symmetric(weight, weight_scale[None, :])
            else:
                weight_q, weight_scale = per_column_weight_quantization(weight)
            self._float = np.float16 if weight.dtype == np.float16 else np.float32
            del weight
            stem = node.name.strip("/").replace("/", "_")
            wq = new_initializer(graph, f"{stem}.weight_int8", weight_q)
            ws = new_initializer(graph, f"{stem}.weight_scale", weight_scale)
            x = node.inputs[0]
            if self.config.activation_scheme == "static":
                self._static(graph, node, x, wq, ws, quantized_inputs)
            else:
                self._dynamic_token(graph, node, x, wq, ws, quantized_inputs, opset)
            self.quantized.append(node.name)
        logger.info("qdq: %d MatMuls quantized to int8 (%s activations)", len(self.quantized), self.config.activation_scheme)
        return ir.passes.PassResult(model, modified=bool(self.quantized))

    def _static(self, graph, node, x, wq, ws, quantized_inputs) -> None:
        if x.name not in quantized_inputs:
            scale = new_initializer(graph, f"{x.name}/act_scale", symmetric_scale(self.activation_abs_max[x.name]))
            zero = new_initializer(graph, f"{x.name}/act_zero_point", ACTIVATION_ZERO_POINTS[self.config.target])
            q = ir.node("QuantizeLinear", [x, scale, zero], name=f"{x.name}/QuantizeLinear")
            q.outputs[0].name = f"{x.name}/quantized"
            graph.insert_before(node, q)
            quantized_inputs[x.name] = (q.outputs[0], scale, zero)
        xq, scale, zero = quantized_inputs[x.name]
        stem = wq.name.removesuffix(".weight_int8")
        # One DequantizeLinear per consumer: a DQ -> MatMul pair becomes one integer kernel.
        dq = ir.node("DequantizeLinear", [xq, scale, zero], name=f"{stem}/input_DequantizeLinear")
        dq.outputs[0].name = f"{stem}.input_dequantized"
        graph.insert_before(node, dq)
        wzero = new_initializer(graph, f"{stem}.weight_zero_point", np.zeros(ws.const_value.shape[0], dtype=np.int8))
        dq_w = ir.node("DequantizeLinear", [wq, ws, wzero], attributes={"axis": 1}, name=f"{stem}/weight_DequantizeLinear")
        dq_w.outputs[0].name = f"{stem}.weight_dequantized"
        graph.insert_before(node, dq_w)
        old_weight = node.inputs[1]
        node.replace_input_with(0, dq.outputs[0])
        node.replace_input_with(1, dq_w.outputs[0])
        drop_unused_weight(graph, old_weight)

    def _fused_token_kernels(self, model: ir.Model) -> bool:
        """Whether the planned MatMuls get the float32 kernel form (module docstring): every one's weight
        is float32 (a float16 graph keeps the op-by-op form)."""
        nodes = {node.name: node for node in model.graph}
        found = [_weight_tensor(nodes[name]) for name, p in self.plan.items() if p == INT8 and name in nodes]
        return bool(found) and all(f is not None and f[0].dtype == ir.DataType.FLOAT for f in found)

    def _dynamic_token(self, graph, node, x, wq, ws, quantized_inputs, opset) -> None:
        fused = self._float == np.float32 and opset >= BLOCKED_QUANTIZE_OPSET
        if x.name not in quantized_inputs:
            if fused:
                nodes, xq, x_scale = self._blocked_token_quantizer(graph, x, wq.const_value.shape[0],
                                                                   self._row_zero_points)
            else:
                nodes, xq, x_scale = self._token_quantizer(graph, x, opset, self._float)
            graph.insert_before(node, nodes)
            quantized_inputs[x.name] = (xq, x_scale)
        xq, x_scale = quantized_inputs[x.name]
        stem = wq.name.removesuffix(".weight_int8")
        a_zero = new_initializer(graph, f"{stem}.act_zero_point", np.array(128, dtype=np.uint8))
        float_type = ir.DataType.FLOAT16 if self._float == np.float16 else ir.DataType.FLOAT
        if fused:
            matmul = ir.node("MatMulIntegerToFloat", [xq, wq, x_scale, ws, a_zero], domain="com.microsoft",
                             name=f"{stem}/MatMulIntegerToFloat")
            matmul.outputs[0].name = f"{stem}/int8_matmul"
            new_nodes = [matmul]
        else:
            matmul = ir.node("MatMulInteger", [xq, wq, a_zero], name=f"{stem}/MatMulInteger")
            if float_type != ir.DataType.FLOAT:  # the graph computes in float16: so do the rescaling Muls
                ws.const_value = ir.tensor(ws.const_value.numpy().astype(self._float), name=ws.name)
                ws.dtype = float_type
            to_float = ir.node("Cast", [matmul.outputs[0]], attributes={"to": float_type}, name=f"{stem}/Cast")
            scale_rows = ir.node("Mul", [to_float.outputs[0], x_scale], name=f"{stem}/token_scale")
            scale_cols = ir.node("Mul", [scale_rows.outputs[0], ws], name=f"{stem}/weight_scale_mul")
            new_nodes = [matmul, to_float, scale_rows, scale_cols]
            for index, new in enumerate(new_nodes):
                new.outputs[0].name = f"{stem}/int8_{index}"
        graph.insert_before(node, new_nodes)
        output = node.outputs[0]
        result = new_nodes[-1].outputs[0]
        result.dtype = output.dtype or float_type
        result.shape = output.shape
        old_weight = node.inputs[1]
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if result.is_graph_output():  # keep the model's output names (e.g. "logits")
            name = output.name
            output.name = f"{name}/float_matmul"
            result.name = name
        drop_unused_weight(graph, old_weight)

    @staticmethod
    def _blocked_token_quantizer(graph, x, k: int, zero_points: dict[str, ir.Value]):
        """Per-row scales ``max(max(ReduceMax(x), -ReduceMin(x)) / 127, min_scale)`` and the uint8 codes
        ``QuantizeLinear(x, s, 128, axis=-1, block_size=K)`` (opset 21: one block per row). Its zero
        point must have the scale's shape ``[..., rows, 1]`` (``Expand`` of 128): activations whose
        leading dims are known and equal (named or fixed, e.g. ``[batch, sequence]``) share one, named
        ``token_zero_point_u8(<dims>)`` and kept in ``zero_points``."""
        name = x.name
        c127 = new_initializer(graph, f"{name}/c127", np.array(127.0, dtype=np.float32))
        eps = new_initializer(graph, f"{name}/min_scale", np.array(MIN_TOKEN_SCALE, dtype=np.float32))
        axes = new_initializer(graph, f"{name}/last_axis", np.array([-1], dtype=np.int64))
        zero = new_initializer(graph, f"{name}/zero_point_u8", np.array(128, dtype=np.uint8))
        row_max = ir.node("ReduceMax", [x, axes], attributes={"keepdims": 1}, name=f"{name}/token_max")
        row_min = ir.node("ReduceMin", [x, axes], attributes={"keepdims": 1}, name=f"{name}/token_min")
        negated = ir.node("Neg", [row_min.outputs[0]], name=f"{name}/token_neg_min")
        abs_max = ir.node("Max", [row_max.outputs[0], negated.outputs[0]], name=f"{name}/token_abs_max")
        scale = ir.node("Div", [abs_max.outputs[0], c127], name=f"{name}/token_scale_raw")
        safe_scale = ir.node("Max", [scale.outputs[0], eps], name=f"{name}/token_scale")
        nodes = [row_max, row_min, negated, abs_max, scale, safe_scale]
        rows = None if x.shape is None else ir.Shape([*list(x.shape)[:-1], 1])
        key = _leading_dims(x)
        shared = None if key is None else f"{ROW_ZERO_POINT}({','.join(map(str, key))})"
        zeros = zero_points.get(shared) if shared is not None else None
        new_zeros = []
        if zeros is None:
            shape = ir.node("Shape", [safe_scale.outputs[0]], name=f"{name}/token_scale_shape")
            expand = ir.node("Expand", [zero, shape.outputs[0]], name=f"{name}/token_zero_point")
            new_zeros = [shape, expand]
            zeros = expand.outputs[0]
        quantize = ir.node("QuantizeLinear", [x, safe_scale.outputs[0], zeros],
                           attributes={"axis": -1, "block_size": int(k)}, name=f"{name}/token_QuantizeLinear")
        nodes += [*new_zeros, quantize]
        for index, new in enumerate(nodes):
            new.outputs[0].name = f"{name}/token_q{index}"
        if new_zeros:
            zeros.dtype, zeros.shape = ir.DataType.UINT8, rows
            if shared is not None:
                zeros.name = shared
                zero_points[shared] = zeros
        for new in (row_max, row_min, negated, abs_max, scale, safe_scale):
            new.outputs[0].dtype, new.outputs[0].shape = ir.DataType.FLOAT, rows
        quantize.outputs[0].dtype, quantize.outputs[0].shape = ir.DataType.UINT8, x.shape
        return nodes, quantize.outputs[0], safe_scale.outputs[0]

    @staticmethod
    def _token_quantizer(graph, x, opset, float_dtype=np.float32):
        name = x.name
        c127 = new_initializer(graph, f"{name}/c127", np.array(127.0, dtype=float_dtype))
        c128 = new_initializer(graph, f"{name}/c128", np.array(128.0, dtype=float_dtype))
        min_scale = max(MIN_TOKEN_SCALE, float(np.finfo(float_dtype).smallest_subnormal))  # 1e-8 is 0 in float16
        eps = new_initializer(graph, f"{name}/min_scale", np.array(min_scale, dtype=float_dtype))
        absolute = ir.node("Abs", [x], name=f"{name}/token_abs")
        if opset >= 18:
            axes = new_initializer(graph, f"{name}/last_axis", np.array([-1], dtype=np.int64))
            row_max = ir.node("ReduceMax", [absolute.outputs[0], axes], attributes={"keepdims": 1}, name=f"{name}/token_max")
        else:
            row_max = ir.node("ReduceMax", [absolute.outputs[0]], attributes={"axes": [-1], "keepdims": 1}, name=f"{name}/token_max")
        scale = ir.node("Div", [row_max.outputs[0], c127], name=f"{name}/token_scale_raw")
        safe_scale = ir.node("Max", [scale.outputs[0], eps], name=f"{name}/token_scale")
        divided = ir.node("Div", [x, safe_scale.outputs[0]], name=f"{name}/token_divide")
        rounded = ir.node("Round", [divided.outputs[0]], name=f"{name}/token_round")
        shifted = ir.node("Add", [rounded.outputs[0], c128], name=f"{name}/token_shift")
        as_uint8 = ir.node("Cast", [shifted.outputs[0]], attributes={"to": ir.DataType.UINT8}, name=f"{name}/token_uint8")
        nodes = [absolute, row_max, scale, safe_scale, divided, rounded, shifted, as_uint8]
        for index, new in enumerate(nodes):
            new.outputs[0].name = f"{name}/token_q{index}"
        return nodes, as_uint8.outputs[0], safe_scale.outputs[0]

