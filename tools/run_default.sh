#!/usr/bin/env bash
# README command 1: set up, then fetch the default model (SmolLM2-135M-Instruct), export it to ONNX
# with a KV cache, verify it, and evaluate it (perplexity on 40 windows, prefill, decode, size).
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
OUT="${GRAPHQ_RUNS:-runs}/smollm2-135m"
graphq export smollm2-135m -o "$OUT" --with-past --overwrite
graphq eval "$OUT/model.onnx" --windows "${WINDOWS:-40}" --json "$OUT/eval.json"
