"""User-facing errors.

Every problem caused by the user's input (a missing file, a file that is not ONNX, an unsupported
model, an output path that would overwrite the input) raises :class:`GraphqError` with one line
that says what is wrong and what to do. The CLI prints that line and exits non-zero; anything
else that escapes is a bug in graphq.
"""

from __future__ import annotations


class GraphqError(Exception):
    """An error the user can act on; its message is one line, printed without a traceback."""


class InvalidModelError(GraphqError):
    """The input model file is missing, unreadable, malformed or unsafe to load."""


class UnsupportedModelError(GraphqError):
    """The model is readable but graphq (or the exporter) does not support its architecture."""


class OutputPathError(GraphqError):
    """The requested output location is unusable (it is the input, inside it, or not writable)."""


class VerificationError(GraphqError):
    """An emitted graph failed the ONNX checker or could not be loaded by ONNX Runtime."""
