"""Where prefill time goes: ONNX Runtime's per-op profile of one or more LM graphs.

    python tools/bench_prefill_profile.py NAME=PATH.onnx [NAME=PATH.onnx ...] [--tokens 32,512]
        [--threads 2] [--runs 5] [--top 15] [--optimized-dir DIR] [--json PATH]

Protocol:

- Runtime: ONNX Runtime CPU EP, ``--threads`` intra-op threads, 1 inter-op thread, full graph
  optimisation (graphq.verify.cpu_session's settings) plus ``SessionOptions.enable_profiling``.
- Input: batch 1, the first ``T`` tokens of WikiText-2 ``wiki.test.raw`` (tokenizer beside the first
  graph), empty KV cache (graphq.runtime.build_feeds), for every ``T`` in ``--tokens``; all outputs
  fetched (logits and ``present.*``), as graphq.evaluate does in decode.
- Per graph and ``T``: one warm-up run, then ``--runs`` profiled runs (the warm-up's events are
  dropped). Node events (``cat == "Node"``, ``name`` ending in ``_kernel_time``) are summed per op
  type (``args.op_name``) and divided by ``--runs``: milliseconds per forward pass and share of the
  summed node time. ``wall ms`` is the median ``session.run`` wall time of the profiled runs (profiling
  adds overhead: compare op shares, and use tools/bench_speed.py for speed).
- The graph ORT actually runs (after its fusions) is written with ``optimized_model_filepath`` to
  ``--optimized-dir`` (default: a temporary folder) and its op-type counts are printed.
- The graphs are profiled one after the other (not interleaved): a profile is a breakdown, not a
  speed comparison.

Prints one table per graph and ``T`` on stdout; ``--json`` writes the same numbers.
"""

from __future__ import annotations

import argparse
import collections
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

logger = logging.getLogger("bench_prefill_profile")


def op_times(trace: list[dict], runs: int, skip_runs: int) -> dict[str, float]:
    """Milliseconds per run, per op type, of the node events after the first ``skip_runs`` model runs."""
    model_runs = sorted(e["ts"] for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
    start = model_runs[skip_runs] if len(model_runs) > skip_runs else 0
    totals: dict[str, float] = collections.Counter()
    for event in trace:
        if event.get("cat") != "Node" or not str(event.get("name", "")).endswith("_kernel_time"):
            continue
        if event["ts"] < start:
            continue
        totals[event.get("args", {}).get("op_name", "?")] += event["dur"] / 1000.0
    return {op: ms / runs for op, ms in sorted(totals.items(), key=lambda kv: -kv[1])}


def profile(path: Path, tokens: list[int], ids, threads: int, runs: int, optimized: Path) -> dict:
    import numpy as np
    import onnx
    import onnxruntime as ort

    from graphq.runtime import GraphSignature, build_feeds

    result = {"path": str(path), "by_tokens": {}}
    for count in tokens:
        with tempfile.TemporaryDirectory() as tmp:
            options = ort.SessionOptions()
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            options.log_severity_level = 4
            options.enable_profiling = True
            options.profile_file_prefix = str(Path(tmp) / "profile")
            if count == tokens[0]:
                options.optimized_model_filepath = str(optimized)
                options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                                 optimized.name + ".data")
                options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes",
                                                 "1024")
            session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
            signature = GraphSignature.of(session)
            feeds = build_feeds(signature, np.asarray(ids[:count], dtype=np.int64)[None, :])
            session.run(None, feeds)
            walls = []
            for _ in range(runs):
                begin = time.perf_counter()
                session.run(None, feeds)
                walls.append((time.perf_counter() - begin) * 1000.0)
            trace = json.loads(Path(session.end_profiling()).read_text(encoding="utf-8"))
        times = op_times(trace, runs, skip_runs=1)
        result["by_tokens"][count] = {"wall_ms": statistics.median(walls), "op_ms": times}
    proto = onnx.load(str(optimized), load_external_data=False)
    result["optimized_ops"] = dict(collections.Counter(n.op_type for n in proto.graph.node).most_common())
    return result


def table(name: str, result: dict, top: int) -> str:
    lines = [f"{name}: {result['path']}", f"  ORT optimised graph ops: {result['optimized_ops']}"]
    for count, data in result["by_tokens"].items():
        total = sum(data["op_ms"].values())
        lines.append(f"  {count} tokens: wall {data['wall_ms']:.2f} ms (median), node time {total:.2f} ms")
        for op, ms in list(data["op_ms"].items())[:top]:
            lines.append(f"    {op:<36} {ms:9.3f} ms  {100 * ms / total:5.1f} %")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_prefill_profile.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("graphs", nargs="+", metavar="NAME=PATH.onnx")
    parser.add_argument("--tokens", default="32,512", help="comma list of prompt lengths (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--optimized-dir", type=Path, default=None)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    graphs = []
    for text in args.graphs:
        name, sep, path = text.partition("=")
        if not sep or not Path(path).is_file():
            print(f"bench_prefill_profile: error: {text}: expected NAME=PATH.onnx of an existing file", file=sys.stderr)
            return 2
        graphs.append((name, Path(path)))
    tokens = [int(t) for t in args.tokens.split(",")]

    from graphq.data import read_text
    from graphq.evaluate import EvalConfig, load_tokenizer

    tokenizer = load_tokenizer(graphs[0][1], None)
    ids = tokenizer(read_text(EvalConfig().text_path), add_special_tokens=False)["input_ids"][: max(tokens)]
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.optimized_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        for name, path in graphs:
            logger.info("profiling %s", name)
            results[name] = profile(path, tokens, ids, args.threads, args.runs, folder / f"{name}.optimized.onnx")
            print(table(name, results[name], args.top), flush=True)
    if args.json is not None:
        args.json.write_text(json.dumps({"threads": args.threads, "runs": args.runs, "graphs": results}, indent=2) + "\n",
                             encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
