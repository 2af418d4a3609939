"""Exact rewrites that put exported graphs into the form onnxscript's ORT fusion rules match.

optimum's TorchScript export of a transformers model differs in small ways from the graphs the
rules in ``onnxscript.rewriter.ort_fusions`` were written against. Each rewrite below is exact
(outputs bit-identical) and fixes one such difference, found on SmolLM2 / Llama and BERT exports:

- ``Div(1, x) -> Reciprocal(x)``: RMSNorm is exported as ``x * (1 / sqrt(mean(x^2) + eps))``; the
  RMSNorm rule expects ``Reciprocal``.
- ``Gather(Shape(x), i) -> constant`` (scalar ``i``) and ``Slice(Shape(x), a, b) -> constant`` when
  those dims of ``x`` are static: the half-rotation ``Slice`` bounds of rotary embedding
  (``Shape(q)[3] / 2``) and BERT's attention scale (``1 / sqrt(Shape(q)[-1:])``) are computed at
  run time; the rules need constants. (onnxscript's constant folder only folds 1-D indices.)
- ``Where(c, [v], y) -> Where(c, v, y)`` (one-element constant branch to a scalar) when ``c`` or
  ``y`` has rank >= 1, so the broadcast result is unchanged: the ``Where(IsNaN(p), 0, p)`` after the
  attention Softmax holds ``[0.0]``; the attention rule expects a scalar.

Run after :class:`onnx_ir.passes.common.AddDefaultAttributesPass` (the rules and onnxscript's
patterns match explicit attributes) and before constant folding, which then folds what these expose.

:data:`POST_FUSION_RULES` hold two more exact rewrites for after fusion:

- ``MatMul(a[..., n, 1], b[1, m]) -> Mul(a, b)`` (a product with a single term). The rotary cos/sin
  cache computed at run time (``positions[n, 1] @ inv_freq[1, m]``) would otherwise look like a
  linear layer with a constant weight to the quantizers.
- a ``SimplifiedLayerNormalization`` that no residual Add joined (the first norm of a decoder) goes
  back to the exported ops ``g * (x * (1 / Sqrt(ReduceMean(x^2) + eps)))``. ORT registers that op in
  the default ONNX domain, where ``onnx.checker`` rejects it (it is not an ONNX op); ORT fuses these
  ops into it again when it loads the graph, so nothing is lost at run time.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import onnx_ir as ir
from onnx_ir.passes.common import AddDefaultAttributesPass
from onnxscript.rewriter import pattern

logger = logging.getLogger(__name__)


def _constant_array(value: ir.Value | None) -> np.ndarray | None:
    if value is None:
        return None
    tensor = value.const_value
    if tensor is None:
        producer = value.producer()
        if producer is not None and producer.op_type == "Constant" and "value" in producer.attributes:
            tensor = producer.attributes["value"].as_tensor()
    return None if tensor is None else tensor.numpy()


def _scalar(value: ir.Value | None, *, rank: int | None = None):
    """The Python number held by a one-element constant (optionally of a given rank), else None."""
    array = _constant_array(value)
    if array is None or array.size != 1 or (rank is not None and array.ndim != rank):
        return None
    return array.reshape(()).item()


def _shape_dims(shape_value: ir.Value, source: ir.Value) -> list | None:
    """The dims ``Shape(source, start, end)`` returns, as ints or symbolic dims; None if unknown."""
    if source.shape is None:
        return None
    node = shape_value.producer()
    start = node.attributes.get_int("start", 0)
    end = node.attributes.get_int("end", None)
    return list(source.shape)[start:end]


class DivOneToReciprocal(pattern.RewriteRuleClassBase):
    """``Div(1, x) -> Reciprocal(x)``."""

    def pattern(self, op, one, x):
        return op.Div(one, x)

    def check(self, context, one, x, **_):
        if _scalar(one) != 1:
            return pattern.MatchResult().fail("numerator is not the constant 1", one)
        return True

    def rewrite(self, op, one, x, **_):
        return op.Reciprocal(x)


class GatherStaticDim(pattern.RewriteRuleClassBase):
    """``Gather(Shape(x), i) -> constant`` for a scalar index ``i`` of a static dim."""

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)  # the Shape usually feeds other Gathers too

    def pattern(self, op, x, index):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Gather(shape, index, axis=0)

    def check(self, context, x, index, shape, **_):
        dims = _shape_dims(shape, x)
        i = _scalar(index, rank=0)
        if dims is None or not isinstance(i, int) or not -len(dims) <= i < len(dims):
            return pattern.MatchResult().fail("index or shape unknown", index)
        if not isinstance(dims[i], int):
            return pattern.MatchResult().fail(f"dim {i} of {x.name} is not static", x)
        self._dim = dims[i]
        return True

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(np.array(self._dim, dtype=np.int64)))


class SliceStaticDims(pattern.RewriteRuleClassBase):
    """``Slice(Shape(x), a, b[, axes=0[, steps=1]]) -> constant`` when the sliced dims are static."""

    def __init__(self) -> None:
        super().__init__(remove_nodes=False)

    def pattern(self, op, x, starts, ends):
        shape = op.Shape(x, _allow_other_attributes=True, _outputs=["shape"])
        return op.Slice(shape, starts, ends, _allow_other_inputs=True)

    def check(self, context, x, starts, ends, shape, **_):
        extra = list(context.root.inputs[3:])
        if any(_scalar(v) not in allowed for v, allowed in zip(extra, ((0, -1), (1,)))):
            return pattern.MatchResult().fail("Slice axes/steps are not 0/1", context.root)
        dims = _shape_dims(shape, x)
        start, end = _scalar(starts), _scalar(ends)
        if dims is None or not isinstance(start, int) or not isinstance(end, int):
            return pattern.MatchResult().fail("bounds or shape unknown", x)
        selected = dims[start:end]
        if not all(isinstance(d, int) for d in selected):
            return pattern.MatchResult().fail(f"dims {start}:{end} of {x.name} are not static", x)
        self._dims = selected
        return True

    def rewrite(self, op, **_):
        return op.Constant(value=ir.tensor(np.array(self._dims, dtype=np.int64)))


def _single_element_constant(value: ir.Value | None) -> bool:
    array = _constant_array(value)
    return array is not None and array.shape == (1,)


class WhereScalarBranch(pattern.RewriteRuleClassBase):
    """``Where(c, [v], y) -> Where(c, v, y)`` when ``c`` or ``y`` has rank >= 1."""

    def pattern(self, op, condition, a, b):
        return op.Where(condition, a, b)

    def check(self, context, condition, a, b, **_):
        if not (_single_element_constant(a) or _single_element_constant(b)):
            return pattern.MatchResult().fail("no one-element constant branch", context.root)
        others = [v for v in (condition, a, b) if not _single_element_constant(v)]
        if not any(v.shape is not None and v.shape.rank() >= 1 for v in others):
            return pattern.MatchResult().fail("the other operands may be scalars", context.root)
        return True

    def rewrite(self, op, condition, a, b, **_):
        def scalar(value):
            if not _single_element_constant(value):
                return value
            return op.Constant(value=ir.tensor(_constant_array(value).reshape(())))

        return op.Where(condition, scalar(a), scalar(b))


class OuterProductMatMulToMul(pattern.RewriteRuleClassBase):
    """``MatMul(a[..., n, 1], b[1, m]) -> Mul(a, b)`` for a constant ``b``."""

    def pattern(self, op, a, b):
        return op.MatMul(a, b)

    def check(self, context, a, b, **_):
        array = _constant_array(b)
        if array is None or array.ndim != 2 or array.shape[0] != 1:
            return pattern.MatchResult().fail("second input is not a constant [1, m]", b)
        if a.shape is None or a.shape.rank() < 2 or a.shape[-1] != 1:
            return pattern.MatchResult().fail("first input is not [..., n, 1]", a)
        return True

    def rewrite(self, op, a, b, **_):
        return op.Mul(a, b)


class SimplifiedLayerNormToOps(pattern.RewriteRuleClassBase):
    """Float32 ``SimplifiedLayerNormalization(x, g)`` over the last axis -> the exported RMSNorm ops."""

    def pattern(self, op, x, scale):
        return op.SimplifiedLayerNormalization(x, scale, _allow_other_attributes=True, _outputs=["normalized"])

    def check(self, context, x, scale, normalized, **_):
        node = normalized.producer()
        rank = x.shape.rank() if x.shape is not None else None
        axis = node.attributes.get_int("axis", -1)
        if x.dtype != ir.DataType.FLOAT or scale.dtype != ir.DataType.FLOAT or node.attributes.get_int("stash_type", 1) != 1:
            return pattern.MatchResult().fail("not float32 throughout", node)
        if axis != -1 and (rank is None or axis != rank - 1):
            return pattern.MatchResult().fail("not over the last axis", node)
        if len(node.outputs) > 1 and any(out.uses() for out in node.outputs[1:]):
            return pattern.MatchResult().fail("its statistics outputs are used", node)
        self._epsilon = node.attributes.get_float("epsilon", 1e-5)
        return True

    def rewrite(self, op, x, scale, **_):
        def const(array):
            return op.Constant(value=ir.tensor(array))

        mean_square = op.ReduceMean(op.Pow(x, const(np.array(2.0, np.float32))), const(np.array([-1], np.int64)), keepdims=1)
        rms = op.Sqrt(op.Add(mean_square, const(np.array(self._epsilon, np.float32))))
        return op.Mul(scale, op.Mul(x, op.Div(const(np.array(1.0, np.float32)), rms)))


CANONICAL_RULES: tuple[type[pattern.RewriteRuleClassBase], ...] = (
    DivOneToReciprocal, GatherStaticDim, SliceStaticDims, WhereScalarBranch,
)
POST_FUSION_RULES: tuple[type[pattern.RewriteRuleClassBase], ...] = (OuterProductMatMulToMul, SimplifiedLayerNormToOps)


@dataclasses.dataclass(frozen=True)
class CanonicalizeConfig:
    rules: tuple[type[pattern.RewriteRuleClassBase], ...] = CANONICAL_RULES
    add_default_attributes: bool = True


def apply_rules(model: ir.Model, rules) -> dict[str, int]:
    """Apply each rule class in turn to the main graph; rule name -> rewrites done."""
    counts = {}
    for rule_class in rules:
        counts[rule_class.__name__] = pattern.RewriteRuleSet([rule_class.rule()]).apply_to_model(model)
    return counts


class FusionCanonicalizePass(ir.passes.InPlacePass):
    """Explicit default attributes, then the exact rewrites of the module docstring."""

    def __init__(self, config: CanonicalizeConfig = CanonicalizeConfig()) -> None:
        super().__init__()
        self.config = config
        self.counts: dict[str, int] = {}

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        if self.config.add_default_attributes:
            modified = AddDefaultAttributesPass()(model).modified
        self.counts = apply_rules(model, self.config.rules)
        fired = {name: n for name, n in self.counts.items() if n}
        logger.info("fusion canonicalisation: %s", fired or "nothing to rewrite")
        return ir.passes.PassResult(model, modified=modified or bool(fired))
