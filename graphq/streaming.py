"""Layer-streamed quantization: when a model is processed block by block, and how its output is
verified without ever loading the float model.

A streamed run holds at most one decoder block's float weights (memory-mapped from the input's
external data and released once used) plus that block's quantized tensors until they are appended to
the output's external-data file (:class:`graphq.modelio.ExternalDataSink`). With ``B`` the bytes of
the largest block (or of the embedding / LM head, whichever is larger), peak memory is roughly
``c * B + graph + calibration cache`` for a small constant ``c`` (float32 copies made by the
quantizer and by ONNX Runtime's per-stage session), independent of the number of layers ``L``:
time grows as ``L * t_block``.

Verification of a streamed output reads the protobuf only (``onnx.checker.check_model`` by path:
it never loads external data, so > 2 GB files are fine), then opens an ONNX Runtime session on the
*quantized* file and runs one short input through it, checking that every output is finite. An output
whose external data exceeds :data:`WHOLE_SESSION_MAX_BYTES` (a 7B W8A8 output: ~7 GB of int8 weights,
which one session holds at ~1.2x the file size) is run instead stage by stage (:mod:`graphq.blockwise`):
each decoder block in its own ONNX Runtime session on the 8-token input, fed the previous stage's
outputs, with the block's weights released afterwards; every graph output must be finite. Memory is
then one block's weights, and every node of the file still runs in ONNX Runtime once.
"""

from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from graphq.errors import VerificationError
from graphq.modelio import initializer_bytes
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import VerificationReport, cpu_session

logger = logging.getLogger(__name__)

# Models whose initializers exceed this are quantized streamed unless told otherwise.
STREAM_THRESHOLD_BYTES = 1 << 30
# Streamed outputs with more external data than this are verified stage by stage, not in one session.
WHOLE_SESSION_MAX_BYTES = 4 << 30
VERIFY_TOKENS = 8
INTEGER_OPS = frozenset({"MatMulInteger", "MatMulIntegerToFloat", "DequantizeLinear", "QuantizeLinear"})


def should_stream(model: ir.Model) -> bool:
    """Stream when the initializers exceed :data:`STREAM_THRESHOLD_BYTES` (metadata only: no data read)."""
    return initializer_bytes(model) > STREAM_THRESHOLD_BYTES


def verify_streamed(path: str | os.PathLike, *, tokens: int = VERIFY_TOKENS, threads: int = 0,
                    prepack: bool = True, by_stage: bool | None = None) -> VerificationReport:
    """``onnx.checker`` by path, an ORT CPU session on the file, and one forward pass over ``tokens``
    token ids ``0 .. tokens-1`` whose outputs must all be finite.

    ``by_stage`` (default: when the file's external data exceeds :data:`WHOLE_SESSION_MAX_BYTES`) runs
    the forward pass one stage at a time instead (module docstring); a graph that cannot be cut into
    stages then falls back to one session.

    ``prepack=False`` turns off ONNX Runtime's weight prepacking. Peak RSS of this check over the
    output's file size, on 7B-shaped 2- and 4-layer outputs (``tools/bench_streamed.py
    --verify-memory``): W4 MatMulNBits 1.2x with prepacking (2.3x without), W8A8 MatMulInteger 1.7x
    with it and 1.16x without; so W8A8 verifies without prepacking."""
    model_path = Path(path)
    try:
        onnx.checker.check_model(str(model_path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"{model_path}: ONNX checker failed: {_first_line(error)}") from error
    if by_stage is None:
        by_stage = external_data_bytes(model_path) > WHOLE_SESSION_MAX_BYTES
    if by_stage:
        report = _verify_by_stage(model_path, tokens=tokens, threads=threads)
        if report is not None:
            return report
    try:
        session = cpu_session(model_path, threads=threads, prepack=prepack)
        signature = GraphSignature.of(session)
        outputs = session.run(None, build_feeds(signature, np.arange(tokens, dtype=np.int64)[None, :]))
    except Exception as error:  # ORT raises its own exception types from C++
        raise VerificationError(f"{model_path}: ONNX Runtime cannot run the model: {_first_line(error)}") from error
    for name, array in zip(signature.output_names, outputs):
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            raise VerificationError(f"{model_path}: output '{name}' is not finite on a {tokens}-token input")
    report = VerificationReport(path=model_path, checker_passed=True, ort_providers=tuple(session.get_providers()),
                                input_names=signature.input_names, output_names=signature.output_names)
    del session, outputs
    logger.info("verified %s: onnx.checker ok, ORT session ran %d tokens", model_path, tokens)
    return report


def external_data_bytes(model_path: Path) -> int:
    """Bytes of the external-data files a model references (metadata only)."""
    from graphq.modelio import referenced_files

    return sum(path.stat().st_size for path in referenced_files(model_path)[1:] if path.is_file())


class _FiniteCheck:
    """An accumulator (:class:`graphq.calibrate.Accumulator`) that only remembers whether every float
    value it saw was finite."""

    def __init__(self) -> None:
        self.finite = True

    def update(self, array: np.ndarray) -> None:
        if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
            self.finite = False


def _verify_by_stage(model_path: Path, *, tokens: int, threads: int) -> VerificationReport | None:
    """The forward pass of :func:`verify_streamed` one stage at a time; None if the graph has no stages."""
    from graphq.blockwise import StagedCalibration, partition
    from graphq.errors import GraphqError
    from graphq.modelio import load_model, release
    from graphq.runtime import signature_of_model

    model = load_model(model_path)
    stages = partition(model)
    if stages is None:
        logger.warning("%s: cannot be cut into blocks; verified in one ONNX Runtime session", model_path)
        return None
    signature = signature_of_model(model)
    outputs = [value.name for value in model.graph.outputs]
    runner = StagedCalibration(model, stages, np.arange(tokens, dtype=np.int64)[None, :], threads=threads or 2,
                               progress=False)
    checked = set()
    try:
        for stage in runner.stages():
            produced = {value.name for node in stage.nodes for value in node.outputs}
            names = [name for name in outputs if name in produced]
            if names:
                for name, check in runner.calibrate(stage, names, _FiniteCheck).items():
                    if not check.finite:
                        raise VerificationError(f"{model_path}: output '{name}' is not finite on a {tokens}-token input")
                checked.update(names)
            runner.advance(stage)
            for node in stage.nodes:
                for value in node.inputs:
                    release(value)
    except GraphqError as error:
        if isinstance(error, VerificationError):
            raise
        raise VerificationError(f"{model_path}: ONNX Runtime cannot run the model: {_first_line(error)}") from error
    missing = [name for name in outputs if name not in checked]
    if missing:  # a graph output that is an input or a constant: nothing ran it
        raise VerificationError(f"{model_path}: output '{missing[0]}' is not computed by any stage")
    logger.info("verified %s: onnx.checker ok, %d stages ran %d tokens in ONNX Runtime one at a time",
                model_path, len(stages), tokens)
    return VerificationReport(path=model_path, checker_passed=True, ort_providers=("CPUExecutionProvider",),
                              input_names=signature.input_names, output_names=signature.output_names)


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__


def quantize_w8a8_streamed(graph: ir.Model, source: Path, staged: Path, recipe, plan: dict[str, str],
                           kept_names: frozenset[str], windows: np.ndarray, *, progress: bool = True
                           ) -> tuple[dict[str, str], dict[str, int]]:
    """W8A8 of ``graph`` one stage at a time (:mod:`graphq.blockwise`), written to ``staged`` (a file in a
    staging folder) with its external data, then verified; returns the SmoothQuant folds and the
    integer op counts of the graph (ORT's optimised graph is not built: it would hold every weight).

    Per stage: the channel ranges of its planned MatMul inputs on the *float* model's activations
    (the cache advances with float weights, as one pass over the float model gives), then
    SmoothQuant on those inputs, int8 weights and dynamic per-token activations, and the stage's new
    tensors go to the output file. Static activations after SmoothQuant would need a second
    calibration of the smoothed stage and are refused here."""
    from graphq.blockwise import StagedCalibration, partition
    from graphq.errors import GraphqError
    from graphq.modelio import ExternalDataSink, release, save_streamed
    from graphq.numerics.calibration import RunningStats
    from graphq.passes.cleanup import CleanupPass
    from graphq.passes.keep_float import keep_float_violations
    from graphq.passes.pack_matmuls import pack_planned_matmuls
    from graphq.passes.qdq_insert import INT8, QdqInsertionPass
    from graphq.passes.smoothquant import SmoothQuantPass

    static = recipe.activations.activation_scheme == "static"
    if static and recipe.smoothquant is not None:
        raise GraphqError(f"streamed W8A8 ({recipe.name}): static activations after SmoothQuant are not supported "
                          "yet; use dynamic-token activations or no SmoothQuant")
    stages = partition(graph)
    if stages is None:
        raise GraphqError(f"{source}: streamed W8A8 runs block by block, but the graph cannot be cut into blocks")
    calib = recipe.calibration
    runner = StagedCalibration(graph, stages, windows, threads=calib.threads, progress=progress)
    sink = ExternalDataSink(staged.parent, staged.name + ".data")
    smoothing: dict[str, str] = {}
    quantized = 0
    for stage in runner.stages():
        nodes = [node for node in stage.nodes if plan.get(node.name) == INT8]
        names = list(dict.fromkeys(node.inputs[0].name for node in nodes))
        # Taken now: the passes below remove the float MatMuls (and their inputs) from the graph.
        read = [value for node in stage.nodes for value in node.inputs if value is not None]
        stats = {}
        if names and (recipe.smoothquant is not None or static):
            stats = runner.calibrate(stage, names, lambda: RunningStats(calib.histogram_bins))
        runner.advance(stage)
        if nodes:
            if recipe.smoothquant is not None:
                smooth = SmoothQuantPass({n: s.channel_abs_max for n, s in stats.items()}, recipe.smoothquant)
                smooth(graph)
                smoothing.update(smooth.applied)
            ranges = {name: recipe.activation_range.absmax(s, bits=8) for name, s in stats.items()} if static else {}
            stage_plan = {node.name: INT8 for node in nodes}
            if recipe.pack_matmuls:
                graph, stage_plan, _ = pack_planned_matmuls(graph, stage_plan)
            qdq = QdqInsertionPass(stage_plan, recipe.activations, activation_abs_max=ranges,
                                   kept_node_names=kept_names)
            qdq(graph)
            quantized += len(qdq.quantized)
        for value in read:
            release(value)
            if value.const_value is not None and not value.is_initializer() and not value.uses():
                # Dropped from the graph (a float weight SmoothQuant rescaled in memory, then quantized),
                # but onnx_ir's shape inference leaves every initializer's Value referenced from the
                # graph inputs' reference counter: unhooked, or ~0.4 GB per 7B layer stays alive.
                value.const_value = None
        sink.spill_new(graph.graph)
        del stats, read
    graph = CleanupPass()(graph).model
    violations = keep_float_violations(n for n in graph.graph if n.name in kept_names)
    if violations:
        raise VerificationError(f"keep-float policy violated: {violations[0]} (and {len(violations) - 1} more)")
    integer = dict(collections.Counter(node.op_type for node in graph.graph if node.op_type in INTEGER_OPS))
    if not integer:
        raise VerificationError("the streamed W8A8 graph has no integer MatMul")
    import json

    from graphq.config import recipe_to_dict

    graph.metadata_props["graphq.recipe"] = json.dumps(recipe_to_dict(recipe), default=str)
    save_streamed(graph, staged, sink)
    del graph
    verify_streamed(staged, prepack=False)
    logger.info("streamed W8A8: %d MatMuls quantized, %d activations smoothed", quantized, len(smoothing))
    return smoothing, integer
