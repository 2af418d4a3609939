"""Run graph passes in order and record what each one changed.

A pass is an ``onnx_ir`` pass: an object with ``call(model) -> PassResult(model, modified)`` (see
``onnx_ir.passes``); calling it also checks its ``requires``/``ensures`` contracts. The pipeline adds
bookkeeping around each pass: node count, initializer count and initializer bytes before and
after, and the time taken, so that a run can say exactly what every pass did.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Sequence

import onnx_ir as ir

from graphq.modelio import initializer_bytes

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class GraphStats:
    nodes: int
    initializers: int
    initializer_bytes: int

    @classmethod
    def of(cls, model: ir.Model) -> GraphStats:
        return cls(
            nodes=sum(1 for _ in model.graph.all_nodes()),
            initializers=len(model.graph.initializers),
            initializer_bytes=initializer_bytes(model),
        )


@dataclasses.dataclass(frozen=True)
class PassRecord:
    name: str
    modified: bool
    before: GraphStats
    after: GraphStats
    seconds: float

    def summary(self) -> str:
        if not self.modified:
            return f"{self.name}: no change ({self.seconds:.2f}s)"
        saved = self.before.initializer_bytes - self.after.initializer_bytes
        return (
            f"{self.name}: nodes {self.before.nodes} -> {self.after.nodes}, "
            f"initializers {self.before.initializers} -> {self.after.initializers} "
            f"({saved / 1e6:+.1f} MB saved), {self.seconds:.2f}s"
        )


@dataclasses.dataclass(frozen=True)
class PipelineResult:
    model: ir.Model
    records: tuple[PassRecord, ...]

    @property
    def modified(self) -> bool:
        return any(record.modified for record in self.records)


def run_pipeline(model: ir.Model, passes: Sequence[ir.passes.PassBase]) -> PipelineResult:
    """Apply ``passes`` in order; each receives the model the previous one returned."""
    records = []
    for graph_pass in passes:
        name = type(graph_pass).__name__
        before = GraphStats.of(model)
        start = time.perf_counter()
        result = graph_pass(model)
        seconds = time.perf_counter() - start
        model = result.model
        record = PassRecord(name, result.modified, before, GraphStats.of(model), seconds)
        logger.info("%s", record.summary())
        records.append(record)
    return PipelineResult(model=model, records=tuple(records))
