"""Weight-only quantization (W4/W8, activations float) of an ONNX language model, end to end.

1. Load the float graph; plan the MatMuls with a constant weight (``recipe.float_nodes`` stay float;
   weights that are not constants are left float and reported).
2. Quantize each planned weight ``W [K, N]`` with the recipe's method, groups of ``G`` along ``K``
   (:mod:`graphq.numerics.weight_only` has the math):
   - ``rtn``: round to nearest (no calibration).
   - ``gptq``: per MatMul input ``X``, ``H = 2 X^T X / n`` streamed over calibration windows of
     ``wiki.valid.tokens``, then the GPTQ error-compensating rounding.
   - ``awq``: the same statistics plus ``mean |X|`` per channel; per input (the MatMuls that share it,
     e.g. q/k/v, searched together) the AWQ scales ``s = mean|X|^alpha`` minimising the output error
     ``tr(D^T (H / 2) D)``; ``s`` is folded into the producer of ``X`` (the RMSNorm weight, or the
     ``up_proj`` columns for ``down_proj``: the SmoothQuant folds, :mod:`graphq.passes.smoothquant`)
     and into the weight rows, ``H -> H / (s s^T)``; then a clip-ratio search per group and column
     and RTN with those ratios. Inputs whose producer cannot absorb ``s`` (the attention output before
     ``o_proj``) keep ``s = 1`` and get the clip search only, so no extra op is added.
   With ``sequential`` (default) the statistics of block ``b`` come from the graph whose blocks
   ``< b`` are already quantized (fake-quantized float weights), one block at a time
   (:mod:`graphq.blockwise`), as in the GPTQ and AWQ papers; otherwise from the float model in
   one pass. Two GPTQ refinements of the block-by-block path (``GptqConfig``):
   - ``true_sequential``: inside a block, the MatMuls that share an input are quantized together, one
     input after another in graph order ([q, k, v], [o], [gate, up], [down]); after each, their
     fake-quantized weights are written and the block is calibrated again, so each input's ``H`` sees
     the block's earlier MatMuls quantized. With ``awq_scales`` every AWQ scale of the block is searched
     on the float-weight statistics and folded first (later inputs first, as without the option); the
     sequential GPTQ then calibrates on the folded block.
   - ``asymmetric`` (GPTAQ, :mod:`graphq.numerics.asymmetric`): a second, float cache of the stage
     inputs follows the float model; each MatMul's input is collected from both, ``X_q`` (the quantized
     model) and ``X_f`` (the float model), and GPTQ rounds ``W' = W + alpha (H + lambda I)^-1 C W``,
     ``C = 2 X_q^T (X_f - X_q) / n``, which minimises ``||X_q W_hat - X_f W||^2`` instead of
     ``||X_q (W_hat - W)||^2``; without upstream error (``X_f = X_q``) it is plain GPTQ bit for bit.
   With ``grid = "cuberoot"`` (recipes ``w4-cuberoot``, ``w4-cuberoot-gptq``), RTN or GPTQ (with the
   clip search evaluated on the same levels) rounds on the cube-root companded grid instead
   (:mod:`graphq.numerics.companding`: levels ``sigma (q - 2^(b-1))^3``); a tied LM head that
   shares its codes with the embedding stays uniform (``embedding_bits``), like ``w4-rtn``'s.
   With ``tuning.steps`` > 0 (recipe ``w4-gptq-tuned``), the codes then stay fixed and every group scale
   is trained end to end so that the quantized model's next-token distribution matches the float
   model's on calibration windows (:mod:`graphq.scale_tuning`).
3. Emit ``MatMulNBits`` or blockwise ``DequantizeLinear`` (:mod:`graphq.passes.weight_only_emit`), or for
   cube-root weights a codebook ``Gather`` or ``DequantizeLinear`` + ``Pow(., 3)``
   (:mod:`graphq.passes.cuberoot_emit`), clean up, save to a staging folder, verify (checker + ORT
   session), move into place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.blockwise import Stage, StagedCalibration, partition
from graphq.calibrate import CalibrationConfig, calibration_windows, collect_statistics, window_framing
from graphq.errors import GraphqError
from graphq.evaluate import load_tokenizer
from graphq.modelio import (ExternalDataSink, load_model, move_staged_into_place, release, release_all, save_model,
                            save_streamed, staging_dir)
from graphq.numerics.asymmetric import asymmetric_target, cross_accumulate
from graphq.numerics.companding import CubeRootWeight, check_cuberoot_config, cuberoot_grid, quantize_cuberoot
from graphq.numerics.weight_only import (
    GPTQ_PRECISIONS,
    QuantizedWeight,
    WeightQuantConfig,
    awq_clip_search,
    awq_search,
    gptq_factor,
    gptq_quantize,
    hessian_accumulate,
    quantize_rtn,
    uniform_grid,
)
from graphq.passes.cleanup import CleanupPass
from graphq.passes.cuberoot_emit import CUBEROOT_FORMS, CubeRootEmissionPass
from graphq.passes.embedding_quant import EmbeddingQuantConfig, EmbeddingQuantizationPass, embedding_group, embedding_lookups
from graphq.passes.qdq_insert import constant_weight, has_constant_weight
from graphq.passes.smoothquant import SmoothQuantConfig, SmoothQuantPass, own_constant
from graphq.passes.weight_only_emit import WeightOnlyEmissionPass, WeightOnlyEmitConfig
from graphq.runtime import check_token_ids, embedding_rows, signature_of_model
from graphq.scale_tuning import ScaleTuningConfig, TuningReport, tune_scales
from graphq.verify import verify_model_file

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq", "awq")
# "uniform": codes on an evenly spaced grid; "cuberoot": levels (k / 2^(b-1))^3 of the group's
# largest magnitude (cube-root companding, graphq.numerics.companding), RTN only.
GRIDS = ("uniform", "cuberoot")
EMBEDDING_MODES = ("quantized", "float")


@dataclasses.dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01
    block_size: int = 128
    # Rows in order of decreasing H[k, k] (static groups). On SmolLM2's first block it cuts the layer
    # output error tr(D^T H D / 2) a further 1.2-4.3x below GPTQ in row order (down_proj 1.88 -> 0.44).
    act_order: bool = True
    # Before GPTQ: per-group clip ratios from the AWQ clip search on the Hessian (each group's own
    # output error under RTN), applied to the group scales GPTQ then uses. SmolLM2-135M g128, 40
    # windows: ppl 37.145 -> 34.549 (1.293x -> 1.202x float).
    clip_search: bool = True
    # Before GPTQ: AWQ's per-input-channel scale search, folded into the producer as for w4-awq.
    awq_scales: bool = False
    # Precision of GPTQ's factor, row updates and clip search (H is accumulated in float64 either way).
    # float32 halves their time and the factor's memory (tools/bench_gptq_precision.py); SmolLM2-135M
    # w4-gptq, 40 windows: ppl 34.274 in float32 against 34.549 in float64.
    precision: str = "float32"
    # Block by block only: quantize a block's MatMuls in groups that share an input, in graph order
    # ([q, k, v], [o], [gate, up], [down]), re-calibrating the block after each group on the group's
    # fake-quantized weights, so o_proj sees quantized q/k/v and down_proj quantized gate/up (the GPTQ
    # reference's --true-sequential). With awq_scales, every AWQ scale of the block is searched and
    # folded first, from the block's float-weight statistics (as without this option).
    # Off: no reliable gain measured. SmolLM2-135M w4-gptq, 40 windows: float64 GPTQ 34.549 -> 34.099,
    # but float32 GPTQ (the default precision) 34.274 -> 34.456; the float64/float32 difference alone
    # is 0.28, so both effects are within that noise. It costs about 1.6x the quantize CPU time.
    true_sequential: bool = False
    # Block by block only: asymmetric calibration (GPTAQ; graphq.numerics.asymmetric): GPTQ rounds
    # W' = W + alpha (H + lambda I)^-1 C W, C = 2 X_q^T (X_f - X_q) / n, so the quantized layer matches
    # the float model's output X_f W instead of X_q W. X_f comes from a float copy of each block
    # (blockwise.StagedCalibration with reference=True). Off: SmolLM2-135M w4-gptq (float64) with
    # true_sequential, alpha 1: ppl 34.132 against 34.099 without it, at twice the quantize CPU time.
    asymmetric: bool = False
    asymmetric_alpha: float = 1.0

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise GraphqError(f"GPTQ damp must lie in (0, 1), got {self.damp}")
        if self.precision not in GPTQ_PRECISIONS:
            raise GraphqError(f"GPTQ precision must be one of {', '.join(GPTQ_PRECISIONS)}, got '{self.precision}'")
        if not 0 < self.asymmetric_alpha <= 1:
            raise GraphqError(f"GPTQ asymmetric_alpha must lie in (0, 1], got {self.asymmetric_alpha}")
        if self.block_size < 1:
            raise GraphqError(f"GPTQ block size must be at least 1, got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class AwqConfig:
    grid: int = 20  # alpha in {0, 1/grid, ..., (grid-1)/grid}
    clip_grid: int = 20
    max_shrink: float = 0.5  # clip ratios searched in [1 - max_shrink, 1]
    fold_scales: bool = True  # False: clip search only

    def __post_init__(self) -> None:
        if self.grid < 1 or self.clip_grid < 1:
            raise GraphqError(f"AWQ grids must be at least 1, got {self.grid}, {self.clip_grid}")
        if not 0 <= self.max_shrink < 1:
            raise GraphqError(f"AWQ max_shrink must lie in [0, 1), got {self.max_shrink}")


@dataclasses.dataclass(frozen=True)
class WeightOnlyRecipe:
    name: str = "w4-rtn"
    method: str = "rtn"
    # float16 scales: 4.125 bits per weight at g128 instead of 4.25, for no measurable accuracy (README).
    weights: WeightQuantConfig = WeightQuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype="float16")
    # A group size that does not divide K (SmolLM2: K = 576, G = 128) makes the last group shorter.
    pad_groups: bool = True
    emit: WeightOnlyEmitConfig = WeightOnlyEmitConfig()
    gptq: GptqConfig = GptqConfig()
    awq: AwqConfig = AwqConfig()
    sequential: bool = True  # calibrate block b on the output of the already-quantized blocks before it
    # "quantized": token embeddings become GatherBlockQuantized (RTN, rows in groups along the hidden
    # dimension); a tied LM head and the embedding then share one set of codes (RTN: a lookup table
    # has no input distribution for GPTQ/AWQ to exploit).
    embedding: str = "quantized"
    # Bits of the embedding table (and of a tied LM head sharing its codes); None: ``weights.bits``.
    # 8 by default: on SmolLM2 (RTN g128, 10 windows) a 4-bit tied head costs ppl 48.2 -> 58.9 (float
    # embedding kept) while the shared 8-bit table gives 48.4 at 92.6 MB instead of 175.8 MB.
    embedding_bits: int | None = 8
    calibration: CalibrationConfig = CalibrationConfig(windows=16)
    float_nodes: tuple[str, ...] = ()
    grid: str = "uniform"
    # After the codes are fixed: the group scales trained end to end against the float model
    # (graphq.scale_tuning); steps 0 leaves them as RTN/GPTQ/AWQ set them.
    tuning: ScaleTuningConfig = ScaleTuningConfig()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GraphqError(f"weight-only method must be one of {METHODS}, got '{self.method}'")
        if self.grid not in GRIDS:
            raise GraphqError(f"weight-only grid must be one of {GRIDS}, got '{self.grid}'")
        if self.grid == "cuberoot":
            check_cuberoot_config(self.weights)
            if self.method == "awq" or self.gptq.awq_scales:
                raise GraphqError("the cube-root grid is quantized by round to nearest or GPTQ, not with AWQ scales")
            if self.emit.format not in CUBEROOT_FORMS:
                raise GraphqError(f"cube-root weights are emitted as {' or '.join(CUBEROOT_FORMS)}, not '{self.emit.format}'")
        elif self.emit.format in CUBEROOT_FORMS:
            raise GraphqError(f"format '{self.emit.format}' is for cube-root weights (grid cuberoot), not uniform ones")
        if self.embedding_bits is not None and self.embedding_bits not in (4, 8):
            raise GraphqError(f"weight-only embedding_bits must be 4 or 8 (GatherBlockQuantized), got {self.embedding_bits}")
        if self.embedding not in EMBEDDING_MODES:
            raise GraphqError(f"weight-only embedding must be one of {EMBEDDING_MODES}, got '{self.embedding}'")
        if self.tuning.steps and (self.grid != "uniform" or self.weights.float_zero_points):
            raise GraphqError("scale tuning trains the scales of uniform grids with integer zero points; "
                              "not the cube-root grid or float zero points")
        if self.weights.float_zero_points and self.emit.format != "matmulnbits":
            raise GraphqError(f"float zero points are emitted as MatMulNBits only (DequantizeLinear takes integer zero "
                              f"points), not as format '{self.emit.format}'")

    @property
    def embedding_config(self) -> WeightQuantConfig:
        """Quantization of the embedding table (and of a tied LM head that shares its codes): integer
        zero points, as ``GatherBlockQuantized`` reads no float ones."""
        return dataclasses.replace(self.weights, bits=self.embedding_bits or self.weights.bits, float_zero_points=False)


class HessianAccumulator:
    """Streams ``H = 2 X^T X / n`` and ``mean |X|`` per channel over calibration batches ``[..., K]``
    (fixed memory: ``K x K``)."""

    def __init__(self) -> None:
        self.hessian: np.ndarray | None = None
        self.count = 0
        self._abs_sum: np.ndarray | None = None

    def update(self, array: np.ndarray) -> None:
        self.hessian, self.count = hessian_accumulate(self.hessian, array, self.count, in_place=True)
        abs_sum = np.abs(np.asarray(array, dtype=np.float64)).reshape(-1, array.shape[-1]).sum(axis=0)
        self._abs_sum = abs_sum if self._abs_sum is None else self._abs_sum + abs_sum

    @property
    def abs_mean(self) -> np.ndarray:
        return self._abs_sum / max(self.count, 1)


class PairedAccumulator(HessianAccumulator):
    """:class:`HessianAccumulator` of the quantized model's inputs ``X_q``, plus the asymmetric cross term
    ``C = 2 X_q^T (X_f - X_q) / n`` with the float model's inputs ``X_f`` to the same MatMul
    (:func:`graphq.numerics.asymmetric.cross_accumulate`)."""

    def __init__(self) -> None:
        super().__init__()
        self.cross: np.ndarray | None = None

    def update(self, array: np.ndarray, reference: np.ndarray) -> None:
        count = self.count
        self.cross, _ = cross_accumulate(self.cross, array, reference, count)
        super().update(array)


@dataclasses.dataclass(frozen=True)
class WeightOnlyResult:
    model_path: Path
    recipe: WeightOnlyRecipe
    quantized_nodes: tuple[str, ...]
    float_nodes: tuple[str, ...]
    quantized_weights: int
    weight_bits: float  # the bound's bits over all quantized weights (see size_breakdown)
    float_bytes: int
    file_bytes: int
    seconds: float
    tuning: TuningReport | None = None

    def to_json(self) -> dict:
        from graphq.config import recipe_to_dict

        return {
            "model_path": str(self.model_path), "recipe": recipe_to_dict(self.recipe),
            "quantized_nodes": list(self.quantized_nodes), "float_nodes": list(self.float_nodes),
            "quantized_weights": self.quantized_weights, "file_bytes": self.file_bytes,
            "size_breakdown": self.size_breakdown(), "seconds": round(self.seconds, 2),
            "tuning": dataclasses.asdict(self.tuning) if self.tuning else None,
        }

    def size_breakdown(self) -> dict:
        """Bytes of the file vs the bound: per quantized weight ``bits + S / G`` (a scale per group of
        ``S`` = 16 or 32 bits, its ``scale_dtype``, plus ``bits / G`` for a zero point, ``S / G`` for a float
        one, emitted as such or as offsets) with each weight's own bits and group, plus the other float initializers.
        ``bits_per_quantized_weight`` is that bound's average."""
        bound = self.weight_bits / 8 + self.float_bytes
        return {"quantized_weights": self.quantized_weights,
                "bits_per_quantized_weight": round(self.weight_bits / max(self.quantized_weights, 1), 4),
                "float_initializer_bytes": self.float_bytes, "bound_bytes": int(bound),
                "file_over_bound": round(self.file_bytes / bound, 4)}


def _plan(model: ir.Model, recipe: WeightOnlyRecipe) -> tuple[list[ir.Node], list[str]]:
    patterns = [re.compile(p) for p in recipe.float_nodes]
    planned, kept = [], []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        if not has_constant_weight(node) or any(p.search(node.name) for p in patterns):
            kept.append(node.name)
        else:
            planned.append(node)
    return planned, kept


def _tied_heads(model: ir.Model, planned: list[ir.Node], recipe: WeightOnlyRecipe) -> dict[str, tuple[str, WeightQuantConfig]]:
    """Planned MatMuls whose weight is ``Transpose(E)`` with ``E`` also an embedding table: node name ->
    (embedding initializer name, the RTN config that lets the lookup share the head's codes)."""
    if recipe.embedding != "quantized" or recipe.emit.format not in ("matmulnbits", *CUBEROOT_FORMS):
        return {}
    tables = {gather.inputs[0].name for gather in embedding_lookups(model)}
    tied = {}
    for node in planned:
        producer = node.inputs[1].producer()
        if producer is None or producer.op_type != "Transpose" or producer.inputs[0].name not in tables:
            continue
        dim = producer.inputs[0].const_value.shape[1]
        group = embedding_group(dim, recipe.weights.group_size)
        config = recipe.embedding_config
        if group is not None and config.bits in (4, 8):
            tied[node.name] = (producer.inputs[0].name, dataclasses.replace(config, group_size=group))
    return tied


def _input_groups(nodes: list[ir.Node]) -> dict[str, list[ir.Node]]:
    """``nodes`` by the tensor they read (q/k/v, gate/up share one), in graph order."""
    groups: dict[str, list[ir.Node]] = {}
    for node in nodes:
        groups.setdefault(node.inputs[0].name, []).append(node)
    return groups


def _fold_awq_scales(graph: ir.Model, groups: dict[str, list[ir.Node]], stats: dict[str, HessianAccumulator],
                     recipe: WeightOnlyRecipe) -> None:
    """AWQ's scale search per input of ``groups``, folded into ``graph``; each folded input's Hessian in
    ``stats`` becomes that of the scaled input, ``H -> H / (s s^T)``. Later inputs first: down_proj's
    scales fold into up_proj's columns before up_proj's input is searched."""
    for name in reversed(list(groups)):
        members, accumulator = groups[name], stats[name]
        joined = np.concatenate([constant_weight(node) for node in members], axis=1)
        scales, _ = awq_search(joined, accumulator.abs_mean, None, recipe.weights, grid=recipe.awq.grid,
                               pad=recipe.pad_groups, hessian=accumulator.hessian)
        fold = SmoothQuantPass({}, SmoothQuantConfig(explicit_mul=False), factors={name: scales})
        fold(graph)
        if name in fold.applied:
            inverse = 1.0 / scales.astype(np.float64)
            accumulator.hessian = accumulator.hessian * np.outer(inverse, inverse)
            logger.debug("awq: %s folded (%s)", name, fold.applied[name])


def _quantize_input(members: list[ir.Node], accumulator: HessianAccumulator, recipe: WeightOnlyRecipe
                    ) -> dict[str, QuantizedWeight]:
    """GPTQ (with the clip search, and the asymmetric target when ``accumulator`` has a cross term) or
    clip search + RTN of the MatMuls ``members`` that read one input."""
    config = recipe.weights
    gptq = recipe.method == "gptq"
    clip_search = recipe.gptq.clip_search if gptq else True
    levels = cuberoot_grid(config) if recipe.grid == "cuberoot" else uniform_grid(config)
    hessian = accumulator.hessian
    cross = getattr(accumulator, "cross", None)
    # one factor of H for all the MatMuls reading this input (q/k/v, gate/up)
    precision = recipe.gptq.precision if gptq else "float64"
    factor = gptq_factor(hessian, damp=recipe.gptq.damp, act_order=recipe.gptq.act_order,
                         precision=precision) if gptq else None
    quantized = {}
    for node in members:
        weight = constant_weight(node)
        if gptq and cross is not None and cross.any():
            weight = asymmetric_target(weight, cross, factor, alpha=recipe.gptq.asymmetric_alpha)
        ratios = 1.0
        if clip_search:
            ratios = awq_clip_search(weight, None, config, grid=recipe.awq.clip_grid, max_shrink=recipe.awq.max_shrink,
                                     pad=recipe.pad_groups, hessian=hessian, levels=levels, precision=precision)
        if gptq:
            quantized[node.name] = gptq_quantize(weight, hessian, config, damp=recipe.gptq.damp,
                                                 block_size=recipe.gptq.block_size, act_order=recipe.gptq.act_order,
                                                 pad=recipe.pad_groups, clip_ratio=ratios, factor=factor, grid=levels)
        else:
            quantized[node.name] = quantize_rtn(weight, config, clip_ratio=ratios, pad=recipe.pad_groups)
    return quantized


def _quantize_with_statistics(graph: ir.Model, nodes: list[ir.Node], stats: dict[str, HessianAccumulator],
                              recipe: WeightOnlyRecipe) -> dict[str, QuantizedWeight]:
    """GPTQ or AWQ of ``nodes`` from the statistics of their inputs; AWQ scales are folded into ``graph``.

    GPTQ can be preceded by AWQ's scale search (``gptq.awq_scales``) and its clip search
    (``gptq.clip_search``); AWQ is scale search, clip search, then round to nearest."""
    fold_scales = recipe.gptq.awq_scales if recipe.method == "gptq" else recipe.awq.fold_scales
    groups = _input_groups(nodes)
    if fold_scales:
        _fold_awq_scales(graph, groups, stats, recipe)
    quantized = {}
    for name in reversed(list(groups)):
        quantized.update(_quantize_input(groups[name], stats.pop(name), recipe))
    return {node.name: quantized[node.name] for node in nodes}


def _quantize_stage(graph: ir.Model, runner: StagedCalibration, stage: Stage, nodes: list[ir.Node],
                    recipe: WeightOnlyRecipe) -> dict[str, QuantizedWeight]:
    """Calibrate and quantize ``nodes`` of ``stage`` (block by block). Plain: one calibration of the
    stage on its float weights. ``gptq.true_sequential``: AWQ scales (if any) folded first from that
    calibration, then one group of MatMuls sharing an input at a time, in graph order, each calibrated
    with the groups before it fake-quantized. ``gptq.asymmetric``: each calibration pairs the inputs
    with those of the stage's float weights run on the float model's stage inputs."""
    options = recipe.gptq
    gptq = recipe.method == "gptq"
    true_sequential, asymmetric = gptq and options.true_sequential, gptq and options.asymmetric
    names = [node.inputs[0].name for node in nodes]
    if not (true_sequential or asymmetric):
        return _quantize_with_statistics(graph, nodes, runner.calibrate(stage, names, HessianAccumulator), recipe)
    groups = _input_groups(nodes)
    if options.awq_scales:
        _fold_awq_scales(graph, groups, runner.calibrate(stage, list(groups), HessianAccumulator), recipe)
    if asymmetric:  # the float weights (AWQ scales folded: the same function) before any is rounded
        runner.hold_reference(stage)
    accumulator = PairedAccumulator if asymmetric else HessianAccumulator
    batches = [[name] for name in groups] if true_sequential else [list(groups)]
    quantized: dict[str, QuantizedWeight] = {}
    for index, batch in enumerate(batches):
        stats = runner.calibrate(stage, batch, accumulator, reference=asymmetric)
        for name in batch:
            done = _quantize_input(groups[name], stats.pop(name), recipe)
            quantized.update(done)
            if true_sequential and index + 1 < len(batches):
                for node in groups[name]:
                    write_fake_quantized(node, done[node.name])
        del stats
    return {node.name: quantized[node.name] for node in nodes}


def write_fake_quantized(node: ir.Node, quantized: QuantizedWeight) -> None:
    """Replace ``node``'s weight by its dequantized value, so later blocks calibrate on quantized outputs.

    A weight shared with other nodes (e.g. the tied embedding read through a Transpose) is left alone."""
    if own_constant(node.inputs[1], 2) is None:
        logger.debug("weight-only: %s reads a shared or transposed weight; later stages see it in float", node.name)
        return
    dtype = node.inputs[1].const_value.dtype.numpy()  # float16 models keep float16 weights
    release(node.inputs[1])
    dequantized = quantized.dequantize().astype(dtype)
    node.inputs[1].const_value = ir.tensor(dequantized, name=node.inputs[1].name)


def _emit(graph: ir.Model, batch: dict[str, QuantizedWeight], recipe: WeightOnlyRecipe) -> None:
    """Emit ``batch`` into ``graph``: cube-root weights as codebook/dq-cube, the others (a tied head
    shared with the embedding stays uniform) as MatMulNBits or blockwise QDQ."""
    cube = {name: q for name, q in batch.items() if isinstance(q, CubeRootWeight)}
    uniform = {name: q for name, q in batch.items() if name not in cube}
    if cube:
        CubeRootEmissionPass(cube, recipe.emit.format)(graph)
    if uniform:
        emit_config = recipe.emit if recipe.grid == "uniform" else dataclasses.replace(recipe.emit, format="matmulnbits")
        WeightOnlyEmissionPass(uniform, emit_config)(graph)


def quantize_weights(model: str | os.PathLike, output: str | os.PathLike, recipe: WeightOnlyRecipe, *,
                     tokenizer_dir: Path | None = None, overwrite: bool = False, progress: bool = True,
                     streamed: bool | None = None) -> WeightOnlyResult:
    """Weight-only quantization of ``model`` (.onnx) into ``output`` (.onnx), verified before it is written.

    ``streamed`` (default: when the initializers exceed :data:`graphq.streaming.STREAM_THRESHOLD_BYTES`)
    emits each block's quantized weights as soon as they are final and writes them to the output's
    external data (:class:`graphq.modelio.ExternalDataSink`), so memory holds about one block of
    weights; the output is the same graph with the same tensors as without it."""
    # graphq.quantize imports the recipes, which import this module
    from graphq.quantize import check_finite_weights, resolve_quantize_paths, stage_side_files
    from graphq.streaming import should_stream, verify_streamed

    start = time.perf_counter()
    source, output = resolve_quantize_paths(model, output, overwrite=overwrite)
    graph = load_model(source)
    streamed = should_stream(graph) if streamed is None else streamed
    check_finite_weights(graph, source)
    planned, kept = _plan(graph, recipe)
    release_all(graph)
    if not planned:
        raise GraphqError(f"{source}: no MatMul with a constant weight to quantize")
    non_constant = [name for name in kept if not any(re.search(p, name) for p in recipe.float_nodes)]
    if non_constant:
        logger.info("weight-only: %d MatMuls have no constant weight and stay float (e.g. %s)", len(non_constant), non_constant[0])
    tied = _tied_heads(graph, planned, recipe)
    planned_names = [node.name for node in planned]
    if recipe.tuning.steps and streamed:
        raise GraphqError(f"{source}: scale tuning trains the whole model in memory; it does not run streamed "
                          "(a model this large is beyond CPU tuning)")
    tuning_report = None
    with staging_dir(output) as staging:
        sink = ExternalDataSink(staging, output.name + ".data") if streamed else None
        summary: dict[str, tuple[int, float]] = {}  # node -> (weights, bits of the size bound)
        quantized: dict[str, QuantizedWeight] = {}

        def done(batch: dict[str, QuantizedWeight]) -> None:
            """Record ``batch``; streamed: emit it now and move its tensors to the output file."""
            for name, q in batch.items():
                summary[name] = (int(np.prod(q.shape)), int(np.prod(q.shape)) * q.config.bits_per_weight(q.group_length, q.shape[0]))
            if sink is None:
                quantized.update(batch)
                return
            _emit(graph, batch, recipe)
            sink.spill_new(graph.graph)

        if recipe.method != "rtn" or recipe.tuning.steps:
            tokenizer = load_tokenizer(source, tokenizer_dir)
        if recipe.method != "rtn":
            windows = calibration_windows(tokenizer, recipe.calibration, window_framing(graph))
            check_token_ids(windows, embedding_rows(graph), tokenizer_dir or source.parent)
        if tied:
            logger.info("weight-only: %s shares its codes with the embedding lookup (RTN, group %d)",
                        ", ".join(tied), next(iter(tied.values()))[1].group_size)
            tied_quantized = {name: quantize_rtn(constant_weight(node), tied[name][1]) for node in planned
                              if (name := node.name) in tied}
        if recipe.method == "rtn":
            rounding = quantize_cuberoot if recipe.grid == "cuberoot" else quantize_rtn
            for node in (n for n in planned if n.name not in tied):
                q = rounding(constant_weight(node), recipe.weights, pad=recipe.pad_groups)
                release(node.inputs[1])
                done({node.name: q})
                del q
        else:
            stages = partition(graph) if recipe.sequential else None
            if stages is None:
                if recipe.sequential:
                    logger.warning("weight-only %s: the graph cannot be cut into blocks; calibrating on the float model", recipe.name)
                if recipe.method == "gptq" and (recipe.gptq.true_sequential or recipe.gptq.asymmetric):
                    logger.warning("weight-only %s: true_sequential and asymmetric apply block by block only; ignored",
                                   recipe.name)
                if streamed:
                    raise GraphqError(f"{source}: streamed {recipe.method} calibrates block by block, but the graph "
                                      "cannot be cut into blocks (or the recipe is not sequential)")
                inputs = list(dict.fromkeys(node.inputs[0].name for node in planned))
                stats = collect_statistics(source, inputs, windows, threads=recipe.calibration.threads, progress=progress,
                                           make_accumulator=HessianAccumulator)
                done(_quantize_with_statistics(graph, [n for n in planned if n.name not in tied], stats, recipe))
            else:
                reference = recipe.method == "gptq" and recipe.gptq.asymmetric
                runner = StagedCalibration(graph, stages, windows, threads=recipe.calibration.threads, progress=progress,
                                           reference=reference)
                for stage in runner.stages():
                    nodes = [node for node in stage.nodes if node.name in set(planned_names) and node.name not in tied]
                    stage_quantized = {}
                    if nodes:
                        stage_quantized = _quantize_stage(graph, runner, stage, nodes, recipe)
                        if stage.outputs:
                            for node in nodes:
                                write_fake_quantized(node, stage_quantized[node.name])
                    runner.advance(stage)
                    for node in stage.nodes:
                        for value in node.inputs:
                            release(value)
                    if stage_quantized:
                        done(stage_quantized)
                    del stage_quantized
        if tied:
            done(tied_quantized)
            del tied_quantized
        weights = sum(summary[name][0] for name in planned_names)
        if recipe.tuning.steps:
            tuning = dataclasses.replace(recipe.calibration, windows=recipe.tuning.windows,
                                         window_tokens=recipe.tuning.window_tokens)
            tuning_windows = calibration_windows(tokenizer, tuning, window_framing(graph))
            check_token_ids(tuning_windows, embedding_rows(graph), tokenizer_dir or source.parent)
            tables = {table: quantized[name].dequantize().T for name, (table, _) in tied.items()}
            tuned, tuning_report = tune_scales(source, graph, {n: q for n, q in quantized.items() if n not in tied},
                                               tables, tuning_windows, recipe.tuning)
            quantized.update(tuned)
            del tuned, tables
        if sink is None:
            quantized = {name: quantized[name] for name in planned_names}  # graph order, whatever the method
            _emit(graph, quantized, recipe)
            del quantized
        embedded, embedded_bits = 0, 0.0
        if recipe.embedding == "quantized":
            if recipe.emit.format != "qdq":
                tables = {g.name: g.inputs[0].const_value.shape for g in embedding_lookups(graph)}
                shared = {table: f"{name}_Q{config.bits}" for name, (table, config) in tied.items()}
                lookup = EmbeddingQuantizationPass(EmbeddingQuantConfig(recipe.embedding_config), shared=shared)
                graph = lookup(graph).model
                for gather, how in lookup.rewritten.items():
                    if how == "own":
                        vocab, dim = tables[gather]
                        embedded += vocab * dim
                        embedded_bits += vocab * dim * recipe.embedding_config.bits_per_weight(embedding_group(dim, recipe.weights.group_size), dim)
            else:
                logger.info("weight-only: embeddings stay float with the %s format", recipe.emit.format)
        graph = CleanupPass()(graph).model
        float_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values()
                          if v.const_value is not None and v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                          and not v.name.endswith((".scales", ".zero_points", ".offsets")))  # in weight_bits
        import json

        from graphq.config import recipe_to_dict

        graph.metadata_props["graphq.recipe"] = json.dumps(recipe_to_dict(recipe), default=str)
        staged = staging / output.name
        signature = signature_of_model(graph)
        if sink is None:
            save_model(graph, staged)
            verify_model_file(staged)
        else:
            save_streamed(graph, staged, sink)
            del graph
            verify_streamed(staged)
        file_bytes = sum(p.stat().st_size for p in staging.iterdir())
        stage_side_files(source, output, staging, signature)
        move_staged_into_place(staging, output)
    result = WeightOnlyResult(model_path=output, recipe=recipe, quantized_nodes=tuple(planned_names), float_nodes=tuple(kept),
                              quantized_weights=weights + embedded,
                              weight_bits=embedded_bits + sum(summary[name][1] for name in planned_names),
                              float_bytes=float_bytes, file_bytes=file_bytes, seconds=time.perf_counter() - start,
                              tuning=tuning_report)
    logger.info("weight-only %s: %d MatMuls in %.1fs%s, %s", recipe.name, len(planned_names), result.seconds,
                " (streamed)" if streamed else "", result.size_breakdown())
    return result
