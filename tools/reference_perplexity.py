"""Independent perplexity check of an exported ONNX model (and optionally its PyTorch source).

Shares no code with ``graphq.evaluate``: the text is read directly, the ONNX model runs through
optimum's ``ORTModelForCausalLM`` (its own session and input handling), and the loss is torch's
``cross_entropy``. Protocol (DESIGN.md): ``wiki.test.raw`` as shipped, tokenised without special
tokens, non-overlapping 512-token windows from the start, 511 scored tokens per window,
PPL = exp(mean NLL over all scored tokens).

    python tools/reference_perplexity.py runs/smollm2-135m/model.onnx --windows 40 \
        [--graphq-json runs/smollm2-135m/eval.json] [--torch HF_DIR] [--json OUT]

With ``--graphq-json`` it prints graphq's number beside the reference and their relative
difference, and exits 1 if they differ by more than ``--tolerance`` (default 0.5 %).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

TEXT = Path(__file__).resolve().parents[1] / "graphq" / "data" / "wikitext-2" / "wiki.test.raw"
log = logging.getLogger("reference_perplexity")


def windows_of(tokenizer, count: int, length: int) -> torch.Tensor:
    ids = tokenizer(TEXT.read_text(encoding="utf-8"), add_special_tokens=False, return_tensors="pt").input_ids[0]
    if ids.numel() < count * length:
        raise SystemExit(f"only {ids.numel() // length} windows available")
    return ids[: count * length].view(count, length)


def perplexity_of(forward, windows: torch.Tensor) -> float:
    nll = 0.0
    for index, window in enumerate(windows):
        logits = forward(window[None, :])[0].float()
        nll += F.cross_entropy(logits[:-1].double(), window[1:], reduction="sum").item()
        log.info("window %d/%d", index + 1, len(windows))
    return math.exp(nll / (windows.shape[0] * (windows.shape[1] - 1)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("onnx_model", type=Path)
    parser.add_argument("--windows", type=int, default=40)
    parser.add_argument("--window-tokens", type=int, default=512)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--torch", type=Path, default=None, help="HF folder of the source model (PyTorch reference)")
    parser.add_argument("--graphq-json", type=Path, default=None, help="graphq eval --json output to compare")
    parser.add_argument("--tolerance", type=float, default=0.005)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    import onnxruntime as ort
    from optimum.onnxruntime import ORTModelForCausalLM
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = args.onnx_model.parent
    tokenizer = AutoTokenizer.from_pretrained(str(folder))
    windows = windows_of(tokenizer, args.windows, args.window_tokens)
    options = ort.SessionOptions()
    options.intra_op_num_threads = args.threads
    ort_model = ORTModelForCausalLM.from_pretrained(
        str(folder), file_name=args.onnx_model.name, session_options=options, local_files_only=True,
        use_io_binding=False,
    )
    mask = torch.ones(1, args.window_tokens, dtype=torch.long)
    results = {"protocol": {"windows": args.windows, "window_tokens": args.window_tokens, "text": "wiki.test.raw"}}
    results["onnx_optimum"] = perplexity_of(lambda ids: ort_model(input_ids=ids, attention_mask=mask).logits, windows)
    if args.torch:
        torch.set_num_threads(args.threads)
        model = AutoModelForCausalLM.from_pretrained(str(args.torch), dtype=torch.float32).eval()
        with torch.no_grad():
            results["pytorch"] = perplexity_of(lambda ids: model(input_ids=ids).logits, windows)
    status = 0
    rows = [(k, v) for k, v in results.items() if k != "protocol"]
    if args.graphq_json:
        graphq_ppl = json.loads(args.graphq_json.read_text())["perplexity"]
        results["graphq"] = graphq_ppl
        results["relative_difference"] = abs(graphq_ppl - results["onnx_optimum"]) / results["onnx_optimum"]
        rows.append(("graphq eval", graphq_ppl))
        status = 0 if results["relative_difference"] <= args.tolerance else 1
    print(f"perplexity, {args.windows} windows x {args.window_tokens} tokens, {args.onnx_model}")
    for name, value in rows:
        print(f"  {name:<14} {value:.4f}")
    if "relative_difference" in results:
        verdict = "OK" if status == 0 else "MISMATCH"
        print(f"  graphq vs reference: {100 * results['relative_difference']:.3f} % ({verdict}, tolerance {100 * args.tolerance:.1f} %)")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    return status


if __name__ == "__main__":
    sys.exit(main())
