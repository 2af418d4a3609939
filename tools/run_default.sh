#!/usr/bin/env bash
# README command 1: set up, then fetch the default model (SmolLM2-135M-Instruct), export it to ONNX
# with a KV cache, verify it, evaluate it (perplexity on 40 windows, prefill, decode, size), and
# compare W8A8 quantization methods on it (graphq recipes vs ONNX Runtime's own tools): one table.
# BENCH=0 stops after the float evaluation; WINDOWS=N changes the number of evaluation windows.
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
RUNS="${GRAPHQ_RUNS:-runs}"
OUT="$RUNS/smollm2-135m"
WINDOWS="${WINDOWS:-40}"
graphq export smollm2-135m -o "$OUT" --with-past --overwrite
graphq eval "$OUT/model.onnx" --windows "$WINDOWS" --json "$OUT/eval.json"
if [ "${BENCH:-1}" != "0" ]; then
  python tools/bench_quality.py --model "$OUT" --work-dir "$RUNS/bench" --windows "$WINDOWS" --json "$RUNS/bench/bench.json"
fi
