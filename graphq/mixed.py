"""Mixed-precision weight-only quantization: int4, int8 or float per MatMul, from a precision plan.

1. The plan: a file (``--plan``: node name -> ``int4`` / ``int8`` / ``float``; nodes it leaves out stay
   float), or the planner (:mod:`graphq.planner`) applied to the model's sensitivity analysis
   (:mod:`graphq.sensitivity`: from ``--analysis``, else the cache, else computed) under a bits budget
   (``--budget-bits``) or a target perplexity ratio (``--target-ratio``). An analysis or plan computed
   for another model is refused.
2. Each int4 / int8 weight is quantized at its precision's config
   (:data:`~graphq.numerics.sensitivity.PRECISIONS`: symmetric, groups of 128 along ``K``) and
   emitted as ``MatMulNBits`` with its own ``bits``; float nodes stay ``MatMul``. ``method``:
   - ``rtn``: round to nearest, the exact ``W_hat`` the analysis measured;
   - ``gptq`` (default): GPTQ with ``act_order`` (:mod:`graphq.weight_only`'s numerics and block-by-block
     calibration: block ``b``'s Hessians come from the graph whose earlier blocks are already
     quantized), the tied LM head included: its codes minimise the logit error ``tr(D^T H D)`` for the
     final norm's output ``H``, and the lookup shares them. On SmolLM2-135M the tied head alone at int4
     g64 costs KL 0.170 with RTN and 0.043 with GPTQ (act_order; 0.074 without), which is why GPTQ is the
     default; the analysis still measures RTN damage, a conservative proxy for the planner.
3. A tied LM head and the embedding lookup share the head's codes (``GatherBlockQuantized`` reading
   them, :mod:`graphq.passes.embedding_quant`); a float head keeps a float lookup: one matrix,
   counted once. Embedding tables not tied to a head are quantized at int4 (recipe ``embedding``).
   When the analysis gave the head hot rows (``AnalysisConfig.head_hot_fraction``: the rows the
   calibration text uses most, :mod:`graphq.numerics.head_rows`) and its precision has fewer bits
   than theirs, those rows are quantized at int8 and the others at the planned precision, both by
   ``method``, and emitted in two tiers (:mod:`graphq.passes.tied_head_split`); the analysis measured
   that head's damage and bits with the same split.
4. Every planned node carries ONNX node metadata (``graphq.precision``, ``graphq.bits_per_weight``,
   ``graphq.kl.<precision>``, ``graphq.scales``) that Netron shows; the model carries the plan summary.
5. Cleanup, save to a staging folder, verify (checker + ORT session), move into place.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.calibrate import CalibrationConfig
from graphq.errors import GraphqError
from graphq.numerics.sensitivity import PRECISIONS, precision_config
from graphq.numerics.weight_only import GPTQ_PRECISIONS, QuantizedWeight, quantize_rtn
from graphq.passes.weight_only_emit import WeightOnlyEmitConfig
from graphq.planner import DEFAULT_PRECISIONS, PrecisionPlan
from graphq.runtime import signature_of_model
from graphq.sensitivity import AnalysisConfig

logger = logging.getLogger(__name__)

EMBEDDING_MODES = ("quantized", "float")
METHODS = ("rtn", "gptq")


@dataclasses.dataclass(frozen=True)
class MixedRecipe:
    name: str = "mixed"
    budget_bits: float | None = 4.5  # average bits per weight (K = 576: int4 g128 = 4.08, int4-g32-fzp = 4.53, int8 = 8.125)
    target_ratio: float | None = None  # instead of a budget: predicted perplexity ratio to stay under
    precisions: tuple[str, ...] = DEFAULT_PRECISIONS
    analysis: AnalysisConfig = AnalysisConfig()
    method: str = "gptq"
    act_order: bool = True  # GPTQ: quantize the inputs with the largest H[k, k] first
    damp: float = 0.01  # GPTQ: damping as a fraction of mean(diag H)
    clip_search: bool = True  # GPTQ: per-group clip ratios from AWQ's clip search on the Hessian first
    precision: str = "float32"  # GPTQ: factor, clip search and updates (GptqConfig.precision)
    calibration: CalibrationConfig = CalibrationConfig(windows=16)  # GPTQ Hessians
    emit: WeightOnlyEmitConfig = WeightOnlyEmitConfig()
    embedding: str = "quantized"  # lookups tied to a quantized head share its codes; others int4

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GraphqError(f"recipe mixed: method must be one of {METHODS}, got '{self.method}'")
        if (self.budget_bits is None) == (self.target_ratio is None):
            raise GraphqError("recipe mixed: give exactly one of budget_bits or target_ratio")
        unknown = [p for p in self.precisions if p not in PRECISIONS]
        if unknown or not self.precisions:
            raise GraphqError(f"recipe mixed: unknown precision(s) {unknown} (known: {', '.join(PRECISIONS)})")
        if self.embedding not in EMBEDDING_MODES:
            raise GraphqError(f"recipe mixed: embedding must be one of {EMBEDDING_MODES}, got '{self.embedding}'")
        if self.precision not in GPTQ_PRECISIONS:
            raise GraphqError(f"recipe mixed: precision must be one of {GPTQ_PRECISIONS}, got '{self.precision}'")
        floating = [p for p in self.precisions if PRECISIONS[p] is not None and PRECISIONS[p].float_zero_points]
        if floating and self.emit.format != "matmulnbits":
            if tuple(self.precisions) != DEFAULT_PRECISIONS:
                raise GraphqError(f"recipe mixed: {', '.join(floating)} (float zero points) is emitted as MatMulNBits only, "
                                  f"not as format '{self.emit.format}'; leave it out of the precisions")
            logger.info("mixed: format %s takes integer zero points only; %s left out of the candidates",
                        self.emit.format, ", ".join(floating))
            object.__setattr__(self, "precisions", tuple(p for p in self.precisions if p not in floating))
        object.__setattr__(self, "precisions", tuple(self.precisions))


@dataclasses.dataclass(frozen=True)
class MixedResult:
    model_path: Path
    recipe: MixedRecipe
    plan: PrecisionPlan
    file_bytes: int
    seconds: float

    def to_json(self) -> dict:
        from graphq.config import recipe_to_dict

        return {"model_path": str(self.model_path), "recipe": recipe_to_dict(self.recipe), "plan": self.plan.to_json(),
                "file_bytes": self.file_bytes, "seconds": round(self.seconds, 2)}


@dataclasses.dataclass(frozen=True)
class PlannedNode:
    name: str
    weight: np.ndarray  # W [K, N]
    tied_table: str | None  # the embedding initializer a tied head reads as Transpose(E)


@dataclasses.dataclass(frozen=True, eq=False)
class SplitHead:
    """A tied head quantized in two row tiers (:mod:`graphq.numerics.head_rows`): ``hot`` holds the columns
    ``rows`` of ``W [K, V]`` (at the analysis' ``HOT_ROW_PRECISION``), ``cold`` the others, both in id order."""

    rows: np.ndarray
    hot: QuantizedWeight
    cold: QuantizedWeight

    @property
    def config(self):
        return self.cold.config

    def dequantize(self) -> np.ndarray:
        vocab = self.rows.size + self.cold.q.shape[1]
        cold = np.setdiff1d(np.arange(vocab), self.rows)
        out = np.empty((self.cold.q.shape[0], vocab), dtype=np.float32)
        out[:, self.rows], out[:, cold] = self.hot.dequantize(), self.cold.dequantize()
        return out

    def bits_per_weight(self) -> float:
        from graphq.numerics.head_rows import tiered_bits

        k, vocab = self.cold.q.shape[0], self.rows.size + self.cold.q.shape[1]
        return tiered_bits(self.cold.config, self.hot.config, k, vocab, self.rows.size)


def split_head(weight: np.ndarray, rows: np.ndarray, hot_config, cold_config, quantize) -> SplitHead:
    """``quantize(W[:, part], config)`` for the hot columns ``rows`` and for the others (columns are
    independent in RTN and GPTQ alike, so this is the head quantized in two tiers)."""
    cold = np.setdiff1d(np.arange(weight.shape[1]), rows)
    return SplitHead(rows, quantize(np.ascontiguousarray(weight[:, rows]), hot_config),
                     quantize(np.ascontiguousarray(weight[:, cold]), cold_config))


def planned_nodes(model: ir.Model) -> list[PlannedNode]:
    """The MatMuls with a constant weight (or the transpose of one), in graph order."""
    from graphq.passes.embedding_quant import embedding_lookups
    from graphq.passes.qdq_insert import constant_weight

    tables = {gather.inputs[0].name for gather in embedding_lookups(model)}
    found = []
    for node in model.graph:
        weight = constant_weight(node)
        if weight is None or weight.dtype != np.float32:
            continue
        producer = node.inputs[1].producer()
        tied = producer.inputs[0].name if producer is not None and producer.inputs[0].name in tables else None
        found.append(PlannedNode(node.name, weight, tied))
    return found


def resolve_plan(source: Path, nodes: list[PlannedNode], recipe: MixedRecipe, *, plan: PrecisionPlan | None,
                 analysis=None, tokenizer_dir: Path | None = None, progress: bool = True) -> tuple[PrecisionPlan, object]:
    """The plan to apply (checked against the model's nodes) and the analysis it came from (if any)."""
    from graphq.numerics.head_rows import tiered_bits
    from graphq.planner import PlanItem, check_plan, evaluate_plan, items_from_analysis, plan_precisions
    from graphq.sensitivity import HOT_ROW_PRECISION, analyze_model, load_analysis, model_digest

    names = [node.name for node in nodes]
    digest = model_digest(source)
    if plan is not None:
        if plan.model_sha256 not in (None, digest):
            raise GraphqError(f"the plan was made for another model (sha256 {plan.model_sha256[:12]}...), not {source}")
        assignments = check_plan(plan.assignments, names)
        if isinstance(analysis, (str, os.PathLike)):
            analysis = load_analysis(analysis)
        if analysis is not None and analysis.model_sha256 == digest:
            items = items_from_analysis(analysis, tuple(dict.fromkeys([*recipe.precisions, *assignments.values()])))
            hot = dict(plan.hot_rows) or _analysis_hot_rows(analysis)
            return evaluate_plan(items, assignments, model_sha256=digest, hot_rows=hot), analysis
        hot_config = precision_config(HOT_ROW_PRECISION, tied_dim=nodes[0].weight.shape[0])

        def bits(node, precision):
            config = precision_config(precision, tied_dim=node.weight.shape[0] if node.tied_table else None)
            n_hot = len(plan.hot_rows.get(node.name, ())) if node.tied_table else 0
            return tiered_bits(config, hot_config, node.weight.shape[0], node.weight.shape[1], n_hot)

        items = [PlanItem(node.name, int(node.weight.size), {p: (bits(node, p), math.nan) for p in set(assignments.values())})
                 for node in nodes]
        return evaluate_plan(items, assignments, model_sha256=digest, hot_rows=dict(plan.hot_rows)), None
    if analysis is None:
        analysis = analyze_model(source, recipe.analysis, tokenizer_dir=tokenizer_dir, progress=progress)
    elif isinstance(analysis, (str, os.PathLike)):
        path = Path(analysis)
        analysis = load_analysis(path)
        if analysis.model_sha256 != digest:
            raise GraphqError(f"{path} is the analysis of another model ({analysis.model_path}, sha256 "
                              f"{analysis.model_sha256[:12]}...), not of {source} (sha256 {digest[:12]}...)")
    analysed = [node.name for node in analysis.nodes]
    if sorted(analysed) != sorted(names):
        raise GraphqError(f"the analysis lists {len(analysed)} nodes but {source} has {len(names)} quantizable MatMuls; "
                          "analyse this model again")
    items = items_from_analysis(analysis, recipe.precisions)
    return plan_precisions(items, budget_bits=recipe.budget_bits, target_ratio=recipe.target_ratio, model_sha256=digest,
                           hot_rows=_analysis_hot_rows(analysis)), analysis


def _analysis_hot_rows(analysis) -> dict[str, tuple[int, ...]]:
    return {node.name: tuple(node.hot_rows) for node in analysis.nodes if node.hot_rows}


def _gptq(graph: ir.Model, source: Path, configs: Mapping[str, object], recipe: MixedRecipe, *,
          tokenizer_dir: Path | None, progress: bool, hot: Mapping[str, tuple[np.ndarray, object]] = {}
          ) -> dict[str, QuantizedWeight | SplitHead]:
    """GPTQ of every node in ``configs`` at its own config, block by block (module docstring): block
    ``b``'s Hessians come from the graph whose earlier blocks hold their fake-quantized weights."""
    from graphq.blockwise import StagedCalibration, partition
    from graphq.calibrate import calibration_windows, collect_statistics
    from graphq.evaluate import load_tokenizer
    from graphq.passes.qdq_insert import constant_weight
    from graphq.weight_only import HessianAccumulator, write_fake_quantized

    def quantize(nodes: list[ir.Node], stats) -> dict[str, QuantizedWeight | SplitHead]:
        done = {}
        for node in nodes:
            def one(weight, config, hessian=stats[node.inputs[0].name].hessian):
                return gptq_columns(weight, hessian, config, damp=recipe.damp, act_order=recipe.act_order,
                                    clip_search=recipe.clip_search, precision=recipe.precision)
            if node.name in hot:
                rows, hot_config = hot[node.name]
                done[node.name] = split_head(constant_weight(node), rows, hot_config, configs[node.name], one)
            else:
                done[node.name] = one(constant_weight(node), configs[node.name])
        return done

    windows = calibration_windows(load_tokenizer(source, tokenizer_dir), recipe.calibration)
    stages = partition(graph)
    if stages is None:
        logger.warning("mixed: the graph cannot be cut into blocks; GPTQ calibrates on the float model")
        planned = [node for node in graph.graph if node.name in configs]
        stats = collect_statistics(source, list(dict.fromkeys(n.inputs[0].name for n in planned)), windows,
                                   threads=recipe.calibration.threads, progress=progress, make_accumulator=HessianAccumulator)
        return quantize(planned, stats)
    quantized: dict[str, QuantizedWeight] = {}
    runner = StagedCalibration(graph, stages, windows, threads=recipe.calibration.threads, progress=progress)
    for stage in runner.stages():
        nodes = [node for node in stage.nodes if node.name in configs]
        if nodes:
            done = quantize(nodes, runner.calibrate(stage, [node.inputs[0].name for node in nodes], HessianAccumulator))
            quantized.update(done)
            if stage.outputs:
                for node in nodes:
                    write_fake_quantized(node, done[node.name])
        runner.advance(stage)
    return quantized


def gptq_columns(weight: np.ndarray, hessian: np.ndarray, config, *, damp: float, act_order: bool,
                 clip_search: bool = False, columns: int = 4096, precision: str = "float64") -> QuantizedWeight:
    """GPTQ of ``W [K, N]`` a block of columns at a time: columns never interact in GPTQ (the updates
    run along ``K`` within each column, and the order depends on ``H`` alone), so this equals one call on
    the whole weight with bounded memory (the tied LM head is ``576 x 49152``). With ``clip_search``,
    each group's range is first shrunk by the ratio minimising its own output error under RTN
    (:func:`~graphq.numerics.weight_only.awq_clip_search` on ``H``), as the ``w4-gptq`` recipe does.
    ``precision``: of the factor, the clip search and the updates (``GptqConfig.precision``)."""
    from graphq.numerics.weight_only import awq_clip_search, gptq_factor, gptq_quantize

    factor = gptq_factor(hessian, damp=damp, act_order=act_order, precision=precision)  # once for every column block

    def one_block(block: np.ndarray) -> QuantizedWeight:
        ratios = awq_clip_search(block, None, config, pad=True, hessian=hessian, precision=precision) if clip_search else 1.0
        return gptq_quantize(block, hessian, config, damp=damp, act_order=act_order, pad=True, clip_ratio=ratios,
                             factor=factor)

    parts = [one_block(weight[:, i:i + columns]) for i in range(0, weight.shape[1], columns)]
    if len(parts) == 1:
        return parts[0]
    return QuantizedWeight(np.concatenate([p.q for p in parts], axis=1), np.concatenate([p.scales for p in parts], axis=1),
                           np.concatenate([p.zero_points for p in parts], axis=1), config)


def node_metadata(precision: str, analysis_node=None, quantized: QuantizedWeight | None = None) -> dict[str, str]:
    """What Netron shows for one planned node (all values are strings)."""
    from graphq.numerics.sensitivity import bits_per_weight

    config = quantized.config if quantized is not None else None
    k = quantized.q.shape[0] if quantized is not None else (analysis_node.k if analysis_node is not None else 0)
    meta = {"graphq.precision": precision}
    if config is not None or precision == "float":
        meta["graphq.bits_per_weight"] = f"{bits_per_weight(config, k):.4g}"
    elif analysis_node is not None and precision in analysis_node.damage:
        meta["graphq.bits_per_weight"] = f"{analysis_node.damage[precision].bits:.4g}"
    if config is not None:
        s = np.abs(quantized.scales)
        meta["graphq.group_size"] = str(quantized.group_length)
        meta["graphq.scales"] = f"|s| min {s.min():.3g} median {np.median(s):.3g} max {s.max():.3g} ({s.size} groups)"
    elif analysis_node is not None and precision in analysis_node.scales:  # the RTN scales the analysis measured
        s = analysis_node.scales[precision]
        meta["graphq.scales"] = f"|s| min {s['min']:.3g} median {s['median']:.3g} max {s['max']:.3g} (RTN, analysis)"
    if analysis_node is not None:
        for p, damage in analysis_node.damage.items():
            meta[f"graphq.kl.{p}"] = f"{damage.kl:.4g}" + ("" if damage.measured else " (estimated)")
            meta[f"graphq.nll_delta.{p}"] = f"{damage.nll_delta:.4g}"
        if analysis_node.lens:
            lens = analysis_node.lens
            meta["graphq.lens"] = (f"{lens['precision']} error rms {lens['error_rms']:.3g}: real {lens['real']:.3g}, "
                                   f"gaussian {lens['gaussian']:.3g}, uniform {lens['uniform']:.3g}")
    return meta


def _hot_rows(nodes: list[PlannedNode], configs: Mapping[str, object], plan: PrecisionPlan,
              recipe: MixedRecipe) -> dict[str, tuple[np.ndarray, object]]:
    """Tied heads to quantize in two row tiers: node name -> (hot rows, their config). Those the plan
    gives hot rows, planned below the hot precision, whose lookup is quantized too (MatMulNBits only)."""
    from graphq.numerics.head_rows import is_tiered
    from graphq.sensitivity import HOT_ROW_PRECISION

    if recipe.embedding != "quantized" or recipe.emit.format != "matmulnbits":
        return {}
    found = {}
    for node in nodes:
        rows, config = plan.hot_rows.get(node.name, ()), configs.get(node.name)
        if node.tied_table is None or config is None or not rows:
            continue
        if max(rows) >= node.weight.shape[1]:
            raise GraphqError(f"the plan's hot rows of {node.name} go up to {max(rows)}, but it has {node.weight.shape[1]} rows")
        hot_config = precision_config(HOT_ROW_PRECISION, tied_dim=node.weight.shape[0])
        if is_tiered(config, hot_config, len(rows)):
            found[node.name] = (np.asarray(rows, dtype=np.int64), hot_config)
    return found


def quantize_mixed(model: str | os.PathLike, output: str | os.PathLike, recipe: MixedRecipe, *,
                   plan: PrecisionPlan | None = None, analysis=None, tokenizer_dir: Path | None = None,
                   overwrite: bool = False, progress: bool = True) -> MixedResult:
    """Quantize ``model`` (.onnx) into ``output`` (.onnx) with a precision per MatMul (module docstring)."""
    from graphq.config import recipe_to_dict
    from graphq.modelio import load_model, move_staged_into_place, save_model, staging_dir
    from graphq.passes.cleanup import CleanupPass
    from graphq.passes.embedding_quant import EmbeddingQuantConfig, EmbeddingQuantizationPass
    from graphq.passes.tied_head_split import TiedHeadSplitPass
    from graphq.passes.weight_only_emit import WeightOnlyEmissionPass
    from graphq.quantize import resolve_quantize_paths, stage_side_files
    from graphq.verify import verify_model_file

    start = time.perf_counter()
    source, output = resolve_quantize_paths(model, output, overwrite=overwrite)
    graph = load_model(source)
    nodes = planned_nodes(graph)
    if not nodes:
        raise GraphqError(f"{source}: no MatMul with a constant weight to quantize")
    plan, analysis = resolve_plan(source, nodes, recipe, plan=plan, analysis=analysis, tokenizer_dir=tokenizer_dir,
                                  progress=progress)
    configs = {node.name: precision_config(plan.assignments[node.name], tied_dim=node.weight.shape[0] if node.tied_table else None)
               for node in nodes}
    configs = {name: config for name, config in configs.items() if config is not None}
    analysed = {node.name: node for node in analysis.nodes} if analysis is not None else {}
    hot = _hot_rows(nodes, configs, plan, recipe)
    if recipe.method == "gptq":
        quantized = _gptq(graph, source, configs, recipe, tokenizer_dir=tokenizer_dir, progress=progress, hot=hot)
    else:
        def rtn(weight, config):
            return quantize_rtn(weight, config, pad=True)
        quantized = {node.name: split_head(node.weight, *hot[node.name], configs[node.name], rtn) if node.name in hot
                     else rtn(node.weight, configs[node.name]) for node in nodes if node.name in configs}
    split = {name: q for name, q in quantized.items() if isinstance(q, SplitHead)}
    uniform = {name: q for name, q in quantized.items() if name not in split}
    # A quantized tied head's codes are E's: the lookup reads them (a float head keeps a float lookup).
    shared = {node.tied_table: f"{node.name}_Q{uniform[node.name].config.bits}" for node in nodes
              if node.tied_table is not None and node.name in uniform}
    del nodes[:]
    graph = WeightOnlyEmissionPass(uniform, recipe.emit)(graph).model
    for name, head in split.items():
        graph = TiedHeadSplitPass(name, head.rows, head.hot, head.cold, recipe.emit)(graph).model
    if recipe.embedding == "quantized" and recipe.emit.format == "matmulnbits":
        graph = EmbeddingQuantizationPass(EmbeddingQuantConfig(PRECISIONS["int4"]), shared=shared)(graph).model
    by_name = {node.name: node for node in graph.graph}
    for name, precision in plan.assignments.items():
        if name in split:
            head = split[name]
            for tag, part in (("hot", head.hot), ("cold", head.cold)):
                emitted = by_name.get(f"{name}_{tag}_rows_Q{part.config.bits}")
                if emitted is not None:
                    meta = node_metadata(precision, analysed.get(name), part)
                    meta["graphq.bits_per_weight"] = f"{head.bits_per_weight():.4g}"
                    meta["graphq.hot_rows"] = f"{head.rows.size} of {head.rows.size + head.cold.q.shape[1]} rows at int8"
                    emitted.metadata_props.update(meta)
            continue
        emitted = by_name.get(f"{name}_Q{quantized[name].config.bits}" if name in quantized else name)
        if emitted is not None:
            emitted.metadata_props.update(node_metadata(precision, analysed.get(name), quantized.get(name)))
    graph = CleanupPass()(graph).model
    graph.metadata_props["graphq.recipe"] = json.dumps(recipe_to_dict(recipe), default=str)
    summary = {k: v for k, v in plan.to_json().items() if k not in ("plan", "hot_rows")}
    summary["hot_rows"] = {name: len(rows) for name, rows in plan.hot_rows.items() if name in split}
    graph.metadata_props["graphq.plan"] = json.dumps(summary)
    with staging_dir(output) as staging:
        staged = staging / output.name
        save_model(graph, staged)
        verify_model_file(staged)
        file_bytes = sum(p.stat().st_size for p in staging.iterdir())
        stage_side_files(source, output, staging, signature_of_model(graph))
        move_staged_into_place(staging, output)
    result = MixedResult(output, recipe, plan, file_bytes, time.perf_counter() - start)
    logger.info("mixed: %s at %.3f bits per weight (predicted KL %.4g) -> %s in %.1fs", plan.counts(), plan.average_bits,
                plan.predicted_kl, output, result.seconds)
    return result
