"""Differentiable evaluation of an ONNX graph with PyTorch, for tuning quantization parameters end to end.

ONNX Runtime runs a graph but gives no gradients. :class:`TorchGraph` walks an ``onnx_ir`` graph in
its (topological) node order and computes every node with the PyTorch function of its op type from
:data:`TORCH_OPS`, a table of ONNX semantics (numpy broadcasting, integer division truncating, Gather
with negative indices, ...). Initializers become tensors once; ``overrides`` replace chosen values
(e.g. a MatMul weight by ``codes * scales`` whose scales require grad) on every call, so autograd
reaches them through the whole model.

Only the ops that exported decoder LMs use are in the table (optimum's Llama/Mistral/Qwen/GPT-2
style graphs: shape arithmetic, the attention mask, rotary embeddings, decomposed RMSNorm/LayerNorm,
Softmax attention); an op outside it is refused by name before anything runs. No nested graphs
(If/Loop/Scan) and no ``com.microsoft`` ops: tune on the exported float graph, before fusion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import onnx_ir as ir
import torch

from graphq.errors import UnsupportedModelError

def torch_dtype(data_type: ir.DataType) -> torch.dtype:
    """The torch dtype of an ONNX element type."""
    return torch.from_numpy(np.zeros(0, dtype=data_type.numpy())).dtype


def _attr(node: ir.Node, name: str, default=None):
    attribute = node.attributes.get(name)
    return default if attribute is None else attribute.value


def _ints(tensor: torch.Tensor) -> list[int]:
    return [int(v) for v in tensor.reshape(-1).tolist()]


def _constant(node: ir.Node, _inputs) -> list[torch.Tensor]:
    for name in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        value = _attr(node, name)
        if value is None:
            continue
        if name == "value":
            return [torch.from_numpy(np.array(value.numpy()))]
        return [torch.tensor(value, dtype=torch.float32 if "float" in name else torch.int64)]
    raise UnsupportedModelError(f"Constant node {node.name} has no value attribute graphq can read")


def _unsqueeze(node, inputs):
    data, axes = inputs[0], _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _attr(node, "axes")
    rank = data.dim() + len(axes)
    for axis in sorted(a % rank for a in axes):
        data = data.unsqueeze(axis)
    return [data]


def _squeeze(node, inputs):
    data = inputs[0]
    axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _attr(node, "axes")
    if axes is None:
        return [data.squeeze()]
    for axis in sorted((a % data.dim() for a in axes), reverse=True):
        data = data.squeeze(axis)
    return [data]


def _div(_node, inputs):
    a, b = inputs
    if a.is_floating_point() or b.is_floating_point():
        return [a / b]
    return [torch.div(a, b, rounding_mode="trunc")]


def _shape(node, inputs):
    shape = list(inputs[0].shape)
    start, end = _attr(node, "start", 0), _attr(node, "end", None)
    return [torch.tensor(shape[start:end], dtype=torch.int64)]


def _gather(node, inputs):
    data, indices = inputs
    axis = _attr(node, "axis", 0) % data.dim()
    indices = torch.where(indices < 0, indices + data.shape[axis], indices)
    picked = data.index_select(axis, indices.reshape(-1))
    return [picked.reshape((*data.shape[:axis], *indices.shape, *data.shape[axis + 1:]))]


def _reshape(node, inputs):
    data, shape = inputs[0], _ints(inputs[1])
    if not _attr(node, "allowzero", 0):
        shape = [data.shape[i] if size == 0 else size for i, size in enumerate(shape)]
    return [data.reshape(shape)]


def _transpose(node, inputs):
    perm = _attr(node, "perm") or list(reversed(range(inputs[0].dim())))
    return [inputs[0].permute(*perm)]


def _slice(_node, inputs):
    data, starts, ends = inputs[0], _ints(inputs[1]), _ints(inputs[2])
    axes = _ints(inputs[3]) if len(inputs) > 3 and inputs[3] is not None else list(range(len(starts)))
    steps = _ints(inputs[4]) if len(inputs) > 4 and inputs[4] is not None else [1] * len(starts)
    index = [slice(None)] * data.dim()
    flips = []
    for start, end, axis, step in zip(starts, ends, axes, steps):
        axis %= data.dim()
        size = data.shape[axis]
        if step > 0:
            start = max(0, min(size, start + size if start < 0 else start))
            end = max(0, min(size, end + size if end < 0 else end))
            index[axis] = slice(start, end, step)
        else:  # torch slices forwards only: take the range, then flip it
            start = max(-1, min(size - 1, start + size if start < 0 else start))
            end = max(-1, min(size - 1, end + size if end < 0 else end))
            index[axis] = slice(end + 1, start + 1)
            flips.append((axis, -step))
    out = data[tuple(index)]
    for axis, step in flips:
        out = out.flip(axis)
        if step != 1:
            out = out.index_select(axis, torch.arange(0, out.shape[axis], step))
    return [out]


def _constant_of_shape(node, inputs):
    value = _attr(node, "value")
    fill = torch.from_numpy(np.array(value.numpy())).reshape(()) if value is not None else torch.tensor(0.0)
    return [torch.full(_ints(inputs[0]), fill.item(), dtype=fill.dtype)]


def _expand(_node, inputs):
    data, shape = inputs[0], _ints(inputs[1])
    return [data.expand(torch.broadcast_shapes(tuple(data.shape), tuple(shape)))]


def _reduce(reduce: Callable) -> Callable:
    def run(node, inputs):
        data = inputs[0]
        axes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _attr(node, "axes")
        keep = bool(_attr(node, "keepdims", 1))
        if not axes:
            if _attr(node, "noop_with_empty_axes", 0):
                return [data]
            axes = list(range(data.dim()))
        return [reduce(data, dim=[a % data.dim() for a in axes], keepdim=keep)]
    return run


def _cast(node, inputs):
    return [inputs[0].to(torch_dtype(ir.DataType(_attr(node, "to"))))]


def _concat(node, inputs):
    return [torch.cat([t for t in inputs if t is not None], dim=_attr(node, "axis"))]


def _split(node, inputs):
    data, axis = inputs[0], _attr(node, "axis", 0)
    sizes = _ints(inputs[1]) if len(inputs) > 1 and inputs[1] is not None else _attr(node, "split")
    if sizes is None:
        parts = len(node.outputs)
        sizes = [-(-data.shape[axis] // parts)] * parts
        sizes[-1] = data.shape[axis] - sum(sizes[:-1])
    return list(torch.split(data, list(sizes), dim=axis))


def _layer_norm(node, inputs):
    data, scale = inputs[0], inputs[1]
    bias = inputs[2] if len(inputs) > 2 else None
    axis = _attr(node, "axis", -1) % data.dim()
    shape = data.shape[axis:]
    return [torch.nn.functional.layer_norm(data, shape, scale, bias, _attr(node, "epsilon", 1e-5))]


def _trilu(node, inputs):
    k = int(inputs[1].item()) if len(inputs) > 1 and inputs[1] is not None else 0
    return [torch.triu(inputs[0], k) if _attr(node, "upper", 1) else torch.tril(inputs[0], k)]


def _elementwise(function: Callable) -> Callable:
    return lambda _node, inputs: [function(*inputs)]


TORCH_OPS: dict[str, Callable[[ir.Node, list], list[torch.Tensor]]] = {
    "Constant": _constant,
    "Identity": _elementwise(lambda x: x),
    "Add": _elementwise(torch.add), "Sub": _elementwise(torch.sub), "Mul": _elementwise(torch.mul), "Div": _div,
    "Pow": _elementwise(torch.pow), "Neg": _elementwise(torch.neg), "Sqrt": _elementwise(torch.sqrt),
    "Reciprocal": _elementwise(torch.reciprocal), "Exp": _elementwise(torch.exp), "Log": _elementwise(torch.log),
    "Tanh": _elementwise(torch.tanh), "Erf": _elementwise(torch.erf), "Sigmoid": _elementwise(torch.sigmoid),
    "Relu": _elementwise(torch.relu), "Cos": _elementwise(torch.cos), "Sin": _elementwise(torch.sin),
    "Max": _elementwise(torch.maximum), "Min": _elementwise(torch.minimum),
    "Equal": _elementwise(torch.eq), "Less": _elementwise(torch.lt), "LessOrEqual": _elementwise(torch.le),
    "Greater": _elementwise(torch.gt), "GreaterOrEqual": _elementwise(torch.ge),
    "And": _elementwise(torch.logical_and), "Or": _elementwise(torch.logical_or), "Not": _elementwise(torch.logical_not),
    "IsNaN": _elementwise(torch.isnan), "IsInf": _elementwise(torch.isinf), "Where": _elementwise(torch.where),
    "MatMul": _elementwise(torch.matmul),
    "Softmax": lambda node, inputs: [torch.softmax(inputs[0], dim=_attr(node, "axis", -1))],
    "Range": lambda _node, inputs: [torch.arange(inputs[0].item(), inputs[1].item(), inputs[2].item(), dtype=inputs[0].dtype)],
    "Flatten": lambda node, inputs: [inputs[0].reshape(int(np.prod(inputs[0].shape[:_attr(node, "axis", 1)])), -1)],
    "Unsqueeze": _unsqueeze, "Squeeze": _squeeze, "Shape": _shape, "Gather": _gather, "Reshape": _reshape,
    "Transpose": _transpose, "Slice": _slice, "ConstantOfShape": _constant_of_shape, "Expand": _expand,
    "ReduceMean": _reduce(torch.mean), "ReduceSum": _reduce(torch.sum), "ReduceMax": _reduce(torch.amax),
    "Cast": _cast, "Concat": _concat, "Split": _split, "LayerNormalization": _layer_norm, "Trilu": _trilu,
}


class TorchGraph:
    """``graph`` evaluated with PyTorch (module docstring). Raises UnsupportedModelError for an op it
    cannot run. The graph must not change while this object is used."""

    def __init__(self, model: ir.Model) -> None:
        graph = model.graph
        unsupported = sorted({f"{n.domain or 'ai.onnx'}::{n.op_type}" for n in graph
                              if n.domain not in ("", "ai.onnx") or n.op_type not in TORCH_OPS})
        if unsupported:
            raise UnsupportedModelError(f"cannot evaluate the graph with PyTorch: unsupported ops {', '.join(unsupported)}")
        self.graph = graph
        self._constants: dict[str, torch.Tensor] = {}
        # value name -> index of the last node that reads it: dropped after that node (autograd keeps
        # what the backward pass needs; the rest, e.g. attention masks and scores, is freed at once)
        self._last_use: dict[str, int] = {}
        for index, node in enumerate(graph):
            for value in node.inputs:
                if value is not None and value.name:
                    self._last_use[value.name] = index

    def constant(self, name: str) -> torch.Tensor:
        """The initializer ``name`` as a tensor (read once, then cached)."""
        if name not in self._constants:
            value = self.graph.initializers[name]
            self._constants[name] = torch.from_numpy(np.array(value.const_value.numpy()))
        return self._constants[name]

    def __call__(self, feeds: Mapping[str, np.ndarray | torch.Tensor], outputs: Sequence[str] | None = None,
                 overrides: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The graph's ``outputs`` (default: all) for ``feeds``; ``overrides`` replace the named values."""
        overrides = overrides or {}
        values: dict[str, torch.Tensor] = {}
        for name, array in feeds.items():
            values[name] = array if isinstance(array, torch.Tensor) else torch.from_numpy(np.asarray(array))
        values.update(overrides)
        wanted = list(outputs) if outputs is not None else [v.name for v in self.graph.outputs]

        def read(value: ir.Value | None):
            if value is None or not value.name:
                return None
            if value.name not in values:
                if value.name in self.graph.initializers:
                    values[value.name] = self.constant(value.name)
                else:
                    raise UnsupportedModelError(f"value '{value.name}' has no producer, feed or initializer")
            return values[value.name]

        keep = set(wanted)
        for index, node in enumerate(self.graph):
            if all(out.name in values for out in node.outputs):
                continue  # overridden
            results = TORCH_OPS[node.op_type](node, [read(v) for v in node.inputs])
            for out, result in zip(node.outputs, results):
                if out.name and out.name not in overrides:
                    values[out.name] = result
            for value in node.inputs:
                if value is not None and self._last_use.get(value.name) == index and value.name not in keep:
                    values.pop(value.name, None)
        return {name: values[name] for name in wanted}
