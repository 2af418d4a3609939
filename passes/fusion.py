"""Fuse transformer subgraphs into ONNX Runtime's contrib ops (the graphs ORT runs fastest).

The patterns are onnxscript's (``onnxscript.rewriter.ort_fusions``, the rule sets behind
``fuse_xformers``), applied in ``fuse_xformers``' order to the main graph:

============================  ==============================================================
step                          what it rewrites
============================  ==============================================================
rms_normalization             ``x * Reciprocal(Sqrt(ReduceMean(x^2) + eps)) * g`` ->
                              ``SimplifiedLayerNormalization``
skip_rms_normalization        ``Add(a, b)`` feeding that norm -> ``SkipSimplifiedLayerNormalization``
                              (outputs the normalized sum and the sum, the residual)
skip_layer_normalization      the same for ``LayerNormalization`` -> ``SkipLayerNormalization``
rotary_embedding              ``x * cos + rotate_half(x) * sin`` -> ``RotaryEmbedding`` ...
cos_sin_cache                 ... with ``cos``/``sin`` from ``inv_freq @ position_ids`` turned into
                              a ``[max_positions, head_dim / 2]`` cache indexed by ``position_ids``
sdpa                          ``Softmax(q k^T * scale + mask) v`` -> an internal SDPA op ...
gqa                           ... plus the KV-cache ``Concat`` and the GQA head repeat
                              (``Unsqueeze -> Expand -> Reshape``) -> ``GroupQueryAttention``
                              (rotary folded in: ``do_rotary=1``)
mha1 / mha2 / sdpa_via_mha    ... or ``MultiHeadAttention`` (with / without past)
erf_gelu, gelu, bias_gelu     ``0.5 x (1 + erf(x / sqrt 2))`` (or tanh) [+ bias] -> ``Gelu`` /
                              ``BiasGelu``
============================  ==============================================================

Before the rules: ONNX Runtime's symbolic shape inference (:mod:`.symbolic_shapes`), the exact
canonicalisations of :mod:`.fusion_canonicalize` and onnxscript's constant folding. After them:
constant folding again, which inlines intermediate fusion ops that nothing consumed (so a half-done
fusion reverts to the original ops), and the post-fusion rewrites of :mod:`.fusion_canonicalize`
(a ``SimplifiedLayerNormalization`` without a residual Add goes back to plain ops: it is not an ONNX
op and ``onnx.checker`` rejects it; ORT fuses those ops again when it loads the graph).

Two checks are added to onnxscript 0.7.2's GroupQueryAttention rule, which replaces the attention
mask by sequence lengths taken from ``position_ids``: (1) its own mask check never rejects (the
pattern match it calls returns a falsy result, not ``None``), so graphq requires the mask to derive
from the ``attention_mask`` input through the ops of a causal + padding mask only
(:data:`CAUSAL_MASK_OPS`, with a causal comparison) - a sliding-window or chunked mask is not fused
into GQA (it becomes ``MultiHeadAttention`` with the mask kept); (2) its rewrite drops the SDPA
scale, so a non-default scale is refused. Like ORT's own GQA graphs, the fused graph assumes inputs
without padding (``attention_mask`` all ones, as for batch 1); ``attention_mask`` stays a graph
input, so callers feed the same inputs as before.

The pass works on a clone (weights shared) and returns it when at least one fused op was added;
otherwise it returns an unchanged clone with ``modified=False``. What fired is in :attr:`report`
(counts per step and per fused op type); ops left unfused are logged as ``left unfused: ...`` with
the closest failed match of each responsible step.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging

import onnx_ir as ir
from onnx_ir.passes.common import CommonSubexpressionEliminationPass, ShapeInferencePass
from onnxscript import optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions import (
    attention,
    bias_gelu,
    cos_sin_cache,
    erfgelu,
    gelu,
    gqa,
    gqa_packed_qkv,
    mha,
    mha_bias,
    mha_scale,
    rms_normalization,
    rotary_embedding,
    sdpa,
    sdpa_via_mha,
    skip_normalization,
)

from graphq.errors import GraphqError
from graphq.passes.fusion_canonicalize import POST_FUSION_RULES, FusionCanonicalizePass, apply_rules
from graphq.passes.symbolic_shapes import SymbolicShapeInferencePass

logger = logging.getLogger(__name__)

# Ops ORT provides for fused subgraphs (SimplifiedLayerNormalization lives in the default domain).
FUSED_OP_TYPES = frozenset({
    "SimplifiedLayerNormalization", "SkipSimplifiedLayerNormalization", "SkipLayerNormalization",
    "RotaryEmbedding", "GroupQueryAttention", "MultiHeadAttention", "Attention", "Gelu", "FastGelu",
    "BiasGelu",
})
FUSED_DOMAINS = frozenset({"", "com.microsoft"})
# The domain of onnxscript's intermediate ops (SDPA, rotary before its cos/sin cache): none may remain.
INTERNAL_DOMAIN = "ai.onnxruntime._fusion"

# Ops of a causal + padding mask as optimum exports transformers' mask (and as dynamo does).
CAUSAL_MASK_OPS = frozenset({
    "Shape", "Gather", "Unsqueeze", "Squeeze", "Concat", "Reshape", "Flatten", "Range", "Cast",
    "Add", "Mul", "ConstantOfShape", "Constant", "Identity", "Expand", "Slice", "Where", "Equal",
    "And", "Or", "Not", "LessOrEqual", "Less", "GreaterOrEqual", "Greater", "Trilu",
})
CAUSAL_COMPARISONS = frozenset({"LessOrEqual", "Less", "GreaterOrEqual", "Greater", "Trilu"})
ATTENTION_MASK_INPUT = "attention_mask"

# Op left in the final graph -> (what it belongs to, steps whose failed matches explain it).
UNFUSED_SIGNS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("Softmax", "attention", ("sdpa", "gqa", "mha1", "mha2", "sdpa_via_mha")),
    ("ReduceMean", "normalization", ("rms_normalization",)),
    ("Neg", "rotary embedding", ("rotary_embedding", "cos_sin_cache")),
    ("Erf", "GELU", ("erf_gelu", "gelu")),
    ("Tanh", "GELU", ("gelu",)),
)


STEP_NAMES = (
    "erf_gelu", "rms_normalization", "skip_layer_normalization", "skip_rms_normalization", "rotary_embedding",
    "cos_sin_cache", "partial_rotary_embedding", "sdpa", "gqa", "packed_qkv_for_gqa", "mha1", "mha2", "mha_scale",
    "mha_bias", "attention", "gelu", "bias_gelu", "sdpa_via_mha",
)


@dataclasses.dataclass(frozen=True)
class FusionConfig:
    """``max_positions``: rows of the constant rotary cos/sin cache (the model's
    ``max_position_embeddings``); None computes the cache at run time from ``position_ids``.
    ``skip_steps``: names of steps (see the module docstring) not to run."""

    max_positions: int | None = None
    skip_steps: frozenset[str] = frozenset()

    def __post_init__(self) -> None:
        if self.max_positions is not None and self.max_positions < 1:
            raise GraphqError(f"max_positions must be at least 1, got {self.max_positions}")
        unknown = set(self.skip_steps) - set(STEP_NAMES)
        if unknown:
            raise GraphqError(f"unknown fusion steps {sorted(unknown)}")


@dataclasses.dataclass(frozen=True)
class FusionStep:
    name: str
    rules: pattern.RewriteRuleSet
    anchors: tuple[str, ...] = ()  # unfused op types that mean this step left something behind
    infer_shapes_after: bool = False
    deduplicate_after: bool = False
    only_after: tuple[str, ...] = ()  # run only if one of these steps fired


@dataclasses.dataclass(frozen=True)
class FusionReport:
    step_counts: dict[str, int]
    fused_ops: dict[str, int]
    left_unfused: tuple[str, ...]
    post_fusion: dict[str, int] = dataclasses.field(default_factory=dict)  # rewrites after fusion (fusion_canonicalize)

    @property
    def fused(self) -> bool:
        return any(self.fused_ops.values())

    def summary(self) -> str:
        ops = ", ".join(f"{n} {op}" for op, n in sorted(self.fused_ops.items()) if n) or "nothing fused"
        return ops + (f"; left unfused: {'; '.join(self.left_unfused)}" if self.left_unfused else "")

    def to_json(self) -> dict:
        return dataclasses.asdict(self)


SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})  # read the shape of their input, not its values


def _ancestors(value: ir.Value) -> tuple[set[ir.Node], set[str]]:
    """Nodes computing the values of ``value`` and the graph inputs whose values they read."""
    nodes, inputs, stack = set(), set(), [value]
    while stack:
        current = stack.pop()
        if current is None:
            continue
        if current.is_graph_input():
            inputs.add(current.name)
        producer = current.producer()
        if producer is not None and producer not in nodes:
            nodes.add(producer)
            if producer.op_type not in SHAPE_ONLY_OPS:
                stack.extend(producer.inputs)
    return nodes, inputs


def causal_mask_problem(mask: ir.Value | None) -> str | None:
    """Why ``mask`` is not a causal + padding mask built from ``attention_mask``; None if it is."""
    if mask is None:
        return "attention has no mask (not causal)"
    nodes, inputs = _ancestors(mask)
    if ATTENTION_MASK_INPUT not in inputs:
        return f"the attention mask does not derive from the '{ATTENTION_MASK_INPUT}' input"
    op_types = {node.op_type for node in nodes}
    unexpected = op_types - CAUSAL_MASK_OPS
    if unexpected:
        return f"the attention mask also uses {sorted(unexpected)} (not a plain causal + padding mask)"
    if not op_types & CAUSAL_COMPARISONS:
        return "the attention mask has no causal comparison"
    return None


class CheckedGroupQueryAttention(gqa.GroupQueryAttention):
    """onnxscript's GQA rule with the mask and scale checks it lacks (module docstring)."""

    def check(self, context, mask=None, **bindings):
        problem = causal_mask_problem(mask)
        if problem is not None:
            return pattern.MatchResult().fail(problem, mask)
        for node in context.nodes:
            if node.op_type == "SDPA" and node.attributes.get("scale") is not None:
                return pattern.MatchResult().fail("attention uses a non-default scale", node)
        return super().check(context, mask=mask, **bindings)


class _CosSinCache(cos_sin_cache.CosSinCacheFusion):
    def __init__(self, name: str, max_positions: int | None, **kwargs) -> None:
        super().__init__(name, **kwargs)
        if max_positions is not None:
            self.max_pos_id = max_positions - 1  # the cache holds positions 0 .. max_pos_id


def _cos_sin_cache_rules(max_positions: int | None) -> pattern.RewriteRuleSet:
    # The four variants of onnxscript's cos_sin_cache_rules, with the cache size set.
    variants = (("CosSinCache_cast", True, False), ("CosSinCache_cast_const_freqs", True, True),
                ("CosSinCache_const_freqs", False, True), ("CosSinCache", False, False))
    return pattern.RewriteRuleSet([
        _CosSinCache.rule(name, max_positions, cast=cast, const_freqs=const_freqs)
        for name, cast, const_freqs in variants
    ])


def fusion_steps(config: FusionConfig) -> tuple[FusionStep, ...]:
    """The steps of ``onnxscript``'s ``fuse_xformers``, in its order (see the module docstring)."""
    return (
        FusionStep("erf_gelu", erfgelu.rules, anchors=("Erf",)),
        FusionStep("rms_normalization", rms_normalization.rms_normalization_ruleset, anchors=("ReduceMean",)),
        FusionStep("skip_layer_normalization", skip_normalization.skip_layer_normalization_ruleset),
        FusionStep("skip_rms_normalization", skip_normalization.skip_rms_normalization_ruleset),
        FusionStep("rotary_embedding", rotary_embedding.rotary_embedding_rules, anchors=("Neg",)),
        FusionStep("cos_sin_cache", _cos_sin_cache_rules(config.max_positions), anchors=("RotaryEmbedding",),
                   deduplicate_after=True),
        FusionStep("partial_rotary_embedding", rotary_embedding.partial_embedding_rules),
        FusionStep("sdpa", sdpa.sdpa_rules, anchors=("Softmax",), infer_shapes_after=True),
        FusionStep("gqa", pattern.RewriteRuleSet([CheckedGroupQueryAttention.rule()]), anchors=("SDPA",)),
        FusionStep("packed_qkv_for_gqa", gqa_packed_qkv.fuse_qkv_gqa_rules),
        FusionStep("mha1", mha.mha_rules_with_past, anchors=("SDPA",)),
        FusionStep("mha2", mha.mha_rules_no_past, anchors=("SDPA",)),
        FusionStep("mha_scale", pattern.RewriteRuleSet([mha_scale.FuseMHAScale.rule()])),
        FusionStep("mha_bias", mha_bias.mha_bias_rules, only_after=("mha1", "mha2")),
        FusionStep("attention", attention.attention_rules, only_after=("mha1", "mha2")),
        FusionStep("gelu", gelu.gelu_rules, anchors=("Erf", "Tanh")),
        FusionStep("bias_gelu", bias_gelu.bias_gelu_rules),
        FusionStep("sdpa_via_mha", pattern.RewriteRuleSet([sdpa_via_mha.SDPAImplementation.rule()]), anchors=("SDPA",)),
    )


def fused_op_counts(model: ir.Model) -> collections.Counter:
    return collections.Counter(
        node.op_type for node in model.graph if node.op_type in FUSED_OP_TYPES and node.domain in FUSED_DOMAINS
    )


def _unfused(model: ir.Model, op_types: tuple[str, ...]) -> int:
    return sum(1 for node in model.graph if node.op_type in op_types and node.domain != "com.microsoft")


def _closest_failure(tracer: pattern.MatchingTracer) -> str | None:
    best = None
    for rule, matches in tracer.best_matches_map.items():
        for info in matches:
            if info.status != pattern.MatchStatus.SUCCESS and (best is None or info.score() > best[1].score()):
                best = (rule, info)
    if best is None:
        return None
    rule, info = best
    reason = info.match_result.reason or info.status.name
    return f"rule {rule.name} at node '{info.root_node.name}': {reason}"


class FusionPass(ir.passes.FunctionalPass):
    """Fuse norms, rotary embedding, attention and GELU into ORT contrib ops (module docstring)."""

    def __init__(self, config: FusionConfig = FusionConfig()) -> None:
        super().__init__()
        self.config = config
        self.report = FusionReport({}, {}, ())

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        before = fused_op_counts(model)
        work = model.clone()
        SymbolicShapeInferencePass()(work)
        FusionCanonicalizePass()(work)
        optimizer.optimize(work)
        counts: dict[str, int] = {}
        reasons: dict[str, str] = {}
        for step in fusion_steps(self.config):
            if step.name in self.config.skip_steps:
                continue
            if step.only_after and not any(counts.get(name) for name in step.only_after):
                counts[step.name] = 0
                continue
            counts[step.name] = step.rules.apply_to_model(work)
            if step.infer_shapes_after:
                ShapeInferencePass()(work)
            if step.deduplicate_after:
                CommonSubexpressionEliminationPass()(work)
            if step.anchors and _unfused(work, step.anchors):
                tracer = pattern.MatchingTracer()
                counts[step.name] += step.rules.apply_to_model(work, tracer=tracer)
                reason = _closest_failure(tracer)
                if reason is not None:
                    reasons[step.name] = reason
                    logger.debug("fusion step %s left %s nodes: %s", step.name, "/".join(step.anchors), reason)
        optimizer.optimize(work)  # inlines intermediate fusion ops nothing consumed
        left = []
        for op_type, what, steps in UNFUSED_SIGNS:
            remaining = _unfused(work, (op_type,))
            if remaining:
                why = "; ".join(f"{s}: {reasons[s]}" for s in steps if s in reasons) or "no rule matched"
                left.append(f"{remaining} {op_type} ({what}): {why}")
        post = apply_rules(work, POST_FUSION_RULES)
        if post.get("SimplifiedLayerNormToOps"):
            logger.info("kept %d RMSNorm(s) without a residual Add as ops (SimplifiedLayerNormalization is not an "
                        "ONNX op; ORT fuses them when it loads the graph)", post["SimplifiedLayerNormToOps"])
        internal = sorted({n.op_type for n in work.graph if n.domain == INTERNAL_DOMAIN})
        if internal:
            raise GraphqError(f"fusion left internal ops {internal} in the graph (an onnxscript rule misfired)")
        after = fused_op_counts(work)
        fused_ops = {op: after[op] - before.get(op, 0) for op in sorted(after) if after[op] != before.get(op, 0)}
        self.report = FusionReport({k: v for k, v in counts.items() if v}, fused_ops, tuple(left),
                                   {k: v for k, v in post.items() if v})
        for line in left:
            logger.info("left unfused: %s", line)
        if not self.report.fused:
            logger.info("fusion: nothing fused; the graph is unchanged")
            return ir.passes.PassResult(model.clone(), modified=False)
        work.metadata_props["graphq.fusion"] = json.dumps(fused_ops, sort_keys=True)
        logger.info("fusion: %s", self.report.summary())
        return ir.passes.PassResult(work, modified=True)
