"""The ``graphq`` command line: the only place that prints, parses arguments and sets up logging.

Errors in the user's input surface as one line on stderr and a non-zero exit status: 1 for a
:class:`~graphq.errors.GraphqError`, 2 for a usage error. An unexpected exception is reported in
one line too, with exit status 70; ``GRAPHQ_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import warnings
from pathlib import Path

import click

from graphq.errors import GraphqError, OutputPathError

logger = logging.getLogger("graphq")

EXIT_USER_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERNAL = 70


def _configure_logging(verbose: int, quiet: bool) -> None:
    level = logging.WARNING if quiet else (logging.DEBUG if verbose > 1 else logging.INFO)
    logging.basicConfig(level=level, format="%(levelname).1s %(name)s: %(message)s", stream=sys.stderr, force=True)
    for noisy in ("onnx_ir", "onnxscript", "transformers", "optimum", "torch"):
        logging.getLogger(noisy).setLevel(logging.DEBUG if verbose > 1 else logging.WARNING)
    if verbose < 2:
        warnings.filterwarnings("ignore")
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # Never reach out to a model hub.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="graphq")
@click.option("-v", "--verbose", count=True, help="More log output (-vv: debug, with library warnings).")
@click.option("-q", "--quiet", is_flag=True, help="Only warnings and errors.")
def app(verbose: int, quiet: bool) -> None:
    """Quantize transformer language models as ONNX graphs."""
    _configure_logging(verbose, quiet)


@app.command()
@click.argument("model", required=False)
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True,
              help="Output folder (model.onnx, tokenizer, graphq_export.json).")
@click.option("--with-past", is_flag=True, help="Export with KV-cache inputs/outputs (decoders).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--opset", type=int, default=None, help="ONNX opset (default: the exporter's).")
@click.option("--fuse", is_flag=True,
              help="Also fuse norms, rotary embedding, attention and GELU into ONNX Runtime's contrib ops.")
def export(model: str | None, output: Path, with_past: bool, overwrite: bool, opset: int | None, fuse: bool) -> None:
    """Export MODEL to a verified, canonicalised ONNX graph.

    MODEL is smollm2-135m (the default), a Hugging Face model folder, or a .gguf file.
    """
    from graphq.export import ExportConfig, export_model

    result = export_model(model, output, ExportConfig(with_past=with_past, overwrite=overwrite, opset=opset, fuse=fuse))
    for record in result.passes:
        click.echo(f"  pass {record.summary()}")
    click.echo(
        f"exported {result.source} ({result.task}) -> {result.model_path} "
        f"[{result.file_bytes / 1e6:.1f} MB, max |ORT - PyTorch| = {result.parity_max_abs_diff:.2e}]"
    )


@app.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .onnx file.")
@click.option("--fuse", is_flag=True,
              help="Also fuse norms, rotary embedding, attention and GELU into ONNX Runtime's contrib ops.")
@click.option("--max-positions", type=int, default=None,
              help="[--fuse] Rows of the rotary cos/sin cache (default: max_position_embeddings of the "
                   "config.json beside MODEL; without one the cache is computed at run time).")
def optimize(model: Path, output: Path, fuse: bool, max_positions: int | None) -> None:
    """Run the canonicalisation passes (cleanup, deduplication, shape inference) on an ONNX file,
    and with --fuse the fusions into ONNX Runtime's contrib ops."""
    from graphq.modelio import check_output_path, load_model, max_positions_beside, resolve_model_file, save_model
    from graphq.passes import FusionConfig, FusionPass, canonicalize_passes
    from graphq.pipeline import run_pipeline
    from graphq.verify import verify_model_file

    if max_positions is not None and not fuse:
        raise GraphqError("--max-positions applies only with --fuse")
    source = resolve_model_file(model)
    check_output_path(output, [source, source.with_name(source.name + ".data")])
    if output.exists():
        raise OutputPathError(f"output {output} already exists; choose a new path")
    passes = canonicalize_passes()
    fusion = None
    if fuse:
        fusion = FusionPass(FusionConfig(max_positions=max_positions or max_positions_beside(source)))
        passes.append(fusion)
    result = run_pipeline(load_model(source), passes)
    save_model(result.model, output)
    try:
        verify_model_file(output)
    except GraphqError:
        for path in (output, output.with_name(output.name + ".data")):
            path.unlink(missing_ok=True)
        raise
    for record in result.records:
        click.echo(f"  pass {record.summary()}")
    if fusion is not None:
        click.echo(f"  fused: {fusion.report.summary()}")
    click.echo(f"wrote {output}")


@app.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .onnx file.")
@click.option("--recipe", "recipe_name", default="w8a8", show_default=True,
              help="Built-in recipe (w8a8, w8a8-int8-head, w8a8-nosmooth, w8a8-static, w8a8-trt, w4-rtn, w4-gptq, "
                   "w4-awq, w4-rtn-g32-asym, w4-gptq-g32-asym, w8-rtn) or a .json/.yaml recipe file.")
@click.option("--alpha", type=float, default=None, help="[w8a8] SmoothQuant migration strength a in [0, 1].")
@click.option("--no-smoothquant", is_flag=True, help="[w8a8] Disable SmoothQuant.")
@click.option("--activations", type=click.Choice(["static", "dynamic-token"]), default=None,
              help="[w8a8] Activation quantization: static per-tensor (calibrated) or dynamic per-token.")
@click.option("--range", "range_method", type=click.Choice(["minmax", "percentile", "mse", "k_sigma"]), default=None,
              help="[w8a8] Static activation range estimator.")
@click.option("--bits", type=int, default=None, help="[weight-only] Bits per weight (2-8).")
@click.option("--group-size", type=int, default=None, help="[weight-only] Group size along the input dimension (0: per channel).")
@click.option("--asym/--sym", "asymmetric", default=None, help="[weight-only] Asymmetric (zero point) or symmetric groups.")
@click.option("--format", "emit_format", type=click.Choice(["matmulnbits", "qdq"]), default=None,
              help="[weight-only] com.microsoft.MatMulNBits or blockwise DequantizeLinear (opset 21).")
@click.option("--accuracy-level", type=int, default=None, help="[weight-only] MatMulNBits accuracy_level (0 unset; 4: int8 activations).")
@click.option("--embedding", type=click.Choice(["quantized", "float"]), default=None,
              help="[weight-only] Token embedding as GatherBlockQuantized (sharing a tied head's codes) or float.")
@click.option("--sequential/--one-pass", default=None,
              help="[weight-only gptq/awq] Calibrate each block on the already-quantized blocks before it (default) "
                   "or all blocks on the float model in one pass.")
@click.option("--calib-windows", type=int, default=None, help="Calibration windows of wiki.valid.tokens.")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None, help="Calibration text file.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="Tokenizer folder (default: the model's).")
@click.option("--save-recipe", type=click.Path(path_type=Path), default=None, help="Also write the effective recipe (.json/.yaml).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def quantize(model: Path, output: Path, recipe_name: str, alpha: float | None, no_smoothquant: bool,
             activations: str | None, range_method: str | None, bits: int | None, group_size: int | None,
             asymmetric: bool | None, emit_format: str | None, accuracy_level: int | None, embedding: str | None,
             sequential: bool | None, calib_windows: int | None,
             calib_text: Path | None, tokenizer: Path | None, save_recipe: Path | None, overwrite: bool) -> None:
    """Quantize MODEL (.onnx) with a recipe; the result is verified before it is written."""
    import dataclasses

    from graphq.config import W8A8Recipe, dump_recipe, load_recipe
    from graphq.modelio import write_text_atomic
    from graphq.passes.smoothquant import SmoothQuantConfig
    from graphq.quantize import quantize_model
    from graphq.weight_only import quantize_weights

    recipe = load_recipe(recipe_name)
    w8a8_options = {"--alpha": alpha, "--no-smoothquant": no_smoothquant or None, "--activations": activations,
                    "--range": range_method}
    weight_options = {"--bits": bits, "--group-size": group_size, "--asym/--sym": asymmetric, "--format": emit_format,
                      "--accuracy-level": accuracy_level, "--embedding": embedding, "--sequential/--one-pass": sequential}
    is_w8a8 = isinstance(recipe, W8A8Recipe)
    misplaced = [k for k, v in (weight_options if is_w8a8 else w8a8_options).items() if v is not None]
    if misplaced:
        raise GraphqError(f"{misplaced[0]} does not apply to the {'w8a8' if is_w8a8 else 'weight-only'} recipe '{recipe.name}'")
    if is_w8a8:
        if no_smoothquant:
            recipe = dataclasses.replace(recipe, smoothquant=None)
        elif alpha is not None:
            recipe = dataclasses.replace(recipe, smoothquant=SmoothQuantConfig(alpha=alpha))
        if activations is not None:
            recipe = dataclasses.replace(recipe, activations=dataclasses.replace(recipe.activations, activation_scheme=activations))
        if range_method is not None:
            recipe = dataclasses.replace(recipe, activation_range=dataclasses.replace(recipe.activation_range, method=range_method))
    else:
        weights = recipe.weights
        for field, value in (("bits", bits), ("group_size", group_size), ("symmetric", None if asymmetric is None else not asymmetric)):
            if value is not None:
                weights = dataclasses.replace(weights, **{field: value})
        emit = recipe.emit
        for field, value in (("format", emit_format), ("accuracy_level", accuracy_level)):
            if value is not None:
                emit = dataclasses.replace(emit, **{field: value})
        recipe = dataclasses.replace(recipe, weights=weights, emit=emit)
        if embedding is not None:
            recipe = dataclasses.replace(recipe, embedding=embedding)
        if sequential is not None:
            recipe = dataclasses.replace(recipe, sequential=sequential)
    calibration = recipe.calibration
    if calib_windows is not None:
        calibration = dataclasses.replace(calibration, windows=calib_windows)
    if calib_text is not None:
        calibration = dataclasses.replace(calibration, text_path=calib_text)
    recipe = dataclasses.replace(recipe, calibration=calibration)
    run = quantize_model if is_w8a8 else quantize_weights
    result = run(model, output, recipe, tokenizer_dir=tokenizer, overwrite=overwrite)
    report = result.to_json()
    write_text_atomic(output.with_suffix(".graphq.json"), json.dumps(report, indent=2) + "\n")
    if save_recipe is not None:
        write_text_atomic(save_recipe, dump_recipe(recipe, save_recipe))
    if is_w8a8:
        click.echo(
            f"quantized {len(report['quantized_nodes'])} MatMuls ({recipe.name}; {len(report['float_nodes'])} kept float; "
            f"SmoothQuant on {len(result.smoothing)} activations) -> {output} in {result.seconds:.1f}s; "
            f"ORT integer kernels: {result.integer_kernels}"
        )
    else:
        size = report["size_breakdown"]
        click.echo(
            f"quantized {len(report['quantized_nodes'])} MatMul weights ({recipe.name}: {recipe.method}, "
            f"{recipe.weights.bits} bits, group {recipe.weights.group_size}, "
            f"{'symmetric' if recipe.weights.symmetric else 'asymmetric'}, {recipe.emit.format}) -> {output} "
            f"in {result.seconds:.1f}s\n"
            f"  size: {result.file_bytes / 1e6:.1f} MB = {size['file_over_bound']:.3f}x the bound "
            f"({size['quantized_weights']} weights x {size['bits_per_quantized_weight_bound']:.3f} bits "
            f"+ {size['float_initializer_bytes'] / 1e6:.1f} MB float initializers)"
        )


@app.command("eval")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--windows", type=int, default=40, show_default=True, help="Number of windows of WikiText-2 test.")
@click.option("--window-tokens", type=int, default=512, show_default=True, help="Tokens per window.")
@click.option("--threads", type=int, default=2, show_default=True,
              help="ONNX Runtime intra-op threads (fixed, for comparable timings).")
@click.option("--speed/--no-speed", default=True, show_default=True, help="Measure prefill and decode speed.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None,
              help="Tokenizer folder (default: the model's folder).")
@click.option("--text", type=click.Path(path_type=Path), default=None,
              help="Evaluation text (default: the shipped wiki.test.raw).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None,
              help="Also write the numbers as JSON to this path.")
def eval_command(model: Path, windows: int, window_tokens: int, threads: int, speed: bool,
                 tokenizer: Path | None, text: Path | None, json_path: Path | None) -> None:
    """Perplexity on WikiText-2 test, prefill latency, decode tokens/s and file size of MODEL (.onnx)."""
    from graphq.evaluate import EvalConfig, evaluate_model
    from graphq.modelio import check_output_path, resolve_model_file, write_text_atomic

    if json_path is not None:
        check_output_path(json_path, [resolve_model_file(model)])
    config = EvalConfig(windows=windows, window_tokens=window_tokens, threads=threads, measure_speed=speed,
                        **({"text_path": text} if text else {}))
    result = evaluate_model(model, config, tokenizer_dir=tokenizer)
    click.echo(result.table())
    if json_path is not None:
        write_text_atomic(json_path, json.dumps(result.to_json(), indent=2) + "\n")


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the CLI and turn every failure into one line and an exit status."""
    try:
        app.main(args=argv, prog_name="graphq", standalone_mode=False)
    except GraphqError as error:
        click.echo(f"graphq: error: {error}", err=True)
        return EXIT_USER_ERROR
    except click.exceptions.Exit as exit_:
        return exit_.exit_code
    except click.ClickException as error:
        error.show()
        return EXIT_USAGE
    except (click.exceptions.Abort, KeyboardInterrupt):
        click.echo("graphq: interrupted", err=True)
        return 130
    except Exception as error:  # the last line of defence: never a traceback unless asked for
        if os.environ.get("GRAPHQ_DEBUG"):
            raise
        first = str(error).strip().splitlines()[0] if str(error).strip() else ""
        click.echo(
            f"graphq: internal error: {type(error).__name__}: {first} "
            "(set GRAPHQ_DEBUG=1 for the traceback, and please report it)",
            err=True,
        )
        return EXIT_INTERNAL
    return 0


if __name__ == "__main__":
    sys.exit(main())
