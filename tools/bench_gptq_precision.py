"""GPTQ in float32 against float64: time of each stage, and how far codes and layer errors move.

graphq's GPTQ (``graphq.numerics.weight_only``) accumulates ``H`` in float64 and can run the factor
``U`` (``U^T U = (H + lambda I)^-1``), the per-group clip search and the row updates in float64 or
float32 (``GptqConfig.precision``). This tool measures both on the same inputs, in one run:

- ``--shapes KxN ...`` (default: the three 7B shapes, 4096x4096 for q/k/v/o, 4096x11008 for
  gate/up, 11008x4096 for down_proj): random float16 weights (std 0.02) and ``H = 2 X^T X / n`` from
  ``--tokens`` random tokens whose channels have gamma-distributed scales (seeded); the w4-gptq
  settings (4 bits, group 128, symmetric, act-order, damp 0.01, block 128) with clip search. For
  each precision: seconds of the factor, the clip search and the GPTQ loop (wall, ``--threads``
  BLAS threads as the environment sets them), then the fraction of clip ratios and of codes that
  differ and the ratio of layer output errors ``tr(D^T H D)`` (``D = W - W_hat``), float32 over float64.
- ``--model M.onnx --blocks B ...``: the same comparison on the real MatMuls of decoder blocks ``B``
  of a float model (default SmolLM2-135M at ``/tmp/smol_onnx/model.onnx``), ``H`` from ``--windows``
  windows of 512 tokens of ``wiki.valid.tokens`` (one float pass; tools/bench_gptq_factor.py).

End-to-end perplexity is measured with the CLI, not here: ``graphq quantize`` with a recipe file whose
``gptq.precision`` is float32, then ``graphq eval OUT.onnx --no-speed`` (40 windows).

    python tools/bench_gptq_precision.py [--shapes 4096x4096 11008x4096] [--model M --blocks 0 15 29] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench_gptq_factor import block_weights_and_hessians  # tools/ is the script's folder

from graphq.numerics import weight_only as wo

SEVEN_B_SHAPES = ("4096x4096", "4096x11008", "11008x4096")
CONFIG = wo.WeightQuantConfig(4, 128, True)


def synthetic(k: int, n: int, tokens: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((tokens, k)).astype(np.float32) * rng.gamma(1.0, 1.0, k).astype(np.float32)
    w = (rng.standard_normal((k, n)) * 0.02).astype(np.float16)
    return w, wo.hessian_accumulate(None, x, 0)[0]


def output_error(w: np.ndarray, q: wo.QuantizedWeight, h: np.ndarray) -> float:
    d = np.asarray(w, dtype=np.float64) - q.dequantize().astype(np.float64)
    return float(np.einsum("kn,kn->", d, h @ d) / 2)


def compare(name: str, w: np.ndarray, h: np.ndarray) -> dict:
    row: dict = {"node": name, "K": int(w.shape[0]), "N": int(w.shape[1])}
    results = {}
    for precision in wo.GPTQ_PRECISIONS:
        start = time.perf_counter()
        factor = wo.gptq_factor(h, damp=0.01, act_order=True, precision=precision)
        factored = time.perf_counter()
        ratios = wo.awq_clip_search(w, None, CONFIG, hessian=h, pad=True, precision=precision)
        searched = time.perf_counter()
        q = wo.gptq_quantize(w, h, CONFIG, act_order=True, pad=True, clip_ratio=ratios, factor=factor)
        row[precision] = {"factor_s": round(factored - start, 2), "clip_search_s": round(searched - factored, 2),
                          "gptq_s": round(time.perf_counter() - searched, 2)}
        results[precision] = (ratios, q)
        del factor
    (r64, q64), (r32, q32) = results["float64"], results["float32"]
    row["clip_ratios_differing"] = float(np.mean(r64 != r32))
    row["codes_differing"] = float(np.mean(q64.q != q32.q))
    row["error_float32_over_float64"] = output_error(w, q32, h) / output_error(w, q64, h)
    total = {p: sum(row[p].values()) for p in wo.GPTQ_PRECISIONS}
    row["seconds_float64_over_float32"] = total["float64"] / total["float32"]
    print(f"{name:44} K {row['K']:5} N {row['N']:5}  float64 {row['float64']}  float32 {row['float32']}  "
          f"speed-up {row['seconds_float64_over_float32']:.2f}x  codes differing {row['codes_differing']:.2e}  "
          f"clip ratios differing {row['clip_ratios_differing']:.2e}  error f32/f64 {row['error_float32_over_float64']:.5f}",
          flush=True)
    return row


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", nargs="*", default=list(SEVEN_B_SHAPES), help="KxN (default: 7B shapes)")
    parser.add_argument("--tokens", type=int, default=256, help="random tokens behind each synthetic H")
    parser.add_argument("--model", type=Path, default=None, help="float ONNX model for the real-Hessian rows")
    parser.add_argument("--blocks", type=int, nargs="*", default=[0, 15, 29])
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    rows = []
    for shape in args.shapes:
        k, n = (int(v) for v in shape.lower().split("x"))
        rows.append(compare(f"synthetic {shape}", *synthetic(k, n, args.tokens)))
    if args.model:
        for block in args.blocks:
            for name, w, h in block_weights_and_hessians(args.model, block, args.windows, 512):
                rows.append(compare(name, w, h))
    if args.json:
        args.json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
