"""GPTQ's inverse Cholesky factor, blocked in place vs numpy's dense routines, on real Hessians.

graphq builds GPTQ's ``U`` (``U^T U = (H + lambda I)^-1``) with a blocked in-place Cholesky and
triangular inverse (:func:`graphq.numerics.weight_only._inverse_cholesky_upper`: one float64 ``K x K``
array) instead of ``np.linalg.cholesky`` + ``np.linalg.inv`` (which copy input and output: about five
``K x K`` arrays, 1 GB each for a 7B ``down_proj``). Both are float64; this tool measures how far the
results move, on the Hessians of a real model's first decoder block.

Protocol: the float model (``--model``, default SmolLM2-135M at ``/tmp/smol_onnx/model.onnx``), the
Hessians ``H = 2 X^T X / n`` of the MatMul inputs of block ``--block`` (q/k/v, o_proj, gate/up,
down_proj) over ``--windows`` windows of ``--window-tokens`` tokens of ``wiki.valid.tokens``
(graphq.calibrate, float model, one pass); for each MatMul, GPTQ with the w4-gptq recipe's settings
(4 bits, group 128, symmetric, act-order, damp 0.01, block 128, no clip search) twice: with the
blocked factor and with the dense reference (the previous implementation, below). Reported per
MatMul: ``max |U - U_ref| / max |U_ref|``, the fraction of codes that differ, and the layer-output
error ``tr(D^T H D) / 2`` (``D = W - W_hat``) of both, relative to RTN's.

    python tools/bench_gptq_factor.py [--windows 8] [--json out.json]
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

from graphq.calibrate import (
    CalibrationConfig,
    calibration_windows,
    collect_statistics,
    window_framing,
)
from graphq.evaluate import load_tokenizer
from graphq.modelio import load_model
from graphq.numerics import weight_only as wo
from graphq.passes.qdq_insert import constant_weight
from graphq.weight_only import HessianAccumulator


def reference_upper(hessian: np.ndarray, damp: float, *, order: np.ndarray | None = None) -> np.ndarray:
    """The previous implementation: dense numpy Cholesky and inverse on the reversed, damped matrix."""
    k = hessian.shape[0]
    order = np.arange(k) if order is None else order
    h = np.array(hessian, dtype=np.float64)[np.ix_(order, order)]
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    mean_diag = float(np.mean(np.diag(h)))
    lower = np.linalg.cholesky(h[::-1, ::-1] + damp * mean_diag * np.eye(k))
    return np.triu(np.linalg.inv(lower)[::-1, ::-1])


def output_error(w: np.ndarray, w_hat: np.ndarray, h: np.ndarray) -> float:
    d = np.asarray(w, dtype=np.float64) - w_hat.astype(np.float64)
    return float(np.einsum("kn,kn->", d, h @ d) / 2)


def block_weights_and_hessians(model_path: Path, block: int, windows: int, window_tokens: int
                               ) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """``(node name, W, H)`` for the MatMuls of decoder block ``block`` of the float model, ``H`` from
    ``windows`` windows of ``window_tokens`` tokens of ``wiki.valid.tokens`` (one float pass)."""
    model = load_model(model_path)
    prefix = f"/model/layers.{block}/"
    nodes = [n for n in model.graph if n.op_type == "MatMul" and n.name.startswith(prefix) and constant_weight(n) is not None]
    tokenizer = load_tokenizer(model_path, None)
    framed = calibration_windows(tokenizer, CalibrationConfig(windows=windows, window_tokens=window_tokens),
                                 window_framing(model))
    inputs = list(dict.fromkeys(n.inputs[0].name for n in nodes))
    stats = collect_statistics(model_path, inputs, framed, progress=False, make_accumulator=HessianAccumulator)
    return [(n.name, constant_weight(n), stats[n.inputs[0].name].hessian) for n in nodes]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=Path("/tmp/smol_onnx/model.onnx"))
    parser.add_argument("--block", type=int, default=0)
    parser.add_argument("--windows", type=int, default=8)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    config = wo.WeightQuantConfig(4, 128, True)
    blocked = wo._inverse_cholesky_upper
    rows = []
    for name, w, h in block_weights_and_hessians(args.model, args.block, args.windows, args.window_tokens):
        perm = np.argsort(-np.where(np.diag(h) == 0, 1.0, np.diag(h)), kind="stable")
        start = time.perf_counter()
        u_new = blocked(h, 0.01, order=perm)
        t_new = time.perf_counter() - start
        start = time.perf_counter()
        u_ref = reference_upper(h, 0.01, order=perm)
        t_ref = time.perf_counter() - start
        new = wo.gptq_quantize(w, h, config, act_order=True, pad=True)
        wo._inverse_cholesky_upper = reference_upper
        try:
            ref = wo.gptq_quantize(w, h, config, act_order=True, pad=True)
        finally:
            wo._inverse_cholesky_upper = blocked
        rtn = output_error(w, wo.quantize_rtn(w, config, pad=True).dequantize(), h)
        row = {"node": name, "K": int(w.shape[0]), "N": int(w.shape[1]),
               "u_max_rel_diff": float(np.abs(u_new - u_ref).max() / np.abs(u_ref).max()),
               "codes_differing": float(np.mean(new.q != ref.q)),
               "error_blocked_over_rtn": output_error(w, new.dequantize(), h) / rtn,
               "error_reference_over_rtn": output_error(w, ref.dequantize(), h) / rtn,
               "factor_seconds_blocked": round(t_new, 3), "factor_seconds_reference": round(t_ref, 3)}
        rows.append(row)
        print(f"{row['node']:40} K {row['K']:5} |dU|/|U| {row['u_max_rel_diff']:.1e}  codes differing "
              f"{row['codes_differing']:.2e}  error/RTN blocked {row['error_blocked_over_rtn']:.6f} "
              f"reference {row['error_reference_over_rtn']:.6f}  factor s {t_new:.2f} vs {t_ref:.2f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
