"""SmoothQuant folded into the weights (Xiao et al., 2023; seeds 001 and 003).

For an activation ``x`` that feeds MatMuls ``y_i = x @ W_i`` (all with constant weights), with
per-channel factors ``s`` from :func:`graphq.numerics.smoothing.smoothing_scales`
(``s_j = max|X_j|^a / max_i max_n |W_i[j, n]|^(1-a)``), the pass rewrites

    y_i = (x / s) @ (diag(s) W_i)

so that the activation the quantizer sees has flatter channels. ``W_i[j, :] *= s_j`` for every
consumer; ``x / s`` is realised without a new op where the producer of ``x`` allows it:

- ``x = Mul(h, gamma)`` with ``gamma`` a 1-D constant (the scale of an RMSNorm/LayerNorm as
  exported): ``gamma /= s``.
- ``LayerNormalization`` / ``SimplifiedLayerNormalization`` ops and the fused
  ``SkipSimplifiedLayerNormalization`` / ``SkipLayerNormalization``: their scale (and bias) ``/= s``.
- ``x = Mul(a, u)`` with ``u = z @ W_up`` (gated MLP: ``silu(gate) * up``) and ``u`` used only
  there: the columns ``W_up[:, j] /= s_j``, since an element-wise product scales channel-wise.
- otherwise (e.g. the attention output feeding ``o_proj``), when ``explicit_mul`` is on, a
  ``Mul(x, 1/s)`` is inserted before the MatMuls.
- ``x`` also read by other nodes (a post-norm encoder such as BERT: the LayerNorm output feeds
  q/k/v or the MLP *and* the next residual Add), when ``explicit_mul`` and ``shared_mul`` are on: no fold is exact
  there (dividing the norm's scale and bias by ``s`` would also scale the residual), so the
  ``Mul(x, 1/s)`` goes on the MatMuls' branch only and the other readers keep ``x``.

Which producers fold how is the table :data:`FOLD_RULES`. The rewrite is exact in real arithmetic;
in float32 the outputs agree to rounding (tests: 1e-4 relative). Activations whose consumers are
not all constant-weight MatMuls, and weights shared with other nodes, are left alone (logged).
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

import numpy as np
import onnx_ir as ir

from graphq.modelio import release
from graphq.numerics.smoothing import smoothing_scales

logger = logging.getLogger(__name__)

# op_type of x's producer -> indices of inputs that are divided by s (scale, bias), for norm ops
# that take their affine parameters as inputs; x must be the op's output 0 (the normalised value).
# The com.microsoft Skip* forms (fusion.py) add the residual first: SkipLayerNormalization's inputs
# are (x, skip, gamma, beta, bias) and its bias is added before the norm, so it is not divided.
NORM_OP_SCALE_INPUTS: Mapping[str, tuple[int, ...]] = {
    "LayerNormalization": (1, 2),
    "SimplifiedLayerNormalization": (1,),
    "RMSNormalization": (1,),
    "SkipSimplifiedLayerNormalization": (2,),
    "SkipLayerNormalization": (2, 3),
}


@dataclasses.dataclass(frozen=True)
class SmoothQuantConfig:
    alpha: float = 0.5
    explicit_mul: bool = True
    # Smooth activations that other nodes also read, with a Mul on the MatMuls' branch (needs
    # explicit_mul; else such activations are skipped).
    shared_mul: bool = True

    def __post_init__(self) -> None:
        from graphq.errors import GraphqError

        if not 0.0 <= self.alpha <= 1.0:
            raise GraphqError(f"SmoothQuant alpha must lie in [0, 1], got {self.alpha}")


def constant_of(value: ir.Value | None) -> np.ndarray | None:
    """The numpy value of an initializer (not a graph input), else None."""
    if value is None or value.const_value is None or value.is_graph_input():
        return None
    return value.const_value.numpy()


def own_constant(value: ir.Value | None, ndim: int) -> np.ndarray | None:
    """A constant of rank ``ndim`` used by exactly one node input (safe to rewrite in place)."""
    array = constant_of(value)
    if array is None or array.ndim != ndim or len(value.uses()) != 1 or value.is_graph_output():
        return None
    return array


# Consumers that read only the shape of a tensor: scaling its values does not concern them.
SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})


def _is_weight_matmul(node: ir.Node, activation: ir.Value) -> bool:
    return (node.op_type == "MatMul" and node.domain == "" and node.inputs[0] is activation
            and own_constant(node.inputs[1], 2) is not None)


def matmul_weight_consumers(activation: ir.Value, *, exclusive: bool = True) -> list[ir.Node] | None:
    """The MatMuls ``activation @ W`` (own 2-D constant W) reading ``activation``, if nothing else
    (apart from shape-only ops) reads its values; else None. With ``exclusive=False``, those MatMuls
    whatever else reads ``activation`` (None if there are none)."""
    consumers = [use.node for use in activation.uses() if use.node.op_type not in SHAPE_ONLY_OPS]
    if not exclusive:
        return [node for node in dict.fromkeys(consumers) if _is_weight_matmul(node, activation)] or None
    if not consumers or activation.is_graph_output():
        return None
    if not all(_is_weight_matmul(node, activation) for node in consumers):
        return None
    return consumers


def _set_constant(value: ir.Value, array: np.ndarray) -> None:
    """Replace ``value``'s constant, keeping its float type (float16 models stay float16)."""
    dtype = value.const_value.dtype.numpy() if value.const_value is not None else array.dtype
    release(value)  # a memory-mapped input weight: close its map now, not at garbage collection
    value.const_value = ir.tensor(np.require(array.astype(dtype, copy=False), requirements="C"), name=value.name)


def private_constant(graph: ir.Graph, node: ir.Node, index: int) -> ir.Value | None:
    """The 1-D constant input ``index`` of ``node``, copied into a new initializer if other nodes
    share it (exporters deduplicate equal norm weights), so that it can be rewritten in place."""
    value = node.inputs[index]
    array = constant_of(value)
    if array is None or value.is_graph_output():
        return None
    if len(value.uses()) == 1:
        return value
    copy = ir.Value(name=f"{value.name}/{node.name}", const_value=ir.tensor(array.copy()))
    copy.dtype, copy.shape = value.const_value.dtype, ir.Shape(list(array.shape))
    graph.register_initializer(copy)
    node.replace_input_with(index, copy)
    return copy


class SmoothQuantPass(ir.passes.InPlacePass):
    """Fold SmoothQuant factors for every activation in ``channel_abs_max`` (tensor name -> [K]).

    ``factors`` (tensor name -> ``s [K]``) folds given factors instead of computing them (AWQ's
    searched scales use the same folds)."""

    def __init__(self, channel_abs_max: Mapping[str, np.ndarray], config: SmoothQuantConfig = SmoothQuantConfig(), *,
                 factors: Mapping[str, np.ndarray] | None = None) -> None:
        super().__init__()
        self.channel_abs_max = channel_abs_max
        self.given_factors = dict(factors or {})
        self.config = config
        self.applied: dict[str, str] = {}  # tensor name -> how it was folded
        self.factors: dict[str, np.ndarray] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        values = {v.name: v for node in model.graph for v in node.outputs}
        for name in list(dict.fromkeys([*self.channel_abs_max, *self.given_factors])):
            activation = values.get(name)
            if activation is None:
                logger.info("smoothquant: %s not produced by any node; skipped", name)
                continue
            consumers = matmul_weight_consumers(activation)
            shared = consumers is None and self.config.explicit_mul and self.config.shared_mul
            if shared:
                consumers = matmul_weight_consumers(activation, exclusive=False)
            if consumers is None:
                logger.info("smoothquant: %s has consumers other than constant-weight MatMuls; skipped", name)
                continue
            weights = [constant_of(node.inputs[1]) for node in consumers]
            weight_abs_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
            reference = self.given_factors.get(name, self.channel_abs_max.get(name))
            if weight_abs_max.shape != np.shape(reference):
                logger.info("smoothquant: %s has %s channels but weights %s; skipped", name, np.shape(reference), weight_abs_max.shape)
                continue
            if name in self.given_factors:
                scales = np.asarray(self.given_factors[name], dtype=np.float32)
            else:
                scales = smoothing_scales(self.channel_abs_max[name], weight_abs_max, self.config.alpha)
            how = self._divide_activation(model.graph, activation, scales, consumers, fold=not shared)
            if how is None:
                continue
            for node, weight in zip(consumers, weights):
                _set_constant(node.inputs[1], weight * scales[:, None])
            self.applied[name] = how
            self.factors[name] = scales
        logger.info("smoothquant: folded %d activations (%s)", len(self.applied),
                    ", ".join(f"{k}: {sum(1 for v in self.applied.values() if v == k)}" for k in sorted(set(self.applied.values()))))
        return ir.passes.PassResult(model, modified=bool(self.applied))

    def _divide_activation(self, graph: ir.Graph, activation: ir.Value, scales: np.ndarray, consumers: list[ir.Node],
                           *, fold: bool = True) -> str | None:
        producer = activation.producer() if fold else None
        if (producer is not None and producer.op_type in NORM_OP_SCALE_INPUTS and producer.domain in ("", "com.microsoft")
                and producer.outputs[0] is activation):
            indices = [i for i in NORM_OP_SCALE_INPUTS[producer.op_type] if i < len(producer.inputs) and producer.inputs[i] is not None]
            arrays = [constant_of(producer.inputs[i]) for i in indices]
            if arrays and all(a is not None and a.shape == scales.shape for a in arrays):
                for index in indices:
                    param = private_constant(graph, producer, index)
                    _set_constant(param, constant_of(param) / scales)
                return "norm-op"
        if producer is not None and producer.op_type == "Mul" and producer.domain == "":
            for index, operand in enumerate(producer.inputs):
                gamma = constant_of(operand)
                if gamma is not None and gamma.shape == scales.shape:
                    param = private_constant(graph, producer, index)
                    _set_constant(param, gamma / scales)
                    return "norm-weight"
            for operand in producer.inputs:
                up = operand.producer() if operand is not None else None
                if (up is not None and up.op_type == "MatMul" and up.domain == "" and len(operand.uses()) == 1
                        and not operand.is_graph_output()):
                    w_up = own_constant(up.inputs[1], 2)
                    if w_up is not None and w_up.shape[1] == scales.shape[0]:
                        _set_constant(up.inputs[1], w_up / scales[None, :])
                        return "producer-columns"
        if not self.config.explicit_mul:
            logger.info("smoothquant: %s has no foldable producer; skipped", activation.name)
            return None
        float_dtype = np.float16 if any(constant_of(n.inputs[1]).dtype == np.float16 for n in consumers) else np.float32
        inverse = ir.Value(name=f"{activation.name}/smooth_inverse", const_value=ir.tensor((1.0 / scales).astype(float_dtype)))
        graph.register_initializer(inverse)
        mul = ir.node("Mul", [activation, inverse], name=f"{activation.name}/smooth_mul")
        smoothed = mul.outputs[0]
        smoothed.name = f"{activation.name}/smoothed"
        if activation.dtype is not None:  # graphs without type information stay without it
            smoothed.dtype = activation.dtype
        if activation.shape is not None:
            smoothed.shape = activation.shape
        if activation.producer() is not None:
            graph.insert_after(activation.producer(), mul)
        else:  # a graph input: the start of the graph keeps the order topological
            graph.insert_before(next(iter(graph)), mul)
        for node in consumers:
            node.replace_input_with(0, smoothed)
        return "explicit-mul" if fold else "explicit-mul-shared"
