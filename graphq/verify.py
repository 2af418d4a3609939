"""Verification of emitted graphs: the ONNX checker and an ONNX Runtime session must both accept a
model before graphq reports success."""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import onnx
import onnxruntime as ort

from graphq.errors import VerificationError

logger = logging.getLogger(__name__)

# More intra-op threads than this is a mistake, not a configuration: ONNX Runtime aborts the process
# when it cannot create them (100000 threads: silent exit).
MAX_THREADS = 1024


@dataclasses.dataclass(frozen=True)
class VerificationReport:
    path: Path
    checker_passed: bool
    ort_providers: tuple[str, ...]
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]


def cpu_session(
    path: str | os.PathLike,
    *,
    threads: int = 0,
    optimization: str = "all",
    free_dimensions: Mapping[str, int] | None = None,
    prepack: bool = True,
) -> ort.InferenceSession:
    """An ONNX Runtime CPU session with a fixed number of intra-op threads (0: ORT's default).

    ``free_dimensions`` pins symbolic input dimensions by name (ORT's free-dimension overrides), e.g. a
    KV-cache head size that a graph declares only as a symbol. ``prepack=False`` turns off ORT's
    weight prepacking."""
    options = ort.SessionOptions()
    for name, size in (free_dimensions or {}).items():
        options.add_free_dimension_override_by_name(name, size)
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    options.log_severity_level = 4  # errors surface as exceptions; ORT's log would add stderr lines
    if not prepack:  # kernels read the stored weights instead of a repacked copy (less memory)
        options.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def verify_model_file(path: str | os.PathLike) -> VerificationReport:
    """Run ``onnx.checker`` (by path, so > 2 GB models work) and open an ORT CPU session."""
    model_path = Path(path)
    try:
        onnx.checker.check_model(str(model_path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"{model_path}: ONNX checker failed: {_first_line(error)}") from error
    try:
        session = cpu_session(model_path)
    except Exception as error:  # ORT raises its own exception types from C++
        raise VerificationError(
            f"{model_path}: ONNX Runtime cannot load the model: {_first_line(error)}"
        ) from error
    report = VerificationReport(
        path=model_path,
        checker_passed=True,
        ort_providers=tuple(session.get_providers()),
        input_names=tuple(i.name for i in session.get_inputs()),
        output_names=tuple(o.name for o in session.get_outputs()),
    )
    logger.info("verified %s: onnx.checker ok, ORT session ok", model_path)
    return report


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
