"""Int8 inputs for the attention matmuls (QK^T and PV), Softmax kept float.

Attention is found by pattern, not by model type: a ``Softmax`` whose input comes from a MatMul of
two computed tensors through the score ops of :data:`SCORE_OPS` (scaling, mask Add, Where), and
whose output reaches input 0 of a second MatMul through :data:`PROB_OPS`. For each of the two
MatMuls ``y = A @ B`` both inputs are fake-quantized to int8 with dynamic symmetric scales
(:mod:`graphq.numerics.kv_cache`) chosen so that an integer kernel could factor them out of the
contracted sum: one scale per row of ``A`` (reduce over its last axis) and one per column of ``B``
(reduce over its second-to-last axis),

    QK^T:  Q per token (over head_dim),        K^T per key token (over head_dim)
    PV:    P per query row (over key tokens),  V per channel (over key tokens)

so ``y_ij = s_i t_j sum_k qa_ik qb_kj``. The Softmax reads the float scores; only its output is
quantized on the way into PV.

This is a QDQ simulation (quantize -> dequantize -> float MatMul): ONNX Runtime has no int8
batched MatMul with dynamic per-row/per-column scales on its CPU EP, so it measures the accuracy
cost of int8 attention inputs and costs extra element-wise work, not a speed-up.
"""

from __future__ import annotations

import dataclasses
import logging

import onnx_ir as ir

from graphq.errors import GraphqError
from graphq.passes.kv_cache_int8 import int8_dequantizer, int8_quantizer

logger = logging.getLogger(__name__)

# Ops allowed between the QK^T MatMul and the Softmax (scaling, additive mask, masked fill).
SCORE_OPS = frozenset({"Add", "Sub", "Mul", "Div", "Where", "Cast"})
# Ops allowed between the Softmax and the PV MatMul (NaN guard of fully masked rows, casts).
PROB_OPS = frozenset({"Where", "Cast", "Identity", "Dropout"})
MAX_HOPS = 4


@dataclasses.dataclass(frozen=True)
class AttentionMatmuls:
    softmax: str
    qk: str
    pv: str


def _is_activation_matmul(node: ir.Node | None) -> bool:
    return (node is not None and node.op_type == "MatMul" and node.domain == ""
            and all(v is not None and v.const_value is None and not v.is_initializer() for v in node.inputs))


def _score_matmul(value: ir.Value, hops: int) -> ir.Node | None:
    producer = value.producer()
    if _is_activation_matmul(producer):
        return producer
    if producer is None or producer.op_type not in SCORE_OPS or hops == 0:
        return None
    for item in producer.inputs:
        if item is not None and item.producer() is not None:
            found = _score_matmul(item, hops - 1)
            if found is not None:
                return found
    return None


def _prob_matmul(value: ir.Value, hops: int) -> ir.Node | None:
    for node, index in value.uses():
        if _is_activation_matmul(node) and index == 0:
            return node
        if node.op_type in PROB_OPS and hops > 0:
            for output in node.outputs:
                found = _prob_matmul(output, hops - 1)
                if found is not None:
                    return found
    return None


def find_attention(model: ir.Model) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
    """(QK^T MatMul, Softmax, PV MatMul) for every attention in the graph."""
    found = []
    for node in model.graph:
        if node.op_type != "Softmax" or node.domain != "":
            continue
        qk = _score_matmul(node.inputs[0], MAX_HOPS)
        pv = _prob_matmul(node.outputs[0], MAX_HOPS)
        if qk is not None and pv is not None:
            found.append((qk, node, pv))
    return found


class AttentionInt8Pass(ir.passes.InPlacePass):
    """Fake-quantize both inputs of every QK^T and PV MatMul to int8 (dynamic scales)."""

    def __init__(self) -> None:
        super().__init__()
        self.matmuls: list[AttentionMatmuls] = []

    @staticmethod
    def check(model: ir.Model) -> list[tuple[ir.Node, ir.Node, ir.Node]]:
        found = find_attention(model)
        if not found:
            fused = sorted({n.op_type for n in model.graph if n.domain == "com.microsoft" and "Attention" in n.op_type})
            hint = (f"; its attention is fused into {', '.join(fused)} (run on the unfused graph)" if fused
                    else " (MatMul -> Softmax -> MatMul)")
            raise GraphqError(f"the graph has no attention pattern for int8 attention inputs{hint}")
        return found

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        found = self.check(model)
        opset = model.opset_imports.get("", 18)
        graph = model.graph
        for qk, softmax, pv in found:
            for matmul in (qk, pv):
                for index, axis in ((0, -1), (1, -2)):
                    stem = f"{matmul.name}/int8_input{index}"
                    value = matmul.inputs[index]
                    quant, codes, scale = int8_quantizer(graph, value, axis, opset, stem)
                    dequant, restored = int8_dequantizer(codes, scale, stem)
                    restored.shape = value.shape
                    graph.insert_before(matmul, [*quant, *dequant])
                    matmul.replace_input_with(index, restored)
            self.matmuls.append(AttentionMatmuls(softmax.name, qk.name, pv.name))
        logger.info("attention: int8 inputs on %d QK^T and %d PV MatMuls (Softmax float)", len(self.matmuls), len(self.matmuls))
        return ir.passes.PassResult(model, modified=bool(self.matmuls))
