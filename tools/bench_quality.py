"""Compare quantization methods (W8A8 and INT4 weight-only) on one float ONNX language model: one run, one table.

    python tools/bench_quality.py [--model DIR] [--methods float,ort-dynamic,ort-static-qdq,graphq:w8a8,...]
    python tools/bench_quality.py --methods float,ort-nbits-rtn-g128,ort-nbits-hqq-g128,ort-nbits-gptq-g128,graphq:w4-rtn,graphq:w4-gptq
        [--windows 40] [--calib-windows 8] [--threads 2] [--repeats 5] [--work-dir runs/bench] [--json PATH]

Protocol (every number in the table comes from this one run):

- Model: an exported float ONNX LM folder (``--model DIR``: model.onnx + tokenizer). Default:
  ``<work-dir>/float``, created with ``graphq export smollm2-135m -o <work-dir>/float --with-past``
  when it has no model.onnx. The input is never modified (its files' SHA-256 is checked at the end).
- Methods (``--methods``, comma list; default: float, ort-dynamic, ort-static-qdq, graphq:w8a8,
  graphq:w8a8-static); each writes ``<work-dir>/<method>/model.onnx`` (``graphq:R`` -> ``graphq-R``):
  ``float``: the input model.
  ``ort-dynamic``: onnxruntime.quantization.quantize_dynamic, per-channel QInt8 weights, MatMul only.
  ``ort-static-qdq``: onnxruntime.quantization.quantize_static, QDQ format, MinMax calibration,
  per-channel symmetric QInt8 weights, per-tensor symmetric QInt8 activations, on the MatMuls with
  a constant weight (the linear layers, as quantize_dynamic; MatMul outputs stay float), calibrated
  on ``--calib-windows`` windows of 512 tokens of ``wiki.valid.tokens`` (calibration text only,
  never the evaluation text), each fed from an empty KV cache.
  ``ort-nbits-*-g128``: ONNX Runtime's own INT4 weight-only quantizer
  (onnxruntime.quantization.matmul_nbits_quantizer.MatMulNBitsQuantizer, emitting MatMulNBits with
  ``accuracy_level`` unset) on the MatMuls whose weight is an initializer (the linear layers; a tied
  LM head that reads ``Transpose(embedding)`` stays float), blocks of 128 along the input dimension:
  ``ort-nbits-rtn-g128``: DefaultWeightOnlyQuantConfig(block_size=128, is_symmetric=True), round to nearest.
  ``ort-nbits-hqq-g128``: HQQWeightOnlyQuantConfig(block_size=128, bits=4) (half-quadratic search of
  scale and zero point, asymmetric by construction; uses torch, no data).
  ``ort-nbits-gptq-g128``: GPTQWeightOnlyQuantConfig (ORT's vendored neural-compressor GPTQ:
  percdamp 0.01, lazy-batch block 128, no act-order, per channel) with groups of 128, symmetric,
  the Hessians from ``--calib-windows`` windows of ``wiki.valid.tokens`` read with
  graphq.calibrate.calibration_windows (512 tokens each, empty KV cache). ORT runs the whole graph
  once per distinct MatMul input per window, so it is slow (about 120 x windows forward passes).
  A peer this onnxruntime cannot run (a quantizer or config class it lacks, a missing optional
  package) becomes a row with status ``skipped: <why>``, never a silent omission.
  ``graphq:RECIPE``: ``graphq quantize MODEL.onnx -o OUT/model.onnx --recipe RECIPE`` (a name, or a recipe
  file such as ``tools/recipes/w4-rtn-f32.yaml``, whose folder is ``graphq-<file stem>``).
  ORT methods run in a child process of this tool and graphq methods through the graphq CLI, so a
  crash or an out-of-memory kill only fails that method's row (status column).
- Perplexity: graphq.evaluate, WikiText-2 ``wiki.test.raw``, first ``--windows`` non-overlapping
  512-token windows, tokenizer of the float folder for every method.
- Prefill: graphq.evaluate.prefill_seconds on the first 512-token test window, ONNX Runtime CPU EP,
  ``--threads`` intra-op threads, full graph optimisation. The float model is timed paired with each
  method (alternating float/method order, one warm-up + one timed run each, ``--repeats`` rounds);
  speed ratio = median float seconds / median method seconds of that pair (> 1: faster than float).
- Size: the .onnx file plus its external-data files (graphq.evaluate.model_file_bytes).
- Quantization time: wall clock of the quantizing child process (interpreter start-up included).

Prints the table on stdout (progress and logs go to stderr); ``--json PATH`` writes the protocol and
the same rows. Exit status 0 also when a method failed (its row says why), 1 when the float model
cannot be exported or evaluated, 2 for bad arguments.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
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

logger = logging.getLogger("bench_quality")

DEFAULT_METHODS = ("float", "ort-dynamic", "ort-static-qdq", "graphq:w8a8", "graphq:w8a8-static")
NBITS_METHODS = ("ort-nbits-rtn-g128", "ort-nbits-hqq-g128", "ort-nbits-gptq-g128")
ORT_METHODS = ("ort-dynamic", "ort-static-qdq", *NBITS_METHODS)
NBITS_BLOCK = 128
RECIPE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
WINDOW_TOKENS = 512
# A file in every method folder this tool writes: only such folders are ever replaced.
MARKER = ".bench_quality"
WORKER_COMMAND = "_ort-worker"  # internal: `bench_quality.py _ort-worker METHOD SRC DST CALIB TOKENIZER`

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
EXIT_SKIPPED = 3  # worker: this onnxruntime cannot run the peer here (the reason is on stderr)
SKIPPED = "skipped: "

# quantize_static options (onnxruntime.quantization 1.2x-1.3x). ActivationSymmetric gives int8
# activations a zero point of 0 and CalibTensorRangeSymmetric makes the calibrated ranges symmetric
# around 0 to match. OpTypesToExcludeOutputQuantization leaves MatMul outputs in float (int8 GEMM,
# float result, as quantize_dynamic's MatMulInteger does); otherwise ORT would also put Q/DQ on the
# residual stream. The QDQ quantizer ignores MatMulConstBOnly, so the W8A8 MatMuls are chosen with
# nodes_to_quantize instead: those whose B is an initializer (the linear layers), leaving
# attention's activation x activation MatMuls and the rotary-embedding MatMul in float.
ORT_STATIC_EXTRA_OPTIONS = {
    "ActivationSymmetric": True,
    "WeightSymmetric": True,
    "CalibTensorRangeSymmetric": True,
    "OpTypesToExcludeOutputQuantization": ["MatMul"],
}


class UsageError(Exception):
    """A bad command-line argument: one line, exit status 2."""


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    model_dir: Path
    methods: tuple[str, ...]
    windows: int = 40
    calib_windows: int = 8
    threads: int = 2
    repeats: int = 5
    work_dir: Path = Path("runs/bench")
    json_path: Path | None = None

    @property
    def model_path(self) -> Path:
        return self.model_dir / "model.onnx"


@dataclasses.dataclass(frozen=True)
class Row:
    method: str
    status: str  # "ok", "failed: <why>" or "skipped: <why>"
    model_path: str | None
    perplexity: float | None
    perplexity_ratio: float | None
    prefill_seconds: float | None
    speed_ratio: float | None
    file_bytes: int | None
    size_ratio: float | None
    quantize_seconds: float | None


def method_dir_name(method: str) -> str:
    """``graphq-w4-rtn`` for ``graphq:w4-rtn``; a recipe file gives its stem (``graphq:tools/recipes/x.yaml``: ``graphq-x``)."""
    kind, _, recipe = method.partition(":")
    return f"{kind}-{Path(recipe).stem}" if recipe else kind


def parse_methods(text: str) -> tuple[str, ...]:
    methods = tuple(m.strip() for m in text.split(",") if m.strip())
    if not methods:
        raise UsageError("--methods is empty")
    for method in methods:
        if method in ("float", *ORT_METHODS):
            continue
        if method.startswith("graphq:"):
            recipe = method.removeprefix("graphq:")
            is_file = recipe.endswith((".yaml", ".yml", ".json")) and Path(recipe).is_file()
            if not (is_file or RECIPE_NAME.match(recipe)):
                raise UsageError(f"bad graphq recipe in '{method}': a name (letters, digits, '.', '_', '-') or a recipe file")
            continue
        raise UsageError(f"unknown method '{method}' ({', '.join(('float', *ORT_METHODS))} or graphq:RECIPE)")
    if len(set(methods)) != len(methods):
        raise UsageError(f"a method is listed twice in --methods {text}")
    return methods


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def error_line(stderr: str, returncode: int) -> str:
    """The line of a child's stderr that says what went wrong, else its first line, else the exit status."""
    lines = [line.strip() for line in stderr.splitlines() if line.strip()]
    for line in lines:
        if line.startswith(("graphq: error", "graphq: internal error", "Error:", "bench_quality: error",
                            "bench_quality: skipped")):
            return line
    if lines:
        return lines[0]
    if returncode < 0:
        return f"killed by signal {-returncode}" + (" (out of memory?)" if returncode == -9 else "")
    return f"exit status {returncode}"


def sha256_files(folder: Path) -> dict[str, str]:
    digests = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest = hashlib.sha256()
        with path.open("rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                digest.update(block)
        digests[str(path.relative_to(folder))] = digest.hexdigest()
    return digests


def ensure_float_model(config: BenchConfig, explicit: bool) -> None:
    if config.model_path.is_file():
        return
    if explicit:
        raise UsageError(f"--model {config.model_dir}: no model.onnx in that folder")
    logger.info("no %s: exporting the default model (graphq export smollm2-135m --with-past)", config.model_path)
    command = [sys.executable, "-m", "graphq", "export", "smollm2-135m", "-o", str(config.model_dir), "--with-past"]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"export of the default model failed: {error_line(done.stderr, done.returncode)}")


def prepare_method_dir(config: BenchConfig, method: str) -> Path:
    """A fresh output folder for ``method``; refuses folders this tool did not create and the input's."""
    out = config.work_dir / method_dir_name(method)
    resolved, source = out.resolve(), config.model_dir.resolve()
    if resolved == source or resolved.is_relative_to(source) or source.is_relative_to(resolved):
        raise UsageError(f"output folder {out} for {method} overlaps the float model folder {config.model_dir}")
    if out.exists():
        if not (out / MARKER).is_file():
            raise UsageError(f"{out} exists and was not written by bench_quality; remove it or choose --work-dir")
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text(f"{method}\n", encoding="utf-8")
    return out


def quantize(config: BenchConfig, method: str, out_dir: Path) -> tuple[str, float]:
    """Run one method's quantizer in a child process; returns (status, wall-clock seconds)."""
    target = out_dir / "model.onnx"
    if method.startswith("graphq:"):
        command = [sys.executable, "-m", "graphq", "-q", "quantize", str(config.model_path), "-o", str(target),
                   "--recipe", method.removeprefix("graphq:")]
    else:
        command = [sys.executable, str(Path(__file__).resolve()), WORKER_COMMAND, method, str(config.model_path),
                   str(target), str(config.calib_windows), str(config.model_dir)]
    logger.info("%s: quantizing -> %s", method, target)
    logger.debug("running %s", " ".join(command))
    start = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.stderr.strip():
        logger.debug("%s stderr:\n%s", method, done.stderr.rstrip())
    if done.returncode == EXIT_SKIPPED and not method.startswith("graphq:"):
        return SKIPPED + error_line(done.stderr, done.returncode).removeprefix("bench_quality: skipped: "), seconds
    if done.returncode != 0:
        return f"failed: {error_line(done.stderr, done.returncode)}", seconds
    if not target.is_file():
        return f"failed: the quantizer wrote no {target.name}", seconds
    return "ok", seconds


# ---------------------------------------------------------------- ORT quantization (child process)


class PeerUnavailable(Exception):
    """This onnxruntime (or its optional dependencies) cannot run the peer on this machine."""


def calibration_windows(tokenizer_dir: Path, count: int):
    """The first ``count`` 512-token windows of wiki.valid.tokens (calibration text, never evaluation)."""
    from graphq.calibrate import CalibrationConfig
    from graphq.calibrate import calibration_windows as windows_of
    from graphq.evaluate import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir / "model.onnx", tokenizer_dir)
    return windows_of(tokenizer, CalibrationConfig(windows=count, window_tokens=WINDOW_TOKENS))


class WindowFeeds:
    """An ORT CalibrationDataReader over token windows, one empty-KV-cache forward pass each.

    Holds a list and a position (not a generator) so that ORT's GPTQ can deep-copy it."""

    def __init__(self, signature, windows) -> None:
        from graphq.runtime import build_feeds

        self.feeds = [build_feeds(signature, window[None, :]) for window in windows]
        self.position = 0

    def get_next(self):
        if self.position >= len(self.feeds):
            return None
        self.position += 1
        return self.feeds[self.position - 1]

    def __iter__(self):
        return iter(self.feeds[self.position:])


def nbits_quantizer_module():
    """ORT's weight-only quantizer module (``matmul_nbits_quantizer``; ``matmul_4bits_quantizer`` before 1.20)."""
    try:
        from onnxruntime.quantization import matmul_nbits_quantizer as module
    except ImportError:
        try:
            from onnxruntime.quantization import matmul_4bits_quantizer as module
        except ImportError as error:
            raise PeerUnavailable(f"this onnxruntime has no MatMulNBits quantizer ({error})") from error
    quantizer = getattr(module, "MatMulNBitsQuantizer", None) or getattr(module, "MatMul4BitsQuantizer", None)
    if quantizer is None:
        raise PeerUnavailable(f"{module.__name__} has no MatMulNBitsQuantizer")
    return module, quantizer


def nbits_algo_config(method: str, source: Path, calib_windows: int, tokenizer_dir: Path):
    """The algo_config of one ``ort-nbits-*`` peer (see the module docstring)."""
    module, _ = nbits_quantizer_module()
    names = {"ort-nbits-rtn-g128": "DefaultWeightOnlyQuantConfig", "ort-nbits-hqq-g128": "HQQWeightOnlyQuantConfig",
             "ort-nbits-gptq-g128": "GPTQWeightOnlyQuantConfig"}
    config_class = getattr(module, names[method], None)
    if config_class is None:
        raise PeerUnavailable(f"this onnxruntime's {module.__name__} has no {names[method]}")
    if method == "ort-nbits-rtn-g128":
        return config_class(block_size=NBITS_BLOCK, is_symmetric=True)
    if method == "ort-nbits-hqq-g128":
        try:
            import torch  # noqa: F401  (ORT's HQQ runs on torch)
        except ImportError as error:
            raise PeerUnavailable("ORT's HQQ quantizer needs torch, which is not installed") from error
        return config_class(block_size=NBITS_BLOCK, bits=4)
    from graphq.runtime import GraphSignature
    from graphq.verify import cpu_session

    signature = GraphSignature.of(cpu_session(source, optimization="disable"))
    reader = WindowFeeds(signature, calibration_windows(tokenizer_dir, calib_windows))
    return config_class(calibration_data_reader=reader, percdamp=0.01, block_size=128, actorder=False,
                        mse=False, perchannel=True)


def nbits_quantize(method: str, source: Path, target: Path, calib_windows: int, tokenizer_dir: Path,
                   external: bool) -> None:
    """INT4 weight-only quantization with ORT's MatMulNBitsQuantizer, groups of 128 (symmetric where
    the algorithm has the choice: the group size and scheme of RTN/GPTQ are the quantizer's own)."""
    _, quantizer_class = nbits_quantizer_module()
    algo_config = nbits_algo_config(method, source, calib_windows, tokenizer_dir)
    quantizer = quantizer_class(str(source), block_size=NBITS_BLOCK, is_symmetric=True, algo_config=algo_config)
    try:
        quantizer.process()
    except ImportError as error:  # older ORT: RTN/GPTQ import the neural-compressor package
        raise PeerUnavailable(f"{method} needs a package that is not installed: {error}") from error
    quantizer.model.save_model_to_file(str(target), use_external_data_format=external)


def ort_quantize(method: str, source: Path, target: Path, calib_windows: int, tokenizer_dir: Path) -> None:
    import onnx
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_dynamic,
        quantize_static,
    )

    from graphq.evaluate import model_file_bytes
    from graphq.modelio import EXTERNAL_DATA_THRESHOLD_BYTES
    from graphq.runtime import GraphSignature
    from graphq.verify import cpu_session

    external = model_file_bytes(source) > EXTERNAL_DATA_THRESHOLD_BYTES
    if method in NBITS_METHODS:
        nbits_quantize(method, source, target, calib_windows, tokenizer_dir, external)
        return
    if method == "ort-dynamic":
        quantize_dynamic(source, target, per_channel=True, weight_type=QuantType.QInt8,
                         op_types_to_quantize=["MatMul"], use_external_data_format=external)
        return

    proto = onnx.load(str(source), load_external_data=False)
    weights = {tensor.name for tensor in proto.graph.initializer}
    weight_matmuls = [n.name for n in proto.graph.node if n.op_type == "MatMul" and n.input[1] in weights]
    if not weight_matmuls or not all(weight_matmuls):
        raise ValueError("the graph has no named MatMul nodes with a constant weight to quantize")
    del proto
    windows = calibration_windows(tokenizer_dir, calib_windows)
    signature = GraphSignature.of(cpu_session(source, optimization="disable"))

    class WindowReader(WindowFeeds, CalibrationDataReader):
        pass

    quantize_static(
        source, target, WindowReader(signature, windows),
        quant_format=QuantFormat.QDQ,
        op_types_to_quantize=["MatMul"],
        nodes_to_quantize=weight_matmuls,
        per_channel=True,
        activation_type=QuantType.QInt8,
        weight_type=QuantType.QInt8,
        calibrate_method=CalibrationMethod.MinMax,
        use_external_data_format=external,
        extra_options=dict(ORT_STATIC_EXTRA_OPTIONS),
    )


def worker_main(args: list[str]) -> int:
    """Child process: quantize with ONNX Runtime; any failure is one line on stderr, exit 1."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr)
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        method, source, target, calib, tokenizer_dir = args
        ort_quantize(method, Path(source), Path(target), int(calib), Path(tokenizer_dir))
    except PeerUnavailable as reason:
        print(f"bench_quality: skipped: {first_line(str(reason))}", file=sys.stderr)
        return EXIT_SKIPPED
    except MemoryError:
        print("bench_quality: error: out of memory", file=sys.stderr)
        return EXIT_ERROR
    except Exception as error:  # report whatever ORT raises as one line in the row
        print(f"bench_quality: error: {type(error).__name__}: {first_line(str(error))}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_OK


# ---------------------------------------------------------------- measurement


def first_test_window(config: BenchConfig):
    from graphq.data import WIKITEXT_TEST, read_text
    from graphq.evaluate import EvalConfig, load_tokenizer, token_windows

    tokenizer = load_tokenizer(config.model_path, config.model_dir)
    ids = tokenizer(read_text(WIKITEXT_TEST), add_special_tokens=False)["input_ids"]
    return token_windows(ids, EvalConfig(windows=1, window_tokens=WINDOW_TOKENS))[0]


def perplexity_of(config: BenchConfig, model_path: Path) -> float:
    from graphq.evaluate import EvalConfig, evaluate_model

    eval_config = EvalConfig(windows=config.windows, window_tokens=WINDOW_TOKENS, threads=config.threads,
                             measure_speed=False)
    return evaluate_model(model_path, eval_config, tokenizer_dir=config.model_dir).perplexity


def paired_prefill(float_session, session, window, repeats: int) -> tuple[float, float]:
    """Median prefill seconds of (float, method), timed alternately in the same rounds."""
    from graphq.evaluate import prefill_seconds

    float_times, method_times = [], []
    for round_ in range(repeats):
        order = ((float_session, float_times), (session, method_times))
        for sess, times in order if round_ % 2 == 0 else reversed(order):
            times.append(prefill_seconds(sess, window, 1))  # one warm-up + one timed run
    return statistics.median(float_times), statistics.median(method_times)


def measure_speed(config: BenchConfig, paths: dict[str, Path]) -> tuple[dict[str, tuple[float, float]], dict[str, str]]:
    """(method -> (prefill seconds, speed ratio to float), method -> failure); float paired with each method."""
    from graphq.evaluate import prefill_seconds
    from graphq.verify import cpu_session

    window = first_test_window(config)
    float_session = cpu_session(config.model_path, threads=config.threads)
    speeds, failures, float_times = {}, {}, []
    for method, path in paths.items():
        if method == "float":
            continue
        logger.info("%s: prefill, paired with float (%d rounds)", method, config.repeats)
        try:
            session = cpu_session(path, threads=config.threads)
            float_s, method_s = paired_prefill(float_session, session, window, config.repeats)
        except Exception as error:  # ORT cannot load or run this method's graph: the row says so
            failures[method] = f"failed: prefill: {first_line(str(error)) or type(error).__name__}"
            continue
        finally:
            session = None  # one quantized session in memory at a time
        float_times.append(float_s)
        speeds[method] = (method_s, float_s / method_s)
    if "float" in paths:
        if not float_times:
            logger.info("float: prefill (%d repeats)", config.repeats)
            float_times.append(prefill_seconds(float_session, window, config.repeats))
        speeds["float"] = (statistics.median(float_times), 1.0)
    return speeds, failures


# ---------------------------------------------------------------- output


def finite_or_none(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def build_row(method: str, result: dict, float_ppl: float, float_bytes: int) -> Row:
    ppl = finite_or_none(result.get("perplexity"))
    size = result.get("file_bytes")
    prefill, speed_ratio = result.get("prefill", (None, None))
    return Row(
        method=method,
        status=result["status"],
        model_path=result.get("model_path"),
        perplexity=ppl,
        perplexity_ratio=None if ppl is None else ppl / float_ppl,
        prefill_seconds=finite_or_none(prefill),
        speed_ratio=finite_or_none(speed_ratio),
        file_bytes=size,
        size_ratio=None if size is None else size / float_bytes,
        quantize_seconds=result.get("quantize_seconds"),
    )


def protocol_of(config: BenchConfig) -> dict:
    import onnxruntime

    return {
        "model": str(config.model_path),
        "perplexity": f"wiki.test.raw, first {config.windows} windows x {WINDOW_TOKENS} tokens",
        "calibration": f"ort-static-qdq, ort-nbits-gptq-g128: wiki.valid.tokens, first {config.calib_windows} windows "
                       f"x {WINDOW_TOKENS} tokens (graphq recipes calibrate as the recipe defines)",
        "prefill": f"first {WINDOW_TOKENS}-token test window, {config.threads} threads, median of "
                   f"{config.repeats} rounds paired with float in this run",
        "windows": config.windows,
        "calib_windows": config.calib_windows,
        "threads": config.threads,
        "repeats": config.repeats,
        "onnxruntime_version": onnxruntime.__version__,
        "ort_static_extra_options": ORT_STATIC_EXTRA_OPTIONS,
        "ort_nbits": {
            "ort-nbits-rtn-g128": f"DefaultWeightOnlyQuantConfig(block_size={NBITS_BLOCK}, is_symmetric=True)",
            "ort-nbits-hqq-g128": f"HQQWeightOnlyQuantConfig(block_size={NBITS_BLOCK}, bits=4)",
            "ort-nbits-gptq-g128": f"GPTQWeightOnlyQuantConfig(percdamp=0.01, block_size=128, actorder=False), "
                                   f"groups of {NBITS_BLOCK}, symmetric",
        },
    }


def table(config: BenchConfig, rows: list[Row]) -> str:
    def fmt(value, spec, suffix=""):
        return "n/a" if value is None else format(value, spec) + suffix

    protocol = protocol_of(config)
    header = [
        f"Quantization methods on {protocol['model']} (onnxruntime {protocol['onnxruntime_version']})",
        f"  perplexity: {protocol['perplexity']}; calibration: {protocol['calibration']}",
        f"  prefill: {protocol['prefill']}; speed = float prefill s / method prefill s",
        "  size: .onnx + external data; quant s: wall clock of the quantizing process",
    ]
    columns = ("method", "ppl", "ppl/float", "prefill s", "speed", "size MB", "size/float", "quant s", "status")
    body = [
        (r.method, fmt(r.perplexity, ".4f"), fmt(r.perplexity_ratio, ".3f", "x"), fmt(r.prefill_seconds, ".3f"),
         fmt(r.speed_ratio, ".2f", "x"), fmt(None if r.file_bytes is None else r.file_bytes / 1e6, ".1f"),
         fmt(r.size_ratio, ".3f", "x"), fmt(r.quantize_seconds, ".1f"), r.status)
        for r in rows
    ]
    widths = [max(len(line[i]) for line in (columns, *body)) for i in range(len(columns))]
    left = (0, len(columns) - 1)
    lines = ["  ".join(cell.ljust(w) if i in left else cell.rjust(w) for i, (cell, w) in enumerate(zip(line, widths)))
             for line in (columns, *body)]
    return "\n".join(header + [""] + [line.rstrip() for line in lines])


# ---------------------------------------------------------------- driver


def run(config: BenchConfig) -> list[Row]:
    """Quantize, evaluate and time every method; the float model's failures are fatal, others' are rows."""
    from graphq.evaluate import model_file_bytes

    before = sha256_files(config.model_dir)
    out_dirs = {m: prepare_method_dir(config, m) for m in config.methods if m != "float"}
    float_bytes = model_file_bytes(config.model_path)
    logger.info("float: perplexity on %d windows", config.windows)
    float_ppl = perplexity_of(config, config.model_path)
    results: dict[str, dict] = {}
    paths: dict[str, Path] = {}
    if "float" in config.methods:
        results["float"] = {"status": "ok", "model_path": str(config.model_path), "perplexity": float_ppl,
                            "file_bytes": float_bytes}
        paths["float"] = config.model_path

    for method, out_dir in out_dirs.items():
        status, seconds = quantize(config, method, out_dir)
        result = results[method] = {"status": status, "quantize_seconds": seconds}
        if status != "ok":
            logger.warning("%s: %s", method, status)
            continue
        target = out_dir / "model.onnx"
        result.update(model_path=str(target), file_bytes=model_file_bytes(target))
        logger.info("%s: quantized in %.1f s, %.1f MB; perplexity on %d windows", method, seconds,
                    result["file_bytes"] / 1e6, config.windows)
        try:
            result["perplexity"] = perplexity_of(config, target)
        except Exception as error:  # a quantized graph ORT cannot run: the row says so
            result["status"] = f"failed: eval: {first_line(str(error)) or type(error).__name__}"
            logger.warning("%s: %s", method, result["status"])
            continue
        paths[method] = target

    speeds, failures = measure_speed(config, paths)
    for method, speed in speeds.items():
        results[method]["prefill"] = speed
    for method, failure in failures.items():
        results[method]["status"] = failure
        logger.warning("%s: %s", method, failure)
    if sha256_files(config.model_dir) != before:
        raise RuntimeError(f"the float model folder {config.model_dir} changed during the benchmark")
    return [build_row(m, results[m], float_ppl, float_bytes) for m in config.methods]


def parse_args(argv: list[str] | None) -> tuple[BenchConfig, bool, int]:
    parser = argparse.ArgumentParser(prog="bench_quality.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None,
                        help="float ONNX LM folder with model.onnx and tokenizer "
                             "(default: WORK_DIR/float, exported if missing)")
    parser.add_argument("--methods", default=",".join(DEFAULT_METHODS), help="comma list (default: %(default)s)")
    parser.add_argument("--windows", type=int, default=40, help="perplexity windows (default: %(default)s)")
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=2, help="ORT intra-op threads (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=5, help="prefill rounds, median (default: %(default)s)")
    parser.add_argument("--work-dir", type=Path, default=Path("runs/bench"),
                        help="one subfolder per method (default: %(default)s)")
    parser.add_argument("--json", type=Path, default=None, help="also write the protocol and rows as JSON")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output (-vv: debug)")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    args = parser.parse_args(argv)
    for name in ("windows", "calib_windows", "threads", "repeats"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    config = BenchConfig(
        model_dir=args.model if args.model is not None else args.work_dir / "float",
        methods=parse_methods(args.methods),
        windows=args.windows,
        calib_windows=args.calib_windows,
        threads=args.threads,
        repeats=args.repeats,
        work_dir=args.work_dir,
        json_path=args.json,
    )
    if config.model_dir.exists() and not config.model_dir.is_dir():
        raise UsageError(f"--model {config.model_dir}: not a folder (pass the folder that holds model.onnx)")
    if config.json_path is not None and config.json_path.resolve().is_relative_to(config.model_dir.resolve()):
        raise UsageError(f"--json {config.json_path} lies inside the float model folder")
    level = logging.WARNING if args.quiet else (logging.DEBUG if args.verbose > 1 else logging.INFO)
    return config, args.model is not None, level


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == [WORKER_COMMAND]:
        return worker_main(argv[1:])
    try:
        config, explicit_model, level = parse_args(argv)
    except UsageError as error:
        print(f"bench_quality: error: {error}", file=sys.stderr)
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
        ensure_float_model(config, explicit_model)
        rows = run(config)
    except UsageError as error:
        print(f"bench_quality: error: {error}", file=sys.stderr)
        return EXIT_USAGE
    except (GraphqError, RuntimeError, OSError) as error:
        print(f"bench_quality: error: {first_line(str(error)) or type(error).__name__}", file=sys.stderr)
        return EXIT_ERROR
    logger.info("benchmark finished in %.0f s", time.perf_counter() - start)
    print(table(config, rows))
    if config.json_path is not None:
        from graphq.modelio import write_text_atomic

        document = {"protocol": protocol_of(config), "rows": [dataclasses.asdict(r) for r in rows]}
        try:
            write_text_atomic(config.json_path, json.dumps(document, indent=2, allow_nan=False) + "\n")
        except GraphqError as error:
            print(f"bench_quality: error: {error}", file=sys.stderr)
            return EXIT_ERROR
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
