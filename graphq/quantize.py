"""W8A8 quantization of an ONNX language model, end to end.

1. Load the float graph; find the MatMuls with constant weights and build the plan (node name ->
   ``int8`` | ``float``; a recipe's ``float_nodes`` patterns stay float). The keep-float policy
   (Softmax, norms, residual Adds) is resolved on the float graph.
2. Calibrate on windows of ``wiki.valid.tokens`` (never the test text): per-channel ranges of every
   planned MatMul input.
3. SmoothQuant (if the recipe has it) folds ``s`` into norm weights / producer weights / an explicit
   Mul. For static activations, the smoothed graph is calibrated again so that ranges describe the
   activations the quantizer will actually see.
4. With ``pack_matmuls``, pack the int8 MatMuls that read one activation (q/k/v, gate/up) into one
   (:mod:`graphq.passes.pack_matmuls`, exact). Insert int8 weights and activations (recipe
   ``grid = "cuberoot"``: cube-root companded int8, :mod:`graphq.passes.cuberoot_qdq`, run by float
   MatMuls); clean up; check that no kept node reads quantized data.
5. Save to a staging folder, verify (``onnx.checker``, ORT session, integer MatMul kernels in ORT's
   optimised graph, except for cube-root), then move into place. Nothing is written at the output path before that.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

from graphq.calibrate import calibration_windows, collect_statistics, window_framing
from graphq.config import W8A8Recipe, recipe_to_dict
from graphq.errors import GraphqError, InvalidModelError, OutputPathError, VerificationError
from graphq.evaluate import load_tokenizer
from graphq.modelio import (check_output_path, load_model, move_staged_into_place, release, resolve_model_file, save_model,
                            staging_dir)
from graphq.passes.cleanup import CleanupPass
from graphq.passes.cuberoot_qdq import CubeRootQdqPass
from graphq.passes.dedupe_initializers import DeduplicateInitializersPass
from graphq.numerics.peg import embedding_groups, group_ranges
from graphq.passes.keep_float import keep_float_violations, kept_nodes
from graphq.passes.peg import PegGroupingPass, check_groups_divide
from graphq.passes.pack_matmuls import pack_planned_matmuls
from graphq.passes.shape_inference import ShapeInferencePass
from graphq.passes.qdq_insert import FLOAT, INT8, QdqInsertionPass, constant_weight, quantizable_matmuls
from graphq.passes.smoothquant import SmoothQuantPass
from graphq.genai_config import GENAI_CONFIG, write_genai_config
from graphq.runtime import ORT_ERRORS, GraphSignature, check_token_ids, embedding_rows, signature_of_model
from graphq.verify import verify_model_file

logger = logging.getLogger(__name__)

INTEGER_MATMUL_KERNELS = frozenset({"MatMulInteger", "MatMulIntegerToFloat", "QLinearMatMul", "DynamicQuantizeMatMul"})
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
              "generation_config.json", "chat_template.jinja", "vocab.txt")


@dataclasses.dataclass(frozen=True)
class QuantizeResult:
    model_path: Path
    recipe: W8A8Recipe
    plan: dict[str, str]
    smoothing: dict[str, str]
    integer_kernels: dict[str, int]
    kept_float_nodes: int
    seconds: float
    # k of the k-sigma weight clip per quantized node (searched or fixed; None: no clip chosen); empty without clipping.
    weight_clip_k: dict[str, float | None] = dataclasses.field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "model_path": str(self.model_path),
            "recipe": recipe_to_dict(self.recipe),
            "quantized_nodes": sorted(n for n, p in self.plan.items() if p == INT8),
            "float_nodes": sorted(n for n, p in self.plan.items() if p == FLOAT),
            "smoothquant": self.smoothing,
            "integer_kernels_in_ort_graph": self.integer_kernels,
            "kept_float_nodes": self.kept_float_nodes,
            "seconds": round(self.seconds, 2),
            **({"weight_clip_k": self.weight_clip_k} if self.weight_clip_k else {}),
        }


def build_plan(model: ir.Model, recipe: W8A8Recipe) -> dict[str, str]:
    """int8 for every constant-weight MatMul, float for those matching ``recipe.float_nodes``."""
    patterns = [re.compile(p) for p in recipe.float_nodes]
    plan = {}
    for node in quantizable_matmuls(model):
        plan[node.name] = FLOAT if any(p.search(node.name) for p in patterns) else INT8
    return plan


def ort_kernel_counts(model_path: Path) -> dict[str, int]:
    """Op-type counts of the graph ONNX Runtime's CPU EP actually runs after its optimisations."""
    with tempfile.TemporaryDirectory() as tmp:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.log_severity_level = 4  # failures surface as exceptions; ORT's own log would add lines
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
        optimized = Path(tmp) / "optimized.onnx"
        options.optimized_model_filepath = str(optimized)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name", "optimized.data")
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            ort.InferenceSession(str(model_path), options, providers=["CPUExecutionProvider"])
        except ORT_ERRORS as error:
            raise VerificationError(f"{model_path}: ONNX Runtime cannot optimise the model: "
                                    f"{str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__}") from error
        proto = onnx.load(str(optimized), load_external_data=False)
        return dict(collections.Counter(node.op_type for node in proto.graph.node))


def check_finite_weights(model: ir.Model, source: Path) -> None:
    """Refuse a model whose MatMul weights or embedding table hold NaN or infinity: its quantization
    scales would be NaN (or the weights all zero) and the output silently broken."""
    broken = []
    for node in model.graph:
        if node.op_type == "MatMul":
            weight = constant_weight(node)
        elif node.op_type == "Gather" and node.inputs[0] is not None and node.inputs[0].const_value is not None:
            weight = node.inputs[0].const_value.numpy()
        else:
            continue
        if weight is not None and np.issubdtype(weight.dtype, np.floating) and not np.isfinite(weight).all():
            broken.append(node.name)
        del weight
        for value in node.inputs:  # memory-mapped weights: read one at a time, not all held
            release(value)
    if broken:
        more = f" (and {len(broken) - 1} more)" if len(broken) > 1 else ""
        raise InvalidModelError(
            f"{source}: the weight of {broken[0]}{more} contains NaN or infinity; the model is broken and "
            "cannot be quantized"
        )


def _with_activation_types(model: ir.Model, plan: dict[str, str]) -> ir.Model:
    """Run shape inference when a planned MatMul's activation has no known dtype (a graph that did not
    come through ``graphq export`` / ``optimize``): the passes copy that dtype onto the values they
    insert, and an untyped value cannot be serialised."""
    nodes = {node.name: node for node in model.graph}
    if all(nodes[name].inputs[0].dtype is not None for name in plan):
        return model
    logger.info("some MatMul inputs have no known type; running shape inference first")
    return ShapeInferencePass()(model).model


def _activation_inputs(model: ir.Model, plan: dict[str, str]) -> list[str]:
    nodes = {node.name: node for node in model.graph}
    return list(dict.fromkeys(nodes[name].inputs[0].name for name, p in plan.items() if p == INT8))


def _weight_ranges(model: ir.Model, plan: dict[str, str], recipe: W8A8Recipe) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """Per-column weight ranges of the int8 nodes (with the recipe's clip) and the k used per node;
    both empty when the weights are neither clipped nor split into PEG groups (the default path)."""
    if recipe.weight_clip.method == "none" and recipe.peg is None:
        return {}, {}
    nodes = {node.name: node for node in model.graph}
    ranges, ks = {}, {}
    for name, precision in plan.items():
        if precision == INT8:
            ranges[name], k = recipe.weight_clip.column_ranges(constant_weight(nodes[name]))
            if k is not None:
                ks[name] = k if np.isfinite(k) else None  # None: the search kept the column maxima
    if ks:
        logger.info("weight clip %s: k per node %s", recipe.weight_clip.method, dict(collections.Counter(ks.values())))
    return ranges, ks


def _peg_groups(model: ir.Model, plan: dict[str, str], stats: dict, recipe: W8A8Recipe, weight_ranges: dict,
                workdir: Path, windows: np.ndarray, progress: bool):
    """Split the int8 MatMuls into channel groups (passes/peg.py); returns the grouped model, its plan,
    one static range per group tensor and the original weights' column ranges per group MatMul."""
    nodes = {node.name: node for node in model.graph}
    planned = [name for name, p in plan.items() if p == INT8]
    groups = {}
    for name in planned:
        x = nodes[name].inputs[0].name
        if x not in groups:
            groups[x] = embedding_groups(stats[x].channel_abs_max, recipe.peg.groups, permute=recipe.peg.permute)
    peg = PegGroupingPass(groups, planned)
    model = peg(model).model
    group_plan = {**{n: p for n, p in plan.items() if p != INT8}, **{n: INT8 for n in peg.group_nodes}}
    if recipe.activation_range.method == "minmax":
        ranges = {value: float(group_ranges(stats[x].channel_abs_max, [groups[x][g]])[0])
                  for value, (x, g) in peg.group_values.items()}
    else:  # the estimator needs each group's own histogram: calibrate the grouped float graph
        grouped_path = workdir / "peg.onnx"
        save_model(model, grouped_path)
        model = load_model(grouped_path)
        calib = recipe.calibration
        group_stats = collect_statistics(grouped_path, list(peg.group_values), windows, threads=calib.threads,
                                         histogram_bins=calib.histogram_bins, progress=progress)
        ranges = {name: recipe.activation_range.absmax(s, bits=8) for name, s in group_stats.items()}
    if recipe.peg.float_outlier_group:  # per activation, the group with the largest range stays float
        widest = {}
        for value, (x, _) in peg.group_values.items():
            if x not in widest or ranges[value] > ranges[widest[x]]:
                widest[x] = value
        kept = set(widest.values())
        for node in model.graph:
            if node.name in peg.group_nodes and node.inputs[0].name in kept:
                group_plan[node.name] = FLOAT
    return model, group_plan, ranges, {n: weight_ranges[orig] for n, orig in peg.group_nodes.items()}


def stage_side_files(source: Path, output: Path, staging: Path, signature: GraphSignature | None = None) -> None:
    """Copy the tokenizer and config files beside the input into ``staging`` (those the output folder
    lacks), so they move into place together with the model; with the output graph's ``signature``,
    also an onnxruntime-genai config for it when the output folder has none (graphq.genai_config)."""
    if output.parent.resolve() != source.parent.resolve():
        for name in SIDE_FILES:
            if (source.parent / name).is_file() and not (output.parent / name).exists():
                try:
                    shutil.copy2(source.parent / name, staging / name)
                except OSError as error:
                    raise OutputPathError(f"cannot write {output.parent / name} ({error.strerror or error})") from error
    if signature is not None and not (output.parent / GENAI_CONFIG).exists():
        write_genai_config(signature, output.name, [staging, output.parent, source.parent], staging)


def resolve_quantize_paths(model: str | os.PathLike, output: str | os.PathLike, *, overwrite: bool) -> tuple[Path, Path]:
    """The input .onnx file and a safe output path (not the input or its data, ends in .onnx, not an
    existing file unless ``overwrite``), for every quantize entry point."""
    source = resolve_model_file(model)
    output = Path(output)
    check_output_path(output, [source, source.with_name(source.name + ".data")])
    if output.suffix != ".onnx":
        raise OutputPathError(f"output path {output} must end in .onnx")
    if output.exists() and not overwrite:
        raise OutputPathError(f"output {output} already exists; pass --overwrite to replace it")
    return source, output


def quantize_model(model: str | os.PathLike, output: str | os.PathLike, recipe: W8A8Recipe, *,
                   tokenizer_dir: Path | None = None, overwrite: bool = False, progress: bool = True,
                   statistics: dict | None = None, streamed: bool | None = None) -> QuantizeResult:
    """Quantize ``model`` (.onnx) with ``recipe`` and write the verified result to ``output`` (.onnx).

    ``statistics``: RunningStats of the float graph's planned MatMul inputs, already collected on the
    recipe's calibration windows (benchmarks reuse one calibration across recipes); used in place of
    the first calibration pass. ``streamed`` (default: for models above
    :data:`graphq.streaming.STREAM_THRESHOLD_BYTES`) runs block by block in bounded memory
    (:func:`graphq.streaming.quantize_w8a8_streamed`)."""
    from graphq.streaming import quantize_w8a8_streamed, should_stream

    if not isinstance(recipe, W8A8Recipe):
        raise GraphqError(f"recipe '{getattr(recipe, 'name', recipe)}' is not a W8A8 recipe; "
                          "weight-only recipes run through graphq.weight_only.quantize_weights")
    start = time.perf_counter()
    source, output = resolve_quantize_paths(model, output, overwrite=overwrite)
    graph = load_model(source)
    plan = build_plan(graph, recipe)
    if not any(p == INT8 for p in plan.values()):
        raise GraphqError(f"{source}: no MatMul with a constant weight to quantize (nothing for W8A8 to do)")
    if recipe.peg is not None:
        check_groups_divide(graph, [n for n, p in plan.items() if p == INT8], recipe.peg.groups)
    check_finite_weights(graph, source)
    graph = _with_activation_types(graph, plan)
    kept = kept_nodes(graph, recipe.keep_float)
    kept_names = frozenset(node.name for node in kept)
    tokenizer = load_tokenizer(source, tokenizer_dir)
    windows = calibration_windows(tokenizer, recipe.calibration, window_framing(graph))
    check_token_ids(windows, embedding_rows(graph), tokenizer_dir or source.parent)
    if streamed if streamed is not None else should_stream(graph):
        if recipe.peg is not None or recipe.grid != "uniform" or recipe.weight_clip.method != "none":
            raise GraphqError(f"recipe '{recipe.name}': PEG groups, the cube-root grid and weight clipping are not "
                              "available in the layer-streamed W8A8 path (models above the streaming threshold)")
        with staging_dir(output) as staging:
            signature = signature_of_model(graph)
            smoothing, integer = quantize_w8a8_streamed(graph, source, staging / output.name, recipe, plan, kept_names,
                                                        windows, progress=progress)
            del graph
            stage_side_files(source, output, staging, signature)
            move_staged_into_place(staging, output)
        return QuantizeResult(model_path=output, recipe=recipe, plan=plan, smoothing=smoothing, integer_kernels=integer,
                              kept_float_nodes=len(kept_names), seconds=time.perf_counter() - start)
    calib = recipe.calibration
    static = recipe.activations.activation_scheme == "static"
    smoothing: dict[str, str] = {}
    ranges: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="graphq-quantize-") as tmp:
        stats = None
        if statistics is not None:
            stats = {name: statistics[name] for name in _activation_inputs(graph, plan)}
        elif recipe.smoothquant is not None or static:
            stats = collect_statistics(source, _activation_inputs(graph, plan), windows, threads=calib.threads,
                                       histogram_bins=calib.histogram_bins, progress=progress)
        if recipe.smoothquant is not None:
            smooth = SmoothQuantPass({n: s.channel_abs_max for n, s in stats.items()}, recipe.smoothquant)
            graph = smooth(graph).model
            smoothing = smooth.applied
            if static:
                smoothed_path = Path(tmp) / "smoothed.onnx"
                save_model(graph, smoothed_path)
                graph = load_model(smoothed_path)
                stats = collect_statistics(smoothed_path, _activation_inputs(graph, plan), windows, threads=calib.threads,
                                           histogram_bins=calib.histogram_bins, progress=progress)
        weight_ranges, clip_k = _weight_ranges(graph, plan, recipe)
        qdq_plan = plan
        if recipe.peg is not None:
            graph, qdq_plan, ranges, weight_ranges = _peg_groups(graph, plan, stats, recipe, weight_ranges, Path(tmp),
                                                                 windows, progress)
        elif static:
            ranges = {name: recipe.activation_range.absmax(s, bits=8) for name, s in stats.items()}
        if recipe.pack_matmuls:
            graph, qdq_plan, weight_ranges = pack_planned_matmuls(graph, qdq_plan, weight_ranges)
        if recipe.grid == "cuberoot":  # W8A8Recipe refuses PEG and weight clipping with this grid
            qdq = CubeRootQdqPass(plan, recipe.activations, activation_abs_max=ranges, kept_node_names=kept_names)
        else:
            qdq = QdqInsertionPass(qdq_plan, recipe.activations, activation_abs_max=ranges, kept_node_names=kept_names,
                                   weight_abs_max=weight_ranges)
        graph = qdq(graph).model
        if recipe.peg is not None:  # the groups of one MatMul share its weight scales and zero points
            graph = DeduplicateInitializersPass(merge_transposed=False)(graph).model
        graph = CleanupPass()(graph).model
        violations = keep_float_violations(n for n in graph.graph if n.name in kept_names)
        if violations:
            raise VerificationError(f"keep-float policy violated: {violations[0]} (and {len(violations) - 1} more)")
        graph.metadata_props["graphq.recipe"] = json.dumps(recipe_to_dict(recipe), default=str)
        with staging_dir(output) as staging:
            staged = staging / output.name
            save_model(graph, staged)
            verify_model_file(staged)
            kernels = ort_kernel_counts(staged)
            integer = {op: count for op, count in kernels.items() if op in INTEGER_MATMUL_KERNELS}
            if not integer and recipe.grid == "cuberoot":
                logger.info("cube-root W8A8 runs float MatMuls on companded values (no integer kernel can)")
            elif not integer:
                raise VerificationError(f"ONNX Runtime runs no integer MatMul kernel on the quantized graph: {kernels}")
            stage_side_files(source, output, staging, signature_of_model(graph))
            move_staged_into_place(staging, output)
    result = QuantizeResult(model_path=output, recipe=recipe, plan=plan, smoothing=smoothing, integer_kernels=integer,
                            kept_float_nodes=len(kept_names), seconds=time.perf_counter() - start, weight_clip_k=clip_k)
    logger.info("quantized %d MatMuls in %.1fs; ORT integer kernels: %s", len(qdq.quantized), result.seconds, integer)
    return result
