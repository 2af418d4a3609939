"""Weight-only quantization (W4/W8, activations float) of an ONNX language model, end to end.

1. Load the float graph; plan the MatMuls with a constant weight (``recipe.float_nodes`` stay float;
   weights that are not constants are left float and reported).
2. Quantize each planned weight ``W [K, N]`` with the recipe's method, groups of ``G`` along ``K``:
   - ``rtn``: round to nearest (no calibration);
   - ``gptq``: one calibration pass over ``wiki.valid.tokens`` accumulates ``H = 2 X^T X / n`` for
     every distinct MatMul input ``X`` (streamed, one ``K x K`` float64 matrix per input), then
     :func:`~graphq.numerics.weight_only.gptq_quantize` per weight. The Hessians come from the float
     model's activations (not layer by layer from the already-quantized prefix; see the issue note).
3. Emit ``MatMulNBits`` or blockwise ``DequantizeLinear`` (:mod:`graphq.passes.weight_only_emit`),
   clean up, save to a staging folder, verify (checker + ORT session), move into place.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir

from graphq.calibrate import CalibrationConfig, calibration_windows, collect_statistics
from graphq.errors import GraphqError, OutputPathError
from graphq.evaluate import load_tokenizer
from graphq.modelio import check_output_path, initializer_bytes, load_model, resolve_model_file, save_model, staging_dir
from graphq.numerics.weight_only import QuantizedWeight, WeightQuantConfig, gptq_quantize, hessian_accumulate, quantize_rtn
from graphq.passes.cleanup import CleanupPass
from graphq.passes.qdq_insert import constant_weight
from graphq.passes.weight_only_emit import WeightOnlyEmissionPass, WeightOnlyEmitConfig
from graphq.verify import verify_model_file

logger = logging.getLogger(__name__)

METHODS = ("rtn", "gptq")
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "config.json",
              "generation_config.json", "chat_template.jinja")


@dataclasses.dataclass(frozen=True)
class GptqConfig:
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.damp < 1:
            raise GraphqError(f"GPTQ damp must lie in (0, 1), got {self.damp}")
        if self.block_size < 1:
            raise GraphqError(f"GPTQ block size must be at least 1, got {self.block_size}")


@dataclasses.dataclass(frozen=True)
class WeightOnlyRecipe:
    name: str = "w4-rtn"
    method: str = "rtn"
    weights: WeightQuantConfig = WeightQuantConfig(bits=4, group_size=128, symmetric=True)
    # A group size that does not divide K (SmolLM2: K = 576, G = 128) makes the last group shorter.
    pad_groups: bool = True
    emit: WeightOnlyEmitConfig = WeightOnlyEmitConfig()
    gptq: GptqConfig = GptqConfig()
    calibration: CalibrationConfig = CalibrationConfig(windows=16)
    float_nodes: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise GraphqError(f"weight-only method must be one of {METHODS}, got '{self.method}'")


class HessianAccumulator:
    """Streams ``H = 2 X^T X / n`` over calibration batches ``[..., K]`` (fixed memory: K x K)."""

    def __init__(self) -> None:
        self.hessian: np.ndarray | None = None
        self.count = 0

    def update(self, array: np.ndarray) -> None:
        self.hessian, self.count = hessian_accumulate(self.hessian, array, self.count)


@dataclasses.dataclass(frozen=True)
class WeightOnlyResult:
    model_path: Path
    recipe: WeightOnlyRecipe
    quantized_nodes: tuple[str, ...]
    float_nodes: tuple[str, ...]
    quantized_weights: int
    float_bytes: int
    file_bytes: int
    seconds: float

    def to_json(self) -> dict:
        from graphq.config import recipe_to_dict

        return {
            "model_path": str(self.model_path), "recipe": recipe_to_dict(self.recipe),
            "quantized_nodes": list(self.quantized_nodes), "float_nodes": list(self.float_nodes),
            "quantized_weights": self.quantized_weights, "file_bytes": self.file_bytes,
            "size_breakdown": self.size_breakdown(), "seconds": round(self.seconds, 2),
        }

    def size_breakdown(self) -> dict:
        """Bytes of the file vs the bound ``bits + 32 / G`` bits per quantized weight plus float parts."""
        cfg = self.recipe.weights
        group = cfg.group_size if cfg.group_size > 0 else None
        bits_per_weight = cfg.bits + (32 / group if group else 0.0) + (0 if cfg.symmetric or not group else cfg.bits / group)
        bound = self.quantized_weights * bits_per_weight / 8 + self.float_bytes
        return {"quantized_weights": self.quantized_weights, "bits_per_quantized_weight_bound": bits_per_weight,
                "float_initializer_bytes": self.float_bytes, "bound_bytes": int(bound),
                "file_over_bound": round(self.file_bytes / bound, 4)}


def _plan(model: ir.Model, recipe: WeightOnlyRecipe) -> tuple[list[ir.Node], list[str]]:
    patterns = [re.compile(p) for p in recipe.float_nodes]
    planned, kept = [], []
    for node in model.graph:
        if node.op_type != "MatMul" or node.domain != "":
            continue
        if constant_weight(node) is None or any(p.search(node.name) for p in patterns):
            kept.append(node.name)
        else:
            planned.append(node)
    return planned, kept


def quantize_weights(model: str | os.PathLike, output: str | os.PathLike, recipe: WeightOnlyRecipe, *,
                     tokenizer_dir: Path | None = None, overwrite: bool = False, progress: bool = True) -> WeightOnlyResult:
    """Weight-only quantization of ``model`` (.onnx) into ``output`` (.onnx), verified before it is written."""
    start = time.perf_counter()
    source = resolve_model_file(model)
    output = Path(output)
    check_output_path(output, [source, source.with_name(source.name + ".data")])
    if output.suffix != ".onnx":
        raise OutputPathError(f"output path {output} must end in .onnx")
    if output.exists() and not overwrite:
        raise OutputPathError(f"output {output} already exists; pass --overwrite to replace it")
    graph = load_model(source)
    planned, kept = _plan(graph, recipe)
    if not planned:
        raise GraphqError(f"{source}: no MatMul with a constant weight to quantize")
    non_constant = [name for name in kept if not any(re.search(p, name) for p in recipe.float_nodes)]
    if non_constant:
        logger.info("weight-only: %d MatMuls have no constant weight and stay float (e.g. %s)", len(non_constant), non_constant[0])
    hessians: dict[str, HessianAccumulator] = {}
    if recipe.method == "gptq":
        tokenizer = load_tokenizer(source, tokenizer_dir)
        windows = calibration_windows(tokenizer, recipe.calibration)
        inputs = list(dict.fromkeys(node.inputs[0].name for node in planned))
        hessians = collect_statistics(source, inputs, windows, threads=recipe.calibration.threads, progress=progress,
                                      make_accumulator=HessianAccumulator)
    quantized: dict[str, QuantizedWeight] = {}
    weights = 0
    for node in planned:
        weight = constant_weight(node)
        if recipe.method == "rtn":
            quantized[node.name] = quantize_rtn(weight, recipe.weights, pad=recipe.pad_groups)
        else:
            hessian = hessians[node.inputs[0].name].hessian
            quantized[node.name] = gptq_quantize(weight, hessian, recipe.weights, damp=recipe.gptq.damp,
                                                 block_size=recipe.gptq.block_size, act_order=recipe.gptq.act_order,
                                                 pad=recipe.pad_groups)
        weights += weight.size
    emit = WeightOnlyEmissionPass(quantized, recipe.emit)
    graph = emit(graph).model
    graph = CleanupPass()(graph).model
    float_bytes = sum(v.const_value.nbytes for v in graph.graph.initializers.values()
                      if v.const_value is not None and v.const_value.dtype in (ir.DataType.FLOAT, ir.DataType.FLOAT16)
                      and not v.name.endswith(".scales"))
    from graphq.config import recipe_to_dict
    import json

    graph.metadata_props["graphq.recipe"] = json.dumps(recipe_to_dict(recipe), default=str)
    with staging_dir(output) as staging:
        staged = staging / output.name
        save_model(graph, staged)
        verify_model_file(staged)
        file_bytes = sum(p.stat().st_size for p in staging.iterdir())
        for item in staging.iterdir():
            os.replace(item, output.parent / item.name)
    if output.parent.resolve() != source.parent.resolve():
        for name in SIDE_FILES:
            if (source.parent / name).is_file() and not (output.parent / name).exists():
                shutil.copy2(source.parent / name, output.parent / name)
    result = WeightOnlyResult(model_path=output, recipe=recipe, quantized_nodes=tuple(quantized), float_nodes=tuple(kept),
                              quantized_weights=weights, float_bytes=float_bytes, file_bytes=file_bytes,
                              seconds=time.perf_counter() - start)
    logger.info("weight-only %s: %d MatMuls in %.1fs, %s", recipe.name, len(quantized), result.seconds, result.size_breakdown())
    return result
