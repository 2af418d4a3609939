"""Sensitivity analysis: how much each quantizable MatMul hurts the model when quantized alone.

For every MatMul with a constant weight (the linear layers and a tied LM head) and every candidate
precision ``c`` (:data:`~graphq.numerics.sensitivity.PRECISIONS`), the damage is the mean KL divergence
of the next-token distributions of the model with only that node's weight replaced by its
fake-quantized value ``W_hat_c`` against the float model,

    D_n(c) = mean_{windows, t} KL( p_float(. | x_<=t) || p_{n,c}(. | x_<=t) ),

on calibration windows of ``wiki.valid.tokens`` (never the test text), with the change of the mean
next-token NLL beside it (``exp`` of it is the perplexity ratio on those windows). Each measurement
replays only the stages from the node's block to the logits (:mod:`graphq.replay`); a tied head also
changes the embedding lookup (they share codes when deployed), so its replay starts at the prelude.

**Measured and estimated.** Every node is replayed at ``int4``. Small perturbations give a KL
quadratic in the error, and an error's effect is proportional to its energy at the node's output,
``e_n(c) = ||X (W_hat_c - W)||^2 / ||X W||^2`` (``X`` the node's input on the first
:data:`LOCAL_SAMPLE_TOKENS` calibration tokens). So other precisions are replayed for the
``measured_others`` nodes with the largest ``int4`` damage and estimated elsewhere as
``D_n(c) = D_n(int4) e_n(c) / e_n(int4)`` (flagged ``measured: false``); the measured ones show how
good the estimate is. ``measured_others = -1`` replays every node at every precision.

**Perturbation lens** (seed 004; Gong et al., 2024): for ``lens_nodes`` nodes spread over the
``int4`` ranking, noise with the second moment of that node's ``int4`` error (Gaussian and uniform,
per tensor or per group: :func:`~graphq.numerics.sensitivity.matched_noise`) replaces the real
error, and its damage is reported next to the quantizer's.

**Head row tiers** (``head_hot_fraction`` ``f > 0``): a tied head's ``ceil(f V)`` most used rows
(:mod:`graphq.numerics.head_rows`: the float model's mean next-token probability over the calibration
positions plus the input frequency) are fake-quantized at :data:`HOT_ROW_PRECISION` at every lower
precision, the others at the precision itself; its damage and bits are those of the split, and the
rows are stored in the node's ``hot_rows`` for the planner and ``mixed`` to apply.

**Activation statistics** (float model, all calibration windows): for every MatMul input ``X``, range,
std, Pearson kurtosis, per-channel ``max |x|`` and its outlier channels (``> outlier_ratio`` x the
median channel); and the same for the residual stream entering each block and the final norm.

**Cache.** The result is keyed by the SHA-256 of the model file (and its external data) and the
analysis config. ``analyze_model`` returns a stored result for the same key at once; a stored file
computed for another model is refused (a different config is recomputed and replaced).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
import re
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import onnx

from graphq.errors import GraphqError
from graphq.numerics.head_rows import hot_rows, is_tiered, row_usage, tiered_bits
from graphq.numerics.sensitivity import (
    DEFAULT_OUTLIER_RATIO,
    NOISE_SCOPES,
    PRECISIONS,
    PowerSums,
    bits_per_weight,
    fake_quantize,
    matched_noise,
    outlier_channels,
    precision_config,
    tensor_kurtosis,
)

logger = logging.getLogger(__name__)

ANALYSIS_FORMAT_VERSION = 3  # 2: precisions store float16 scales; 3: the int4 ones q8-pow2 scales (bits changed)
ANALYSIS_KIND = "graphq-analysis"
LOCAL_SAMPLE_TOKENS = 512
REFERENCE_PRECISION = "int4"
HOT_ROW_PRECISION = "int8"  # the precision of a tied head's hot rows (AnalysisConfig.head_hot_fraction)


@dataclasses.dataclass(frozen=True)
class AnalysisConfig:
    windows: int = 4
    window_tokens: int = 128
    batch: int = 4  # windows per ONNX Runtime call
    threads: int = 2
    precisions: tuple[str, ...] = ("int4", "int4-g32-asym", "int4-g32-fzp", "int8")
    measured_others: int = 16  # replays at the non-int4 precisions (most damaged nodes first); -1: all
    outlier_ratio: float = DEFAULT_OUTLIER_RATIO
    lens_nodes: int = 8
    lens_scope: str = "tensor"
    lens_select: tuple[str, ...] = ()  # regular expressions: lens these nodes instead of a spread
    seed: int = 0
    text_path: Path | None = None  # None: the shipped wiki.valid.tokens
    # A tied head: this fraction of its rows, those the calibration text uses most, stays at
    # HOT_ROW_PRECISION whatever the head's precision (graphq.numerics.head_rows); 0: none. Off by
    # default: on SmolLM2-135M (mixed, GPTQ, 4.5 bits, 40 windows) 0.05 gave 1.0871x against 1.0848x
    # without, although it cuts the head's RTN int4 KL from 0.170 to 0.029 (GPTQ already does most of that).
    head_hot_fraction: float = 0.0

    def __post_init__(self) -> None:
        for name in ("windows", "window_tokens", "batch", "threads"):
            if getattr(self, name) < 1:
                raise GraphqError(f"analysis {name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.window_tokens < 2:
            raise GraphqError("analysis window-tokens must be at least 2")
        unknown = [p for p in self.precisions if p not in PRECISIONS or PRECISIONS[p] is None]
        if unknown or not self.precisions:
            raise GraphqError(f"analysis precisions must be among {[p for p in PRECISIONS if PRECISIONS[p]]}, got {list(self.precisions)}")
        if REFERENCE_PRECISION not in self.precisions:
            raise GraphqError(f"analysis precisions must include {REFERENCE_PRECISION} (every node is replayed at it)")
        if self.measured_others < -1 or self.lens_nodes < 0:
            raise GraphqError("analysis measured-others must be >= -1 and lens-nodes >= 0")
        if not 0 <= self.head_hot_fraction < 1:
            raise GraphqError(f"analysis head-hot-fraction must lie in [0, 1), got {self.head_hot_fraction}")
        if self.outlier_ratio <= 1:
            raise GraphqError(f"outlier ratio must exceed 1, got {self.outlier_ratio}")
        if self.lens_scope not in NOISE_SCOPES:
            raise GraphqError(f"lens scope must be one of {NOISE_SCOPES}, got '{self.lens_scope}'")
        object.__setattr__(self, "precisions", tuple(self.precisions))
        object.__setattr__(self, "lens_select", tuple(self.lens_select))
        if self.text_path is not None:
            object.__setattr__(self, "text_path", Path(self.text_path))

    def to_json(self) -> dict:
        return {f.name: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
                for f in dataclasses.fields(self) for v in [getattr(self, f.name)]}

    @classmethod
    def from_json(cls, data: Mapping) -> AnalysisConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise GraphqError(f"analysis config: unknown key(s) {sorted(unknown)}")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.items()})


@dataclasses.dataclass(frozen=True)
class Damage:
    kl: float  # mean KL(p_float || p_quantized) per next-token prediction
    nll_delta: float  # change of the mean next-token NLL (log of the perplexity ratio)
    local_error: float  # ||X (W_hat - W)||^2 / ||X W||^2 on the sample
    measured: bool  # False: estimated from int4 by the local error ratio (module docstring)
    bits: float  # nominal bits per weight of this precision for this node


@dataclasses.dataclass(frozen=True)
class NodeAnalysis:
    name: str
    role: str  # q_proj, down_proj, lm_head, ...
    block: int | None
    k: int
    n: int
    tied: bool  # a head whose weight is the transposed embedding (one set of codes for both)
    activation: str
    weight: dict  # abs_max, std, kurtosis of W
    scales: dict  # precision -> {min, median, max} of |scale|
    damage: dict  # precision -> Damage
    lens: dict | None = None  # precision, error_rms, error_kurtosis, real, gaussian, uniform
    hot_rows: tuple[int, ...] = ()  # a tied head: the rows kept at HOT_ROW_PRECISION (graphq.numerics.head_rows)

    @property
    def weights(self) -> int:
        return self.k * self.n


@dataclasses.dataclass(frozen=True)
class TensorStats:
    tensor: str
    block: int | None
    nodes: tuple[str, ...]  # MatMuls reading it (empty for the residual stream)
    min: float
    max: float
    abs_max: float
    std: float
    kurtosis: float
    outlier_channels: tuple[int, ...]
    channel_abs_max: tuple[float, ...]

    @property
    def range_ratio(self) -> float:
        """``max |x| / std``: how many standard deviations the largest value lies out."""
        return self.abs_max / self.std if self.std > 0 else math.inf


@dataclasses.dataclass(frozen=True)
class Analysis:
    model_path: str
    model_sha256: str
    config: AnalysisConfig
    float_nll: float
    tokens: int
    nodes: tuple[NodeAnalysis, ...]
    activations: tuple[TensorStats, ...]
    residual: tuple[TensorStats, ...]  # entering block 0 .. L-1, then the final norm's input
    timing: dict
    format_version: int = ANALYSIS_FORMAT_VERSION

    def node(self, name: str) -> NodeAnalysis:
        for node in self.nodes:
            if node.name == name:
                return node
        raise GraphqError(f"the analysis has no node '{name}'")

    def to_json(self) -> dict:
        data = dataclasses.asdict(self)
        data["config"] = self.config.to_json()
        return {"kind": ANALYSIS_KIND, **data}

    @classmethod
    def from_json(cls, data: Mapping) -> Analysis:
        data = dict(data)
        if data.pop("kind", None) != ANALYSIS_KIND:
            raise GraphqError("not a graphq analysis file")
        if data.get("format_version") != ANALYSIS_FORMAT_VERSION:
            raise GraphqError(f"analysis format_version {data.get('format_version')} is not supported "
                              f"(expected {ANALYSIS_FORMAT_VERSION}); run graphq analyze again")
        nodes = tuple(NodeAnalysis(**{**n, "damage": {p: Damage(**d) for p, d in n["damage"].items()},
                                      "hot_rows": tuple(n.get("hot_rows", ()))}) for n in data["nodes"])

        def stats(items):
            return tuple(TensorStats(**{**t, "nodes": tuple(t["nodes"]), "outlier_channels": tuple(t["outlier_channels"]),
                                        "channel_abs_max": tuple(t["channel_abs_max"])}) for t in items)

        return cls(**{**data, "config": AnalysisConfig.from_json(data["config"]), "nodes": nodes,
                      "activations": stats(data["activations"]), "residual": stats(data["residual"])})


def load_analysis(path: str | os.PathLike) -> Analysis:
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as error:
        raise GraphqError(f"{path}: no such analysis file") from error
    except (OSError, ValueError) as error:
        raise GraphqError(f"{path}: cannot read the analysis ({str(error).splitlines()[0]})") from error
    if not isinstance(data, dict):
        raise GraphqError(f"{path}: not a graphq analysis file")
    try:
        return Analysis.from_json(data)
    except (KeyError, TypeError) as error:
        raise GraphqError(f"{path}: malformed analysis file ({error})") from error


def model_digest(path: str | os.PathLike) -> str:
    """SHA-256 of an .onnx file followed by each external-data file it references (sorted by name)."""
    path = Path(path)
    proto = onnx.load(str(path), load_external_data=False)
    locations = sorted({e.value for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
                        for e in t.external_data if e.key == "location"})
    del proto
    digest = hashlib.sha256()
    for file in [path, *(path.parent / loc for loc in locations)]:
        with open(file, "rb") as handle:
            while chunk := handle.read(1 << 20):
                digest.update(chunk)
    return digest.hexdigest()


def _config_key(config: AnalysisConfig) -> str:
    return hashlib.sha256(json.dumps(config.to_json(), sort_keys=True).encode()).hexdigest()[:16]


def cache_path(digest: str, config: AnalysisConfig) -> Path:
    from graphq.models.cache import cache_dir

    return cache_dir() / "analysis" / f"{digest[:16]}-{_config_key(config)}.json"


def cached_analysis(path: Path, digest: str, config: AnalysisConfig, *, model: Path) -> Analysis | None:
    """The analysis stored at ``path`` if it is this model's with this config; None if absent or
    computed with another config; an error if it belongs to another model."""
    if not path.is_file():
        return None
    stored = load_analysis(path)
    if stored.model_sha256 != digest:
        raise GraphqError(f"{path} holds the analysis of another model ({stored.model_path}, sha256 "
                          f"{stored.model_sha256[:12]}...), not of {model} (sha256 {digest[:12]}...); "
                          "choose another output path or pass --overwrite")
    if stored.config != config:
        logger.info("analysis: %s was computed with another config; recomputing", path)
        return None
    return stored


def _square_sum(array: np.ndarray) -> float:
    flat = array.reshape(-1)
    return float(np.dot(flat.astype(np.float64), flat.astype(np.float64)))


def _role(name: str) -> str:
    parts = [p for p in name.split("/") if p]
    return parts[-2] if len(parts) >= 2 else name


def _summary(values: np.ndarray) -> dict:
    return {"min": float(values.min()), "median": float(np.median(values)), "max": float(values.max())}


def _tensor_stats(name: str, block: int | None, nodes: Iterable[str], stats: PowerSums, ratio: float) -> TensorStats:
    channels = stats.channel_abs_max
    return TensorStats(name, block, tuple(nodes), float(stats.min), float(stats.max), float(stats.abs_max),
                       float(stats.std), float(stats.kurtosis),
                       tuple(int(c) for c in outlier_channels(channels, ratio)), tuple(float(c) for c in channels))


def _spread(ranked: list[str], count: int) -> list[str]:
    """``count`` names spread evenly over ``ranked`` (first and last included)."""
    if count >= len(ranked):
        return list(ranked)
    if count == 1:
        return ranked[:1]
    return [ranked[round(i * (len(ranked) - 1) / (count - 1))] for i in range(count)]


def analyze_model(model: str | os.PathLike, config: AnalysisConfig = AnalysisConfig(), *,
                  output: str | os.PathLike | None = None, tokenizer_dir: Path | None = None,
                  overwrite: bool = False, progress: bool = True) -> Analysis:
    """The sensitivity analysis of ``model`` (module docstring), from the cache when it has it.

    Writes the result to ``output`` (if given) and to the cache folder."""
    from graphq.modelio import read_model_proto, resolve_model_file, write_text_atomic

    source = resolve_model_file(model)
    read_model_proto(source)  # clear errors for missing, truncated or unsafe files
    digest = model_digest(source)
    stored_at = cache_path(digest, config)
    destination = Path(output) if output is not None else None
    found = None
    if destination is not None and not overwrite:
        found = cached_analysis(destination, digest, config, model=source)
    if found is None:
        try:
            found = cached_analysis(stored_at, digest, config, model=source)
        except GraphqError:
            found = None
    if found is not None:
        logger.info("analysis: cached result for %s (sha256 %s...)", source, digest[:12])
        if destination is not None and not (destination.is_file() and load_analysis(destination) == found):
            write_text_atomic(destination, json.dumps(found.to_json()) + "\n")
        return found
    analysis = _run_analysis(source, digest, config, tokenizer_dir=tokenizer_dir, progress=progress)
    text = json.dumps(analysis.to_json()) + "\n"
    write_text_atomic(stored_at, text)
    if destination is not None:
        write_text_atomic(destination, text)
    return analysis


def _run_analysis(source: Path, digest: str, config: AnalysisConfig, *, tokenizer_dir: Path | None,
                  progress: bool) -> Analysis:
    from tqdm.auto import tqdm

    from graphq.calibrate import CalibrationConfig, calibration_windows
    from graphq.evaluate import load_tokenizer
    from graphq.modelio import load_model
    from graphq.replay import StageReplay

    start_wall, start_cpu = time.perf_counter(), time.process_time()
    tokenizer = load_tokenizer(source, tokenizer_dir)
    windows = calibration_windows(tokenizer, CalibrationConfig(windows=config.windows, window_tokens=config.window_tokens,
                                                               threads=config.threads, text_path=config.text_path))
    graph = load_model(source)
    replay = StageReplay(graph, windows, batch=config.batch, threads=config.threads)
    residual_candidates = _residual_candidates(graph, replay)
    del graph
    nodes = replay.nodes
    readers: dict[str, list] = {}
    for node in nodes:
        readers.setdefault(node.activation, []).append(node)
    act_stats = {name: PowerSums() for name in readers}
    samples: dict[str, list[np.ndarray]] = {name: [] for name in readers}
    residual_stats: dict[int, tuple[str, PowerSums]] = {}

    def on_tensor(name: str, array: np.ndarray) -> None:
        act_stats[name].update(array)
        flat = array.reshape(-1, array.shape[-1])
        have = sum(len(s) for s in samples[name])
        if have < LOCAL_SAMPLE_TOKENS:
            samples[name].append(np.array(flat[: LOCAL_SAMPLE_TOKENS - have], dtype=np.float32))

    head = [node for node in nodes if node.stage == replay.logits_stage]
    hidden = head[0].k if head else max(set(n.k for n in nodes), key=[n.k for n in nodes].count)

    def on_stage_inputs(index: int, env: Mapping[str, np.ndarray]) -> None:
        names = [n for n in residual_candidates.get(index, ())
                 if env[n].ndim == 3 and env[n].dtype == np.float32 and env[n].shape[-1] == hidden]
        if len(names) == 1:
            entry = residual_stats.setdefault(index, (names[0], PowerSums()))
            entry[1].update(env[names[0]])

    bar = tqdm(total=len(replay.batches), desc="analysis: float pass", unit="batch", disable=not progress or None)
    replay.float_pass(readers, on_tensor, on_stage_inputs, progress=bar.update)
    bar.close()
    replay.release_model()
    float_seconds = time.perf_counter() - start_wall
    float_nll = float(replay.float_nll.mean())
    sample = {name: np.concatenate(parts) for name, parts in samples.items()}
    samples.clear()

    others = [p for p in config.precisions if p != REFERENCE_PRECISION]
    total_others = len(others) * (len(nodes) if config.measured_others < 0 else min(config.measured_others, len(nodes)))
    lens_count = len(nodes) if config.lens_select else min(config.lens_nodes, len(nodes))
    bar = tqdm(total=len(nodes) + total_others + 2 * lens_count, desc="analysis: replays", unit="replay",
               disable=not progress or None)
    results: dict[str, dict] = {}
    replays = 0

    hot: dict[str, np.ndarray] = {}
    if config.head_hot_fraction > 0:
        probabilities = replay.probability_sums()
        for node in nodes:
            if node.transposed and node.n == probabilities.size:
                usage = row_usage(probabilities, np.bincount(windows.reshape(-1), minlength=node.n)[: node.n])
                hot[node.name] = hot_rows(usage, config.head_hot_fraction)

    def quantized(node, precision):
        """``(config, W_hat, |scales|, bits per weight)``; a tied head's hot rows at HOT_ROW_PRECISION."""
        cfg = precision_config(precision, tied_dim=node.k if node.transposed else None)
        w = replay.weights[node.weight]
        w = w.T if node.transposed else w
        rows = hot.get(node.name, np.empty(0, dtype=np.int64))
        hot_cfg = precision_config(HOT_ROW_PRECISION, tied_dim=node.k)
        bits = tiered_bits(cfg, hot_cfg, node.k, node.n, rows.size)
        if not is_tiered(cfg, hot_cfg, rows.size):
            return (cfg, *fake_quantize(w, cfg), bits)
        cold = np.setdiff1d(np.arange(node.n), rows)
        w_hat = np.empty_like(w)
        w_hat[:, rows] = fake_quantize(w[:, rows], hot_cfg)[0]
        w_hat[:, cold], scales = fake_quantize(w[:, cold], cfg)
        return cfg, w_hat, scales, bits

    def measure(node, w_hat) -> tuple[float, float]:
        nonlocal replays
        result = replay.replay({node.weight: w_hat.T if node.transposed else w_hat})
        replays += 1
        bar.update()
        return float(result.kl.mean()), float(result.nll.mean() - replay.float_nll.mean())

    def output_energy(x: np.ndarray, w: np.ndarray) -> float:
        """``||x w||^2`` in float64, a block of columns at a time (bounded memory for the LM head)."""
        return sum(_square_sum(x @ w[:, i:i + 4096]) for i in range(0, w.shape[1], 4096))

    def local_error(node, w_hat, reference: float) -> float:
        w = replay.weights[node.weight]
        w = w.T if node.transposed else w
        error = output_energy(sample[node.activation], w_hat - w)
        return error / reference if reference > 0 else 0.0

    for node in nodes:  # every node at int4, local errors at every precision
        w = replay.weights[node.weight]
        w = w.T if node.transposed else w
        entry = {"weight": {"abs_max": float(np.abs(w).max()), "std": float(w.std()), "kurtosis": float(tensor_kurtosis(w))},
                 "scales": {}, "damage": {}, "local": {}}
        reference = output_energy(sample[node.activation], w)
        for precision in config.precisions:
            cfg, w_hat, scales, bits = quantized(node, precision)
            entry["scales"][precision] = _summary(scales)
            entry["local"][precision] = local_error(node, w_hat, reference)
            entry.setdefault("bits", {})[precision] = bits
            if precision == REFERENCE_PRECISION:
                entry["damage"][precision] = measure(node, w_hat)
        results[node.name] = entry
    ranked = sorted((n.name for n in nodes), key=lambda name: -results[name]["damage"][REFERENCE_PRECISION][0])
    replayed = set(ranked if config.measured_others < 0 else ranked[: config.measured_others])
    by_name = {node.name: node for node in nodes}
    for name in ranked:
        node, entry = by_name[name], results[name]
        for precision in others:
            if name in replayed:
                _, w_hat, _, _ = quantized(node, precision)
                entry["damage"][precision] = measure(node, w_hat)
            else:
                ref_kl, ref_nll = entry["damage"][REFERENCE_PRECISION]
                ratio = entry["local"][precision] / entry["local"][REFERENCE_PRECISION] if entry["local"][REFERENCE_PRECISION] > 0 else 0.0
                entry["damage"][precision] = (ref_kl * ratio, ref_nll * ratio)

    if config.lens_select:
        patterns = [re.compile(p) for p in config.lens_select]
        lensed = [name for name in ranked if any(p.search(name) for p in patterns)]
        if not lensed:
            raise GraphqError(f"--lens-nodes {list(config.lens_select)} matches no quantizable node")
    else:
        lensed = _spread(ranked, lens_count)
    rng = np.random.default_rng(config.seed)
    for name in lensed:
        node, entry = by_name[name], results[name]
        cfg, w_hat, _, _ = quantized(node, REFERENCE_PRECISION)
        w = replay.weights[node.weight]
        w = w.T if node.transposed else w
        error = w_hat - w
        lens = {"precision": REFERENCE_PRECISION, "scope": config.lens_scope,
                "error_rms": float(np.sqrt(np.mean(error.astype(np.float64) ** 2))),
                "error_kurtosis": float(tensor_kurtosis(error)), "real": entry["damage"][REFERENCE_PRECISION][0]}
        for kind in ("gaussian", "uniform"):
            noise = matched_noise(error, kind, rng, scope=config.lens_scope, group_size=cfg.group_size)
            lens[kind] = measure(node, w + noise)[0]
        entry["lens"] = lens
    bar.close()

    node_results = []
    for node in nodes:
        entry = results[node.name]
        damage = {p: Damage(kl=entry["damage"][p][0], nll_delta=entry["damage"][p][1], local_error=entry["local"][p],
                            measured=p == REFERENCE_PRECISION or node.name in replayed, bits=entry["bits"][p])
                  for p in config.precisions}
        node_results.append(NodeAnalysis(node.name, _role(node.name), node.block, node.k, node.n, node.transposed,
                                         node.activation, entry["weight"], entry["scales"], damage, entry.get("lens"),
                                         tuple(int(r) for r in hot.get(node.name, ()))))
    activations = tuple(_tensor_stats(name, readers[name][0].block, [n.name for n in readers[name]], stats, config.outlier_ratio)
                        for name, stats in act_stats.items() if stats.count)
    residual = tuple(_tensor_stats(name, _residual_block(replay, index), (), stats, config.outlier_ratio)
                     for index, (name, stats) in sorted(residual_stats.items()))
    seconds = time.perf_counter() - start_wall
    timing = {"seconds": round(seconds, 2), "cpu_seconds": round(time.process_time() - start_cpu, 2),
              "float_pass_seconds": round(float_seconds, 2), "replays": replays,
              "seconds_per_replay": round((seconds - float_seconds) / max(replays, 1), 3)}
    logger.info("analysis of %s: %d nodes, %d replays in %.0fs (%.0f CPU s)", source, len(nodes), replays, seconds,
                timing["cpu_seconds"])
    return Analysis(str(source), digest, config, float_nll, int(replay.float_nll.size), tuple(node_results),
                    activations, residual, timing)


def _residual_candidates(graph, replay) -> dict[int, list[str]]:
    """Per block stage (and the logits stage): its inputs produced by the stage right before it."""
    producer_stage = {}
    for index, stage in enumerate(replay.stages):
        for node in stage.nodes:
            for value in node.outputs:
                producer_stage[value.name] = index
    candidates = {}
    for index, stage in enumerate(replay.stages):
        if stage.key[1] == 0 or index == replay.logits_stage:
            candidates[index] = [name for name in stage.inputs if producer_stage.get(name) == index - 1
                                 and name not in replay.stages[index - 1].window_independent]
    return candidates


def _residual_block(replay, index: int) -> int | None:
    """The block a residual-stream tensor enters (None for the final norm)."""
    block, after = replay.stages[index].key
    return block if after == 0 else None
