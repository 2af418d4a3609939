"""Cube-root (companded, non-uniform) quantization against its uniform counterparts at equal bits.

    python tools/bench_cuberoot.py [--model /tmp/smol_onnx_past] [--variants w4-rtn,w4-cuberoot,...]
        [--windows 40] [--ppl-variants ...] [--no-speed] [--repeats 3] [--threads 2]
        [--work-dir /tmp/wt_cuberoot/bench] [--json PATH]

Protocol (every number of one invocation comes from this run):

- Float model: ``--model DIR``, a ``graphq export --with-past`` folder (SmolLM2-135M-Instruct by
  default); never modified. Each variant is quantized from it with graphq's API into
  ``<work-dir>/<variant>/model.onnx`` (reused when already there: delete the folder to rebuild):

  ``w4-rtn``            uniform int4 g128 symmetric RTN (MatMulNBits), tied LM head + embedding shared 8-bit
  ``w4-cuberoot``       cube-root int4 g128 (codebook form), the same 8-bit shared head + embedding
  ``w4-cuberoot-dq``    the same codes in the dq-cube form (DequantizeLinear + Pow 3)
  ``w4-rtn-fhead``      ``w4-rtn`` with the LM head and the embedding float (like with like, no 8-bit table)
  ``w4-cuberoot-fhead`` ``w4-cuberoot`` with the LM head and the embedding float
  ``w8a8``              the default W8A8 (SmoothQuant a=0.5, per-token dynamic int8, float head;
                        32 calibration windows of wiki.valid.tokens)
  ``w8a8-cuberoot``     the same with cube-root weights (per channel) and activations (per token)

- Perplexity (``--ppl-variants``, default every variant but ``w4-cuberoot-dq``, whose weights differ
  from the codebook form by float32 rounding only): graphq.evaluate.perplexity over the first
  ``--windows`` 512-token windows of WikiText-2 ``wiki.test.raw`` (the ``graphq eval`` protocol),
  ONNX Runtime CPU EP, ``--threads`` threads, full optimisation. The float model is scored only
  with ``--ppl-float`` (its 40-window value, 28.7387, is in the README).
- Speed (unless ``--no-speed``): tools/bench_speed.py's harness on the float model plus every
  variant, ``--repeats`` interleaved rounds, no perplexity: decode tokens/s (32-token prompt, 128
  greedy tokens, KV cache, batch 1) and prefill tokens/s (one 512-token window), as the median over
  rounds of the ratio to float in the same round; the ratio to the uniform counterpart
  (w4-cuberoot* vs w4-rtn, w8a8-cuberoot vs w8a8) is the quotient of those medians.
- Size: the .onnx file plus external data; graphq's size bound (``bits_per_quantized_weight``).

- Probe (``--probe V1,V2``): a light speed check, one session at a time (bench_speed keeps every
  session open, which the shared machine's memory could not hold with the dq-cube graph): per
  variant and float, in order, one 8-token greedy decode (32-token prompt) after a 2-token warm-up
  and one 512-token prefill after a warm-up; tokens/s and the ratio to float of the same pass.
  Sequential, not interleaved: rougher than the harness, for forms too slow for 128-token decodes.
- Weight error (``--weight-error``, numpy only, no ONNX Runtime): for random ``[576, 576]`` weights
  (Gaussian, Laplace, Student-t with 3 degrees of freedom; seed 0) and for every MatMul weight of
  ``--model`` (the LM head / tied embedding included), int4 g128 symmetric uniform RTN (sign trick)
  vs cube-root g128: the relative squared error ``||W - W_hat||^2 / ||W||^2``, the same restricted
  to small weights (``|w| < 0.5 std`` of the matrix), and the relative output error
  ``||X (W - W_hat)|| / ||X W||`` for Gaussian inputs ``X [256, K]`` (seed 0); the excess kurtosis
  of the weights says how heavy their tails are. Real-model rows are sums over all matrices.

Prints a table; ``--json`` writes the protocol and the numbers.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_cuberoot")
TOOLS = Path(__file__).resolve().parent
VARIANTS = ("w4-rtn", "w4-cuberoot", "w4-cuberoot-dq", "w4-rtn-fhead", "w4-cuberoot-fhead", "w8a8", "w8a8-cuberoot")
FLOAT_PPL_40 = 28.7387
UNIFORM_OF = {"w4-cuberoot": "w4-rtn", "w4-cuberoot-dq": "w4-rtn", "w4-cuberoot-fhead": "w4-rtn-fhead",
              "w8a8-cuberoot": "w8a8"}


def recipe_of(variant: str):
    from graphq.config import LM_HEAD_NODES, RECIPES

    if variant == "w4-cuberoot-dq":
        base = RECIPES["w4-cuberoot"]
        return dataclasses.replace(base, name=variant, emit=dataclasses.replace(base.emit, format="dq-cube"))
    if variant.endswith("-fhead"):
        base = RECIPES[variant.removesuffix("-fhead")]
        return dataclasses.replace(base, name=variant, embedding="float", float_nodes=LM_HEAD_NODES)
    return RECIPES[variant]


def build(variant: str, model: Path, work_dir: Path) -> tuple[Path, dict]:
    """The variant's graph (built unless already there) and what graphq reported."""
    from graphq.config import W8A8Recipe
    from graphq.quantize import quantize_model
    from graphq.weight_only import quantize_weights

    out = work_dir / variant / "model.onnx"
    report = out.with_suffix(".graphq.json")
    if out.is_file() and report.is_file():
        logger.info("%s: reusing %s", variant, out)
        return out, json.loads(report.read_text())
    recipe = recipe_of(variant)
    run = quantize_model if isinstance(recipe, W8A8Recipe) else quantize_weights
    start = time.perf_counter()
    result = run(model, out, recipe, overwrite=True, progress=False)
    data = {**result.to_json(), "build_seconds": round(time.perf_counter() - start, 1)}
    report.write_text(json.dumps(data, indent=2) + "\n")
    return out, data


def load_bench_speed():
    spec = importlib.util.spec_from_file_location("bench_speed", TOOLS / "bench_speed.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_speed"] = module
    spec.loader.exec_module(module)
    return module


def perplexities(names: list[str], paths: dict[str, Path], model_dir: Path, windows: int, threads: int) -> dict[str, float]:
    from graphq.verify import cpu_session

    bench_speed = load_bench_speed()
    tokens = bench_speed.wikitext_windows(bench_speed.SpeedConfig(model_dir=model_dir), windows)
    from graphq.evaluate import perplexity

    scores = {}
    for name in names:
        start = time.perf_counter()
        scores[name] = perplexity(cpu_session(paths[name], threads=threads), tokens, progress=False)
        logger.info("%s: perplexity %.4f on %d windows (%.0f s)", name, scores[name], windows, time.perf_counter() - start)
    return scores


def speeds(names: list[str], paths: dict[str, Path], model_dir: Path, repeats: int, threads: int, work_dir: Path) -> dict:
    bench_speed = load_bench_speed()
    config = bench_speed.SpeedConfig(model_dir=model_dir, peers=("float",), graphq_models=tuple((n, paths[n]) for n in names),
                                     threads=threads, repeats=repeats, perplexity=False, work_dir=work_dir / "speed")
    rows = bench_speed.run(config)
    return {row.peer: row for row in rows}


def weight_errors(model: Path) -> list[dict]:
    """Uniform vs cube-root int4 g128 reconstruction and output errors (module docstring)."""
    import numpy as np
    from graphq.passes.qdq_insert import constant_weight, quantizable_matmuls

    from graphq.modelio import load_model
    from graphq.numerics.companding import quantize_cuberoot
    from graphq.numerics.weight_only import WeightQuantConfig, quantize_rtn

    config = WeightQuantConfig(bits=4, group_size=128, symmetric=True, scale_dtype="float32")
    rng = np.random.default_rng(0)
    sources = {"gaussian": [rng.standard_normal((576, 576))], "laplace": [rng.laplace(size=(576, 576))],
               "student-t3": [rng.standard_t(3, size=(576, 576))]}
    graph = load_model(model)
    sources[f"{model.parent.name} (all {len(quantizable_matmuls(graph))} MatMul weights)"] = \
        [constant_weight(node) for node in quantizable_matmuls(graph)]
    rows = []
    for name, weights in sources.items():
        sums = dict.fromkeys(("w2", "uni", "cube", "small_w2", "small_uni", "small_cube", "y2", "y_uni", "y_cube"), 0.0)
        kurtosis = []
        for w in weights:
            uni = quantize_rtn(w, config, pad=True).dequantize() - w
            cube = quantize_cuberoot(w, config, pad=True).dequantize() - w
            small = np.abs(w) < 0.5 * w.std()
            x = rng.standard_normal((256, w.shape[0]))
            y = x @ w
            sums["w2"] += np.sum(w**2); sums["uni"] += np.sum(uni**2); sums["cube"] += np.sum(cube**2)
            sums["small_w2"] += np.sum(w[small] ** 2); sums["small_uni"] += np.sum(uni[small] ** 2)
            sums["small_cube"] += np.sum(cube[small] ** 2)
            sums["y2"] += np.sum(y**2); sums["y_uni"] += np.sum((x @ uni) ** 2); sums["y_cube"] += np.sum((x @ cube) ** 2)
            centred = w - w.mean()
            kurtosis.append(float(np.mean(centred**4) / np.mean(centred**2) ** 2 - 3))
        sums = {key: float(value) for key, value in sums.items()}
        rows.append({"weights": name, "excess_kurtosis_median": float(np.median(kurtosis)),
                     "rel_sq_error_uniform": sums["uni"] / sums["w2"], "rel_sq_error_cuberoot": sums["cube"] / sums["w2"],
                     "small_rel_sq_error_uniform": sums["small_uni"] / sums["small_w2"],
                     "small_rel_sq_error_cuberoot": sums["small_cube"] / sums["small_w2"],
                     "rel_output_error_uniform": float(np.sqrt(sums["y_uni"] / sums["y2"])),
                     "rel_output_error_cuberoot": float(np.sqrt(sums["y_cube"] / sums["y2"]))})
        logger.info("weight error: %s done", name)
    return rows


def print_weight_errors(rows: list[dict]) -> None:
    print("| weights (int4 g128 sym) | excess kurtosis | rel. sq. error uniform | cube-root | small |w| uniform | small cube-root "
          "| output error uniform | cube-root |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['weights']} | {r['excess_kurtosis_median']:.2f} | {r['rel_sq_error_uniform']:.5f} | {r['rel_sq_error_cuberoot']:.5f} | "
              f"{r['small_rel_sq_error_uniform']:.4f} | {r['small_rel_sq_error_cuberoot']:.4f} | "
              f"{r['rel_output_error_uniform']:.4f} | {r['rel_output_error_cuberoot']:.4f} |")


def probe(names: list[str], paths: dict[str, Path], model_dir: Path, threads: int) -> dict[str, dict]:
    """Decode (8 tokens) and prefill (512 tokens) rates, one session at a time (module docstring)."""
    import gc

    from graphq.evaluate import greedy_decode, prefill_seconds
    from graphq.verify import cpu_session

    bench_speed = load_bench_speed()
    window = bench_speed.wikitext_windows(bench_speed.SpeedConfig(model_dir=model_dir), 1)[0]
    prompt = window[:32]
    rates = {}
    for name in ["float", *names]:
        session = cpu_session(paths[name], threads=threads)
        greedy_decode(session, prompt, 2)
        _, seconds = greedy_decode(session, prompt, 8)
        prefill = prefill_seconds(session, window, 1)
        rates[name] = {"decode_tokens_per_s": 8 / seconds, "prefill_tokens_per_s": len(window) / prefill}
        logger.info("probe %s: %s", name, rates[name])
        del session
        gc.collect()
    for name in names:
        rates[name]["decode_x_float"] = rates[name]["decode_tokens_per_s"] / rates["float"]["decode_tokens_per_s"]
        rates[name]["prefill_x_float"] = rates[name]["prefill_tokens_per_s"] / rates["float"]["prefill_tokens_per_s"]
    return rates


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench_cuberoot.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=Path("/tmp/smol_onnx_past"), help="float with-past export folder")
    parser.add_argument("--variants", default="w4-rtn,w4-cuberoot,w4-cuberoot-dq,w8a8,w8a8-cuberoot")
    parser.add_argument("--ppl-variants", default=None, help="comma list (default: every variant but w4-cuberoot-dq)")
    parser.add_argument("--ppl-float", action="store_true", help="also score the float model")
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--no-speed", action="store_true")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work-dir", type=Path, default=Path("/tmp/wt_cuberoot/bench"))
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--probe", default=None, help="comma list of variants: the light sequential speed probe only")
    parser.add_argument("--weight-error", action="store_true", help="only the numpy weight-error table (no graphs built)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "onnx_ir", "onnxscript", "graphq.calibrate"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if args.weight_error:
        rows = weight_errors(args.model / "model.onnx")
        print_weight_errors(rows)
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"protocol": {"model": str(args.model), "weight_error": True}, "rows": rows}, indent=2) + "\n")
        return 0
    if args.probe:
        names = [v.strip() for v in args.probe.split(",") if v.strip()]
        paths = {"float": args.model / "model.onnx"}
        for name in names:
            paths[name], _ = build(name, paths["float"], args.work_dir)
        rates = probe(names, paths, args.model, args.threads)
        print("| variant | decode tok/s (8) | prefill tok/s | decode x float | prefill x float |")
        print("|---|---|---|---|---|")
        for name, r in rates.items():
            print(f"| {name} | {r['decode_tokens_per_s']:.2f} | {r['prefill_tokens_per_s']:.1f} | "
                  f"{r.get('decode_x_float', 1.0):.3f} | {r.get('prefill_x_float', 1.0):.3f} |")
        if args.json is not None:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps({"protocol": {"model": str(args.model), "probe": names, "threads": args.threads},
                                             "rates": rates}, indent=2) + "\n")
        return 0
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant {unknown[0]} (one of {', '.join(VARIANTS)})")
    ppl_names = [v for v in variants if v != "w4-cuberoot-dq"] if args.ppl_variants is None else \
        [v.strip() for v in args.ppl_variants.split(",") if v.strip()]
    model = args.model / "model.onnx"
    paths, reports = {"float": model}, {}
    for variant in variants:
        paths[variant], reports[variant] = build(variant, model, args.work_dir)
    ppl = perplexities((["float"] if args.ppl_float else []) + ppl_names, paths, args.model, args.windows, args.threads)
    speed = {} if args.no_speed else speeds(variants, paths, args.model, args.repeats, args.threads, args.work_dir)
    from graphq.evaluate import model_file_bytes

    # float's 40-window perplexity from the README (graphq eval, same function and windows) unless scored here
    float_ppl = ppl.get("float") or (FLOAT_PPL_40 if args.windows == 40 else None)
    rows = []
    for name in ["float", *variants]:
        row = speed.get(name)
        uniform = speed.get(UNIFORM_OF.get(name, ""))
        size = reports.get(name, {}).get("size_breakdown", {})
        rows.append({
            "variant": name, "perplexity": ppl.get(name), "windows": args.windows if name in ppl else None,
            "ppl_over_float": None if name not in ppl else ppl[name] / float_ppl if float_ppl else None,
            "file_mb": round(model_file_bytes(paths[name]) / 1e6, 1),
            "bits_per_quantized_weight": size.get("bits_per_quantized_weight"),
            "decode_x_float": row.decode_ratio if row else None, "prefill_x_float": row.prefill_ratio if row else None,
            "decode_x_uniform": (row.decode_ratio / uniform.decode_ratio) if row and uniform and row.decode_ratio and uniform.decode_ratio else None,
            "prefill_x_uniform": (row.prefill_ratio / uniform.prefill_ratio) if row and uniform and row.prefill_ratio and uniform.prefill_ratio else None,
            "decode_tokens_per_s": row.decode_tokens_per_s if row else None, "greedy_match": row.greedy_match if row else None,
            "kernels": row.kernels if row else None, "build_seconds": reports.get(name, {}).get("build_seconds"),
            "status": row.status if row else None,
        })

    def fmt(value, spec):
        return "n/a" if value is None else format(value, spec)

    print("| variant | ppl | x float | size MB | bits/weight | decode x float | prefill x float | decode x uniform | prefill x uniform |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['variant']} | {fmt(r['perplexity'], '.4f')} | {fmt(r['ppl_over_float'], '.3f')} | {r['file_mb']} | "
              f"{fmt(r['bits_per_quantized_weight'], '.3f')} | {fmt(r['decode_x_float'], '.2f')} | {fmt(r['prefill_x_float'], '.2f')} | "
              f"{fmt(r['decode_x_uniform'], '.2f')} | {fmt(r['prefill_x_uniform'], '.2f')} |")
    if args.json is not None:
        import onnxruntime

        protocol = {"model": str(model), "windows": args.windows, "repeats": args.repeats, "threads": args.threads,
                    "onnxruntime": onnxruntime.__version__, "argv": sys.argv[1:] if argv is None else argv}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
