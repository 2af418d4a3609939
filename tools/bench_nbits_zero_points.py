"""Cost of MatMulNBits zero-point forms in ONNX Runtime's CPU kernel: none (symmetric), packed uint4, float.

Why: a GGUF Q4_1 weight is ``w = q d + m`` per block of 32 with a float minimum ``m``. MatMulNBits'
uint4 zero point can only shift by whole steps, so ``-m / d`` is rounded (up to ``d / 2`` of error
per block); MatMulNBits also accepts float zero points of the scales' type, which represent Q4_1
exactly. This script measures what each form costs.

Protocol: one ``com.microsoft.MatMulNBits`` node, ``K x N`` (default 576 x 1536, SmolLM2's
gate/up projection), 4 bits, blocks of ``--block`` (default 32), random codes, scales in
[0.01, 0.02], float zero points uniform in [0, 15] (the uint4 form rounds them); for each zero-point
form and ``accuracy_level`` 0 and 4, a CPU session with ``--threads`` intra-op threads (default 2),
inputs of ``M`` = 1 (decode) and 64 (prefill-like) rows; 20 warm-up runs, then the mean of
``--runs`` (default 200 for M = 1, 50 for M = 64). The forms are timed one after another in one
process: compare the ratios, not the absolute times. The float form's output is also checked
against ``x @ W_hat^T`` computed in numpy (max abs error printed).

    python tools/bench_nbits_zero_points.py [--k 576] [--n 1536] [--block 32] [--threads 2]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def build(packed: np.ndarray, scales: np.ndarray, zero_points: np.ndarray | None, *, k: int, n: int, block: int,
          accuracy_level: int) -> bytes:
    initializers = [numpy_helper.from_array(packed, "B"), numpy_helper.from_array(scales, "S")]
    inputs = ["X", "B", "S"]
    if zero_points is not None:
        initializers.append(numpy_helper.from_array(zero_points, "Z"))
        inputs.append("Z")
    node = helper.make_node("MatMulNBits", inputs, ["Y"], domain="com.microsoft", K=k, N=n, bits=4, block_size=block,
                            accuracy_level=accuracy_level)
    graph = helper.make_graph([node], "nbits", [helper.make_tensor_value_info("X", TensorProto.FLOAT, ["M", k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, ["M", n])], initializers)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)])
    return model.SerializeToString()


def seconds_per_run(session: ort.InferenceSession, x: np.ndarray, runs: int) -> float:
    for _ in range(20):
        session.run(None, {"X": x})
    start = time.perf_counter()
    for _ in range(runs):
        session.run(None, {"X": x})
    return (time.perf_counter() - start) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k", type=int, default=576)
    parser.add_argument("--n", type=int, default=1536)
    parser.add_argument("--block", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=200)
    args = parser.parse_args()
    k, n, block = args.k, args.n, args.block
    if k % block or block % 2:
        parser.error("--block must be even and divide --k")
    blocks = k // block
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 16, (n, blocks, block)).astype(np.uint8)
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    scales = rng.uniform(0.01, 0.02, (n * blocks,)).astype(np.float32)
    float_zero = rng.uniform(0, 15, (n * blocks,)).astype(np.float32)
    rounded = np.rint(float_zero).astype(np.uint8).reshape(n, blocks)
    if blocks % 2:
        rounded = np.concatenate([rounded, np.zeros((n, 1), np.uint8)], axis=1)
    uint4_zero = (rounded[:, 0::2] | (rounded[:, 1::2] << 4)).astype(np.uint8).reshape(-1)
    w_hat = ((codes.reshape(n, k).astype(np.float64) - np.repeat(float_zero.reshape(n, blocks), block, axis=1))
             * np.repeat(scales.reshape(n, blocks), block, axis=1))
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    options.inter_op_num_threads = 1
    forms = {"none (symmetric)": None, "uint4 packed": uint4_zero, "float": float_zero}
    print(f"MatMulNBits K={k} N={n} bits=4 block={block}, onnxruntime {ort.__version__}, {args.threads} threads")
    print(f"{'zero points':18} {'acc':>3} {'M':>3} {'ms/run':>8} {'x sym acc0':>10} {'max |err|':>10}")
    reference = {}
    for form, zero_points in forms.items():
        for accuracy_level in (0, 4):
            session = ort.InferenceSession(build(packed, scales, zero_points, k=k, n=n, block=block,
                                                 accuracy_level=accuracy_level), options,
                                           providers=["CPUExecutionProvider"])
            for m in (1, 64):
                x = rng.standard_normal((m, k)).astype(np.float32)
                error = float(np.abs(session.run(None, {"X": x})[0] - x @ w_hat.T).max()) if form == "float" else float("nan")
                seconds = seconds_per_run(session, x, args.runs if m == 1 else max(1, args.runs // 4))
                reference.setdefault(m, seconds)
                print(f"{form:18} {accuracy_level:>3} {m:>3} {seconds * 1e3:8.3f} {seconds / reference[m]:9.2f}x {error:10.2e}")


if __name__ == "__main__":
    main()
