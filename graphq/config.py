"""Typed quantization recipes, serialised to and from JSON/YAML.

A recipe is a frozen dataclass tree; ``recipe_to_dict`` / ``recipe_from_dict`` convert it to plain
data (with a ``format_version``), so ``--recipe`` takes either a built-in name (:data:`RECIPES`) or
a ``.json`` / ``.yaml`` file holding that data. Unknown keys are errors, not silently ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from pathlib import Path

from graphq.calibrate import CalibrationConfig
from graphq.errors import GraphqError
from graphq.numerics.calibration import RangeEstimator
from graphq.numerics.clipping import WeightClip
from graphq.passes.keep_float import KeepFloatPolicy
from graphq.passes.peg import PegConfig
from graphq.passes.qdq_insert import QdqConfig
from graphq.passes.smoothquant import SmoothQuantConfig
from graphq.numerics.weight_only import WeightQuantConfig
from graphq.passes.weight_only_emit import WeightOnlyEmitConfig
from graphq.scale_tuning import ScaleTuningConfig
from graphq.weight_only import GptqConfig, WeightOnlyRecipe
from graphq.mixed import MixedRecipe

RECIPE_FORMAT_VERSION = 1


@dataclasses.dataclass(frozen=True)
class W8A8Recipe:
    """Int8 weights (symmetric, per output channel) and int8 activations on every planned MatMul."""

    name: str = "w8a8"
    smoothquant: SmoothQuantConfig | None = SmoothQuantConfig(alpha=0.5)
    activations: QdqConfig = QdqConfig(activation_scheme="dynamic-token")
    activation_range: RangeEstimator = RangeEstimator(method="minmax")
    calibration: CalibrationConfig = CalibrationConfig(windows=32)
    keep_float: KeepFloatPolicy = KeepFloatPolicy()
    # Regular expressions (re.search) on node names: matching MatMuls stay float.
    float_nodes: tuple[str, ...] = ()
    # "uniform" int8, or "cuberoot": weights and activations companded (graphq.passes.cuberoot_qdq).
    grid: str = "uniform"
    # Per-embedding-group static activations (graphq.passes.peg); None: one scale per tensor.
    peg: PegConfig | None = None
    # Per-column range of the int8 weights (k-sigma clipping, graphq.numerics.clipping).
    weight_clip: WeightClip = WeightClip()
    # Pack the int8 MatMuls that read one activation (q/k/v, gate/up) into one MatMul after SmoothQuant
    # (graphq.passes.pack_matmuls, exact): one activation quantization and one integer GEMM per group.
    pack_matmuls: bool = False

    def __post_init__(self) -> None:
        if self.grid not in W8A8_GRIDS:
            raise GraphqError(f"w8a8 grid must be one of {W8A8_GRIDS}, got '{self.grid}'")
        if self.peg is not None and self.activations.activation_scheme != "static":
            raise GraphqError("PEG (per-embedding-group activation scales) needs static activations, "
                              f"not '{self.activations.activation_scheme}'")
        if self.grid == "cuberoot" and (self.peg is not None or self.weight_clip.method != "none"):
            raise GraphqError("the cube-root grid does not combine with PEG groups or k-sigma weight clipping")
        if self.pack_matmuls and (self.peg is not None or self.grid != "uniform"):
            raise GraphqError("pack_matmuls does not combine with PEG groups or the cube-root grid")


W8A8_GRIDS = ("uniform", "cuberoot")


# Node-name pattern of the LM head in optimum's exports of decoder LMs.
LM_HEAD_NODES = ("^/lm_head/",)
_STATIC = QdqConfig(activation_scheme="static")
_CUBEROOT_WEIGHTS = WeightQuantConfig(scale_dtype="float32")  # the dq-cube form stores cube roots of the scales

# Defaults chosen from measurements on SmolLM2-135M (tools/bench_quality.py, 40 windows; the README
# has the table): per-token activations with a = 0.5 keep perplexity within 1.5 %. The LM head stays
# float by default: quantized it costs accuracy (1.021x vs 1.015x) and an extra int8 copy of the tied
# embedding (+28 MB). (It was also slower, from three element-wise ops on the [tokens, vocab] output;
# since the per-token scales moved into MatMulIntegerToFloat it is faster: fused graph, q/k/v and
# gate/up packed, tools/bench_speed.py 3 rounds, prefill 2.71x vs 2.28x float, decode 3.08x vs 2.39x;
# 40 windows 29.359 vs 29.152.) Static per-tensor activations need
# a stronger migration (a = 0.8, best of 0.5/0.8/0.9 with min-max; percentile, MSE and k-sigma
# clipping of the activations were all worse on 10 windows).
RECIPES: dict[str, W8A8Recipe | WeightOnlyRecipe] = {
    "w8a8": W8A8Recipe(float_nodes=LM_HEAD_NODES, pack_matmuls=True),
    "w8a8-int8-head": W8A8Recipe(name="w8a8-int8-head", pack_matmuls=True),
    "w8a8-nosmooth": W8A8Recipe(name="w8a8-nosmooth", smoothquant=None, float_nodes=LM_HEAD_NODES, pack_matmuls=True),
    "w8a8-static": W8A8Recipe(name="w8a8-static", smoothquant=SmoothQuantConfig(alpha=0.8), activations=_STATIC,
                              float_nodes=LM_HEAD_NODES),
    "w8a8-trt": W8A8Recipe(name="w8a8-trt", smoothquant=SmoothQuantConfig(alpha=0.8),
                           activations=QdqConfig(activation_scheme="static", target="tensorrt"), float_nodes=LM_HEAD_NODES),
    # Cube-root companding of weights and activations (seed 004), otherwise as w8a8; float MatMuls.
    "w8a8-cuberoot": W8A8Recipe(name="w8a8-cuberoot", grid="cuberoot", float_nodes=LM_HEAD_NODES),
    # Static activations with one scale per group of hidden / 8 channels, the channels gathered by
    # calibrated range (PEG, seed 001); no SmoothQuant. SmolLM2-135M, 40 windows (tools/bench_outliers.py):
    # 1.23x float against 2.42x per tensor; K = 4 / 16 were not compared on the real model. On this model
    # the permutation does not help (10 windows: 41.68 with, 41.25 without) and its Gather costs prefill
    # time (--no-peg-permute); keeping the widest group float (peg.float_outlier_group) gives 1.04x.
    "w8a8-peg": W8A8Recipe(name="w8a8-peg", smoothquant=None, activations=_STATIC, float_nodes=LM_HEAD_NODES,
                           peg=PegConfig(groups=8)),
    # Weight-only (activations float): group 128 symmetric unless named otherwise.
    "w4-rtn": WeightOnlyRecipe(name="w4-rtn", method="rtn"),
    "w4-gptq": WeightOnlyRecipe(name="w4-gptq", method="gptq"),
    "w4-awq": WeightOnlyRecipe(name="w4-awq", method="awq"),
    # AWQ's scale search folded in, then GPTQ with clip search: the most accurate W4 g128 measured on
    # SmolLM2-135M (40 windows: 33.830 = 1.177x float vs w4-gptq 34.549, w4-awq 35.885; 8 min, 2.4 GB).
    "w4-awq-gptq": WeightOnlyRecipe(name="w4-awq-gptq", method="gptq", gptq=GptqConfig(awq_scales=True)),
    # w4-gptq, then its group scales trained end to end against the float model (graphq.scale_tuning:
    # 200 windows of wiki.valid, knowledge distillation; codes unchanged, same file size).
    # SmolLM2-135M, 40 windows: 31.463 = 1.095x float against w4-gptq's 34.43 (12.5 min on 2 cores;
    # w4-awq-gptq tuned the same way 1.103x, so AWQ's scales add nothing here).
    "w4-gptq-tuned": WeightOnlyRecipe(name="w4-gptq-tuned", method="gptq", tuning=ScaleTuningConfig(steps=200)),
    "w4-rtn-g32-asym": WeightOnlyRecipe(name="w4-rtn-g32-asym", weights=WeightQuantConfig(bits=4, group_size=32, symmetric=False, scale_dtype="float16")),
    "w4-gptq-g32-asym": WeightOnlyRecipe(name="w4-gptq-g32-asym", method="gptq",
                                         weights=WeightQuantConfig(bits=4, group_size=32, symmetric=False, scale_dtype="float16")),
    # Float zero points (the affine s q + m of llama.cpp's Q4_1; MatMulNBits only): 6 bits per weight.
    "w4-rtn-g32-fzp": WeightOnlyRecipe(name="w4-rtn-g32-fzp", weights=WeightQuantConfig(bits=4, group_size=32, symmetric=False, scale_dtype="float16",
                                                                                       float_zero_points=True)),
    "w4-gptq-g32-fzp": WeightOnlyRecipe(name="w4-gptq-g32-fzp", method="gptq",
                                        weights=WeightQuantConfig(bits=4, group_size=32, symmetric=False, float_zero_points=True, scale_dtype="float16")),
    "w8-rtn": WeightOnlyRecipe(name="w8-rtn", weights=WeightQuantConfig(bits=8, group_size=128, symmetric=True, scale_dtype="float16")),
    # Cube-root companding (seed 004): non-uniform 4-bit levels, g128, same tied 8-bit head/embedding as w4-rtn.
    "w4-cuberoot": WeightOnlyRecipe(name="w4-cuberoot", grid="cuberoot", weights=_CUBEROOT_WEIGHTS,
                                    emit=WeightOnlyEmitConfig(format="codebook")),
    "w4-cuberoot-gptq": WeightOnlyRecipe(name="w4-cuberoot-gptq", method="gptq", grid="cuberoot", weights=_CUBEROOT_WEIGHTS,
                                         emit=WeightOnlyEmitConfig(format="codebook")),
    # int4 / int8 / float per MatMul from the sensitivity analysis, within 4.5 bits per weight.
    "mixed": MixedRecipe(),
}

# "kind" written into recipe files -> the dataclass that reads them.
RECIPE_KINDS = {"w8a8": W8A8Recipe, "weight-only": WeightOnlyRecipe, "mixed": MixedRecipe}


def _to_plain(value):
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (tuple, list, frozenset, set)):
        items = [_to_plain(v) for v in value]
        return sorted(items) if isinstance(value, (frozenset, set)) else items
    if isinstance(value, Path):
        return str(value)
    return value


def recipe_to_dict(recipe: W8A8Recipe | WeightOnlyRecipe | MixedRecipe) -> dict:
    kind = next(k for k, cls in RECIPE_KINDS.items() if isinstance(recipe, cls))
    return {"format_version": RECIPE_FORMAT_VERSION, "kind": kind, **_to_plain(recipe)}


def _from_plain(annotation, data, where: str):
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if data is None:
            return None
        return _from_plain(options[0], data, where)
    if dataclasses.is_dataclass(annotation):
        if not isinstance(data, dict):
            raise GraphqError(f"recipe: '{where}' must be a mapping")
        hints = typing.get_type_hints(annotation)
        names = {f.name for f in dataclasses.fields(annotation) if f.init}
        unknown = set(data) - names
        if unknown:
            raise GraphqError(f"recipe: unknown key(s) {sorted(unknown)} in '{where}'")
        defaults = {f.name: f.default for f in dataclasses.fields(annotation)}

        def field_data(name, value):  # a partial mapping keeps the rest of the field's default (e.g. its scale_dtype)
            default = defaults[name]
            if dataclasses.is_dataclass(default) and isinstance(value, dict):
                return {**_to_plain(default), **value}
            return value

        return annotation(**{k: _from_plain(hints[k], field_data(k, v), f"{where}.{k}") for k, v in data.items()})
    if origin in (tuple, frozenset):
        if not isinstance(data, list):
            raise GraphqError(f"recipe: '{where}' must be a list, got {_shown(data)}")
        (item_type, *_) = typing.get_args(annotation)
        return origin(_from_plain(item_type, item, f"{where}[{index}]") for index, item in enumerate(data))
    if annotation is Path:
        if not isinstance(data, str) or not data:
            raise GraphqError(f"recipe: '{where}' must be a path (a string), got {_shown(data)}")
        return Path(data)
    return _scalar(annotation, data, where)


_SCALAR_NAMES = {bool: "true or false", int: "an integer", float: "a number", str: "a string"}


def _shown(data) -> str:
    text = repr(data)
    return text if len(text) <= 60 else text[:57] + "..."


def _scalar(annotation, data, where: str):
    """``data`` if it has the scalar type ``annotation`` (an int is a valid float; a bool is no number)."""
    if annotation not in _SCALAR_NAMES:
        return data
    valid = {
        bool: isinstance(data, bool),
        int: isinstance(data, int) and not isinstance(data, bool),
        float: isinstance(data, (int, float)) and not isinstance(data, bool) and math.isfinite(data),
        str: isinstance(data, str),
    }[annotation]
    if not valid:
        raise GraphqError(f"recipe: '{where}' must be {_SCALAR_NAMES[annotation]}, got {_shown(data)}")
    return float(data) if annotation is float else data


def _check_patterns(recipe) -> None:
    """Node-name patterns must be valid regular expressions."""
    for pattern in getattr(recipe, "float_nodes", ()):
        try:
            re.compile(pattern)
        except re.error as error:
            raise GraphqError(f"recipe: float_nodes pattern {pattern!r} is not a valid regular expression ({error})") from error


def recipe_from_dict(data: dict) -> W8A8Recipe | WeightOnlyRecipe:
    data = dict(data)
    version = data.pop("format_version", RECIPE_FORMAT_VERSION)
    kind = data.pop("kind", "w8a8")
    if version != RECIPE_FORMAT_VERSION:
        raise GraphqError(f"recipe: format_version {version} is not supported (expected {RECIPE_FORMAT_VERSION})")
    if kind not in RECIPE_KINDS:
        raise GraphqError(f"recipe: kind '{kind}' is not supported (supported: {', '.join(RECIPE_KINDS)})")
    try:
        recipe = _from_plain(RECIPE_KINDS[kind], data, "recipe")
    except TypeError as error:
        raise GraphqError(f"recipe: {error}") from error
    _check_patterns(recipe)
    return recipe


def load_recipe(name_or_path: str) -> W8A8Recipe | WeightOnlyRecipe:
    """A built-in recipe by name, or a recipe file (.json, .yaml, .yml)."""
    if name_or_path in RECIPES:
        return RECIPES[name_or_path]
    path = Path(name_or_path)
    if not path.is_file():
        raise GraphqError(f"unknown recipe '{name_or_path}' (built-in: {', '.join(RECIPES)}; or a .json/.yaml file)")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise GraphqError(f"{path}: the recipe is not UTF-8 text ({error.reason} at byte {error.start})") from error
    except OSError as error:
        raise GraphqError(f"{path}: cannot read the recipe ({error.strerror or error})") from error
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as error:  # json and yaml raise their own error types
        raise GraphqError(f"{path}: cannot parse the recipe ({str(error).splitlines()[0]})") from error
    if not isinstance(data, dict):
        raise GraphqError(f"{path}: a recipe file must hold a mapping")
    return recipe_from_dict(data)


def dump_recipe(recipe: W8A8Recipe | WeightOnlyRecipe, path: Path) -> str:
    """Text of the recipe as JSON or YAML (by the suffix of ``path``)."""
    data = recipe_to_dict(recipe)
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        return yaml.safe_dump(data, sort_keys=False)
    return json.dumps(data, indent=2) + "\n"
