"""Int8 KV cache and int8 attention inputs (``graphq quantize --kv-cache int8 --attention int8``).

Runs :class:`~graphq.passes.kv_cache_int8.KvCacheInt8Pass` and/or
:class:`~graphq.passes.attention_int8.AttentionInt8Pass` on a graph (float, or already
weight-quantized by a recipe), cleans up, saves to a staging folder, verifies (``onnx.checker`` and an
ORT session) and only then moves the result into place. No onnxruntime-genai config is written:
genai cannot feed an int8 cache; :func:`graphq.evaluate.greedy_decode` can.

Cache memory per token (keys and values of all layers): float32 ``2 L H 4 d`` bytes; int8
``2 L H (d + 4)`` bytes (codes plus one float32 scale per token per head).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from pathlib import Path

from graphq.errors import GraphqError
from graphq.modelio import load_model, move_staged_into_place, save_model, staging_dir
from graphq.numerics.kv_cache import cache_bytes_per_token
from graphq.passes.attention_int8 import AttentionInt8Pass
from graphq.passes.cleanup import CleanupPass
from graphq.passes.kv_cache_int8 import KvCacheInt8Pass
from graphq.quantize import resolve_quantize_paths, stage_side_files
from graphq.verify import verify_model_file

logger = logging.getLogger(__name__)

CACHE_FORMATS = ("int8",)
ATTENTION_FORMATS = ("int8",)


@dataclasses.dataclass(frozen=True)
class AttentionQuantConfig:
    """``kv_cache``: None (float) or "int8"; ``attention``: None (float) or "int8" (QK^T and PV inputs)."""

    kv_cache: str | None = None
    attention: str | None = None

    def __post_init__(self) -> None:
        if self.kv_cache is not None and self.kv_cache not in CACHE_FORMATS:
            raise GraphqError(f"kv-cache must be one of {CACHE_FORMATS}, got '{self.kv_cache}'")
        if self.attention is not None and self.attention not in ATTENTION_FORMATS:
            raise GraphqError(f"attention must be one of {ATTENTION_FORMATS}, got '{self.attention}'")

    @property
    def active(self) -> bool:
        return self.kv_cache is not None or self.attention is not None


@dataclasses.dataclass(frozen=True)
class AttentionQuantResult:
    model_path: Path
    config: AttentionQuantConfig
    cache_tensors: int
    attention_matmuls: int
    cache_bytes_per_token_float32: int | None
    cache_bytes_per_token: int | None
    seconds: float

    def to_json(self) -> dict:
        ratio = (None if not self.cache_bytes_per_token else
                 round(self.cache_bytes_per_token / self.cache_bytes_per_token_float32, 4))
        return {
            "model_path": str(self.model_path),
            "kv_cache": self.config.kv_cache,
            "attention": self.config.attention,
            "cache_tensors": self.cache_tensors,
            "attention_matmul_pairs": self.attention_matmuls,
            "cache_bytes_per_token_float32": self.cache_bytes_per_token_float32,
            "cache_bytes_per_token": self.cache_bytes_per_token,
            "cache_ratio_vs_float32": ratio,
            "seconds": round(self.seconds, 2),
        }


def check_attention_quant(graph, config: AttentionQuantConfig) -> None:
    """GraphqError unless every requested rewrite applies to ``graph`` (an ``onnx_ir`` model); changes nothing."""
    if not config.active:
        raise GraphqError("nothing to do: choose --kv-cache int8 and/or --attention int8")
    if config.kv_cache is not None:
        KvCacheInt8Pass.check(graph)
    if config.attention is not None:
        AttentionInt8Pass.check(graph)


def quantize_attention(model: str | os.PathLike, output: str | os.PathLike, config: AttentionQuantConfig, *,
                       overwrite: bool = False) -> AttentionQuantResult:
    """Apply ``config`` to ``model`` (.onnx) and write the verified result to ``output`` (.onnx)."""
    start = time.perf_counter()
    source, output = resolve_quantize_paths(model, output, overwrite=overwrite)
    graph = load_model(source)
    check_attention_quant(graph, config)  # before either pass changes anything
    matmuls = 0
    if config.attention is not None:
        attention = AttentionInt8Pass()
        graph = attention(graph).model
        matmuls = len(attention.matmuls)
    entries = []
    if config.kv_cache is not None:
        cache = KvCacheInt8Pass()
        graph = cache(graph).model
        entries = cache.entries
    graph = CleanupPass()(graph).model
    graph.metadata_props["graphq.attention_quant"] = json.dumps(dataclasses.asdict(config))
    with staging_dir(output) as staging:
        staged = staging / output.name
        save_model(graph, staged)
        verify_model_file(staged)
        stage_side_files(source, output, staging)
        move_staged_into_place(staging, output)
    float_bytes = int8_bytes = None
    if entries and all(isinstance(e.kv_heads, int) and isinstance(e.head_dim, int) for e in entries):
        float_bytes = sum(cache_bytes_per_token(e.kv_heads, e.head_dim, int8=False) for e in entries)
        int8_bytes = sum(cache_bytes_per_token(e.kv_heads, e.head_dim, int8=True) for e in entries)
    result = AttentionQuantResult(output, config, len(entries), matmuls, float_bytes, int8_bytes,
                                  time.perf_counter() - start)
    logger.info("attention quantization -> %s: %s", output, result.to_json())
    return result
