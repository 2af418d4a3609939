"""Outlier handling on static W8A8 without SmoothQuant: PEG groups and k-sigma clipping, one run, one table.

    python tools/bench_outliers.py --model /tmp/smol_onnx/model.onnx --work-dir /tmp/bench-outliers \\
        [--rows baseline,peg-k8,...] [--windows 40] [--calib-windows 32] [--threads 2] [--speed-rounds 5]
        [--speed-rows baseline,peg-k8] [--json PATH]

Protocol (every number in the table comes from this one run):

- Model: a float ONNX LM (``--model``, tokenizer beside it); never modified.
- Baseline (row ``baseline``): recipe ``w8a8-static`` with SmoothQuant off, i.e. int8 symmetric
  per-output-channel weights, static per-tensor int8 activations with min-max ranges, LM head float
  (as every graphq W8A8 recipe). Every other row changes exactly one thing of the baseline:
  ``peg-kK`` (recipe ``w8a8-peg`` with K groups, range-based permutation), ``peg-kK-noperm``
  (contiguous groups), ``peg-kK-floatout`` (the group with the largest range of each activation kept
  float: mixed precision, not pure W8A8), ``act-ks-K`` / ``act-ks-search`` (activation range ``k_sigma`` with k = K /
  ``k_sigma_search``), ``w-ks-K`` / ``w-ks-search`` (weights clipped per column at k-sigma /
  searched k per tensor), ``peg-k8-w-ks-search`` (both).
- Calibration: ONE pass of graphq.calibrate.collect_statistics over the first ``--calib-windows``
  windows of 512 tokens of ``wiki.valid.tokens`` on the float model, for every planned MatMul input;
  every row is quantized from these same statistics (graphq.quantize.quantize_model(statistics=...),
  exactly what the recipe would compute itself, since no row smooths; ``--stats-cache`` keeps them
  for the next run of the same model and window count). Rows whose activation range
  is not min-max under PEG calibrate their group tensors again (the recipe's own behaviour).
- Perplexity: graphq.evaluate (WikiText-2 ``wiki.test.raw``, first ``--windows`` 512-token windows).
- Kernels: op counts of ONNX Runtime's optimised graph (graphq.quantize.ort_kernel_counts) for the
  integer MatMuls and the PEG plumbing (Gather, Split, Sum).
- Speed: prefill of the first test window (graphq.evaluate.prefill_seconds, one warm-up + one timed
  run per round), the ``--speed-rows`` and float timed in turn in each of ``--speed-rounds`` rounds
  (order rotated every round); median seconds; ratios to the baseline from the same rounds.
  ``--time NAME=PATH`` (repeatable) times already-quantized graphs the same way and does nothing else
  (ratios to the first one named).

Prints a table on stdout; ``--json`` writes the protocol and the rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import pickle
import statistics
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_outliers")

KERNEL_OPS = ("MatMulIntegerToFloat", "MatMulInteger", "QLinearMatMul", "DynamicQuantizeMatMul", "MatMul",
              "Gather", "Split", "Sum")
DEFAULT_ROWS = ("float,baseline,peg-k4,peg-k8,peg-k16,peg-k4-noperm,peg-k8-noperm,peg-k16-noperm,"
                "act-ks-3,act-ks-5,act-ks-10,act-ks-search,w-ks-3,w-ks-5,w-ks-10,w-ks-search")


def baseline_recipe():
    from graphq.config import RECIPES

    return dataclasses.replace(RECIPES["w8a8-static"], name="w8a8-static-nosmooth", smoothquant=None)


def row_recipe(name: str, base):
    """The recipe of one row name (module docstring), or None for float."""
    from graphq.numerics.calibration import RangeEstimator
    from graphq.numerics.clipping import WeightClip
    from graphq.passes.peg import PegConfig

    if name == "float":
        return None
    if name == "baseline":
        return base
    parts = name.split("-")
    recipe = base
    rest = parts
    if parts[0] == "peg":
        groups = int(parts[1].removeprefix("k"))
        permute = "noperm" not in parts
        float_outlier = "floatout" in parts
        recipe = dataclasses.replace(recipe, peg=PegConfig(groups=groups, permute=permute, float_outlier_group=float_outlier))
        rest = [p for p in parts[2:] if p not in ("noperm", "floatout")]
    if rest[:2] == ["act", "ks"]:
        k = rest[2]
        estimator = RangeEstimator(method="k_sigma_search") if k == "search" else RangeEstimator(method="k_sigma", k=float(k))
        recipe = dataclasses.replace(recipe, activation_range=estimator)
    elif rest[:2] == ["w", "ks"]:
        k = rest[2]
        clip = WeightClip(method="k_sigma_search") if k == "search" else WeightClip(method="k_sigma", k=float(k))
        recipe = dataclasses.replace(recipe, weight_clip=clip)
    elif rest:
        raise SystemExit(f"bench_outliers: unknown row '{name}'")
    return dataclasses.replace(recipe, name=name)


def calibrate_once(model_path: Path, base, progress: bool):
    from graphq.calibrate import calibration_windows, collect_statistics
    from graphq.evaluate import load_tokenizer
    from graphq.modelio import load_model
    from graphq.quantize import _activation_inputs, build_plan

    graph = load_model(model_path)
    plan = build_plan(graph, base)
    names = _activation_inputs(graph, plan)
    windows = calibration_windows(load_tokenizer(model_path, None), base.calibration)
    start = time.perf_counter()
    stats = collect_statistics(model_path, names, windows, threads=base.calibration.threads,
                               histogram_bins=base.calibration.histogram_bins, progress=progress)
    logger.info("calibrated %d tensors in %.0fs", len(names), time.perf_counter() - start)
    return stats


def speed(paths: dict[str, Path], threads: int, rounds: int) -> dict[str, float]:
    from graphq.data import WIKITEXT_TEST, read_text
    from graphq.evaluate import (
        EvalConfig,
        load_tokenizer,
        prefill_seconds,
        token_windows,
    )
    from graphq.verify import cpu_session

    first = next(iter(paths.values()))
    ids = load_tokenizer(first, None)(read_text(WIKITEXT_TEST), add_special_tokens=False)["input_ids"]
    window = token_windows(ids, EvalConfig(windows=1))[0]
    sessions = {name: cpu_session(path, threads=threads) for name, path in paths.items()}
    times = {name: [] for name in paths}
    names = list(paths)
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            times[name].append(prefill_seconds(sessions[name], window, 1))
    return {name: statistics.median(t) for name, t in times.items()}


def time_only(args) -> int:
    """``--time``: prefill rounds over already-quantized graphs, a table, nothing else."""
    from graphq.quantize import ort_kernel_counts

    paths = dict(item.split("=", 1) for item in args.time)
    seconds = speed({name: Path(path) for name, path in paths.items()}, args.threads, args.speed_rounds)
    first = next(iter(seconds))
    print(f"| graph | prefill s (median of {args.speed_rounds}) | {first} time / graph time | ORT kernels (integer MatMuls, PEG plumbing) |")
    print("|---|---|---|---|")
    rows = []
    for name, value in seconds.items():
        counts = ort_kernel_counts(Path(paths[name]))
        kernels = {op: counts[op] for op in KERNEL_OPS if op in counts}
        rows.append({"row": name, "path": paths[name], "prefill_seconds": value, "ratio": seconds[first] / value,
                     "kernels": kernels})
        print(f"| {name} | {value:.3f} | {seconds[first] / value:.2f} | {kernels} |")
    if args.json:
        args.json.write_text(json.dumps({"protocol": {"threads": args.threads, "speed_rounds": args.speed_rounds},
                                         "rows": rows}, indent=2) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path)
    parser.add_argument("--work-dir", type=Path)
    parser.add_argument("--rows", default=DEFAULT_ROWS)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--calib-windows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--speed-rows", default="")
    parser.add_argument("--speed-rounds", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--time", action="append", default=[], metavar="NAME=PATH",
                        help="speed only: time these already-quantized graphs (prefill rounds as above), nothing else")
    parser.add_argument("--stats-cache", type=Path,
                        help="pickle of the calibration statistics: read if present (same model and --calib-windows), else written")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    if not args.time and (args.model is None or args.work_dir is None):
        parser.error("--model and --work-dir are required (unless --time)")

    if args.time:
        return time_only(args)
    from graphq.config import recipe_to_dict
    from graphq.evaluate import EvalConfig, evaluate_model, model_file_bytes
    from graphq.quantize import ort_kernel_counts, quantize_model

    base = baseline_recipe()
    base = dataclasses.replace(base, calibration=dataclasses.replace(base.calibration, windows=args.calib_windows,
                                                                   threads=args.threads))
    row_names = [r for r in args.rows.split(",") if r]
    recipes = {name: row_recipe(name, base) for name in row_names}
    for name in args.speed_rows.split(","):
        if name and name not in recipes:
            raise SystemExit(f"bench_outliers: speed row '{name}' is not among --rows")
    stats = None
    if args.stats_cache is not None and args.stats_cache.is_file():
        cached = pickle.loads(args.stats_cache.read_bytes())
        if cached["model"] != str(args.model.resolve()) or cached["calib_windows"] != args.calib_windows:
            raise SystemExit(f"bench_outliers: {args.stats_cache} holds statistics of another model or window count")
        stats = cached["stats"]
        logger.info("calibration statistics from %s", args.stats_cache)
    elif any(recipes.values()):
        stats = calibrate_once(args.model, base, progress=False)
        if args.stats_cache is not None:
            args.stats_cache.write_bytes(pickle.dumps({"model": str(args.model.resolve()),
                                                       "calib_windows": args.calib_windows, "stats": stats}))
    eval_config = EvalConfig(windows=args.windows, threads=args.threads, measure_speed=False)
    rows, paths = [], {}
    for name, recipe in recipes.items():
        row = {"row": name}
        try:
            if recipe is None:
                path = args.model
            else:
                path = args.work_dir / name / "model.onnx"
                result = quantize_model(args.model, path, recipe, overwrite=True, progress=False, statistics=stats)
                row["recipe"] = recipe_to_dict(recipe)
                row["quantize_seconds"] = round(result.seconds, 1)
                if result.weight_clip_k:
                    row["weight_clip_k"] = dict(sorted(
                        {str(k): list(result.weight_clip_k.values()).count(k) for k in set(result.weight_clip_k.values())}.items()))
                counts = ort_kernel_counts(path)
                row["kernels"] = {op: counts[op] for op in KERNEL_OPS if op in counts}
            paths[name] = path
            start = time.perf_counter()
            row["perplexity"] = evaluate_model(path, eval_config, progress=False).perplexity
            row["eval_seconds"] = round(time.perf_counter() - start, 1)
            row["mb"] = round(model_file_bytes(path) / 1e6, 1)
        except Exception as error:  # one failed row must not lose the others
            logger.exception("row %s failed", name)
            row["status"] = f"failed: {str(error).splitlines()[0] if str(error) else type(error).__name__}"
        logger.info("row %s: %s", name, {k: v for k, v in row.items() if k != "recipe"})
        rows.append(row)
    float_ppl = next((r.get("perplexity") for r in rows if r["row"] == "float"), None)
    speed_rows = [r for r in args.speed_rows.split(",") if r and r in paths]
    seconds = speed({name: paths[name] for name in speed_rows}, args.threads, args.speed_rounds) if speed_rows else {}
    for row in rows:
        if float_ppl and row.get("perplexity"):
            row["x_float"] = row["perplexity"] / float_ppl
        if row["row"] in seconds:
            row["prefill_seconds"] = seconds[row["row"]]
            if "baseline" in seconds:
                row["prefill_vs_baseline"] = seconds["baseline"] / seconds[row["row"]]  # > 1: faster than the baseline
    print(f"| row | ppl ({args.windows} windows) | x float | prefill s | speed vs baseline | MB | integer kernels / plumbing | weight k |")
    print("|---|---|---|---|---|---|---|---|")
    def fmt(row, key, spec):
        return format(row[key], spec) if row.get(key) is not None else ""

    for row in rows:
        kernels = ", ".join(f"{k} {v}" for k, v in row.get("kernels", {}).items())
        print(f"| {row['row']} | {fmt(row, 'perplexity', '.4f')} | {fmt(row, 'x_float', '.3f')} | "
              f"{fmt(row, 'prefill_seconds', '.3f')} | {fmt(row, 'prefill_vs_baseline', '.2f')} | {fmt(row, 'mb', '.1f')} | {kernels} | {row.get('weight_clip_k', '')} "
              f"{row.get('status', '')} |")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        protocol = {"model": str(args.model), "windows": args.windows, "calib_windows": args.calib_windows,
                    "threads": args.threads, "speed_rounds": args.speed_rounds, "speed_rows": speed_rows}
        args.json.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
