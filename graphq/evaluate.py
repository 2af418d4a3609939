"""Evaluation of an ONNX language model on ONNX Runtime's CPU execution provider.

**Perplexity** (protocol of DESIGN.md). The text (default: WikiText-2 ``wiki.test.raw`` exactly as
shipped, rows joined by ``\\n``) is tokenised once without special tokens into ``t_0 .. t_{N-1}``.
Window ``w`` holds tokens ``t_{512w} .. t_{512w+511}`` (non-overlapping, from the start; the first
``windows`` windows). Each window is one forward pass from an empty cache; every position except
the last predicts the next token, so a window scores 511 tokens. With ``p`` the model's softmax
(computed in float64 from the float32 logits),

    PPL = exp( - sum_{w,i} log p(t_{w,i+1} | t_{w,0..i}) / (511 * windows) ).

**Prefill**: latency of one forward pass over the first 512-token window (empty cache), median of
``prefill_repeats`` runs after one warm-up; reported as seconds and tokens/s.

**Decode** (graphs with a KV cache only): a 32-token prompt (the first tokens of the text) is
prefilled, then 128 tokens are generated greedily one at a time, feeding back ``present.*`` as
``past_key_values.*``. Decode tokens/s = 128 / time of those 128 steps; median of
``decode_repeats`` runs after a warm-up.

**Chunked perplexity** (graphs with a KV cache; :func:`chunked_perplexity`): the same windows and
formula, but each window is fed as a prefill of its first ``prefill_tokens`` tokens from an empty
cache, then chunks of ``chunk_tokens`` tokens, each chunk reading the cache that the previous
steps returned. Tokens after the prefill therefore attend to earlier tokens through the cache the
graph emits (int8 for a graph from ``--kv-cache int8``); with a float cache the result equals the
one-pass perplexity up to float rounding.

All sessions use ``threads`` intra-op threads (fixed; default 2) and ORT's full graph optimisation.
**Size**: bytes of the .onnx file plus its external-data files.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import statistics
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from tqdm import tqdm

from graphq.data import WIKITEXT_TEST, read_text
from graphq.errors import GraphqError
from graphq.modelio import read_model_proto, resolve_model_file
from graphq.runtime import ORT_ERRORS, GraphSignature, build_feeds, check_token_ids, logits_size, next_cache
from graphq.verify import MAX_THREADS, cpu_session

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    windows: int = 40
    window_tokens: int = 512
    threads: int = 2
    prefill_repeats: int = 5
    decode_prompt_tokens: int = 32
    decode_new_tokens: int = 128
    decode_repeats: int = 3
    measure_speed: bool = True
    text_path: Path = WIKITEXT_TEST

    def __post_init__(self) -> None:
        for name in ("windows", "window_tokens", "threads", "prefill_repeats",
                     "decode_prompt_tokens", "decode_new_tokens", "decode_repeats"):
            if getattr(self, name) < 1:
                raise GraphqError(f"{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.window_tokens < 2:
            raise GraphqError("window-tokens must be at least 2 (one token predicts the next)")
        if self.threads > MAX_THREADS:
            raise GraphqError(f"threads must be at most {MAX_THREADS}, got {self.threads}")


@dataclasses.dataclass(frozen=True)
class EvalResult:
    model: str
    perplexity: float
    windows: int
    window_tokens: int
    tokens_scored: int
    file_bytes: int
    threads: int
    has_kv_cache: bool
    prefill_seconds: float | None
    prefill_tokens_per_s: float | None
    decode_tokens_per_s: float | None
    onnxruntime_version: str = ort.__version__

    def to_json(self) -> dict:
        return dataclasses.asdict(self)

    def table(self) -> str:
        def fmt(value, spec):
            return "n/a" if value is None else format(value, spec)

        rows = [
            ("model", self.model),
            ("perplexity", f"{self.perplexity:.4f}"),
            ("windows x tokens", f"{self.windows} x {self.window_tokens} ({self.tokens_scored} scored)"),
            ("file size", f"{self.file_bytes / 1e6:.1f} MB ({self.file_bytes} bytes)"),
            ("prefill latency (512 tokens)", f"{fmt(self.prefill_seconds, '.3f')} s"),
            ("prefill tokens/s", fmt(self.prefill_tokens_per_s, ".1f")),
            ("decode tokens/s", fmt(self.decode_tokens_per_s, ".1f")
             + ("" if self.has_kv_cache else " (graph has no KV cache; export with --with-past)")),
            ("threads / onnxruntime", f"{self.threads} / {self.onnxruntime_version}"),
        ]
        width = max(len(k) for k, _ in rows)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)


def model_file_bytes(model_path: Path) -> int:
    """Size of the .onnx file plus every external-data file it references."""
    proto = onnx.load(str(model_path), load_external_data=False)
    locations = set()
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            locations.update(e.value for e in tensor.external_data if e.key == "location")
    return model_path.stat().st_size + sum((model_path.parent / loc).stat().st_size for loc in locations)


def load_tokenizer(model_path: Path, tokenizer_dir: Path | None):
    from transformers import AutoTokenizer

    source = tokenizer_dir or model_path.parent
    if not (source / "tokenizer.json").is_file() and not (source / "tokenizer_config.json").is_file():
        raise GraphqError(
            f"no tokenizer in {source}; export with graphq (it saves one beside the model) "
            "or pass --tokenizer DIR"
        )
    try:
        return AutoTokenizer.from_pretrained(str(source), trust_remote_code=False)
    except Exception as error:  # transformers raises several types for broken tokenizer files
        raise GraphqError(f"cannot load the tokenizer in {source}: {str(error).splitlines()[0]}") from error


def token_windows(token_ids: list[int], config: EvalConfig) -> np.ndarray:
    available = len(token_ids) // config.window_tokens
    if available < config.windows:
        raise GraphqError(
            f"the text gives only {available} windows of {config.window_tokens} tokens; "
            f"asked for {config.windows}"
        )
    used = np.asarray(token_ids[: config.windows * config.window_tokens], dtype=np.int64)
    return used.reshape(config.windows, config.window_tokens)


def window_nll(logits: np.ndarray, window: np.ndarray) -> float:
    """Sum of -log p(next token) over one window; ``logits`` is (tokens, vocab)."""
    scores = logits[:-1].astype(np.float64)
    scores -= scores.max(axis=-1, keepdims=True)
    log_normaliser = np.log(np.exp(scores).sum(axis=-1))
    target_scores = scores[np.arange(len(window) - 1), window[1:]]
    return float(np.sum(log_normaliser - target_scores))


def perplexity(session: ort.InferenceSession, windows: np.ndarray, progress: bool = True) -> float:
    signature = GraphSignature.of(session)
    if "logits" not in signature.output_names:
        raise GraphqError("the graph has no 'logits' output: perplexity needs a causal language model")
    total = 0.0
    for window in tqdm(windows, desc="perplexity", unit="window", disable=not progress or None):
        (logits,) = session.run(["logits"], build_feeds(signature, window[None, :]))
        total += window_nll(logits[0], window)
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def chunked_window_logits(session: ort.InferenceSession, window: np.ndarray, prefill_tokens: int,
                          chunk_tokens: int) -> np.ndarray:
    """Logits ``(tokens, vocab)`` of one window fed as a prefill then chunks through the KV cache."""
    signature = GraphSignature.of(session)
    if not signature.has_kv_cache:
        raise GraphqError("chunked perplexity needs a graph with a KV cache (export with --with-past)")
    if not 1 <= prefill_tokens < len(window) or chunk_tokens < 1:
        raise GraphqError(f"chunked perplexity needs 1 <= prefill ({prefill_tokens}) < window tokens ({len(window)}) "
                          f"and chunk >= 1 ({chunk_tokens})")
    names = list(signature.output_names)
    pieces, cache = [], None
    bounds = [0, *range(prefill_tokens, len(window), chunk_tokens), len(window)]
    for begin, end in itertools.pairwise(bounds):
        feeds = build_feeds(signature, window[None, begin:end], cache)
        outputs = dict(zip(names, session.run(names, feeds)))
        pieces.append(outputs["logits"][0])
        cache = next_cache(signature, outputs)
    return np.concatenate(pieces, axis=0)


def chunked_perplexity(session: ort.InferenceSession, windows: np.ndarray, prefill_tokens: int, chunk_tokens: int,
                       progress: bool = True) -> float:
    """Perplexity with every window fed as ``prefill_tokens`` then chunks of ``chunk_tokens``."""
    total = 0.0
    for window in tqdm(windows, desc="chunked perplexity", unit="window", disable=not progress or None):
        total += window_nll(chunked_window_logits(session, window, prefill_tokens, chunk_tokens), window)
    return float(np.exp(total / (windows.shape[0] * (windows.shape[1] - 1))))


def prefill_seconds(session: ort.InferenceSession, window: np.ndarray, repeats: int) -> float:
    signature = GraphSignature.of(session)
    feeds = build_feeds(signature, window[None, :])
    outputs = [signature.main_output]
    session.run(outputs, feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        session.run(outputs, feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def greedy_decode(session: ort.InferenceSession, prompt: np.ndarray, new_tokens: int) -> tuple[list[int], float]:
    """Greedy generation with the KV cache; returns the tokens and the seconds the decode steps took."""
    signature = GraphSignature.of(session)
    output_names = list(signature.output_names)
    outputs = dict(zip(output_names, session.run(output_names, build_feeds(signature, prompt[None, :]))))
    token = int(np.argmax(outputs["logits"][0, -1]))
    generated = [token]
    start = time.perf_counter()
    for _ in range(new_tokens - 1):
        cache = next_cache(signature, outputs)
        feeds = build_feeds(signature, np.array([[token]], dtype=np.int64), cache)
        outputs = dict(zip(output_names, session.run(output_names, feeds)))
        token = int(np.argmax(outputs["logits"][0, -1]))
        generated.append(token)
    return generated, time.perf_counter() - start


def decode_tokens_per_s(session: ort.InferenceSession, prompt: np.ndarray, config: EvalConfig) -> float:
    greedy_decode(session, prompt, 8)
    rates = []
    for _ in range(config.decode_repeats):
        _, seconds = greedy_decode(session, prompt, config.decode_new_tokens + 1)
        rates.append(config.decode_new_tokens / seconds)
    return statistics.median(rates)


def evaluate_model(
    model: str | os.PathLike,
    config: EvalConfig = EvalConfig(),
    *,
    tokenizer_dir: Path | None = None,
    progress: bool = True,
) -> EvalResult:
    """Perplexity, prefill latency, decode speed and size of an ONNX language model."""
    model_path = resolve_model_file(model)
    read_model_proto(model_path)  # clear errors for missing, truncated or unsafe files
    tokenizer = load_tokenizer(model_path, tokenizer_dir)
    text = read_text(config.text_path)
    token_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    windows = token_windows(token_ids, config)
    try:
        session = cpu_session(model_path, threads=config.threads)
    except Exception as error:
        raise GraphqError(f"{model_path}: ONNX Runtime cannot load the model: {str(error).splitlines()[0]}") from error
    signature = GraphSignature.of(session)
    check_token_ids(windows, logits_size(session), tokenizer_dir or model_path.parent)
    prefill = decode = None
    try:
        ppl = perplexity(session, windows, progress)
        if config.measure_speed:
            prefill = prefill_seconds(session, windows[0], config.prefill_repeats)
            if signature.has_kv_cache:
                decode = decode_tokens_per_s(session, windows[0][: config.decode_prompt_tokens], config)
    except ORT_ERRORS as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise GraphqError(f"{model_path}: ONNX Runtime failed while evaluating: {first}") from error
    return EvalResult(
        model=str(model_path),
        perplexity=ppl,
        windows=config.windows,
        window_tokens=config.window_tokens,
        tokens_scored=config.windows * (config.window_tokens - 1),
        file_bytes=model_file_bytes(model_path),
        threads=config.threads,
        has_kv_cache=signature.has_kv_cache,
        prefill_seconds=prefill,
        prefill_tokens_per_s=None if prefill is None else config.window_tokens / prefill,
        decode_tokens_per_s=decode,
    )
