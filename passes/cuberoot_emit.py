"""Emit cube-root (companded) quantized weights in front of their MatMuls (``y = x @ W_hat``).

Input: per MatMul (by node name) a :class:`~graphq.numerics.companding.CubeRootWeight` with
``W_hat[k, n] = sigma[g(k), n] * (q[k, n] - Z)^3`` (``Z = 2^(b-1)``, groups ``g(k) = k // G``). No
ONNX Runtime kernel multiplies by a non-uniform grid, so the weight is rebuilt in float before a
plain ``MatMul``, in one of two forms (:data:`CUBEROOT_FORMS`):

- ``codebook``: ``Gather(codebook, Cast(q, int32))`` with the ``2^b``-entry table ``(q - Z)^3``,
  times ``Gather(sigma, rows)`` (``rows[k] = g(k)``, one int64 initializer per ``(K, G)`` shared by
  every weight of that shape). Codes are stored uint4 (4 bits: two per byte in the file) or uint8.
  Everything upstream of the MatMul is constant, so ONNX Runtime folds it into a float32 weight
  when the session is created: the file holds 4-bit codes, the running session float weights
  (float speed and memory). Bit-exact with :meth:`CubeRootWeight.dequantize`.
- ``dq-cube``: ``Pow(DequantizeLinear(k, t, axis=0, block_size=G), 3)`` with the signed levels
  ``k = q - Z`` stored int4 / int8 (no zero point) and ``t = cbrt(sigma)`` (blockwise, opset 21;
  a last group shorter than ``G`` is allowed). ONNX Runtime does not constant-fold
  ``DequantizeLinear`` (it keeps QDQ units for its fusions), so the session keeps 4-bit codes and
  rebuilds the float weight on every run. Equal to :meth:`CubeRootWeight.dequantize_cube_form`.

Weights that are the transpose of a constant (a tied LM head) are handled like plain constants; the
source constant stays for its other users.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import ml_dtypes
import numpy as np
import onnx_ir as ir
from graphq.passes.qdq_insert import drop_unused_weight, new_initializer
from graphq.passes.weight_only_emit import BLOCKWISE_DQ_OPSET
from graphq.passes.weight_only_emit import named_matmuls

from graphq.errors import GraphqError
from graphq.numerics.companding import CubeRootWeight, codebook

logger = logging.getLogger(__name__)

CUBEROOT_FORMS = ("codebook", "dq-cube")
_CODE_STORAGE = {4: ml_dtypes.uint4, 8: np.uint8}
_LEVEL_STORAGE = {4: ml_dtypes.int4, 8: np.int8}


def _shared_initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    if name in graph.initializers:
        return graph.initializers[name]
    return new_initializer(graph, name, array)


def cuberoot_weight_nodes(graph: ir.Graph, stem: str, qw: CubeRootWeight, form: str) -> tuple[list[ir.Node], ir.Value]:
    """The nodes that rebuild ``W_hat`` (float32 ``[K, N]``) from new initializers, and their output."""
    bits = qw.config.bits
    k, _ = qw.shape
    if form == "codebook":
        codes = new_initializer(graph, f"{stem}.qweight", qw.q.astype(_CODE_STORAGE[bits]))
        scales = new_initializer(graph, f"{stem}.scales", qw.scales.astype(np.float32))
        table = _shared_initializer(graph, f"cuberoot.codebook_{bits}bit", codebook(bits))
        rows = _shared_initializer(graph, f"cuberoot.rows_K{k}_G{qw.group_length}", qw.group_of_rows().astype(np.int64))
        index = ir.node("Cast", [codes], attributes={"to": ir.DataType.INT32}, name=f"{stem}/codes_Cast")
        cubes = ir.node("Gather", [table, index.outputs[0]], attributes={"axis": 0}, name=f"{stem}/codebook_Gather")
        row_scales = ir.node("Gather", [scales, rows], attributes={"axis": 0}, name=f"{stem}/scales_Gather")
        weight = ir.node("Mul", [cubes.outputs[0], row_scales.outputs[0]], name=f"{stem}/weight_Mul")
        nodes = [index, cubes, row_scales, weight]
    elif form == "dq-cube":
        levels = new_initializer(graph, f"{stem}.qweight", qw.levels.astype(_LEVEL_STORAGE[bits]))
        scales = new_initializer(graph, f"{stem}.scales", qw.cube_scales)
        three = _shared_initializer(graph, "cuberoot.three", np.array(3.0, dtype=np.float32))
        dq = ir.node("DequantizeLinear", [levels, scales], attributes={"axis": 0, "block_size": qw.group_length},
                     name=f"{stem}/weight_DequantizeLinear")
        weight = ir.node("Pow", [dq.outputs[0], three], name=f"{stem}/weight_cube")
        nodes = [dq, weight]
    else:
        raise GraphqError(f"cube-root weight form must be one of {CUBEROOT_FORMS}, got '{form}'")
    for index, node in enumerate(nodes):
        node.outputs[0].name = f"{stem}.cuberoot_{index}"
        node.outputs[0].dtype = ir.DataType.INT32 if (form == "codebook" and index == 0) else ir.DataType.FLOAT
    weight.outputs[0].name = f"{stem}.weight_dequantized"
    weight.outputs[0].shape = ir.Shape(list(qw.shape))
    return nodes, weight.outputs[0]


class CubeRootEmissionPass(ir.passes.InPlacePass):
    """Replace the weights of the named MatMuls by their cube-root quantized form."""

    def __init__(self, quantized: Mapping[str, CubeRootWeight], form: str = "codebook") -> None:
        super().__init__()
        if form not in CUBEROOT_FORMS:
            raise GraphqError(f"cube-root weight form must be one of {CUBEROOT_FORMS}, got '{form}'")
        not_cube = [name for name, qw in quantized.items() if not isinstance(qw, CubeRootWeight)]
        if not_cube:
            raise GraphqError(f"cube-root emission: the weight of {not_cube[0]} is not cube-root quantized")
        self.quantized = dict(quantized)
        self.form = form
        self.emitted: list[str] = []

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        nodes = named_matmuls(graph, self.quantized, "cube-root emission")
        for name, qw in self.quantized.items():
            node = nodes[name]
            new_nodes, weight = cuberoot_weight_nodes(graph, name.strip("/").replace("/", "_"), qw, self.form)
            graph.insert_before(node, new_nodes)
            old_weight = node.inputs[1]
            node.replace_input_with(1, weight)
            drop_unused_weight(graph, old_weight)
            self.emitted.append(name)
        if self.emitted and model.opset_imports.get("", 1) < BLOCKWISE_DQ_OPSET:
            model.opset_imports[""] = BLOCKWISE_DQ_OPSET  # int4 / uint4 initializers, blockwise DequantizeLinear
        logger.info("cube-root: %d MatMul weights emitted (%s form)", len(self.emitted), self.form)
        return ir.passes.PassResult(model, modified=bool(self.emitted))
