"""Decode and prefill speed of quantized peers of one float ONNX language model, as ratios to float.

    python tools/bench_speed.py --model DIR [--hf HF_DIR] [--peers float,ort-dynamic,ort-nbits-rtn-g128,genai-int4,genai-int4-og]
        [--graphq NAME=PATH.onnx ...] [--recipe RECIPE ...] [--threads 2] [--repeats 5]
        [--prefill-tokens 512] [--windows 40 | --no-ppl] [--genai-python PYTHON] [--genai-model DIR] [--work-dir runs/bench-speed] [--json PATH]

Protocol (DESIGN.md "Benchmark protocol"; every number comes from this one run):

- Float model: ``--model DIR``, a ``graphq export --with-past`` folder (model.onnx with a KV cache +
  tokenizer). It is never modified (its files' SHA-256 is checked at the end).
- Peers (``--peers``, comma list), each written to ``<work-dir>/<peer>/`` in a child process:
  ``float``: the input graph.
  ``ort-dynamic``: onnxruntime.quantization.quantize_dynamic on the input (per-channel QInt8, MatMul).
  ``ort-nbits-rtn-g128``: ORT's MatMulNBitsQuantizer, RTN int4, blocks of 128, symmetric,
  ``accuracy_level`` unset (float activations). Both ORT peers are made by tools/bench_quality.py's
  worker, so the two benchmarks compare the same graphs.
  ``genai-int4``: onnxruntime-genai's model builder (``python -m onnxruntime_genai.models.builder
  -i HF_DIR -o DIR -p int4 -e cpu``, its defaults: int4 RTN blocks of 32, symmetric, accuracy_level 4,
  LM head and tied embedding quantized too, fused GroupQueryAttention / SkipSimplifiedLayerNorm)
  built from the float HF checkpoint (``--hf``; default: the ``source`` in the export's
  graphq_export.json), nothing downloaded. The builder runs with ``--genai-python`` (default: this
  interpreter); ``--genai-model DIR`` takes an already built folder instead. Its graph runs in plain
  ONNX Runtime through the same loop as every other peer (its symbolic KV head size is pinned with
  a free-dimension override read from genai_config.json).
  ``genai-int4-og``: the same genai graph run by onnxruntime_genai's own Generator (greedy, KV buffer
  shared between steps, ``--threads`` intra-op threads); needs onnxruntime-genai in this interpreter.
  ``graphq:RECIPE`` (``--recipe RECIPE``, repeatable): ``graphq quantize MODEL -o OUT --recipe RECIPE``.
  ``NAME`` (``--graphq NAME=PATH.onnx``, repeatable): a graph graphq already wrote.
  A peer that cannot run here (onnxruntime-genai not installed, its builder failing to import, no
  HF checkpoint) becomes a row with status ``skipped: <why>``; a peer that breaks, ``failed: <why>``.
- Runtime: ONNX Runtime CPU EP, ``--threads`` intra-op threads (default 2), 1 inter-op thread, full
  graph optimisation (graphq.verify.cpu_session); every session stays open for the whole run.
- Decode (graphq.evaluate.greedy_decode, as ``graphq eval``): batch 1, prompt = the first 32 tokens
  of WikiText-2 ``wiki.test.raw`` (tokenizer of the float folder), prefill from an empty cache, then
  128 greedy tokens one step at a time feeding ``present.*`` back as ``past_key_values.*``;
  tokens/s = 128 / seconds of those 128 steps (the prompt's prefill is not timed). One 8-token
  warm-up per peer before the first round.
- Prefill (graphq.evaluate.prefill_seconds): one forward pass over the first 512-token test window
  from an empty cache, one warm-up + one timed run per round; tokens/s = 512 / seconds.
  ``--prefill-tokens T`` times the first ``T`` tokens of that window instead (e.g. 32: the decode
  prompt's prefill).
- Interleaving: ``--repeats`` rounds; in round r every peer decodes once, then every peer prefills
  once, in the peer order rotated by r. Speed = median over rounds; ratio = median over rounds of
  (peer rate / float rate in the same round), so a slow spell on the shared machine hits both.
- Greedy match: how many of the 129 generated tokens agree with float's before the first difference.
- Perplexity (unless ``--no-ppl``): graphq.evaluate.perplexity over the first ``--windows`` 512-token
  windows of ``wiki.test.raw`` on the same session (``genai-int4-og`` runs the genai graph: n/a).
- Size: the .onnx file plus its external-data files. Kernels: quantized-op counts of the file's graph
  and the MatMulNBits block sizes / accuracy levels.

Prints the table on stdout (logs on stderr); ``--json PATH`` writes the protocol and the rows. Exit
status 0 also when a peer failed (its row says why), 1 when the float model cannot be measured,
2 for bad arguments.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import hashlib
import importlib.util
import json
import logging
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("bench_speed")

TOOLS = Path(__file__).resolve().parent
ORT_PEERS = ("ort-dynamic", "ort-nbits-rtn-g128")
GENAI, GENAI_OG = "genai-int4", "genai-int4-og"
PEERS = ("float", *ORT_PEERS, GENAI, GENAI_OG)
NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:-]*$")
WINDOW_TOKENS, PROMPT_TOKENS, NEW_TOKENS = 512, 32, 128
MARKER = ".bench_speed"  # in every peer folder this tool writes: only such folders are ever replaced
KERNEL_OPS = ("MatMulNBits", "MatMulInteger", "MatMulIntegerToFloat", "DynamicQuantizeLinear", "QLinearMatMul", "DequantizeLinear",
              "GatherBlockQuantized", "GroupQueryAttention", "SkipSimplifiedLayerNormalization")
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class UsageError(Exception):
    """A bad command-line argument: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class SpeedConfig:
    model_dir: Path
    peers: tuple[str, ...] = PEERS
    graphq_models: tuple[tuple[str, Path], ...] = ()
    recipes: tuple[str, ...] = ()
    hf_dir: Path | None = None
    genai_python: str = sys.executable
    genai_model: Path | None = None
    threads: int = 2
    repeats: int = 5
    prefill_tokens: int = WINDOW_TOKENS
    windows: int = 40
    perplexity: bool = True
    work_dir: Path = Path("runs/bench-speed")
    json_path: Path | None = None

    @property
    def model_path(self) -> Path:
        return self.model_dir / "model.onnx"

    @property
    def names(self) -> tuple[str, ...]:
        return (*self.peers, *(f"graphq:{r}" for r in self.recipes), *(n for n, _ in self.graphq_models))


@dataclasses.dataclass(frozen=True)
class Candidate:
    """A peer ready to measure (status "ok") or the reason it is not."""

    name: str
    status: str
    model_path: Path | None = None
    runtime: str = "onnxruntime"  # or "onnxruntime-genai"
    build_seconds: float | None = None
    free_dimensions: tuple[tuple[str, int], ...] = ()


@dataclasses.dataclass(frozen=True)
class Row:
    peer: str
    status: str  # "ok", "failed: <why>" or "skipped: <why>"
    runtime: str
    model_path: str | None
    decode_tokens_per_s: float | None
    decode_ratio: float | None
    prefill_tokens_per_s: float | None
    prefill_ratio: float | None
    perplexity: float | None
    perplexity_ratio: float | None
    file_bytes: int | None
    size_ratio: float | None
    greedy_match: int | None
    build_seconds: float | None
    kernels: dict
    decode_rounds: list
    prefill_rounds: list


# ---------------------------------------------------------------- small pure helpers


def load_bench_quality():
    """tools/bench_quality.py as a module (its ORT worker and error helpers are shared)."""
    name = "bench_quality"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, TOOLS / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def first_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit)\b.*")


def child_error(stderr: str, returncode: int) -> str:
    """What a child process died of: the exception line of a traceback, else bench_quality's choice."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    if any(line.startswith("Traceback") for line in lines):
        for line in reversed(lines):
            if EXCEPTION_LINE.match(line):
                return line
    return load_bench_quality().error_line(stderr, returncode)


def rotated(names: tuple[str, ...], round_: int) -> tuple[str, ...]:
    if not names:
        return names
    shift = round_ % len(names)
    return names[shift:] + names[:shift]


def paired_ratio(values: list[float], reference: list[float]) -> float | None:
    """Median over rounds of value / reference of the same round (rates: > 1 is faster)."""
    pairs = [v / r for v, r in zip(values, reference) if v and r and math.isfinite(v) and math.isfinite(r)]
    return statistics.median(pairs) if pairs else None


def greedy_match(tokens: list[int], reference: list[int]) -> int:
    """Length of the common prefix of two greedy generations."""
    count = 0
    for a, b in zip(tokens, reference):
        if a != b:
            break
        count += 1
    return count


def median_or_none(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def sha256_files(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def kernels_of(model_path: Path) -> dict:
    """Quantized / fused op counts of a graph and the MatMulNBits attributes (block sizes, accuracy levels)."""
    import onnx

    proto = onnx.load(str(model_path), load_external_data=False)
    counts = collections.Counter(node.op_type for node in proto.graph.node)
    summary: dict = {op: counts[op] for op in KERNEL_OPS if counts[op]}
    blocks, levels = set(), set()
    for node in proto.graph.node:
        if node.op_type == "MatMulNBits":
            attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
            blocks.add(int(attributes.get("block_size", 0)))
            levels.add(int(attributes.get("accuracy_level", 0)))
    if blocks:
        summary["matmulnbits_block_size"] = sorted(blocks)
        summary["matmulnbits_accuracy_level"] = sorted(levels)
    return summary


def kernels_text(kernels: dict) -> str:
    parts = []
    if "MatMulNBits" in kernels:
        blocks = "/".join(str(b) for b in kernels["matmulnbits_block_size"])
        levels = "/".join(str(a) for a in kernels["matmulnbits_accuracy_level"])
        parts.append(f"nbits x{kernels['MatMulNBits']} g{blocks} acc{levels}")
    integer = kernels.get("MatMulInteger", 0) + kernels.get("MatMulIntegerToFloat", 0)
    if integer:
        parts.append(f"int8 x{integer}")
    if "GroupQueryAttention" in kernels:
        parts.append("GQA")
    return ", ".join(parts) or "float"


def genai_free_dimensions(model_dir: Path) -> tuple[tuple[str, int], ...]:
    """Symbolic KV-cache dims of a genai builder graph pinned to genai_config.json's sizes.

    The builder declares ``past_key_values.*`` as ``[batch_size, kv_heads, past_sequence_length,
    kv_cache_dim]``; graphq.runtime needs the head count and size to make an empty cache."""
    import onnx

    from graphq.runtime import PAST_INPUT

    decoder = json.loads((model_dir / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"]
    sizes = {1: decoder.get("num_key_value_heads"), 3: decoder.get("head_size")}
    proto = onnx.load(str(model_dir / decoder.get("filename", "model.onnx")), load_external_data=False)
    pinned = {}
    for value in proto.graph.input:
        if not PAST_INPUT.match(value.name):
            continue
        dims = value.type.tensor_type.shape.dim
        for axis, size in sizes.items():
            if axis < len(dims) and dims[axis].dim_param and size:
                pinned[dims[axis].dim_param] = int(size)
    return tuple(sorted(pinned.items()))


# ---------------------------------------------------------------- building the peers (child processes)


def prepare_dir(config: SpeedConfig, name: str) -> Path:
    """A fresh output folder for ``name``; refuses folders this tool did not create and the input's."""
    out = config.work_dir / name.replace(":", "-")
    resolved, source = out.resolve(), config.model_dir.resolve()
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise UsageError(f"output folder {out} for {name} overlaps the float model folder {config.model_dir}")
    if out.exists():
        if not (out / MARKER).is_file():
            raise UsageError(f"{out} exists and was not written by bench_speed; remove it or choose --work-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(f"{name}\n", encoding="utf-8")
    return out


def run_child(name: str, command: list[str], env: dict | None = None) -> tuple[int, str, float]:
    logger.info("%s: building", name)
    logger.debug("running %s", " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        logger.debug("%s stderr:\n%s", name, done.stderr.rstrip()[-4000:])
    return done.returncode, done.stderr, seconds


def build_quantized(config: SpeedConfig, name: str) -> Candidate:
    """An ORT peer (through bench_quality's worker) or a graphq recipe (through the graphq CLI)."""
    bench_quality = load_bench_quality()
    target = prepare_dir(config, name) / "model.onnx"
    if name.startswith("graphq:"):
        command = [sys.executable, "-m", "graphq", "-q", "quantize", str(config.model_path), "-o", str(target),
                   "--recipe", name.removeprefix("graphq:")]
    else:
        command = [sys.executable, str(TOOLS / "bench_quality.py"), bench_quality.WORKER_COMMAND, name,
                   str(config.model_path), str(target), "1", str(config.model_dir)]
    returncode, stderr, seconds = run_child(name, command)
    if returncode == bench_quality.EXIT_SKIPPED and not name.startswith("graphq:"):
        return Candidate(name, "skipped: " + child_error(stderr, returncode).removeprefix("bench_quality: skipped: "))
    if returncode != 0:
        return Candidate(name, f"failed: {child_error(stderr, returncode)}", build_seconds=seconds)
    if not target.is_file():
        return Candidate(name, f"failed: wrote no {target.name}", build_seconds=seconds)
    return Candidate(name, "ok", target, build_seconds=seconds)


def genai_importable(python: str) -> str | None:
    """None when ``python`` imports onnxruntime_genai, else why not (one line)."""
    done = subprocess.run([python, "-c", "import onnxruntime_genai"], capture_output=True, text=True)
    if done.returncode == 0:
        return None
    return child_error(done.stderr, done.returncode)


def hf_source(config: SpeedConfig) -> Path | None:
    """``--hf``, else the HF folder graphq exported the float model from (graphq_export.json)."""
    if config.hf_dir is not None:
        return config.hf_dir
    record = config.model_dir / "graphq_export.json"
    if record.is_file():
        source = Path(json.loads(record.read_text(encoding="utf-8")).get("source", ""))
        if (source / "config.json").is_file():
            return source
    return None


def build_genai(config: SpeedConfig) -> Candidate:
    """onnxruntime-genai's model builder, int4 for the CPU EP, from the float HF checkpoint."""
    if config.genai_model is not None:
        return genai_candidate(config.genai_model, None)
    missing = genai_importable(config.genai_python)
    if missing is not None:
        return Candidate(GENAI, f"skipped: onnxruntime-genai is not installed for {config.genai_python} "
                                f"({missing}; pip install -e .[bench])")
    hf_dir = hf_source(config)
    if hf_dir is None:
        return Candidate(GENAI, "skipped: the builder needs the float HF checkpoint (--hf DIR)")
    out = prepare_dir(config, GENAI)
    cache = out / "builder-cache"
    command = [config.genai_python, "-m", "onnxruntime_genai.models.builder", "-i", str(hf_dir), "-o", str(out),
               "-p", "int4", "-e", "cpu", "-c", str(cache)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    returncode, stderr, seconds = run_child(GENAI, command, env)
    shutil.rmtree(cache, ignore_errors=True)
    if returncode != 0:
        reason = child_error(stderr, returncode)
        if reason.startswith(("ImportError", "ModuleNotFoundError")):
            return Candidate(GENAI, f"skipped: the model builder cannot import here ({reason}); it may need a "
                                    "newer transformers than graphq pins: pass --genai-python PYTHON of an "
                                    "environment where `python -m onnxruntime_genai.models.builder` imports")
        return Candidate(GENAI, f"failed: model builder: {reason}", build_seconds=seconds)
    return genai_candidate(out, seconds)


def genai_candidate(folder: Path, seconds: float | None) -> Candidate:
    if not (folder / "genai_config.json").is_file():
        return Candidate(GENAI, f"failed: {folder} has no genai_config.json", build_seconds=seconds)
    try:
        filename = json.loads((folder / "genai_config.json").read_text(encoding="utf-8"))["model"]["decoder"].get(
            "filename", "model.onnx")
        dims = genai_free_dimensions(folder)
    except (KeyError, ValueError, OSError) as error:
        return Candidate(GENAI, f"failed: cannot read {folder}: {first_line(error)}", build_seconds=seconds)
    return Candidate(GENAI, "ok", folder / filename, build_seconds=seconds, free_dimensions=dims)


def genai_og_candidate(genai: Candidate | None) -> Candidate:
    if importlib.util.find_spec("onnxruntime_genai") is None:
        return Candidate(GENAI_OG, "skipped: onnxruntime-genai is not installed (pip install -e .[bench])",
                         runtime="onnxruntime-genai")
    if genai is None or genai.status != "ok":
        return Candidate(GENAI_OG, f"skipped: needs the {GENAI} model", runtime="onnxruntime-genai")
    return dataclasses.replace(genai, name=GENAI_OG, runtime="onnxruntime-genai", build_seconds=None)


def build_candidates(config: SpeedConfig) -> list[Candidate]:
    candidates: dict[str, Candidate] = {}
    for name in config.peers:
        if name == "float":
            candidates[name] = Candidate("float", "ok", config.model_path)
        elif name in ORT_PEERS:
            candidates[name] = build_quantized(config, name)
        elif name in (GENAI, GENAI_OG) and GENAI not in candidates:
            candidates[GENAI] = build_genai(config)
    if GENAI_OG in config.peers:
        candidates[GENAI_OG] = genai_og_candidate(candidates.get(GENAI))
    for recipe in config.recipes:
        candidates[f"graphq:{recipe}"] = build_quantized(config, f"graphq:{recipe}")
    for name, path in config.graphq_models:
        status = "ok" if path.is_file() else f"failed: no such file {path}"
        candidates[name] = Candidate(name, status, path if path.is_file() else None)
    return [candidates[name] for name in config.names]


# ---------------------------------------------------------------- runners: one decode / prefill / perplexity


class OrtRunner:
    """A peer's graph in an ONNX Runtime CPU session, driven by graphq.evaluate's loops."""

    def __init__(self, candidate: Candidate, threads: int) -> None:
        from graphq.runtime import GraphSignature
        from graphq.verify import cpu_session

        self.session = cpu_session(candidate.model_path, threads=threads,
                                   free_dimensions=dict(candidate.free_dimensions))
        if not GraphSignature.of(self.session).has_kv_cache:
            raise ValueError("the graph has no KV cache (export with --with-past)")

    def decode(self, prompt, new_tokens: int) -> tuple[list[int], float]:
        from graphq.evaluate import greedy_decode

        return greedy_decode(self.session, prompt, new_tokens)

    def prefill(self, window) -> float:
        from graphq.evaluate import prefill_seconds

        return prefill_seconds(self.session, window, 1)  # one warm-up + one timed run

    def perplexity(self, windows) -> float | None:
        from graphq.evaluate import perplexity

        return perplexity(self.session, windows)


class GenaiRunner:
    """The genai graph run by onnxruntime_genai's Generator (greedy, its own KV buffer)."""

    def __init__(self, candidate: Candidate, threads: int) -> None:
        import onnxruntime_genai as og

        config = og.Config(str(candidate.model_path.parent))
        config.clear_providers()  # CPU
        options = {"intra_op_num_threads": threads, "inter_op_num_threads": 1}
        config.overlay(json.dumps({"model": {"decoder": {"session_options": options}}}))
        self.og = og
        self.model = og.Model(config)

    def generator(self, prompt, new_tokens: int):
        params = self.og.GeneratorParams(self.model)
        total = len(prompt) + new_tokens
        params.set_search_options(do_sample=False, max_length=total, min_length=total)
        generator = self.og.Generator(self.model, params)
        return generator

    def decode(self, prompt, new_tokens: int) -> tuple[list[int], float]:
        """As graphq.evaluate.greedy_decode: the prompt's prefill picks token 1, then new_tokens - 1 timed steps."""
        import numpy as np

        generator = self.generator(prompt, new_tokens)
        generator.append_tokens(np.asarray(prompt, dtype=np.int64)[None, :])
        generator.generate_next_token()  # argmax of the prompt's last logits: no model run
        start = time.perf_counter()
        while not generator.is_done():
            generator.generate_next_token()
        seconds = time.perf_counter() - start
        return [int(t) for t in generator.get_sequence(0)[len(prompt):]], seconds

    def prefill(self, window) -> float:
        import numpy as np

        batch = np.asarray(window, dtype=np.int64)[None, :]
        self.generator(window, 1).append_tokens(batch)  # warm-up, as graphq.evaluate.prefill_seconds
        generator = self.generator(window, 1)
        start = time.perf_counter()
        generator.append_tokens(batch)
        return time.perf_counter() - start

    def perplexity(self, windows) -> float | None:
        return None  # the same graph as genai-int4, scored there


def open_runner(candidate: Candidate, threads: int):
    return (GenaiRunner if candidate.runtime == "onnxruntime-genai" else OrtRunner)(candidate, threads)


# ---------------------------------------------------------------- measurement


def wikitext_windows(config: SpeedConfig, windows: int):
    """The first ``windows`` 512-token windows of wiki.test.raw, tokenised with the float folder's tokenizer."""
    from graphq.data import WIKITEXT_TEST, read_text
    from graphq.evaluate import EvalConfig, load_tokenizer, token_windows

    tokenizer = load_tokenizer(config.model_path, config.model_dir)
    ids = tokenizer(read_text(WIKITEXT_TEST), add_special_tokens=False)["input_ids"]
    return token_windows(ids, EvalConfig(windows=windows, window_tokens=WINDOW_TOKENS))


def interleaved(runners: dict, prompt, window, repeats: int) -> tuple[dict, dict, dict, dict]:
    """(decode tok/s per round, prefill tok/s per round, generated tokens, failures) per peer."""
    decode = {name: [] for name in runners}
    prefill = {name: [] for name in runners}
    tokens, failures = {}, {}
    for name, runner in runners.items():
        try:
            runner.decode(prompt, 8)  # warm-up, as graphq.evaluate.decode_tokens_per_s
        except Exception as error:  # this peer's graph cannot decode: its row says so
            failures[name] = f"failed: decode: {first_line(error) or type(error).__name__}"
    names = tuple(n for n in runners if n not in failures)
    for round_ in range(repeats):
        logger.info("round %d/%d: decode and prefill, order %s", round_ + 1, repeats, ", ".join(rotated(names, round_)))
        for name in rotated(names, round_):
            generated, seconds = runners[name].decode(prompt, NEW_TOKENS + 1)
            decode[name].append(NEW_TOKENS / seconds)
            tokens.setdefault(name, generated)
        for name in rotated(names, round_):
            prefill[name].append(len(window) / runners[name].prefill(window))
    return decode, prefill, tokens, failures


def measure(config: SpeedConfig, candidates: list[Candidate]) -> list[Row]:
    """Open every ready peer, time them interleaved, score perplexity; the float model's failures are fatal."""
    from graphq.evaluate import model_file_bytes

    windows = wikitext_windows(config, config.windows if config.perplexity else 1)
    prompt, window = windows[0][:PROMPT_TOKENS], windows[0][:config.prefill_tokens]
    runners, status = {}, {c.name: c.status for c in candidates}
    for candidate in candidates:
        if candidate.status != "ok":
            logger.warning("%s: %s", candidate.name, candidate.status)
            continue
        try:
            runners[candidate.name] = open_runner(candidate, config.threads)
        except Exception as error:  # ORT cannot load this graph: the row says so
            status[candidate.name] = f"failed: load: {first_line(error) or type(error).__name__}"
            logger.warning("%s: %s", candidate.name, status[candidate.name])
    if "float" not in runners:
        raise RuntimeError(f"cannot run the float model {config.model_path}: {status.get('float', 'not measured')}")
    decode, prefill, tokens, failures = interleaved(runners, prompt, window, config.repeats)
    status.update(failures)
    perplexities = {}
    if config.perplexity:
        for name, runner in runners.items():
            if name in failures:
                continue
            logger.info("%s: perplexity on %d windows", name, config.windows)
            try:
                perplexities[name] = runner.perplexity(windows)
            except Exception as error:  # speed stands; the perplexity cell says n/a
                logger.warning("%s: perplexity failed: %s", name, first_line(error) or type(error).__name__)
    float_bytes = model_file_bytes(config.model_path)
    rows = []
    for candidate in candidates:
        name = candidate.name
        size = model_file_bytes(candidate.model_path) if candidate.model_path is not None and status[name] == "ok" else None
        ppl, float_ppl = finite_or_none(perplexities.get(name)), perplexities.get("float")
        rows.append(Row(
            peer=name,
            status=status[name],
            runtime=candidate.runtime,
            model_path=None if candidate.model_path is None else str(candidate.model_path),
            decode_tokens_per_s=median_or_none(decode.get(name, [])),
            decode_ratio=paired_ratio(decode.get(name, []), decode["float"]),
            prefill_tokens_per_s=median_or_none(prefill.get(name, [])),
            prefill_ratio=paired_ratio(prefill.get(name, []), prefill["float"]),
            perplexity=ppl,
            perplexity_ratio=None if ppl is None or not float_ppl else ppl / float_ppl,
            file_bytes=size,
            size_ratio=None if size is None else size / float_bytes,
            greedy_match=greedy_match(tokens[name], tokens["float"]) if name in tokens else None,
            build_seconds=candidate.build_seconds,
            kernels=kernels_of(candidate.model_path) if size is not None else {},
            decode_rounds=decode.get(name, []),
            prefill_rounds=prefill.get(name, []),
        ))
    return rows


# ---------------------------------------------------------------- output


def protocol_of(config: SpeedConfig) -> dict:
    import onnxruntime

    try:
        from importlib.metadata import version

        genai_version = version("onnxruntime-genai")
    except Exception:  # not installed
        genai_version = None
    return {
        "model": str(config.model_path),
        "decode": f"batch 1, first {PROMPT_TOKENS} tokens of wiki.test.raw as prompt, {NEW_TOKENS} greedy tokens "
                  "with the KV cache; tokens/s of the decode steps (graphq.evaluate.greedy_decode)",
        "prefill": f"first {config.prefill_tokens} tokens of wiki.test.raw, empty cache, warm-up + timed run per round",
        "prefill_tokens": config.prefill_tokens,
        "rounds": f"{config.repeats} rounds, peers rotated each round; speed = median; ratio = median of per-round "
                  "ratios to float",
        "perplexity": (f"wiki.test.raw, first {config.windows} windows x {WINDOW_TOKENS} tokens"
                       if config.perplexity else "not measured (--no-ppl)"),
        "threads": config.threads,
        "repeats": config.repeats,
        "windows": config.windows if config.perplexity else None,
        "genai_builder": "python -m onnxruntime_genai.models.builder -i HF_DIR -o DIR -p int4 -e cpu",
        "hf_dir": None if hf_source(config) is None else str(hf_source(config)),
        "onnxruntime_version": onnxruntime.__version__,
        "onnxruntime_genai_version": genai_version,
    }


def table(config: SpeedConfig, rows: list[Row]) -> str:
    def fmt(value, spec, suffix=""):
        return "n/a" if value is None else format(value, spec) + suffix

    protocol = protocol_of(config)
    header = [
        f"Speed of peers of {protocol['model']} (onnxruntime {protocol['onnxruntime_version']}, "
        f"onnxruntime-genai {protocol['onnxruntime_genai_version'] or 'not installed'}, {config.threads} threads)",
        f"  decode: {protocol['decode']}",
        f"  prefill: {protocol['prefill']}",
        f"  {protocol['rounds']}; perplexity: {protocol['perplexity']}",
        f"  match: greedy tokens (of {NEW_TOKENS + 1}) equal to float's before the first difference",
    ]
    columns = ("peer", "decode tok/s", "decode x", "prefill tok/s", "prefill x", "ppl", "ppl/float", "size MB",
               "match", "kernels", "status")
    body = [
        (r.peer, fmt(r.decode_tokens_per_s, ".1f"), fmt(r.decode_ratio, ".2f", "x"), fmt(r.prefill_tokens_per_s, ".1f"),
         fmt(r.prefill_ratio, ".2f", "x"), fmt(r.perplexity, ".4f"), fmt(r.perplexity_ratio, ".3f", "x"),
         fmt(None if r.file_bytes is None else r.file_bytes / 1e6, ".1f"), fmt(r.greedy_match, "d"),
         kernels_text(r.kernels) if r.status == "ok" else "", r.status)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (columns, *body)) for i in range(len(columns))]
    left = (0, len(columns) - 2, len(columns) - 1)
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in (columns, *body)]
    return "\n".join(header + [""] + [line.rstrip() for line in lines])


# ---------------------------------------------------------------- driver


def run(config: SpeedConfig) -> list[Row]:
    before = sha256_files(config.model_dir)
    candidates = build_candidates(config)
    rows = measure(config, candidates)
    if sha256_files(config.model_dir) != before:
        raise RuntimeError(f"the float model folder {config.model_dir} changed during the benchmark")
    return rows


def parse_graphq_model(text: str) -> tuple[str, Path]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise UsageError(f"--graphq {text}: expected NAME=PATH.onnx")
    return name, Path(path)


def parse_args(argv: list[str]) -> tuple[SpeedConfig, int]:
    parser = argparse.ArgumentParser(prog="bench_speed.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, required=True, help="float with-past export folder (model.onnx + tokenizer)")
    parser.add_argument("--peers", default=",".join(PEERS), help="comma list of %(default)s (default: all)")
    parser.add_argument("--graphq", action="append", default=[], metavar="NAME=PATH.onnx",
                        help="a graph graphq wrote, measured as peer NAME (repeatable)")
    parser.add_argument("--recipe", action="append", default=[], metavar="RECIPE",
                        help="run `graphq quantize --recipe RECIPE` on the float model; peer graphq:RECIPE (repeatable)")
    parser.add_argument("--hf", type=Path, default=None,
                        help="float HF checkpoint for the genai builder (default: source in graphq_export.json)")
    parser.add_argument("--genai-python", default=sys.executable,
                        help="interpreter that runs the genai model builder (default: this one)")
    parser.add_argument("--genai-model", type=Path, default=None, help="an already built genai folder (skips the builder)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds, median (default: %(default)s)")
    parser.add_argument("--prefill-tokens", type=int, default=WINDOW_TOKENS,
                        help="tokens of the timed prefill, at most %(default)s (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows (default: %(default)s)")
    parser.add_argument("--no-ppl", action="store_true", help="skip perplexity")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench-speed"),
                        help="one subfolder per built peer (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the protocol and rows as JSON")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)

    for name in ("threads", "repeats", "windows", "prefill_tokens"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    if args.prefill_tokens > WINDOW_TOKENS:
        raise UsageError(f"--prefill-tokens must be at most {WINDOW_TOKENS}, got {args.prefill_tokens}")
    peers = tuple(p.strip() for p in args.peers.split(",") if p.strip())
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise UsageError(f"unknown peer '{unknown[0]}' (one of {', '.join(PEERS)}; graphq graphs: --graphq/--recipe)")
    if "float" not in peers:
        peers = ("float", *peers)  # every ratio is to float measured in the same rounds
    recipe_name = load_bench_quality().RECIPE_NAME
    for recipe in args.recipe:
        if not recipe_name.match(recipe):
            raise UsageError(f"bad recipe name '{recipe}' (letters, digits, '.', '_', '-')")
    graphq_models = tuple(parse_graphq_model(text) for text in args.graphq)
    config = SpeedConfig(
        model_dir=args.model, peers=peers, graphq_models=graphq_models, recipes=tuple(args.recipe),
        hf_dir=args.hf, genai_python=args.genai_python, genai_model=args.genai_model, threads=args.threads,
        repeats=args.repeats, prefill_tokens=args.prefill_tokens, windows=args.windows, perplexity=not args.no_ppl, work_dir=args.work_dir,
        json_path=args.json,
    )
    names = config.names
    for name in names:
        if not NAME.match(name):
            raise UsageError(f"bad peer name '{name}' (letters, digits, '.', '_', ':', '-')")
    if len(set(names)) != len(names):
        raise UsageError(f"a peer name is given twice: {', '.join(names)}")
    if not config.model_path.is_file():
        raise UsageError(f"--model {config.model_dir}: no model.onnx in that folder")
    if config.json_path is not None and config.json_path.resolve().is_relative_to(config.model_dir.resolve()):
        raise UsageError(f"--json {config.json_path} lies inside the float model folder")
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    return config, level


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        config, level = parse_args(argv)
    except UsageError as error:
        print(f"bench_speed: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except SystemExit as exit_:  # argparse: --help (0) or a malformed command line (2)
        return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("transformers", "onnx_ir", "onnxscript"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

    from graphq.errors import GraphqError

    start = time.perf_counter()
    try:
        rows = run(config)
    except UsageError as error:
        print(f"bench_speed: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (GraphqError, RuntimeError, OSError) as error:
        print(f"bench_speed: error: {first_line(str(error)) or type(error).__name__}", file=sys.stderr)
        return EXIT_ERROR
    logger.info("benchmark finished in %.0f s", time.perf_counter() - start)
    print(table(config, rows))
    if config.json_path is not None:
        from graphq.modelio import write_text_atomic

        document = {"protocol": protocol_of(config), "rows": [dataclasses.asdict(r) for r in rows]}
        try:
            write_text_atomic(config.json_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
        except GraphqError as error:
            print(f"bench_speed: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
