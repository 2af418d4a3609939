"""Emit a tied embedding / LM head whose rows come in two precisions (:mod:`graphq.numerics.head_rows`).

Input: the head ``z = MatMul(h, Transpose(E))`` with ``E [V, D]`` a constant that embedding ``Gather``
lookups also read; the hot rows ``H`` (ids, increasing) and the other rows ``C`` (increasing); and two
:class:`~graphq.numerics.weight_only.QuantizedWeight`: ``hot`` of ``W[:, H]`` and ``cold`` of ``W[:, C]``,
``W = E^T [D, V]``. With ``position = row_positions(H, V)`` (``position[t]`` is row ``t``'s place when
the hot rows are stacked first):

- head: ``z = Gather(Concat(MatMulNBits_hot(h), MatMulNBits_cold(h), axis=-1), position, axis=-1)``,
  i.e. ``z[..., t] = h . W_hat[:, t]`` in vocabulary order (the two MatMulNBits are emitted by
  :class:`~graphq.passes.weight_only_emit.WeightOnlyEmissionPass`, with its scale storage and
  ``accuracy_level``);
- each lookup ``Gather(E, ids)``: ``p = Gather(position, ids)``, and
  ``Where(p < |H|, GBQ_hot(min(p, |H| - 1)), GBQ_cold(max(p - |H|, 0)))``, the two
  ``GatherBlockQuantized`` reading the head's codes, scales and zero points (one copy of every row).

``E`` and its ``Transpose`` go once nothing else reads them. The pass changes nothing (and says so)
when there are no hot rows: the plain shared head of :mod:`graphq.passes.embedding_quant` is that case.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.numerics.head_rows import row_positions
from graphq.numerics.weight_only import QuantizedWeight
from graphq.passes.embedding_quant import embedding_lookups, shared_lookup_inputs
from graphq.passes.qdq_insert import drop_unused_weight, new_initializer
from graphq.passes.weight_only_emit import WeightOnlyEmissionPass, WeightOnlyEmitConfig, named_matmuls

logger = logging.getLogger(__name__)


class TiedHeadSplitPass(ir.passes.InPlacePass):
    """Rewrite the tied head ``head`` (and the lookups of its table) with hot and cold rows."""

    def __init__(self, head: str, rows: np.ndarray, hot: QuantizedWeight, cold: QuantizedWeight,
                 config: WeightOnlyEmitConfig = WeightOnlyEmitConfig()) -> None:
        super().__init__()
        if config.format != "matmulnbits":
            raise GraphqError(f"a head with hot rows is emitted as MatMulNBits, not as format '{config.format}'")
        self.head, self.rows, self.hot, self.cold, self.config = head, np.asarray(rows, dtype=np.int64), hot, cold, config
        self.lookups: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        if not self.rows.size:
            logger.info("tied head split: no hot rows; %s left as it is", self.head)
            return ir.passes.PassResult(model, modified=False)
        graph = model.graph
        node = named_matmuls(graph, [self.head], "tied head split")[self.head]
        transpose = node.inputs[1].producer()
        if transpose is None or transpose.op_type != "Transpose" or transpose.inputs[0].const_value is None:
            raise GraphqError(f"tied head split: {self.head} does not read the transpose of a constant table")
        table = transpose.inputs[0]
        vocab, dim = table.const_value.shape
        position = row_positions(self.rows, vocab)
        cold_rows = np.flatnonzero(np.isin(np.arange(vocab), self.rows, invert=True))
        for part, rows in ((self.hot, self.rows), (self.cold, cold_rows)):
            if part.q.shape != (dim, rows.size):
                raise GraphqError(f"tied head split: expected a quantized [{dim}, {rows.size}] part, got {part.q.shape}")
        lookups = [g for g in embedding_lookups(model) if g.inputs[0] is table]
        stem = node.name.strip("/").replace("/", "_")
        positions = new_initializer(graph, f"{stem}.row_position", position)

        # Two float MatMuls on the row subsets, which the uniform emitter then rewrites as MatMulNBits.
        x, output, weight = node.inputs[0], node.outputs[0], table.const_value.numpy().T
        float_type = table.const_value.dtype  # value types may be missing (no value_info): the table's
        parts = []
        for tag, rows in (("hot", self.rows), ("cold", cold_rows)):
            columns = new_initializer(graph, f"{stem}.{tag}_rows_float", np.ascontiguousarray(weight[:, rows]))
            matmul = ir.node("MatMul", [x, columns], name=f"{node.name}_{tag}_rows")
            matmul.outputs[0].dtype = float_type
            if x.shape is not None:
                matmul.outputs[0].shape = ir.Shape([*list(x.shape)[:-1], int(rows.size)])
            parts.append(matmul)
        concat = ir.node("Concat", [p.outputs[0] for p in parts], attributes={"axis": -1}, name=f"{node.name}_rows_Concat")
        ordered = ir.node("Gather", [concat.outputs[0], positions], attributes={"axis": -1}, name=f"{node.name}_rows_Gather")
        graph.insert_before(node, [*parts, concat, ordered])
        concat.outputs[0].dtype = ordered.outputs[0].dtype = float_type
        ordered.outputs[0].shape = output.shape
        output.replace_all_uses_with(ordered.outputs[0], replace_graph_outputs=True)
        graph.remove(node, safe=True)
        name = output.name
        output.name, ordered.outputs[0].name = f"{name}/float_matmul", name
        WeightOnlyEmissionPass({parts[0].name: self.hot, parts[1].name: self.cold}, self.config)(model)
        emitted = {n.name: n for n in graph}
        hot_head = emitted[f"{parts[0].name}_Q{self.hot.config.bits}"]
        cold_head = emitted[f"{parts[1].name}_Q{self.cold.config.bits}"]

        for gather in lookups:
            self._split_lookup(graph, gather, positions, hot_head, cold_head, self.rows.size, cold_rows.size, float_type)
        drop_unused_weight(graph, transpose.outputs[0])
        if not table.uses() and not table.is_graph_output() and table.name in graph.initializers:
            graph.initializers.pop(table.name)
        model.opset_imports.setdefault("com.microsoft", 1)
        logger.info("tied head split: %s as %d hot rows (%d bits) and %d others (%d bits); %d lookups", self.head,
                    self.rows.size, self.hot.config.bits, cold_rows.size, self.cold.config.bits, len(self.lookups))
        return ir.passes.PassResult(model, modified=True)

    def _split_lookup(self, graph: ir.Graph, gather: ir.Node, positions: ir.Value, hot_head: ir.Node, cold_head: ir.Node,
                      n_hot: int, n_cold: int, float_type: ir.DataType) -> None:
        stem = gather.name.strip("/").replace("/", "_")
        ids, output = gather.inputs[1], gather.outputs[0]
        scalar = {name: new_initializer(graph, f"{stem}.{name}", np.array(value, dtype=np.int64))
                  for name, value in (("hot_rows", n_hot), ("last_hot_row", n_hot - 1), ("first_row", 0))}
        last_axis = new_initializer(graph, f"{stem}.last_axis", np.array([-1], dtype=np.int64))
        place = ir.node("Gather", [positions, ids], attributes={"axis": 0}, name=f"{stem}/row_position_Gather")
        is_hot = ir.node("Less", [place.outputs[0], scalar["hot_rows"]], name=f"{stem}/is_hot")
        hot_index = ir.node("Min", [place.outputs[0], scalar["last_hot_row"]], name=f"{stem}/hot_index")
        shifted = ir.node("Sub", [place.outputs[0], scalar["hot_rows"]], name=f"{stem}/cold_shift")
        cold_index = ir.node("Max", [shifted.outputs[0], scalar["first_row"]], name=f"{stem}/cold_index")
        nodes = [place, is_hot, hot_index, shifted, cold_index]
        for index_node in nodes:
            index_node.outputs[0].dtype = ir.DataType.BOOL if index_node is is_hot else ir.DataType.INT64
            index_node.outputs[0].shape = ids.shape
        graph.insert_before(gather, nodes)
        rows = []
        for tag, head, index, count in (("hot", hot_head, hot_index, n_hot), ("cold", cold_head, cold_index, n_cold)):
            inputs, attributes = shared_lookup_inputs(graph, gather, head, count, role_prefix=f"{tag}_")
            lookup = ir.node("GatherBlockQuantized", [inputs[0], index.outputs[0], *inputs[1:]], attributes=attributes,
                             domain="com.microsoft", name=f"{gather.name}_{tag}_Q{attributes['bits']}")
            graph.insert_before(gather, lookup)
            lookup.outputs[0].dtype = float_type
            rows.append(lookup.outputs[0])
        condition = ir.node("Unsqueeze", [is_hot.outputs[0], last_axis], name=f"{stem}/is_hot_Unsqueeze")
        condition.outputs[0].dtype = ir.DataType.BOOL
        chosen = ir.node("Where", [condition.outputs[0], *rows], name=f"{stem}/rows_Where")
        graph.insert_before(gather, [condition, chosen])
        chosen.outputs[0].dtype, chosen.outputs[0].shape = float_type, output.shape
        output.replace_all_uses_with(chosen.outputs[0], replace_graph_outputs=True)
        graph.remove(gather, safe=True)
        name = output.name
        output.name, chosen.outputs[0].name = f"{name}/float_gather", name
        self.lookups.append(gather.name)
