"""Int8 KV cache for graphs exported with past (``past_key_values.N.key|value`` in, ``present.N.*`` out).

The cache crosses the graph boundary as int8 codes plus float32 scales, one per token per head
(:mod:`graphq.numerics.kv_cache`): for every layer ``N`` and kind ``k`` in (key, value)

    inputs   past_key_values.N.k        int8    [batch, kv_heads, past, head_dim]
             past_key_values.N.k_scale  float32 [batch, kv_heads, past, 1]
    outputs  present.N.k                int8    [batch, kv_heads, past + new, head_dim]
             present.N.k_scale          float32 [batch, kv_heads, past + new, 1]

Inside the graph the past is dequantized (``Cast(q) * s``) and takes the place of the float past
input, so attention runs unchanged on ``concat(x_hat_past, x_new)``: the tokens of the current step
attend to their own keys/values in float. Only the new tokens are quantized on the way out:

    x_new   = present_float[:, :, past:, :]              (Slice after the past length)
    s_new   = max(max_d |x_new| / 127, s_min),  q_new = round(x_new / s_new)
    present = concat(q_past, q_new),  present_scale = concat(s_past, s_new)   (axis 2)

so a token is quantized exactly once, when it enters the cache; its codes are carried forward
byte for byte, with no requantization drift over a long generation. Slicing the float present
(instead of reading the new K/V where the exporter concatenates them) treats the attention as a
black box, so the same rewrite applies to optimum's unfused attention and to a fused
``GroupQueryAttention`` whose ``present_key`` is ``concat(past_key, new_key)``.

The quantizer is plain ops (Abs, ReduceMax, Div, Max, Round, Cast): ``QuantizeLinear`` at opset
18 takes only per-tensor or 1-D per-axis scales, not a scale computed per token.
"""

from __future__ import annotations

import dataclasses
import logging
import re

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.numerics.kv_cache import INT8_MAX, MIN_SCALE
from graphq.passes.qdq_insert import new_initializer
from graphq.runtime import PAST_INPUT, PRESENT_OUTPUT

logger = logging.getLogger(__name__)

SCALE_SUFFIX = "_scale"
_FLOAT_PAST = re.compile(r"^past_key_values\.(\d+)\.(key|value)$")


def _constant(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    """The initializer ``name`` (created once per graph, shared by every quantizer)."""
    if name in graph.initializers:
        return graph.initializers[name]
    return new_initializer(graph, name, array)


def int8_quantizer(graph: ir.Graph, x: ir.Value, axis: int, opset: int, stem: str) -> tuple[list[ir.Node], ir.Value, ir.Value]:
    """Nodes computing ``q = round(x / s)`` (int8) and ``s = max(max_axis |x| / 127, s_min)``
    (float, ``axis`` kept as size 1); returns (nodes, q, s). Nothing is inserted yet."""
    c127 = _constant(graph, "graphq.int8.c127", np.array(INT8_MAX, dtype=np.float32))
    eps = _constant(graph, "graphq.int8.min_scale", np.array(MIN_SCALE, dtype=np.float32))
    absolute = ir.node("Abs", [x], name=f"{stem}/abs")
    if opset >= 18:
        axes = _constant(graph, f"graphq.int8.axis{axis}", np.array([axis], dtype=np.int64))
        abs_max = ir.node("ReduceMax", [absolute.outputs[0], axes], attributes={"keepdims": 1}, name=f"{stem}/abs_max")
    else:
        abs_max = ir.node("ReduceMax", [absolute.outputs[0]], attributes={"axes": [axis], "keepdims": 1}, name=f"{stem}/abs_max")
    raw_scale = ir.node("Div", [abs_max.outputs[0], c127], name=f"{stem}/scale_raw")
    scale = ir.node("Max", [raw_scale.outputs[0], eps], name=f"{stem}/scale")
    divided = ir.node("Div", [x, scale.outputs[0]], name=f"{stem}/divide")
    rounded = ir.node("Round", [divided.outputs[0]], name=f"{stem}/round")
    codes = ir.node("Cast", [rounded.outputs[0]], attributes={"to": ir.DataType.INT8}, name=f"{stem}/int8")
    nodes = [absolute, abs_max, raw_scale, scale, divided, rounded, codes]
    for node in nodes:
        node.outputs[0].name = f"{node.name}_output"
    for node in nodes[:-1]:
        node.outputs[0].dtype = ir.DataType.FLOAT
    codes.outputs[0].dtype = ir.DataType.INT8
    return nodes, codes.outputs[0], scale.outputs[0]


def int8_dequantizer(q: ir.Value, scale: ir.Value, stem: str) -> tuple[list[ir.Node], ir.Value]:
    """Nodes computing ``s * float(q)``; returns (nodes, x_hat)."""
    as_float = ir.node("Cast", [q], attributes={"to": ir.DataType.FLOAT}, name=f"{stem}/to_float")
    scaled = ir.node("Mul", [as_float.outputs[0], scale], name=f"{stem}/dequantize")
    for node in (as_float, scaled):
        node.outputs[0].name = f"{node.name}_output"
        node.outputs[0].dtype = ir.DataType.FLOAT
    return [as_float, scaled], scaled.outputs[0]


@dataclasses.dataclass(frozen=True)
class CacheEntry:
    """One rewritten cache tensor (a layer's keys or values)."""

    layer: int
    kind: str
    kv_heads: int | str
    head_dim: int | str


def _scale_shape(shape: ir.Shape | None) -> ir.Shape | None:
    return None if shape is None or len(shape) != 4 else ir.Shape([*list(shape)[:3], 1])


class KvCacheInt8Pass(ir.passes.InPlacePass):
    """Make the KV cache of a with-past graph int8 codes + per-token float scales."""

    def __init__(self) -> None:
        super().__init__()
        self.entries: list[CacheEntry] = []

    @staticmethod
    def check(model: ir.Model) -> list[tuple[ir.Value, ir.Value]]:
        """(past input, present output) pairs to rewrite; a GraphqError when the graph has none or is
        not a float cache (nothing is changed before this returns)."""
        graph = model.graph
        outputs = {value.name: value for value in graph.outputs}
        past = [value for value in graph.inputs if PAST_INPUT.match(value.name)]
        if not past:
            raise GraphqError("the graph has no past_key_values.* inputs: an int8 KV cache needs a graph exported "
                              "with past (graphq export --with-past)")
        pairs = []
        for value in past:
            match = _FLOAT_PAST.match(value.name)
            if match is None or value.dtype != ir.DataType.FLOAT:
                raise GraphqError(f"cache input {value.name} is not a float32 key/value ({value.dtype}); "
                                  "the KV cache is already quantized or of an unsupported type")
            layer, kind = match.groups()
            present = outputs.get(PRESENT_OUTPUT.format(layer=layer, kind=kind))
            if present is None or present.dtype != ir.DataType.FLOAT:
                raise GraphqError(f"the graph has {value.name} but no float32 output "
                                  f"{PRESENT_OUTPUT.format(layer=layer, kind=kind)}")
            if value.shape is None or len(value.shape) != 4:
                raise GraphqError(f"cache input {value.name} must be 4-D [batch, kv_heads, past, head_dim], got {value.shape}")
            pairs.append((value, present))
        return pairs

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        pairs = self.check(model)
        graph = model.graph
        opset = model.opset_imports.get("", 18)
        if opset < 13:
            raise GraphqError(f"an int8 KV cache needs opset >= 13 (Slice/ReduceMax forms), the graph has {opset}")
        first_node = next(iter(graph))
        for past, present in pairs:
            layer, kind = _FLOAT_PAST.match(past.name).groups()
            stem = f"/graphq/kv_cache/{layer}/{kind}"
            uses = list(past.uses())
            past.dtype = ir.DataType.INT8
            past_scale = ir.Value(name=past.name + SCALE_SUFFIX, type=ir.TensorType(ir.DataType.FLOAT),
                                  shape=_scale_shape(past.shape))
            graph.inputs.insert(list(graph.inputs).index(past) + 1, past_scale)
            dequant_nodes, past_float = int8_dequantizer(past, past_scale, f"{stem}/past")
            past_float.shape = ir.Shape(list(past.shape))
            graph.insert_before(first_node, dequant_nodes)
            for node, index in uses:
                node.replace_input_with(index, past_float)

            start = _constant(graph, "graphq.int8.c2", np.array([2], dtype=np.int64))
            big = _constant(graph, "graphq.int8.int64_max", np.array([np.iinfo(np.int64).max], dtype=np.int64))
            past_length = ir.node("Shape", [past], attributes={"start": 2, "end": 3}, name=f"{stem}/past_length")
            new_tokens = ir.node("Slice", [present, past_length.outputs[0], big, start], name=f"{stem}/new_tokens")
            for node in (past_length, new_tokens):
                node.outputs[0].name = f"{node.name}_output"
            new_tokens.outputs[0].dtype = ir.DataType.FLOAT
            quant_nodes, new_codes, new_scale = int8_quantizer(graph, new_tokens.outputs[0], -1, opset, f"{stem}/new")
            codes = ir.node("Concat", [past, new_codes], attributes={"axis": 2}, name=f"{stem}/present")
            scales = ir.node("Concat", [past_scale, new_scale], attributes={"axis": 2}, name=f"{stem}/present_scale")
            graph.append(past_length)
            graph.append(new_tokens)
            graph.extend(quant_nodes)
            graph.extend([codes, scales])

            name = present.name
            position = list(graph.outputs).index(present)
            present.name = f"{name}/float"
            codes.outputs[0].name = name
            codes.outputs[0].dtype = ir.DataType.INT8
            codes.outputs[0].shape = present.shape
            scales.outputs[0].name = name + SCALE_SUFFIX
            scales.outputs[0].dtype = ir.DataType.FLOAT
            scales.outputs[0].shape = _scale_shape(present.shape)
            graph.outputs[position] = codes.outputs[0]
            graph.outputs.insert(position + 1, scales.outputs[0])
            dims = list(past.shape)
            self.entries.append(CacheEntry(int(layer), kind, dims[1], dims[3]))
        logger.info("kv cache: %d key/value tensors now cross the graph boundary as int8 + per-token scales", len(self.entries))
        return ir.passes.PassResult(model, modified=bool(self.entries))
