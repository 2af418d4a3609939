"""Calibration: streaming statistics of intermediate tensors over calibration text.

**Data.** The calibration text (default: WikiText-2 ``wiki.valid.tokens``, never the evaluation
text) is read as UTF-8 and tokenised once without special tokens into ``t_0 .. t_{N-1}``. Window
``w`` holds tokens ``t_{Tw} .. t_{Tw+T-1}`` (``T = window_tokens``; non-overlapping, from the
start; the first ``windows`` of them, or all ``floor(N / T)`` if the text is shorter, with a
warning). How a window is framed depends on the graph (:data:`FRAMING_BY_OUTPUT`, keyed by its main
output): a decoder LM (``logits``) reads the ``T`` text tokens as they are; an encoder
(``last_hidden_state``) was trained on ``[CLS] text [SEP]`` inputs, so each of its windows holds
``T - s`` text tokens wrapped in the ``s`` special tokens the tokenizer puts around one sequence
(:func:`special_token_frame`), still ``T`` tokens in all. Every window is one sequence
without padding: ``attention_mask`` all ones, ``token_type_ids`` zeros (:mod:`graphq.runtime`).

**Statistics.** An augmented copy of the model lists the requested tensors as extra graph outputs.
Each window is one forward pass from an empty KV cache on ONNX Runtime's CPU execution provider,
asking only for those tensors; each tensor's batch ``[..., C]`` is folded into its
:class:`~graphq.numerics.calibration.RunningStats` (min, max, per-channel ``max |x|``, mean, std,
a fixed-size histogram of ``|x|``) and dropped before the next window. Memory is therefore
``O(sum of channels + tensors x bins)``, independent of the number of windows (ORT's own
calibrators keep every output of every batch, which does not fit for LLMs).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from typing import Protocol
from pathlib import Path

import numpy as np
import onnx_ir as ir
from tqdm import tqdm

from graphq.data import WIKITEXT_VALID, read_text
from graphq.errors import GraphqError
from graphq.modelio import load_model, resolve_model_file, save_model
from graphq.numerics.calibration import DEFAULT_BINS, RunningStats
from graphq.runtime import GraphSignature, build_feeds, signature_of_model
from graphq.verify import MAX_THREADS, cpu_session

logger = logging.getLogger(__name__)


class Accumulator(Protocol):
    """Folds one calibration batch ``[..., C]`` into a fixed-size summary."""

    def update(self, array: np.ndarray) -> None: ...

_FLOAT_TYPES = frozenset({ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE})


@dataclasses.dataclass(frozen=True)
class CalibrationConfig:
    windows: int = 32
    window_tokens: int = 512
    threads: int = 2
    histogram_bins: int = DEFAULT_BINS
    # None: the shipped WikiText-2 validation text (kept symbolic so recipes stay portable).
    text_path: Path | None = None

    def __post_init__(self) -> None:
        for name in ("windows", "window_tokens", "threads", "histogram_bins"):
            if getattr(self, name) < 1:
                raise GraphqError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.threads > MAX_THREADS:
            raise GraphqError(f"threads must be at most {MAX_THREADS}, got {self.threads}")
        _check_bins(self.histogram_bins)
        if self.text_path is not None:
            object.__setattr__(self, "text_path", Path(self.text_path))

    @property
    def text(self) -> Path:
        return self.text_path or WIKITEXT_VALID


def _check_bins(bins: int) -> None:
    if bins < 2 or bins % 2:
        raise GraphqError(f"histogram-bins must be an even number of at least 2, got {bins}")


@dataclasses.dataclass(frozen=True)
class WindowFraming:
    """How a calibration window is laid out for one kind of graph (module docstring)."""

    special_tokens: bool = False  # wrap the window's text tokens in the tokenizer's special tokens


RAW_WINDOWS = WindowFraming()
# Main output of the graph (GraphSignature.main_output) -> framing of its calibration windows; graphs
# whose main output is not listed (decoder LMs: ``logits``) get raw windows.
FRAMING_BY_OUTPUT: dict[str, WindowFraming] = {"last_hidden_state": WindowFraming(special_tokens=True)}


def window_framing(model: ir.Model) -> WindowFraming:
    """The framing of calibration windows for ``model`` (:data:`FRAMING_BY_OUTPUT`)."""
    return FRAMING_BY_OUTPUT.get(signature_of_model(model).main_output, RAW_WINDOWS)


def special_token_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after one sequence (``[CLS]`` / ``[SEP]`` for
    BERT), read off its own output for a probe text, whatever its post-processor."""
    probe = "a b"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    framed = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(framed) - len(plain) + 1):
        if framed[start:start + len(plain)] == plain:
            return framed[:start], framed[start + len(plain):]
    raise GraphqError("the tokenizer changes the text tokens when it adds special tokens; cannot frame calibration windows")


def calibration_windows(tokenizer, config: CalibrationConfig = CalibrationConfig(),
                        framing: WindowFraming = RAW_WINDOWS) -> np.ndarray:
    """Token windows ``[windows, window_tokens]`` (int64) from the calibration text, framed as ``framing``."""
    text = read_text(config.text)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    prefix, suffix = special_token_frame(tokenizer) if framing.special_tokens else ([], [])
    special = len(prefix) + len(suffix)
    text_tokens = config.window_tokens - special
    if text_tokens < 1:
        raise GraphqError(f"window-tokens {config.window_tokens} leaves no room for text beside the "
                          f"{special} special tokens of each window")
    available = len(token_ids) // text_tokens
    if available == 0:
        raise GraphqError(
            f"calibration text gives only 0 windows of {config.window_tokens} tokens "
            f"({len(token_ids)} tokens in {config.text}); use a longer text or fewer window-tokens"
        )
    count = config.windows
    if available < config.windows:
        logger.warning(
            "calibration text gives only %d windows of %d tokens (%s); asked for %d, using %d",
            available, config.window_tokens, config.text, config.windows, available,
        )
        count = available
    chunks = [token_ids[i * text_tokens:(i + 1) * text_tokens] for i in range(count)]
    return np.asarray([prefix + chunk + suffix for chunk in chunks], dtype=np.int64)


def _graph_values(graph: ir.Graph) -> dict[str, ir.Value]:
    values = {value.name: value for value in graph.inputs if value.name}
    for node in graph:
        for value in node.outputs:
            if value.name:
                values[value.name] = value
    return values


def _listing(names: Iterable[str], limit: int = 5) -> str:
    names = list(names)
    shown = ", ".join(f"'{name}'" for name in names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _augmented_model(model_path: Path, tensor_names: list[str]) -> ir.Model:
    """The model with every requested tensor also a graph output."""
    model = load_model(model_path)
    values = _graph_values(model.graph)
    unknown = [name for name in tensor_names if name not in values]
    if unknown:
        constants = [name for name in unknown if name in model.graph.initializers]
        if constants:
            raise GraphqError(
                f"{model_path}: {_listing(constants)} "
                f"{'is an initializer' if len(constants) == 1 else 'are initializers'} (constant), "
                "not an activation; calibrate tensors that nodes compute"
            )
        raise GraphqError(
            f"{model_path}: no tensor named {_listing(unknown)} in the graph "
            f"({len(unknown)} of {len(tensor_names)} requested names unknown); tensors in the graph "
            f"include {_listing(name for name in values if name not in tensor_names)}"
        )
    existing = {value.name for value in model.graph.outputs}
    if any(values[name].dtype is None for name in tensor_names):  # e.g. a float16 graph without value_info
        from graphq.passes.shape_inference import ShapeInferencePass

        model = ShapeInferencePass()(model).model
        values = _graph_values(model.graph)
    for name in tensor_names:
        value = values[name]
        if value.type is None or value.dtype is None:
            value.dtype = ir.DataType.FLOAT
        if value.dtype not in _FLOAT_TYPES:
            raise GraphqError(
                f"{model_path}: tensor '{name}' is {value.dtype.name}, not a floating-point activation"
            )
        if name not in existing:
            model.graph.outputs.append(value)
    return model


def collect_statistics(
    model_path: str | os.PathLike,
    tensor_names: Iterable[str],
    windows: np.ndarray,
    *,
    threads: int = 2,
    histogram_bins: int = DEFAULT_BINS,
    progress: bool = True,
    make_accumulator: Callable[[], Accumulator] | None = None,
) -> dict[str, RunningStats]:
    """Statistics of ``tensor_names`` over one forward pass per row of ``windows`` (module docstring).

    Returns one :class:`RunningStats` per name, in the order given (or, with ``make_accumulator``,
    one accumulator of that kind: anything with ``update(array)``, e.g. a Hessian for GPTQ). The model file is not modified;
    the augmented copy lives in a temporary folder that is removed whatever happens.
    """
    model_path = resolve_model_file(model_path)
    names = list(dict.fromkeys([tensor_names] if isinstance(tensor_names, str) else tensor_names))
    if not names:
        raise GraphqError("no tensors to calibrate: name at least one")
    windows = np.asarray(windows)
    if windows.ndim != 2 or windows.shape[0] < 1 or windows.shape[1] < 1:
        raise GraphqError(f"calibration windows must be a non-empty [windows, tokens] array, got shape {windows.shape}")
    if not np.issubdtype(windows.dtype, np.integer):
        raise GraphqError(f"calibration windows must hold integer token ids, got {windows.dtype}")
    if threads < 1:
        raise GraphqError(f"threads must be at least 1, got {threads}")
    _check_bins(histogram_bins)

    model = _augmented_model(model_path, names)
    make = make_accumulator or (lambda: RunningStats(histogram_bins))
    stats = {name: make() for name in names}
    logger.info(
        "calibrating %d tensors of %s over %d windows of %d tokens",
        len(names), model_path, windows.shape[0], windows.shape[1],
    )
    try:
        workdir = Path(tempfile.mkdtemp(prefix="graphq-calibrate-"))
    except OSError as error:
        raise GraphqError(
            f"cannot create a temporary folder for the calibration model ({error.strerror or error}); set TMPDIR"
        ) from error
    try:
        augmented = workdir / "model.onnx"
        save_model(model, augmented)
        del model
        try:
            session = cpu_session(augmented, threads=threads)
        except Exception as error:  # ORT raises its own exception types from C++
            raise GraphqError(
                f"{model_path}: ONNX Runtime cannot load the model with calibration outputs: {_first_line(error)}"
            ) from error
        signature = GraphSignature.of(session)
        for index, window in enumerate(tqdm(windows, desc="calibration", unit="window", disable=not progress or None)):
            feeds = build_feeds(signature, window[None, :].astype(np.int64))
            try:
                outputs = session.run(names, feeds)
            except Exception as error:
                raise GraphqError(
                    f"{model_path}: ONNX Runtime failed on calibration window {index}: {_first_line(error)}"
                ) from error
            for name, output in zip(names, outputs):
                try:
                    stats[name].update(output)
                except ValueError as error:
                    raise GraphqError(f"tensor '{name}' in calibration window {index}: {error}") from error
            del outputs
        del session
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return stats


def _first_line(error: BaseException) -> str:
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
