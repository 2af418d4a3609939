"""Split planned MatMuls into per-embedding-group MatMuls (PEG, seed 001), an exact float rewrite.

For an activation ``x [..., C]`` with channel groups ``I_0 .. I_{K-1}`` (a partition of the ``C``
channels into equal parts, graphq.numerics.peg.embedding_groups) every planned consumer
``y = MatMul(x, W)`` becomes

    xp  = Gather(x, perm, axis=-1)          perm = I_0 ++ I_1 ++ ... (omitted when it is the identity)
    x_g = Split(xp, [C/K] * K, axis=-1)[g]
    y   = Sum_g MatMul(x_g, W[I_g])         (W[I_g]: the rows of W for the group's channels)

which is ``x @ W`` up to float summation order: the activation and the weight rows are permuted
consistently and the product is summed over a partition of the channels. The Gather + Split is
built once per activation and shared by all its planned consumers (q/k/v, gate/up).

The pass changes no precision; quantization is the next step (graphq.quantize runs
:class:`~graphq.passes.qdq_insert.QdqInsertionPass` on the group MatMuls, so each ``x_g`` gets its
own per-tensor scale and each group MatMul fuses into one integer kernel). ``group_nodes`` maps each
new MatMul to the node it came from and ``group_values`` each ``x_g`` to ``(x, g)``.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.passes.qdq_insert import constant_weight, drop_unused_weight, new_initializer

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PegConfig:
    """``groups`` channel groups per activation; ``permute``: gather them by calibrated range first;
    ``float_outlier_group``: the group with the largest range keeps float activations and weights
    (mixed precision as in seed 001; ``1/groups`` of the channels), the others int8."""

    groups: int = 8
    permute: bool = True
    float_outlier_group: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.groups, bool) or not isinstance(self.groups, int) or self.groups < 1:
            raise GraphqError(f"PEG groups must be a positive integer, got {self.groups!r}")


def check_groups_divide(model: ir.Model, node_names: Iterable[str], groups: int) -> None:
    """Refuse ``groups`` that do not divide the hidden size of every planned MatMul's input."""
    nodes = {node.name: node for node in model.graph}
    for name in node_names:
        weight = constant_weight(nodes[name])
        if weight is not None and weight.shape[0] % groups:
            raise GraphqError(f"PEG: {groups} groups do not divide the hidden size {weight.shape[0]} of the input "
                              f"of '{name}'; choose a divisor of every planned MatMul's input size")


class PegGroupingPass(ir.passes.InPlacePass):
    """Rewrite the named MatMuls as sums of per-group MatMuls (module docstring)."""

    def __init__(self, groups: Mapping[str, list[np.ndarray]], node_names: Iterable[str]) -> None:
        super().__init__()
        self.groups = {name: [np.asarray(g, dtype=np.int64) for g in index] for name, index in groups.items()}
        self.node_names = list(dict.fromkeys(node_names))
        self.group_nodes: dict[str, str] = {}
        self.group_values: dict[str, tuple[str, int]] = {}

    def _check(self, nodes: dict[str, ir.Node]) -> None:
        for name in self.node_names:
            node = nodes.get(name)
            if node is None:
                raise GraphqError(f"PEG: node '{name}' is not in the graph")
            weight = constant_weight(node)
            if weight is None:
                raise GraphqError(f"PEG: node '{name}' ({node.op_type}) is not a MatMul with a constant weight")
            index = self.groups.get(node.inputs[0].name)
            if index is None:
                raise GraphqError(f"PEG: no channel groups for '{node.inputs[0].name}' (input of '{name}')")
            merged = np.sort(np.concatenate(index))
            if len({len(g) for g in index}) != 1 or not np.array_equal(merged, np.arange(weight.shape[0])):
                raise GraphqError(f"PEG: the groups of '{node.inputs[0].name}' are not an equal-size partition "
                                  f"of its {weight.shape[0]} channels")

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        self._check(nodes)
        opset = model.opset_imports.get("", 18)
        wanted = set(self.node_names)
        parts: dict[str, list[ir.Value]] = {}
        for node in list(graph):
            if node.name not in wanted:
                continue
            x = node.inputs[0]
            if x.name not in parts:
                new_nodes, parts[x.name] = self._split(graph, x, self.groups[x.name], opset)
                graph.insert_before(node, new_nodes)
                for g, value in enumerate(parts[x.name]):
                    self.group_values[value.name] = (x.name, g)
            self._rewrite(graph, node, parts[x.name], self.groups[x.name])
        logger.info("peg: %d MatMuls split into channel groups over %d activations", len(wanted), len(parts))
        return ir.passes.PassResult(model, modified=bool(wanted))

    @staticmethod
    def _split(graph: ir.Graph, x: ir.Value, index: list[np.ndarray], opset: int) -> tuple[list[ir.Node], list[ir.Value]]:
        perm = np.concatenate(index)
        size = len(index[0])
        new_nodes = []
        source = x
        if not np.array_equal(perm, np.arange(perm.size)):
            indices = new_initializer(graph, f"{x.name}/peg_perm", perm)
            gather = ir.node("Gather", [x, indices], attributes={"axis": -1}, name=f"{x.name}/peg_Gather")
            gather.outputs[0].name = f"{x.name}/peg_permuted"
            source = gather.outputs[0]
            source.dtype, source.shape = x.dtype, x.shape
            new_nodes.append(gather)
        sizes = np.full(len(index), size, dtype=np.int64)
        if opset >= 13:
            split = ir.node("Split", [source, new_initializer(graph, f"{x.name}/peg_sizes", sizes)],
                            attributes={"axis": -1}, num_outputs=len(index), name=f"{x.name}/peg_Split")
        else:
            split = ir.node("Split", [source], attributes={"axis": -1, "split": sizes.tolist()},
                            num_outputs=len(index), name=f"{x.name}/peg_Split")
        shape = None if x.shape is None else ir.Shape([*list(x.shape)[:-1], size])
        for g, value in enumerate(split.outputs):
            value.name = f"{x.name}/peg{g}"
            value.dtype, value.shape = x.dtype, shape
        new_nodes.append(split)
        return new_nodes, list(split.outputs)

    def _rewrite(self, graph: ir.Graph, node: ir.Node, parts: list[ir.Value], index: list[np.ndarray]) -> None:
        weight = constant_weight(node)
        stem = node.name.strip("/").replace("/", "_")
        output = node.outputs[0]
        new_nodes, products = [], []
        for g, (x_g, rows) in enumerate(zip(parts, index)):
            w_g = new_initializer(graph, f"{stem}.peg{g}.weight", np.ascontiguousarray(weight[rows]))
            matmul = ir.node("MatMul", [x_g, w_g], name=f"{node.name}/peg{g}")
            matmul.outputs[0].name = f"{stem}/peg{g}_out"
            matmul.outputs[0].dtype, matmul.outputs[0].shape = output.dtype or ir.DataType.FLOAT, output.shape
            new_nodes.append(matmul)
            products.append(matmul.outputs[0])
            self.group_nodes[matmul.name] = node.name
        total = ir.node("Sum", products, name=f"{node.name}/peg_Sum")
        result = total.outputs[0]
        result.name = f"{stem}/peg_sum"
        result.dtype, result.shape = output.dtype or ir.DataType.FLOAT, output.shape
        new_nodes.append(total)
        graph.insert_before(node, new_nodes)
        old_weight = node.inputs[1]
        output.replace_all_uses_with(result, replace_graph_outputs=True)
        graph.remove(node, safe=True)
        if result.is_graph_output():  # keep the model's output names (e.g. "logits")
            name = output.name
            output.name = f"{name}/float_matmul"
            result.name = name
        drop_unused_weight(graph, old_weight)
