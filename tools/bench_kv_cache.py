"""Int8 KV cache and int8 attention inputs against the float-cache graph, measured in one run.

    python tools/bench_kv_cache.py --model /tmp/smol_onnx_past/model.onnx --work-dir /tmp/wt_kvcache/bench
        [--windows 40] [--prefill 256] [--chunk 32] [--chunked float,kv-int8] [--one-pass float,attn-int8]
        [--token-windows 2] [--speed-rounds 3]
        [--generate-prompts 8] [--generate-tokens 32] [--threads 2] [--json PATH]

Protocol (every number from this one run, one ORT session per graph, ``--threads`` intra-op threads,
full graph optimisation: graphq.verify.cpu_session):

- Graphs: ``float`` = ``--model`` (a ``graphq export --with-past`` graph, never modified);
  ``kv-int8`` = ``graphq.attention_quant.quantize_attention(model, kv_cache="int8")`` (the same
  code as ``graphq quantize MODEL -o OUT --kv-cache int8``), ``attn-int8`` (``--attention int8``,
  float cache) and ``kv+attn-int8`` (both); a graph is built when a measure names it.
- Text: WikiText-2 ``wiki.test.raw`` tokenised by the model folder's tokenizer, the first
  ``--windows`` non-overlapping 512-token windows (the ``graphq eval`` windows).
- Windows are scored in order, every measure on window w before any on window w + 1 (a partial
  run compares the same windows; the JSON is rewritten after each window).
- Chunked perplexity (graphq.evaluate.chunked_window_logits) of the ``--chunked`` graphs: each window is fed as a
  prefill of its first ``--prefill`` tokens from an empty cache, then chunks of ``--chunk`` tokens
  through the cache the graph returned, so the last 512 - prefill tokens of every window attend to
  the earlier ones through the (int8 or float) cache. PPL over all 511 predicted tokens per window
  (the prefill's predictions are identical for both caches: the cache is empty there).
  ``--token-windows N``: the same with chunks of 1 token (pure decode) on the first N windows.
- One-pass perplexity (as graphq.evaluate.perplexity, the ``graphq eval`` number) of the
  ``--one-pass`` graphs: the whole window in one forward pass from an empty cache.
- Cache bytes per token: the bytes of all ``present.*`` outputs after a 512-token prefill, / 512.
- Greedy agreement (graphq.evaluate.greedy_decode): ``--generate-prompts`` prompts = the first 32
  tokens of windows 0, 1, ...; ``--generate-tokens`` greedy tokens each; reported: prompts whose
  tokens are all identical to float's, and the mean number of tokens before the first difference.
- Speed: ``--speed-rounds`` rounds; in each round every graph prefills the first window once
  (graphq.evaluate.prefill_seconds, 1 warm-up + 1 timed) and decodes 64 tokens after a 32-token
  prompt (graphq.evaluate.greedy_decode); ratio = median over rounds of (float time / graph time)
  within the round, after one 8-token decode warm-up per graph. Ratios only (the machine is shared).

Prints a table; ``--json PATH`` writes the protocol arguments and the numbers.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import numpy as np

from graphq.attention_quant import AttentionQuantConfig, quantize_attention
from graphq.data import read_text
from graphq.evaluate import (EvalConfig, chunked_perplexity, chunked_window_logits, greedy_decode, load_tokenizer,
                             prefill_seconds, token_windows, window_nll)
from graphq.runtime import GraphSignature, build_feeds
from graphq.verify import cpu_session

logger = logging.getLogger("bench_kv_cache")


def cache_bytes_per_token(session, window: np.ndarray) -> float:
    signature = GraphSignature.of(session)
    names = [n for n in signature.output_names if n.startswith("present.")]
    outputs = session.run(names, build_feeds(signature, window[None, :]))
    return sum(o.nbytes for o in outputs) / len(window)


VARIANTS = {
    "float": None,
    "kv-int8": AttentionQuantConfig(kv_cache="int8"),
    "attn-int8": AttentionQuantConfig(attention="int8"),
    "kv+attn-int8": AttentionQuantConfig(kv_cache="int8", attention="int8"),
}


def build_graphs(args, names: list[str]) -> dict[str, Path]:
    graphs = {}
    for name in names:
        if VARIANTS[name] is None:
            graphs[name] = args.model
            continue
        out = args.work_dir / name / "model.onnx"
        if not out.exists():
            quantize_attention(args.model, out, VARIANTS[name])
        graphs[name] = out
    return graphs


def _names(text: str) -> list[str]:
    names = [n for n in text.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown graph(s) {unknown}; choose from {list(VARIANTS)}")
    return names


def write_json(args, rows) -> None:
    if args.json is not None:
        protocol = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2, default=str) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True)
    parser.add_argument("--work-dir", type=Path, required=True)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--prefill", type=int, default=256)
    parser.add_argument("--chunk", type=int, default=32)
    parser.add_argument("--chunked", default="float,kv-int8", help="graphs scored by chunked perplexity")
    parser.add_argument("--one-pass", default="float,attn-int8", help="graphs scored by one-pass perplexity")
    parser.add_argument("--token-windows", type=int, default=0)
    parser.add_argument("--speed-rounds", type=int, default=3)
    parser.add_argument("--generate-prompts", type=int, default=8)
    parser.add_argument("--generate-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    chunked, one_pass = _names(args.chunked), _names(args.one_pass)

    tokenizer = load_tokenizer(args.model, None)
    ids = tokenizer(read_text(EvalConfig().text_path), add_special_tokens=False)["input_ids"]
    windows = token_windows(ids, EvalConfig(windows=args.windows))
    graphs = build_graphs(args, list(dict.fromkeys(["float", *chunked, *one_pass])))
    sessions = {name: cpu_session(path, threads=args.threads) for name, path in graphs.items()}
    rows: dict[str, dict] = {name: {"graph": str(path)} for name, path in graphs.items()}
    for name, session in sessions.items():
        rows[name]["cache_bytes_per_token"] = cache_bytes_per_token(session, windows[0])

    # Window by window, every measure on the same window, so a partial run compares equal windows.
    measures = [(name, "ppl_chunked") for name in chunked] + [(name, "ppl_one_pass") for name in one_pass]
    nll = dict.fromkeys(measures, 0.0)
    scored = windows.shape[1] - 1
    for index, window in enumerate(windows):
        for name, kind in measures:
            session = sessions[name]
            if kind == "ppl_chunked":
                logits = chunked_window_logits(session, window, args.prefill, args.chunk)
            else:
                (logits,) = session.run(["logits"], build_feeds(GraphSignature.of(session), window[None, :]))
                logits = logits[0]
            nll[(name, kind)] += window_nll(logits, window)
        for (name, kind), total in nll.items():
            rows[name][kind] = float(np.exp(total / ((index + 1) * scored)))
            rows[name]["windows_scored"] = index + 1
        logger.info("window %d/%d: %s", index + 1, len(windows),
                    ", ".join(f"{n} {k[4:]} {rows[n][k]:.4f}" for n, k in measures))
        write_json(args, rows)

    if args.token_windows:
        for name in [n for n in ("float", "kv-int8") if n in sessions]:
            rows[name]["ppl_token_by_token"] = chunked_perplexity(sessions[name], windows[: args.token_windows],
                                                                  args.prefill, 1, progress=False)
            logger.info("%s: token-by-token ppl %.4f", name, rows[name]["ppl_token_by_token"])
        write_json(args, rows)

    reference = {}
    for index in range(args.generate_prompts):
        reference[index] = greedy_decode(sessions["float"], windows[index][:32], args.generate_tokens)[0]
    for name, session in sessions.items():
        same, prefix = 0, []
        for index in range(args.generate_prompts):
            tokens = greedy_decode(session, windows[index][:32], args.generate_tokens)[0]
            same += tokens == reference[index]
            prefix.append(next((i for i, (a, b) in enumerate(zip(tokens, reference[index])) if a != b), len(tokens)))
        rows[name]["greedy_identical_prompts"] = f"{same}/{args.generate_prompts}"
        rows[name]["greedy_mean_tokens_before_difference"] = float(np.mean(prefix))
    write_json(args, rows)

    prefill_ratio = {name: [] for name in sessions}
    decode_ratio = {name: [] for name in sessions}
    for session in sessions.values():  # warm-up
        greedy_decode(session, windows[0][:32], 8)
    for _ in range(args.speed_rounds):
        times = {}
        for name, session in sessions.items():
            prefill = prefill_seconds(session, windows[0], 1)
            decode = greedy_decode(session, windows[0][:32], 65)[1]
            times[name] = (prefill, decode)
        for name in sessions:
            prefill_ratio[name].append(times["float"][0] / times[name][0])
            decode_ratio[name].append(times["float"][1] / times[name][1])
    for name in sessions:
        rows[name]["prefill_speed_vs_float"] = statistics.median(prefill_ratio[name])
        rows[name]["decode_speed_vs_float"] = statistics.median(decode_ratio[name])

    base = rows["float"]
    for name, row in rows.items():
        row["cache_vs_float32"] = row["cache_bytes_per_token"] / base["cache_bytes_per_token"]
        for kind in ("ppl_chunked", "ppl_one_pass", "ppl_token_by_token"):
            if kind in row and kind in base:
                row[f"{kind}_vs_float"] = row[kind] / base[kind]

    columns = ["ppl_chunked", "ppl_chunked_vs_float", "ppl_one_pass", "ppl_one_pass_vs_float", "ppl_token_by_token",
               "ppl_token_by_token_vs_float", "cache_bytes_per_token", "cache_vs_float32", "greedy_identical_prompts",
               "greedy_mean_tokens_before_difference", "prefill_speed_vs_float", "decode_speed_vs_float"]
    print("| graph | " + " | ".join(columns) + " |")
    print("|" + "---|" * (len(columns) + 1))
    for name, row in rows.items():
        cells = [row.get(c) for c in columns]
        print(f"| {name} | " + " | ".join("" if c is None else (f"{c:.4f}" if isinstance(c, float) else str(c)) for c in cells) + " |")
    write_json(args, rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
