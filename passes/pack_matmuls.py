"""Pack the MatMuls that read one activation into one MatMul, an exact rewrite.

For constant weights ``W_1 [K, N_1] .. W_m [K, N_m]`` read by ``y_i = MatMul(x, W_i)`` (q/k/v
projections after one norm, gate/up after another):

    y   = MatMul(x, W)          W = [W_1 | W_2 | ... | W_m]   (concatenated along the output axis)
    y_i = Split(y, [N_1 .. N_m], axis=-1)[i]

Column ``n`` of ``x @ W`` is column ``n`` of the ``W_i`` it came from times ``x``: the same dot
products, so the rewrite is exact in real arithmetic and, up to the GEMM kernel's blocking, in float.
Quantized afterwards, one activation quantization and one integer GEMM serve the whole group, and
per-output-column weight scales are the same as for the separate MatMuls.

Consumers that take the parts packed (a pattern table, :data:`PACKED_CONSUMERS`) read ``y`` directly
and the ``Split`` is left out: ONNX Runtime's ``GroupQueryAttention`` takes ``query`` as packed QKV
``[batch, seq, (num_heads + 2 kv_num_heads) head_size]`` when ``key`` and ``value`` are absent, so
q/k/v packed in that order feed it as they are.

A group is packed only when every member has a direct 2-D constant weight of one dtype and input size
``K`` and no member's output is a graph output; with ``node_names`` only those MatMuls are considered
(e.g. the int8 ones of a quantization plan). ``packed`` maps each new MatMul to the names it replaced.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import numpy as np
import onnx_ir as ir

from graphq.passes.qdq_insert import INT8, drop_unused_weight, new_initializer

logger = logging.getLogger(__name__)

# (domain, op_type) -> the input indices that take the parts of a packed input, in packing order;
# the consumer then reads the packed tensor at the first index and the others are left empty.
PACKED_CONSUMERS: dict[tuple[str, str], tuple[int, ...]] = {
    ("com.microsoft", "GroupQueryAttention"): (0, 1, 2),
}


def _direct_weight(node: ir.Node) -> ir.Value | None:
    """The 2-D constant initializer ``W`` of ``MatMul(x, W)`` (not a transposed one), else None."""
    if node.op_type != "MatMul" or node.domain != "" or len(node.inputs) != 2 or node.inputs[0] is None:
        return None
    weight = node.inputs[1]
    if weight is None or weight.is_graph_input() or weight.const_value is None or len(weight.const_value.shape) != 2:
        return None
    return weight


def _packed_consumer(members: list[ir.Node]) -> tuple[ir.Node, list[ir.Node]] | None:
    """(consumer, members in its input order) when the members' outputs feed exactly the packed-input
    slots of one :data:`PACKED_CONSUMERS` node, each once and nothing else."""
    slots = {}
    consumer = None
    for member in members:
        uses = list(member.outputs[0].uses())
        if len(uses) != 1:
            return None
        node, index = uses[0].node, uses[0].idx
        if consumer is not None and node is not consumer:
            return None
        consumer = node
        slots[index] = member
    indices = PACKED_CONSUMERS.get((consumer.domain or "", consumer.op_type))
    if indices is None or sorted(slots) != sorted(indices):
        return None
    return consumer, [slots[i] for i in indices]


def packed_name(names: list[str]) -> str:
    """``/a/b/q_proj/MatMul`` + ``/a/b/k_proj/MatMul`` -> ``/a/b/q_proj+k_proj/MatMul``."""
    parts = [name.split("/") for name in names]
    head = 0
    while all(len(p) > head + 1 and p[head] == parts[0][head] for p in parts):
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 and p[-1 - tail] == parts[0][-1 - tail] for p in parts):
        tail += 1
    middles = ["/".join(p[head:len(p) - tail]) for p in parts]
    return "/".join([*parts[0][:head], "+".join(middles), *(parts[0][len(parts[0]) - tail:] if tail else [])])


class PackMatMulsPass(ir.passes.InPlacePass):
    """Pack constant-weight MatMuls that share their input (module docstring)."""

    def __init__(self, node_names: Iterable[str] | None = None) -> None:
        super().__init__()
        self.node_names = None if node_names is None else frozenset(node_names)
        self.packed: dict[str, tuple[str, ...]] = {}

    def _groups(self, graph: ir.Graph) -> list[list[ir.Node]]:
        by_input: dict[int, list[ir.Node]] = {}
        for node in graph:
            if self.node_names is not None and node.name not in self.node_names:
                continue
            if _direct_weight(node) is None or node.outputs[0].is_graph_output():
                continue
            by_input.setdefault(id(node.inputs[0]), []).append(node)
        groups = []
        for members in by_input.values():
            weights = [m.inputs[1].const_value for m in members]
            if len(members) > 1 and len({(w.dtype, w.shape[0]) for w in weights}) == 1:
                groups.append(members)
        return groups

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        consumers = 0
        for members in self._groups(graph):
            found = _packed_consumer(members)
            if found is not None:
                members = found[1]
            self._pack(graph, members, found[0] if found is not None else None)
            consumers += found is not None
        if self.packed:
            logger.info("pack: %d groups of MatMuls packed (%d MatMuls -> %d), %d read packed by %s",
                        len(self.packed), sum(len(v) for v in self.packed.values()), len(self.packed), consumers,
                        "/".join(op for _, op in PACKED_CONSUMERS))
        return ir.passes.PassResult(model, modified=bool(self.packed))

    def _pack(self, graph: ir.Graph, members: list[ir.Node], consumer: ir.Node | None) -> None:
        first = min(members, key=lambda m: list(graph).index(m)) if len(members) > 1 else members[0]
        x = members[0].inputs[0]
        weights = [m.inputs[1] for m in members]
        arrays = [w.const_value.numpy() for w in weights]
        sizes = [a.shape[1] for a in arrays]
        name = packed_name([m.name for m in members])
        stem = name.strip("/").replace("/", "_")
        packed_weight = new_initializer(graph, f"{stem}.weight", np.concatenate(arrays, axis=1))
        del arrays
        matmul = ir.node("MatMul", [x, packed_weight], name=name)
        out = matmul.outputs[0]
        out.name = f"{stem}/packed_out"
        template = members[0].outputs[0]
        out.dtype = template.dtype
        if template.shape is not None:
            out.shape = ir.Shape([*list(template.shape)[:-1], sum(sizes)])
        new_nodes = [matmul]
        if consumer is not None:
            indices = PACKED_CONSUMERS[(consumer.domain or "", consumer.op_type)]
            consumer.replace_input_with(indices[0], out)
            for index in indices[1:]:
                consumer.replace_input_with(index, None)
        else:
            split = ir.node("Split", [out, new_initializer(graph, f"{stem}.split_sizes", np.array(sizes, dtype=np.int64))],
                            attributes={"axis": -1}, num_outputs=len(members), name=f"{name}/Split")
            new_nodes.append(split)
            for member, value in zip(members, split.outputs):
                old = member.outputs[0]
                value.dtype, value.shape = old.dtype, old.shape
                old.replace_all_uses_with(value)
                original = old.name
                old.name = f"{original}/before_pack"
                value.name = original
        # the members only need x, which is defined before the first one: insert the packed nodes there
        graph.insert_before(first, new_nodes)
        for member, weight in zip(members, weights):
            graph.remove(member, safe=True)
            drop_unused_weight(graph, weight)
        self.packed[name] = tuple(m.name for m in members)


def pack_planned_matmuls(model: ir.Model, plan: Mapping[str, str], weight_ranges: dict[str, np.ndarray] | None = None,
                         ) -> tuple[ir.Model, dict[str, str], dict[str, np.ndarray]]:
    """Pack the int8 MatMuls of ``plan`` that share an input; returns the model, the plan with each
    packed group replaced by its new MatMul (int8), and per-column weight ranges (clipping) concatenated
    for the packed nodes whose members all had them."""
    pack = PackMatMulsPass([name for name, p in plan.items() if p == INT8])
    model = pack(model).model
    weight_ranges = dict(weight_ranges or {})
    replaced = {name for members in pack.packed.values() for name in members}
    new_plan = {**{n: p for n, p in plan.items() if n not in replaced}, **{n: INT8 for n in pack.packed}}
    for name, members in pack.packed.items():
        if all(m in weight_ranges for m in members):
            weight_ranges[name] = np.concatenate([weight_ranges.pop(m) for m in members])
    return model, new_plan, weight_ranges
