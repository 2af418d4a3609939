"""How to emit per-embedding-group (PEG) activation quantization for ONNX Runtime: one MatMul, several forms.

    python tools/bench_peg_emission.py [--channels 576] [--outputs 1536] [--groups 8] [--tokens 512]
        [--threads 1] [--rounds 15] [--json PATH]

Protocol: one random layer ``y = x @ W`` (``x [1, tokens, channels]`` normal with 5 channels x50,
``W`` normal x0.05, seed 0), int8 symmetric per-column weights; every form below is saved as an
ONNX model (opset 21), loaded in ONNX Runtime's CPU EP (full optimisation, ``--threads`` intra-op
threads), and run once to warm up; then ``--rounds`` rounds, each timing one run of every form in
turn; median per form. Reported: the op counts of ORT's optimised graph, the time ratio to the
per-tensor form, and max |y - x @ W|.

- ``float``: MatMul on float weights.
- ``per-tensor``: QuantizeLinear/DequantizeLinear of x with one scale (uint8, zero point 128),
  DequantizeLinear of the int8 weight (axis 1) -> MatMul (graphq's static W8A8).
- ``peg-split``: x Split into K contiguous groups, each with its own scalar QDQ and its rows of W,
  summed (graphq's PEG without permutation).
- ``peg-gather-split``: one Gather of x by the range permutation, then as ``peg-split`` (graphq's PEG).
- ``peg-gathers``: one Gather per group instead of Gather + Split.
- ``per-axis-dq``: one QuantizeLinear/DequantizeLinear of x with a per-channel scale vector
  (axis -1: each group's scale repeated over its channels), uint8 zero-point vector 128 -> MatMul.
- ``per-axis-dq-s8``: the same with int8 and no zero point.

A form ONNX Runtime cannot run is reported with its error.
"""

from __future__ import annotations

import argparse
import collections
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper


def build_forms(channels: int, outputs: int, groups: int, tokens: int):
    rng = np.random.default_rng(0)
    w = (rng.standard_normal((channels, outputs)) * 0.05).astype(np.float32)
    x = rng.standard_normal((1, tokens, channels)).astype(np.float32)
    x[..., :5] *= 50
    ws = (np.abs(w).max(0) / 127).astype(np.float32)
    wq = np.clip(np.rint(w / ws), -127, 127).astype(np.int8)
    ranges = np.abs(x).reshape(-1, channels).max(0)
    order = np.argsort(-ranges, kind="stable")
    size = channels // groups
    permuted = [np.sort(order[g * size:(g + 1) * size]) for g in range(groups)]
    contiguous = [np.arange(g * size, (g + 1) * size) for g in range(groups)]

    def init(name, array):
        return numpy_helper.from_array(np.asarray(array), name)

    def model(nodes, inits):
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, tokens, channels])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, tokens, outputs])], inits)
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])

    weight_inits = [init("wz", np.zeros(outputs, np.int8)), init("ws", ws), init("z", np.uint8(128))]

    def grouped(index, source_nodes, group_inputs):
        nodes, inits, outs = list(source_nodes), list(weight_inits), []
        for g, rows in enumerate(index):
            scale = np.float32(ranges[rows].max() / 127)
            inits += [init(f"s{g}", scale), init(f"wq{g}", wq[rows])]
            nodes += [helper.make_node("QuantizeLinear", [group_inputs[g], f"s{g}", "z"], [f"xq{g}"]),
                      helper.make_node("DequantizeLinear", [f"xq{g}", f"s{g}", "z"], [f"xd{g}"]),
                      helper.make_node("DequantizeLinear", [f"wq{g}", "ws", "wz"], [f"wd{g}"], axis=1),
                      helper.make_node("MatMul", [f"xd{g}", f"wd{g}"], [f"y{g}"])]
            outs.append(f"y{g}")
        nodes.append(helper.make_node("Sum", outs, ["y"]))
        return nodes, inits

    forms = {"float": model([helper.make_node("MatMul", ["x", "W"], ["y"])], [init("W", w)])}
    scale = np.float32(ranges.max() / 127)
    forms["per-tensor"] = model(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["xq"]), helper.make_node("DequantizeLinear", ["xq", "s", "z"], ["xd"]),
         helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1), helper.make_node("MatMul", ["xd", "wd"], ["y"])],
        [*weight_inits, init("s", scale), init("wq", wq)])
    sizes = init("sizes", np.full(groups, size, np.int64))
    split_outs = [f"x{g}" for g in range(groups)]
    nodes, inits = grouped(contiguous, [helper.make_node("Split", ["x", "sizes"], split_outs, axis=-1)], split_outs)
    forms["peg-split"] = model(nodes, [*inits, sizes])
    perm = init("perm", np.concatenate(permuted).astype(np.int64))
    nodes, inits = grouped(permuted, [helper.make_node("Gather", ["x", "perm"], ["xp"], axis=-1),
                                      helper.make_node("Split", ["xp", "sizes"], split_outs, axis=-1)], split_outs)
    forms["peg-gather-split"] = model(nodes, [*inits, sizes, perm])
    gathers = [helper.make_node("Gather", ["x", f"i{g}"], [f"x{g}"], axis=-1) for g in range(groups)]
    nodes, inits = grouped(permuted, gathers, split_outs)
    forms["peg-gathers"] = model(nodes, [*inits, *[init(f"i{g}", idx.astype(np.int64)) for g, idx in enumerate(permuted)]])
    vector = np.zeros(channels, np.float32)
    for rows in permuted:
        vector[rows] = ranges[rows].max() / 127
    for name, zero in (("per-axis-dq", init("zv", np.full(channels, 128, np.uint8))), ("per-axis-dq-s8", None)):
        q_inputs = ["x", "sv"] + (["zv"] if zero is not None else [])
        dq_inputs = ["xq", "sv"] + (["zv"] if zero is not None else [])
        forms[name] = model(
            [helper.make_node("QuantizeLinear", q_inputs, ["xq"], axis=-1), helper.make_node("DequantizeLinear", dq_inputs, ["xd"], axis=-1),
             helper.make_node("DequantizeLinear", ["wq", "ws", "wz"], ["wd"], axis=1), helper.make_node("MatMul", ["xd", "wd"], ["y"])],
            [*weight_inits, init("sv", vector), init("wq", wq), *([zero] if zero is not None else [])])
    return forms, x, x @ w


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--channels", type=int, default=576)
    parser.add_argument("--outputs", type=int, default=1536)
    parser.add_argument("--groups", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    if args.channels % args.groups:
        parser.error(f"--groups {args.groups} does not divide --channels {args.channels}")
    forms, x, reference = build_forms(args.channels, args.outputs, args.groups, args.tokens)
    rows, sessions = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, proto in forms.items():
            onnx.checker.check_model(proto)
            path = Path(tmp) / f"{name}.onnx"
            onnx.save(proto, path)
            options = ort.SessionOptions()
            options.intra_op_num_threads = args.threads
            options.log_severity_level = 4
            options.optimized_model_filepath = str(path.with_suffix(".opt.onnx"))
            row = rows[name] = {}
            try:
                session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
                row["kernels"] = dict(collections.Counter(n.op_type for n in onnx.load(options.optimized_model_filepath).graph.node))
                y = session.run(None, {"x": x})[0]
                row["max_abs_error"] = float(np.abs(y - reference).max())
                sessions[name] = session
            except Exception as error:  # noqa: BLE001 -- ORT rejects or fails the form: the row says so
                row["status"] = f"failed: {str(error).strip().splitlines()[-1][:200]}"
        times = {name: [] for name in sessions}
        for _ in range(args.rounds):
            for name, session in sessions.items():
                start = time.perf_counter()
                session.run(None, {"x": x})
                times[name].append(time.perf_counter() - start)
    base = statistics.median(times["per-tensor"])
    print(f"C={args.channels} N={args.outputs} K={args.groups} tokens={args.tokens} threads={args.threads}")
    print("| form | ms | per-tensor time / form time | max abs error | ORT kernels |")
    print("|---|---|---|---|---|")
    for name, row in rows.items():
        if name in times:
            row["ms"] = 1e3 * statistics.median(times[name])
            row["speed_vs_per_tensor"] = base * 1e3 / row["ms"]
            print(f"| {name} | {row['ms']:.2f} | {row['speed_vs_per_tensor']:.2f} | {row['max_abs_error']:.3f} | {row['kernels']} |")
        else:
            print(f"| {name} | | | | {row['status']} |")
    if args.json:
        args.json.write_text(json.dumps({"args": vars(args) | {"json": str(args.json)}, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
