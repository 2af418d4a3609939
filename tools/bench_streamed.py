"""Peak memory and time per layer of layer-streamed quantization on Llama-shaped synthetic models.

Protocol (issue 8): for each layer count ``L`` in ``--layers`` (default 2 and 4), write a synthetic
model with ``tools/make_synthetic.py`` (7B shapes by default: d 4096, ffn 11008, vocab 32000, 32
heads, float16 weights, external data), then run each recipe in ``--recipes`` (default w4-rtn,
w4-gptq, w8a8) as its own process::

    /usr/bin/time -v python -m graphq -q quantize MODEL -o OUT --recipe RECIPE.json --overwrite

where ``RECIPE.json`` is the built-in recipe with calibration reduced to ``--windows`` windows of
``--window-tokens`` tokens of wiki.valid (the weights are random: accuracy is meaningless here, only
memory and time are measured). Models above 1 GiB of initializers are quantized streamed (one decoder
block at a time, outputs written to external data as they are final) automatically. Recorded per
run: peak RSS ("Maximum resident set size" of ``/usr/bin/time -v``: includes memory-mapped file
pages the process touched), wall time, output size; the output is deleted after each run (disk).
The output is verified inside the command (onnx.checker by path, ONNX Runtime session on the
quantized file, one 8-token forward pass with finite logits).

Time per layer is reported two ways: ``total / L`` and the marginal ``(T(L2) - T(L1)) / (L2 - L1)``
(wall time; CPU time, user + system of ``/usr/bin/time -v``, is recorded beside it because on a shared
machine it depends far less on what else runs)
between consecutive sizes; linear growth means the marginal cost stays constant and the fixed cost
(embedding, LM head, verification, start-up) is ``T(L) - L * marginal``. Timings on a shared machine
are noisy: compare only runs of the same invocation.

    nice -n 5 python tools/bench_streamed.py --layers 2 4 --workdir /tmp/bench_streamed --json out.json

With ``--load-check``, each output is also opened, before it is deleted, in a fresh process as a
whole-model ONNX Runtime CPU session (2 threads, all optimisations, default prepacking) that runs one
8-token input: the proof that the output loads in ONNX Runtime as one model, with that process's
peak RSS (``ru_maxrss``) and whether the logits are finite. (The quantize command itself verifies
outputs above 4 GiB of external data stage by stage, so its own peak stays at one block.)

``--verify-memory OUT.onnx ...`` instead measures the verification step alone on existing quantized
outputs: for each, a fresh process opens an ONNX Runtime CPU session (2 threads, all optimisations)
with and without weight prepacking and runs one 8-token input; peak RSS (``ru_maxrss``) after
the session and after the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _time_v(command: list[str], log: Path) -> dict:
    """Run ``command`` under ``/usr/bin/time -v``; peak RSS (bytes), wall seconds, exit code."""
    start = time.perf_counter()
    with open(log, "w") as handle:
        completed = subprocess.run(["/usr/bin/time", "-v", *command], check=False, stdout=handle, stderr=subprocess.STDOUT, cwd=ROOT)
    seconds = time.perf_counter() - start
    text = log.read_text(errors="replace")
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", text)
    cpu = sum(float(m) for m in re.findall(r"(?:User|System) time \(seconds\): ([\d.]+)", text))
    return {"rc": completed.returncode, "seconds": round(seconds, 1), "cpu_seconds": round(cpu, 1),
            "peak_rss_bytes": int(match.group(1)) * 1024 if match else None}


def _recipe_file(name: str, windows: int, tokens: int, folder: Path) -> Path:
    sys.path.insert(0, str(ROOT))
    from graphq.config import RECIPES, recipe_to_dict

    recipe = RECIPES[name]
    recipe = dataclasses.replace(recipe, calibration=dataclasses.replace(recipe.calibration, windows=windows,
                                                                          window_tokens=tokens))
    path = folder / f"{name}.json"
    path.write_text(json.dumps(recipe_to_dict(recipe), indent=1))
    return path


_VERIFY_PROBE = """
import resource, sys, numpy as np, onnxruntime as ort
from graphq.runtime import GraphSignature, build_feeds
options = ort.SessionOptions(); options.intra_op_num_threads = 2; options.log_severity_level = 4
if sys.argv[2] == "off":
    options.add_session_config_entry("session.disable_prepacking", "1")
session = ort.InferenceSession(sys.argv[1], options, providers=["CPUExecutionProvider"])
opened = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
out = session.run(None, build_feeds(GraphSignature.of(session), np.arange(8)[None]))
ran = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(opened * 1024, ran * 1024, bool(np.isfinite(out[0]).all()))
"""


def verify_memory(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        size = sum(p.stat().st_size for p in path.parent.glob(path.name + "*"))
        for prepack in ("on", "off"):
            done = subprocess.run([sys.executable, "-c", _VERIFY_PROBE, str(path), prepack], check=True, cwd=ROOT,
                                  capture_output=True, text=True)
            opened, ran, finite = done.stdout.split()
            rows.append({"model": str(path), "model_bytes": size, "prepack": prepack, "session_peak_rss_bytes": int(opened),
                         "run_peak_rss_bytes": int(ran), "finite": finite == "True"})
            print(f"{path}  {size / 1e9:.2f} GB  prepack {prepack:3}  session {int(opened) / 1e9:.2f} GB  "
                  f"after run {int(ran) / 1e9:.2f} GB  ratio {int(ran) / size:.2f}  finite {finite}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[2, 4])
    parser.add_argument("--recipes", nargs="+", default=["w4-rtn", "w4-gptq", "w8a8"])
    parser.add_argument("--dtype", default="float16")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--intermediate", type=int, default=11008)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--windows", type=int, default=2)
    parser.add_argument("--window-tokens", type=int, default=64)
    parser.add_argument("--workdir", type=Path)
    parser.add_argument("--keep-models", action="store_true", help="do not delete the synthetic models")
    parser.add_argument("--reuse-models", action="store_true", help="use a model already in the workdir")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--verify-memory", type=Path, nargs="+", help="only measure verification of these outputs")
    parser.add_argument("--load-check", action="store_true",
                        help="open each output as one ORT session in a fresh process before deleting it")
    args = parser.parse_args(argv)
    if args.verify_memory:
        rows = verify_memory(args.verify_memory)
        if args.json:
            args.json.write_text(json.dumps({"verify_memory": rows}, indent=1))
        return 0
    if args.workdir is None:
        parser.error("--workdir is required (unless --verify-memory)")
    args.workdir.mkdir(parents=True, exist_ok=True)
    rows = []
    for layers in args.layers:
        model_dir = args.workdir / f"synthetic-{layers}"
        gen = None
        if not (args.reuse_models and (model_dir / "model.onnx").is_file()):
            gen = _time_v([sys.executable, "tools/make_synthetic.py", "-o", str(model_dir), "--layers", str(layers),
                           "--dtype", args.dtype, "--hidden", str(args.hidden), "--intermediate", str(args.intermediate),
                           "--vocab", str(args.vocab), "--heads", str(args.heads), "--kv-heads", str(args.heads)],
                          args.workdir / f"make-{layers}.log")
            if gen["rc"]:
                print(f"make_synthetic failed for {layers} layers: see {args.workdir / f'make-{layers}.log'}")
                return 1
        model_bytes = sum(p.stat().st_size for p in model_dir.glob("model.onnx*"))
        for name in args.recipes:
            recipe = _recipe_file(name, args.windows, args.window_tokens, args.workdir)
            out = args.workdir / f"out-{layers}-{name}"
            run = _time_v([sys.executable, "-m", "graphq", "-q", "quantize", str(model_dir / "model.onnx"), "-o",
                           str(out / "model.onnx"), "--recipe", str(recipe), "--overwrite"],
                          args.workdir / f"quantize-{layers}-{name}.log")
            out_bytes = sum(p.stat().st_size for p in out.glob("model.onnx*")) if out.is_dir() else 0
            rows.append({"layers": layers, "recipe": name, "model_bytes": model_bytes, "output_bytes": out_bytes,
                         "make_seconds": gen["seconds"] if gen else None, **run})
            if args.load_check and run["rc"] == 0:
                start = time.perf_counter()
                done = subprocess.run([sys.executable, "-c", _VERIFY_PROBE, str(out / "model.onnx"), "on"], cwd=ROOT,
                                      capture_output=True, text=True, check=False)
                fields = done.stdout.split()
                rows[-1]["ort_load"] = ({"session_peak_rss_bytes": int(fields[0]), "run_peak_rss_bytes": int(fields[1]),
                                         "finite": fields[2] == "True", "seconds": round(time.perf_counter() - start, 1)}
                                        if done.returncode == 0 and len(fields) == 3 else
                                        {"error": (done.stderr.strip().splitlines() or [f"rc {done.returncode}"])[-1]})
            print(json.dumps(rows[-1]), flush=True)
            shutil.rmtree(out, ignore_errors=True)
        if not args.keep_models:
            shutil.rmtree(model_dir, ignore_errors=True)
    for row in rows:
        row["seconds_per_layer"] = round(row["seconds"] / row["layers"], 1)
        smaller = [r for r in rows if r["recipe"] == row["recipe"] and r["layers"] < row["layers"] and r["rc"] == 0]
        if smaller and row["rc"] == 0:
            base = max(smaller, key=lambda r: r["layers"])
            for key in ("seconds", "cpu_seconds"):
                row[f"marginal_{key}_per_layer"] = round((row[key] - base[key]) / (row["layers"] - base["layers"]), 1)
    print(f"\n{'recipe':10} {'layers':>6} {'model GB':>9} {'out GB':>7} {'peak RSS GB':>12} {'seconds':>8} "
          f"{'s/layer':>8} {'marginal s/layer':>17} {'CPU s':>8} {'marginal CPU s/layer':>21} rc")
    for row in rows:
        rss = row["peak_rss_bytes"] / 1e9 if row["peak_rss_bytes"] else float("nan")
        print(f"{row['recipe']:10} {row['layers']:>6} {row['model_bytes'] / 1e9:>9.2f} {row['output_bytes'] / 1e9:>7.2f} "
              f"{rss:>12.2f} {row['seconds']:>8.1f} {row['seconds_per_layer']:>8.1f} "
              f"{row.get('marginal_seconds_per_layer', ''):>17} {row['cpu_seconds']:>8.1f} "
              f"{row.get('marginal_cpu_seconds_per_layer', ''):>21} {row['rc']}")
        if "ort_load" in row:
            print(f"{'':10} ORT whole-model load: {row['ort_load']}")
    if args.json:
        args.json.write_text(json.dumps({"protocol": {k: str(v) for k, v in vars(args).items()}, "rows": rows}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
