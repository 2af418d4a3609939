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
*quantized* file and runs one short input through it, checking that every output is finite.
"""

from __future__ import annotations

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
VERIFY_TOKENS = 8


def should_stream(model: ir.Model) -> bool:
    """Stream when the initializers exceed :data:`STREAM_THRESHOLD_BYTES` (metadata only: no data read)."""
    return initializer_bytes(model) > STREAM_THRESHOLD_BYTES


def verify_streamed(path: str | os.PathLike, *, tokens: int = VERIFY_TOKENS, threads: int = 0) -> VerificationReport:
    """``onnx.checker`` by path, an ORT CPU session on the file, and one forward pass over ``tokens``
    token ids ``0 .. tokens-1`` whose outputs must all be finite."""
    model_path = Path(path)
    try:
        onnx.checker.check_model(str(model_path))
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as error:
        raise VerificationError(f"{model_path}: ONNX checker failed: {_first_line(error)}") from error
    try:
        session = cpu_session(model_path, threads=threads)
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


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
