"""Which ops stay in float, and the check that enforces it.

Quantization noise hurts most in Softmax (exponential, outputs in [0, 1]), in normalisation (the
statistics of the residual stream, whose dynamic range is huge) and in the residual additions
themselves (seeds 000 and 001). graphq therefore never quantizes these; the policy is data:

- op types in :data:`KEEP_FLOAT_OP_TYPES` (plus what a recipe adds), including ONNX Runtime's
  fused ops that contain them (attention, Skip* norms, rotary embedding), and GELU (``Erf`` as
  exported op by op, ``Gelu`` / ``BiasGelu`` / ``FastGelu`` fused: encoders such as BERT);
- RMSNorm as exported op by op: ``Pow(x, 2) -> ReduceMean -> Add(eps) -> Sqrt -> Div/Reciprocal
  -> Mul(x, .) -> [Cast] -> Mul(gamma)`` (chain ops in :data:`RMS_NORM_CHAIN_OPS`);
- residual Adds: ``Add(a, b)`` with two non-constant inputs, one produced by a constant-weight
  MatMul (the attention and MLP output projections), possibly through a ``Cast`` or a bias ``Add``
  with a constant (linear layers with bias, e.g. BERT's ``dense`` + bias + residual).

A kept node *violates* the policy when one of its inputs comes straight out of a quantization op
(:data:`QUANTIZATION_OP_TYPES`): it would then compute on quantized or dequantized data. Integer
linear kernels with a float output (:data:`FLOAT_RESULT_OP_TYPES`: ``MatMulIntegerToFloat``,
``DynamicQuantizeMatMul``, ``MatMulNBits``) are the quantized layer itself, whose float result a
residual Add or a Skip norm reads exactly as it reads a float ``MatMul``'s (or the ``Mul`` that
rescales a ``MatMulInteger``): not a violation.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable

import onnx_ir as ir

KEEP_FLOAT_OP_TYPES = frozenset({
    "Softmax", "LayerNormalization", "SimplifiedLayerNormalization", "SkipLayerNormalization",
    "SkipSimplifiedLayerNormalization", "RMSNormalization",
    # ONNX Runtime's fused ops (graphq.passes.fusion): attention holds a Softmax, the Skip* norms
    # the residual Add, rotary embedding the position-dependent cos/sin.
    "GroupQueryAttention", "MultiHeadAttention", "Attention", "RotaryEmbedding",
    # GELU of encoders: Erf as exported op by op, and its fused forms.
    "Erf", "Gelu", "BiasGelu", "FastGelu",
})
RMS_NORM_CHAIN_OPS = ("Add", "Sqrt", "Div", "Reciprocal", "Mul", "Cast")
RMS_NORM_MAX_CHAIN = 6
QUANTIZATION_OP_TYPES = frozenset({
    "QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "MatMulInteger", "QLinearMatMul",
})
FLOAT_RESULT_OP_TYPES = frozenset({"MatMulIntegerToFloat", "DynamicQuantizeMatMul", "MatMulNBits"})


@dataclasses.dataclass(frozen=True)
class KeepFloatPolicy:
    op_types: frozenset[str] = KEEP_FLOAT_OP_TYPES
    extra_op_types: tuple[str, ...] = ()
    rms_norm_patterns: bool = True
    residual_adds: bool = True


def _is_constant(value: ir.Value | None) -> bool:
    if value is None:
        return True
    if value.const_value is not None and not value.is_graph_input():
        return True
    producer = value.producer()
    return producer is not None and producer.op_type == "Constant"


def rms_norm_nodes(graph: ir.Graph) -> set[ir.Node]:
    """Nodes of op-by-op RMSNorm patterns (see module docstring)."""
    found: set[ir.Node] = set()
    for node in graph:
        if node.op_type != "ReduceMean":
            continue
        square = node.inputs[0].producer() if node.inputs[0] is not None else None
        if square is None or square.op_type != "Pow":
            continue
        chain = {square, node}
        frontier = [node]
        for _ in range(RMS_NORM_MAX_CHAIN):
            next_nodes = [use.node for current in frontier for out in current.outputs for use in out.uses()
                          if use.node.op_type in RMS_NORM_CHAIN_OPS]
            if not next_nodes:
                break
            chain.update(next_nodes)
            done = [n for n in next_nodes if n.op_type == "Mul" and any(
                v is not None and v.const_value is not None and len(v.shape or ()) == 1 for v in n.inputs)]
            if done:
                break
            frontier = next_nodes
        found |= chain
    return found


def _through_cast_and_bias(producer: ir.Node | None) -> ir.Node | None:
    """The first producer up the chain that is neither a ``Cast`` nor an ``Add`` of a constant (a bias)."""
    while producer is not None and (producer.op_type == "Cast" or (
            producer.op_type == "Add" and sum(_is_constant(v) for v in producer.inputs) == 1)):
        activation = next(v for v in producer.inputs if not _is_constant(v))
        producer = activation.producer()
    return producer


def residual_adds(graph: ir.Graph) -> set[ir.Node]:
    """Adds of two activations where one is the output of a constant-weight MatMul."""
    found = set()
    for node in graph:
        if node.op_type != "Add" or any(_is_constant(v) for v in node.inputs):
            continue
        for value in node.inputs:
            producer = _through_cast_and_bias(value.producer())
            if producer is not None and producer.op_type == "MatMul" and _is_constant(producer.inputs[1]):
                found.add(node)
                break
    return found


def kept_nodes(model: ir.Model, policy: KeepFloatPolicy = KeepFloatPolicy()) -> set[ir.Node]:
    """Every node of the main graph that the policy keeps in float."""
    op_types = policy.op_types | frozenset(policy.extra_op_types)
    kept = {node for node in model.graph if node.op_type in op_types}
    if policy.rms_norm_patterns:
        kept |= rms_norm_nodes(model.graph)
    if policy.residual_adds:
        kept |= residual_adds(model.graph)
    return kept


def keep_float_violations(nodes: Iterable[ir.Node]) -> list[str]:
    """One message per kept node that consumes the output of a quantization op."""
    violations = []
    for node in nodes:
        for value in node.inputs:
            producer = value.producer() if value is not None else None
            if producer is not None and producer.op_type in QUANTIZATION_OP_TYPES:
                violations.append(f"{node.op_type} '{node.name}' reads '{value.name}' from {producer.op_type} '{producer.name}'")
    return violations
