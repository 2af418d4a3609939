"""Quantize token-embedding lookups: ``Gather(E, ids)`` -> ``com.microsoft.GatherBlockQuantized``.

An embedding ``E [V, D]`` is read one row per token, so each row is quantized on its own in groups
of ``G`` along ``D`` (round to nearest, :func:`~graphq.numerics.weight_only.quantize_rtn` applied to
``E^T``, whose groups run along ``D``): ``E_hat[v, d] = (q[v, d] - z[v, g(d)]) s[v, g(d)]``.
ONNX Runtime's ``GatherBlockQuantized`` (uint8 data, ``bits`` 4 or 8, ``quantize_axis`` = 1,
``gather_axis`` = 0) stores these codes exactly as ``MatMulNBits`` stores the columns of a weight
``W [D, V]``: ``B [V, n_blocks, G * bits / 8]`` reshaped to ``[V, D * bits / 8]``, scales ``[V, n_blocks]``,
and the same default zero point ``2^(bits-1)`` for symmetric groups.

Tied embeddings. When the LM head is ``MatMulNBits`` over ``E^T`` (the export's tied
``lm_head = Transpose(E)``), the lookup reads *the head's own packed codes* through ``Reshape``
nodes: the matrix is stored once, in 4 bits, and both uses see the same ``E_hat``. That needs
``G`` to divide ``D`` (no padded last block): :func:`embedding_group` picks the group.

Which Gathers: axis 0, data a 2-D float constant, indices not constant. Everything else is left
as it is (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphq.numerics.weight_only import WeightQuantConfig, pack_matmul_nbits, quantize_rtn
from graphq.passes.qdq_insert import new_initializer
from graphq.passes.weight_only_emit import stored_float

logger = logging.getLogger(__name__)

GATHER_BLOCK_QUANTIZED_BITS = (4, 8)
MIN_EMBEDDING_GROUP = 16  # ORT's blockwise kernels take blocks of 16 and up (powers of two)


def embedding_group(dim: int, group_size: int) -> int | None:
    """The largest power-of-two group ``<= group_size`` (``>= 16``) dividing ``dim``; ``dim`` itself
    for per-channel (``group_size <= 0``) when it is a power of two; else None."""
    limit = group_size if group_size > 0 else dim
    g = 1 << (max(limit, 1).bit_length() - 1)
    while g >= MIN_EMBEDDING_GROUP:
        if dim % g == 0:
            return g
        g //= 2
    return None


@dataclasses.dataclass(frozen=True)
class EmbeddingQuantConfig:
    weights: WeightQuantConfig = WeightQuantConfig(bits=4, group_size=128, symmetric=True)


def embedding_lookups(model: ir.Model) -> list[ir.Node]:
    """The ``Gather`` nodes that read rows of a 2-D float constant with run-time indices."""
    found = []
    for node in model.graph:
        if node.op_type != "Gather" or node.domain != "" or node.attributes.get_int("axis", 0) != 0:
            continue
        data, indices = node.inputs[0], node.inputs[1]
        if (data is None or data.const_value is None or data.is_graph_input() or indices is None
                or indices.const_value is not None or len(data.const_value.shape) != 2
                or data.const_value.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16)):
            continue
        found.append(node)
    return found


def shared_lookup_inputs(graph: ir.Graph, gather: ir.Node, head: ir.Node, rows: int, *, role_prefix: str = "",
                         before: ir.Node | None = None) -> tuple[list[ir.Value], dict]:
    """``GatherBlockQuantized`` inputs (codes, scales, zero points) and attributes that read the codes of
    the ``MatMulNBits`` ``head`` (``N = rows``) as a ``[rows, ...]`` table: each of the head's inputs
    reshaped to ``[rows, -1]``, inserted before ``before`` (default ``gather``)."""
    stem = gather.name.strip("/").replace("/", "_")
    reshaped = []
    for index, role in ((1, "qweight"), (2, "scales"), (3, "zero_points")):
        if index >= len(head.inputs) or head.inputs[index] is None:
            continue
        shape = new_initializer(graph, f"{stem}.{role_prefix}{role}_shape", np.array([rows, -1], dtype=np.int64))
        reshape = ir.node("Reshape", [head.inputs[index], shape], name=f"{stem}/{role_prefix}{role}_Reshape")
        reshape.outputs[0].name = f"{stem}.{role_prefix}{role}_rows"
        reshape.outputs[0].dtype = head.inputs[index].dtype
        graph.insert_before(before or gather, reshape)
        reshaped.append(reshape.outputs[0])
    attributes = {"gather_axis": 0, "quantize_axis": 1, "block_size": head.attributes.get_int("block_size"),
                  "bits": head.attributes.get_int("bits")}
    return reshaped, attributes


class EmbeddingQuantizationPass(ir.passes.InPlacePass):
    """Rewrite embedding lookups as ``GatherBlockQuantized``.

    ``shared`` maps an embedding initializer name to the ``MatMulNBits`` node (by name) whose weight is
    that embedding's transpose: the lookup then reads that node's codes.
    """

    def __init__(self, config: EmbeddingQuantConfig = EmbeddingQuantConfig(), *, shared: Mapping[str, str] | None = None) -> None:
        super().__init__()
        self.config = config
        self.shared = dict(shared or {})
        self.rewritten: dict[str, str] = {}  # Gather name -> "shared" | "own"

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = {node.name: node for node in graph}
        for gather in embedding_lookups(model):
            data = gather.inputs[0]
            vocab, dim = data.const_value.shape
            head = nodes.get(self.shared.get(data.name, ""))
            if head is not None and head.op_type == "MatMulNBits" and dim % head.attributes.get_int("block_size") == 0:
                inputs, attributes = shared_lookup_inputs(graph, gather, head, vocab)
                how = "shared"
            elif any(use.node.op_type != "Gather" for use in data.uses()):
                logger.info("embedding: %s is also read by %s (e.g. a float LM head); lookup left float",
                            data.name, next(u.node.name for u in data.uses() if u.node.op_type != "Gather"))
                continue
            else:
                prepared = self._own_inputs(graph, gather, data.const_value.numpy(), vocab, dim)
                if prepared is None:
                    continue
                inputs, attributes = prepared
                how = "own"
            lookup = ir.node("GatherBlockQuantized", [inputs[0], gather.inputs[1], *inputs[1:]], attributes=attributes,
                             domain="com.microsoft", name=f"{gather.name}_Q{attributes['bits']}")
            graph.insert_before(gather, lookup)
            output, result = gather.outputs[0], lookup.outputs[0]
            result.dtype, result.shape = output.dtype or data.const_value.dtype, output.shape
            output.replace_all_uses_with(result, replace_graph_outputs=True)
            graph.remove(gather, safe=True)
            name = output.name
            output.name, result.name = f"{name}/float_gather", name
            if not data.uses() and not data.is_graph_output() and data.name in graph.initializers:
                graph.initializers.pop(data.name)
            self.rewritten[gather.name] = how
        if self.rewritten:
            model.opset_imports.setdefault("com.microsoft", 1)
        logger.info("embedding: %d lookups quantized (%s)", len(self.rewritten),
                    ", ".join(f"{k}: {how}" for k, how in self.rewritten.items()) or "none")
        return ir.passes.PassResult(model, modified=bool(self.rewritten))

    def _own_inputs(self, graph: ir.Graph, gather: ir.Node, table: np.ndarray, vocab: int, dim: int
                    ) -> tuple[list[ir.Value], dict] | None:
        cfg = self.config.weights
        group = embedding_group(dim, cfg.group_size)
        if cfg.bits not in GATHER_BLOCK_QUANTIZED_BITS or group is None:
            logger.info("embedding: %s left float (bits %d, no group <= %d dividing %d)", gather.name, cfg.bits,
                        cfg.group_size, dim)
            return None
        quantized = quantize_rtn(table.astype(np.float32).T, dataclasses.replace(cfg, group_size=group))
        packed = pack_matmul_nbits(quantized)
        stem = gather.name.strip("/").replace("/", "_")
        float_type = ir.DataType.FLOAT16 if table.dtype == np.float16 else ir.DataType.FLOAT
        inputs = [new_initializer(graph, f"{stem}.qweight", packed["B"].reshape(vocab, -1)),
                  stored_float(graph, f"{stem}.scales", packed["scales"].reshape(vocab, -1), cfg.scale_dtype, float_type,
                               group_axis=1)]
        if packed["zero_points"] is not None:
            inputs.append(new_initializer(graph, f"{stem}.zero_points", packed["zero_points"].reshape(vocab, -1)))
        return inputs, {"gather_axis": 0, "quantize_axis": 1, "block_size": group, "bits": cfg.bits}
