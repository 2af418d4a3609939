"""End-to-end tuning of weight-only group scales against the float model (knowledge distillation).

After RTN/GPTQ/AWQ have fixed every weight's codes, the group scales are trained so that the whole
quantized model's next-token distribution matches the float model's on calibration windows
(:mod:`graphq.numerics.scale_tuning` has the math). Layer-wise methods minimise each MatMul's own
output error; this step sees the errors of all layers together, through attention and the norms.

- Teacher: the float source graph in ONNX Runtime (logits only, no gradient).
- Student: the graph being quantized, evaluated with PyTorch (:class:`graphq.torch_graph.TorchGraph`),
  each tuned MatMul's weight replaced by ``c * s0 * (1 + theta)``; a tied head that shares its codes
  with the embedding is applied as its dequantized table (fixed).
- Adam on ``theta`` over ``steps`` windows of ``wiki.valid`` (cycled in a seeded order).
- Guard: the distillation loss is measured on ``held_out`` further calibration windows before and after;
  the tuned scales are kept only if it went down, else the original ones are returned (and logged).

Scales are rounded to their storage (float16 or q8-pow2) at the end. Codes and zero points are unchanged.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import onnx_ir as ir
import torch

from graphq.errors import GraphqError
from graphq.numerics.scale_tuning import distillation_loss, tuned_weight
from graphq.numerics.weight_only import QuantizedWeight, _nonzero_scale, _stored
from graphq.runtime import build_feeds, signature_of_model
from graphq.torch_graph import TorchGraph, torch_dtype
from graphq.verify import cpu_session

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ScaleTuningConfig:
    steps: int = 0  # 0: no tuning
    learning_rate: float = 1e-3  # Adam, on the relative correction theta
    window_tokens: int = 512
    held_out: int = 4  # windows after the training ones, for the keep-or-revert guard
    seed: int = 0
    threads: int | None = None  # PyTorch and ONNX Runtime threads; None: their defaults

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise GraphqError(f"scale tuning steps must be >= 0, got {self.steps}")
        if not 0 < self.learning_rate < 1:
            raise GraphqError(f"scale tuning learning_rate must lie in (0, 1), got {self.learning_rate}")
        if self.window_tokens < 2 or self.held_out < 1:
            raise GraphqError("scale tuning needs window_tokens >= 2 and held_out >= 1")

    @property
    def windows(self) -> int:
        """Calibration windows read: training ones (at most 256, cycled) plus the held-out ones."""
        return min(self.steps, 256) + self.held_out


@dataclasses.dataclass(frozen=True)
class TuningReport:
    tuned_weights: int
    loss_before: float  # distillation loss on the held-out windows
    loss_after: float
    kept: bool
    seconds: float


class _Tunable:
    """One weight's fixed codes and base scales, and its trainable ``theta``."""

    def __init__(self, quantized: QuantizedWeight, dtype: torch.dtype) -> None:
        self.quantized = quantized
        rows = quantized.group_of_rows()
        self.rows = torch.from_numpy(rows.astype(np.int64))
        centred = quantized.q.astype(np.int16) - quantized.zero_points[rows].astype(np.int16)  # |c| <= 255
        self.codes = torch.from_numpy(centred.astype(np.int16 if quantized.config.bits == 8 else np.int8))
        self.scales = torch.from_numpy(quantized.scales.astype(np.float32))
        self.theta = torch.zeros_like(self.scales, requires_grad=True)
        self.dtype = dtype

    def weight(self) -> torch.Tensor:
        return tuned_weight(self.codes, self.scales, self.theta, self.rows).to(self.dtype)

    def result(self) -> QuantizedWeight:
        config = self.quantized.config
        scales = (self.scales * (1.0 + self.theta.detach())).numpy().astype(np.float64)
        stored = _nonzero_scale(_stored(scales, config), config)
        return QuantizedWeight(self.quantized.q, stored, self.quantized.zero_points, config)


def check_tunable(quantized: QuantizedWeight) -> None:
    if quantized.config.float_zero_points:
        raise GraphqError("scale tuning keeps integer zero points fixed; float zero points are not tuned")


def tune_scales(source: Path, student_graph: ir.Model, quantized: dict[str, QuantizedWeight],
                fixed_tables: dict[str, np.ndarray], windows: np.ndarray, config: ScaleTuningConfig
                ) -> tuple[dict[str, QuantizedWeight], TuningReport]:
    """Tuned copies of ``quantized`` (node name -> weight of that MatMul in ``student_graph``).

    ``source``: the float model file (the teacher). ``fixed_tables``: initializer name -> array that
    replaces it in the student (the dequantized embedding a tied head shares). ``windows``: token
    windows ``[n, T]``, the last ``config.held_out`` held out."""
    start = time.perf_counter()
    if len(windows) <= config.held_out:
        raise GraphqError(f"scale tuning needs more than {config.held_out} calibration windows, got {len(windows)}")
    for weight in quantized.values():
        check_tunable(weight)
    threads = torch.get_num_threads()
    if config.threads:
        torch.set_num_threads(config.threads)
    try:
        teacher = cpu_session(source, threads=config.threads or 0)
        signature = signature_of_model(student_graph)
        output = signature.main_output
        evaluate = TorchGraph(student_graph)
        nodes = {node.name: node for node in student_graph.graph if node.name in quantized}
        missing = sorted(set(quantized) - set(nodes))
        if missing:
            raise GraphqError(f"scale tuning: nodes not in the graph: {', '.join(missing[:5])}")
        tunables = {}
        for name, node in nodes.items():
            dtype = torch_dtype(node.inputs[1].const_value.dtype) if node.inputs[1].const_value is not None else torch.float32
            tunables[node.inputs[1].name] = _Tunable(quantized[name], dtype)
        fixed = {name: torch.from_numpy(np.ascontiguousarray(table)) for name, table in fixed_tables.items()}

        def loss_on(window: np.ndarray) -> torch.Tensor:
            feeds = build_feeds(signature, window[None, :])
            with torch.no_grad():
                target = torch.from_numpy(teacher.run([output], feeds)[0])
            overrides = {**fixed, **{name: t.weight() for name, t in tunables.items()}}
            return distillation_loss(evaluate(feeds, [output], overrides)[output], target)

        def held_out_loss() -> float:
            with torch.no_grad():
                return float(np.mean([loss_on(w).item() for w in windows[-config.held_out:]]))

        before = held_out_loss()
        train = windows[:-config.held_out]
        order = np.random.default_rng(config.seed).permutation(len(train))
        optimiser = torch.optim.Adam([t.theta for t in tunables.values()], lr=config.learning_rate)
        for step in range(config.steps):
            if step and step % len(train) == 0:
                order = np.random.default_rng(config.seed + step).permutation(len(train))
            loss = loss_on(train[order[step % len(train)]])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            if step % 25 == 0 or step + 1 == config.steps:
                logger.info("scale tuning: step %d/%d, loss %.4g (%.0fs)", step + 1, config.steps, loss.item(),
                            time.perf_counter() - start)
        after = held_out_loss()
    finally:
        torch.set_num_threads(threads)
    kept = after < before
    by_value = {node.inputs[1].name: name for name, node in nodes.items()}
    result = {by_value[value]: tunable.result() for value, tunable in tunables.items()} if kept else dict(quantized)
    report = TuningReport(tuned_weights=len(tunables), loss_before=before, loss_after=after, kept=kept,
                          seconds=time.perf_counter() - start)
    if kept:
        logger.info("scale tuning: held-out distillation loss %.4g -> %.4g over %d weights in %.0fs",
                    before, after, len(tunables), report.seconds)
    else:
        logger.warning("scale tuning: held-out distillation loss did not improve (%.4g -> %.4g); kept the untuned scales",
                       before, after)
    return {name: result[name] for name in quantized}, report
