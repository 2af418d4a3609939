"""The ``graphq`` command line: the only place that prints, parses arguments and sets up logging.

Errors in the user's input surface as one line on stderr and a non-zero exit status: 1 for a
:class:`~graphq.errors.GraphqError`, 2 for a usage error. An unexpected exception is reported in
one line too, with exit status 70; ``GRAPHQ_DEBUG=1`` shows its traceback.
"""

from __future__ import annotations

import dataclasses
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
        # What TRANSFORMERS_VERBOSITY does at import, also when transformers is already imported
        # (graphq.cli.main called in-process).
        logging.getLogger("transformers").setLevel(logging.ERROR)
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

    MODEL is smollm2-135m (the default), all-minilm-l6-v2 (a sentence encoder), a Hugging Face model
    folder, or a .gguf file.
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
    from graphq.modelio import check_output_path, load_model, max_positions_beside, resolve_model_file, save_verified
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
    save_verified(result.model, output, verify_model_file)
    for record in result.records:
        click.echo(f"  pass {record.summary()}")
    if fusion is not None:
        click.echo(f"  fused: {fusion.report.summary()}")
    click.echo(f"wrote {output}")


@app.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Output .onnx file.")
@click.option("--recipe", "recipe_name", default=None,
              help="Built-in recipe (w8a8, w8a8-int8-head, w8a8-nosmooth, w8a8-static, w8a8-trt, w8a8-peg, w4-rtn, w4-gptq, "
                   "w4-awq, w4-awq-gptq, w4-rtn-g32-asym, w4-gptq-g32-asym, w4-rtn-g32-fzp, w4-gptq-g32-fzp, w8-rtn, w4-cuberoot, "
                   "w8a8-cuberoot, mixed) or a .json/.yaml recipe file (default w8a8; none with --kv-cache/--attention alone).")
@click.option("--kv-cache", "kv_cache", type=click.Choice(["int8"]), default=None,
              help="With-past graphs: the KV cache crosses the graph boundary as int8 + per-token scales.")
@click.option("--attention", "attention", type=click.Choice(["int8"]), default=None,
              help="Int8 (QDQ-simulated) inputs to the QK^T and PV MatMuls; Softmax stays float.")
@click.option("--alpha", type=float, default=None, help="[w8a8] SmoothQuant migration strength a in [0, 1].")
@click.option("--no-smoothquant", is_flag=True, help="[w8a8] Disable SmoothQuant.")
@click.option("--activations", type=click.Choice(["static", "dynamic-token"]), default=None,
              help="[w8a8] Activation quantization: static per-tensor (calibrated) or dynamic per-token.")
@click.option("--range", "range_method", type=click.Choice(["minmax", "percentile", "mse", "k_sigma", "k_sigma_search"]),
              default=None, help="[w8a8] Static activation range estimator.")
@click.option("--weight-clip", type=click.Choice(["none", "k_sigma", "k_sigma_search"]), default=None,
              help="[w8a8] Per-column int8 weight range: max |w|, k-sigma clipped, or k searched per tensor.")
@click.option("--k", "k_sigma", type=float, default=None, help="[w8a8] k of k-sigma clipping (activations and weights; > 0).")
@click.option("--peg-groups", type=int, default=None,
              help="[w8a8] Per-embedding-group static activations: K groups of hidden channels (must divide the hidden sizes).")
@click.option("--peg-permute/--no-peg-permute", default=None, help="[w8a8] Gather PEG groups by calibrated channel range.")
@click.option("--bits", type=int, default=None, help="[weight-only] Bits per weight (2-8).")
@click.option("--group-size", type=int, default=None, help="[weight-only] Group size along the input dimension (0: per channel).")
@click.option("--asym/--sym", "asymmetric", default=None, help="[weight-only] Asymmetric (zero point) or symmetric groups.")
@click.option("--float-zero-points/--int-zero-points", "float_zero_points", default=None,
              help="[weight-only] Asymmetric groups: float zero points (the affine s q + m of Q4_1; MatMulNBits only) "
                   "or integer ones.")
@click.option("--scale-dtype", type=click.Choice(["float16", "float32", "q8-pow2"]), default=None,
              help="[weight-only] How group scales (and float zero points' offsets) are stored: float16 (a Cast that "
                   "ONNX Runtime folds at load), float32, or q8-pow2 (8-bit codes times a power of two per column, "
                   "folded at load the same way). Default: the recipe's; float32 with --format qdq (the form TensorRT consumes).")
@click.option("--format", "emit_format", type=click.Choice(["matmulnbits", "qdq", "codebook", "dq-cube"]), default=None,
              help="[weight-only] com.microsoft.MatMulNBits or blockwise DequantizeLinear (opset 21); cube-root "
                   "weights: codebook Gather or DequantizeLinear + Pow 3.")
@click.option("--accuracy-level", type=int, default=None, help="[weight-only] MatMulNBits accuracy_level for every node (0: unset, float activations; 4: int8 "
                   "activations). Default: 4 for 8-bit weights (ORT's float path for them is ~90x slower), unset for others.")
@click.option("--embedding", type=click.Choice(["quantized", "float"]), default=None,
              help="[weight-only] Token embedding as GatherBlockQuantized (sharing a tied head's codes) or float.")
@click.option("--embedding-bits", type=click.Choice(["4", "8"]), default=None,
              help="[weight-only] Bits of the quantized embedding (and of a tied LM head sharing its codes).")
@click.option("--tune-steps", type=int, default=None,
              help="[weight-only] After rounding, train the group scales end to end against the float model for this "
                   "many calibration windows (knowledge distillation; codes unchanged; about 3.5 s a step for a "
                   "135M model on 2 cores). 0: off.")
@click.option("--sequential/--one-pass", default=None,
              help="[weight-only gptq/awq] Calibrate each block on the already-quantized blocks before it (default) "
                   "or all blocks on the float model in one pass.")
@click.option("--budget-bits", type=float, default=None,
              help="[mixed] Average bits per weight (at K = 576: int4 g128 = 4.08, int4-g32-fzp = 4.53, int8 = 8.125, "
                   "float = 32; default 4.5).")
@click.option("--target-ratio", type=float, default=None,
              help="[mixed] Instead of a budget: the smallest plan with predicted perplexity ratio <= this.")
@click.option("--analysis", "analysis_path", type=click.Path(path_type=Path), default=None,
              help="[mixed] Sensitivity analysis of MODEL (graphq analyze); default: the cache, else computed.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None,
              help="[mixed] Precision plan file (node name -> int4|int8|float) instead of planning from the analysis.")
@click.option("--method", "mixed_method", type=click.Choice(["gptq", "rtn"]), default=None,
              help="[mixed] How int4/int8 weights are rounded (default gptq, act_order).")
@click.option("--calib-windows", type=int, default=None, help="Calibration windows of wiki.valid.tokens.")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None, help="Calibration text file.")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="Tokenizer folder (default: the model's).")
@click.option("--save-recipe", type=click.Path(path_type=Path), default=None, help="Also write the effective recipe (.json/.yaml).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file.")
def quantize(model: Path, output: Path, recipe_name: str | None, kv_cache: str | None, attention: str | None,
             alpha: float | None, no_smoothquant: bool,
             activations: str | None, range_method: str | None, weight_clip: str | None, k_sigma: float | None,
             peg_groups: int | None, peg_permute: bool | None, bits: int | None, group_size: int | None,
             asymmetric: bool | None, float_zero_points: bool | None, scale_dtype: str | None, emit_format: str | None,
             accuracy_level: int | None, embedding: str | None, embedding_bits: str | None, tune_steps: int | None,
             sequential: bool | None, budget_bits: float | None, target_ratio: float | None,
             analysis_path: Path | None, plan_path: Path | None, mixed_method: str | None, calib_windows: int | None,
             calib_text: Path | None, tokenizer: Path | None, save_recipe: Path | None, overwrite: bool) -> None:
    """Quantize MODEL (.onnx) with a recipe; the result is verified before it is written."""
    import dataclasses

    from graphq.attention_quant import AttentionQuantConfig
    from graphq.config import W8A8Recipe, dump_recipe, load_recipe
    from graphq.mixed import MixedRecipe
    from graphq.passes.peg import PegConfig
    from graphq.passes.smoothquant import SmoothQuantConfig
    from graphq.quantize import quantize_model
    from graphq.weight_only import quantize_weights

    cache_config = AttentionQuantConfig(kv_cache=kv_cache, attention=attention)
    if recipe_name is None and cache_config.active:
        options = {"--alpha": alpha, "--no-smoothquant": no_smoothquant or None, "--activations": activations,
                   "--range": range_method, "--bits": bits, "--group-size": group_size, "--asym/--sym": asymmetric,
                   "--float-zero-points/--int-zero-points": float_zero_points, "--scale-dtype": scale_dtype, "--format": emit_format,
                   "--accuracy-level": accuracy_level, "--embedding": embedding,
                   "--embedding-bits": embedding_bits, "--tune-steps": tune_steps, "--sequential/--one-pass": sequential,
                   "--budget-bits": budget_bits,
                   "--target-ratio": target_ratio, "--analysis": analysis_path, "--plan": plan_path,
                   "--method": mixed_method, "--calib-windows": calib_windows, "--calib-text": calib_text,
                   "--save-recipe": save_recipe}
        misplaced = [k for k, v in options.items() if v is not None]
        if misplaced:
            raise GraphqError(f"{misplaced[0]} needs a weight recipe (--recipe); --kv-cache/--attention alone quantize "
                              "only the attention")
        _quantize_cache(model, output, cache_config, overwrite=overwrite)
        return
    recipe = load_recipe(recipe_name or "w8a8")
    mixed_options = {"--budget-bits": budget_bits, "--target-ratio": target_ratio, "--analysis": analysis_path,
                     "--plan": plan_path, "--method": mixed_method}
    if isinstance(recipe, MixedRecipe):
        if cache_config.active:
            raise GraphqError("--kv-cache/--attention combine with w8a8 and weight-only recipes, not with 'mixed'")
        misplaced = [k for k, v in {"--alpha": alpha, "--no-smoothquant": no_smoothquant or None, "--activations": activations,
                                    "--range": range_method, "--bits": bits, "--group-size": group_size,
                                    "--asym/--sym": asymmetric, "--float-zero-points/--int-zero-points": float_zero_points,
                                    "--scale-dtype": scale_dtype, "--sequential/--one-pass": sequential, "--weight-clip": weight_clip,
                                    "--tune-steps": tune_steps,
                                    "--k": k_sigma, "--peg-groups": peg_groups, "--peg-permute": peg_permute}.items()
                     if v is not None]
        if misplaced:
            from graphq.numerics.sensitivity import PRECISIONS

            raise GraphqError(f"{misplaced[0]} does not apply to the mixed recipe '{recipe.name}' "
                              f"(its precisions are {'/'.join(PRECISIONS)})")
        if mixed_method is not None:
            recipe = dataclasses.replace(recipe, method=mixed_method)
        _quantize_mixed(model, output, recipe, budget_bits=budget_bits, target_ratio=target_ratio, analysis_path=analysis_path,
                        plan_path=plan_path, emit_format=emit_format, accuracy_level=accuracy_level, embedding=embedding,
                        calib_windows=calib_windows, calib_text=calib_text, tokenizer=tokenizer, save_recipe=save_recipe,
                        overwrite=overwrite)
        return
    misplaced = [k for k, v in mixed_options.items() if v is not None]
    if misplaced:
        raise GraphqError(f"{misplaced[0]} applies to the mixed recipe only, not to '{recipe.name}'")
    w8a8_options = {"--alpha": alpha, "--no-smoothquant": no_smoothquant or None, "--activations": activations,
                    "--range": range_method, "--weight-clip": weight_clip, "--k": k_sigma, "--peg-groups": peg_groups,
                    "--peg-permute": peg_permute}
    weight_options = {"--bits": bits, "--group-size": group_size, "--asym/--sym": asymmetric,
                      "--float-zero-points/--int-zero-points": float_zero_points, "--scale-dtype": scale_dtype,
                      "--format": emit_format, "--accuracy-level": accuracy_level, "--embedding": embedding, "--embedding-bits": embedding_bits,
                      "--sequential/--one-pass": sequential, "--tune-steps": tune_steps}
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
        if weight_clip is not None:
            recipe = dataclasses.replace(recipe, weight_clip=dataclasses.replace(recipe.weight_clip, method=weight_clip))
        if k_sigma is not None:
            recipe = dataclasses.replace(recipe, activation_range=dataclasses.replace(recipe.activation_range, k=k_sigma),
                                         weight_clip=dataclasses.replace(recipe.weight_clip, k=k_sigma))
        if peg_groups is not None or peg_permute is not None:
            peg = recipe.peg or PegConfig()
            peg = dataclasses.replace(peg, **{k: v for k, v in (("groups", peg_groups), ("permute", peg_permute)) if v is not None})
            recipe = dataclasses.replace(recipe, peg=peg, pack_matmuls=False)  # PEG splits MatMuls: no packing
    else:
        if scale_dtype is None and emit_format == "qdq":
            scale_dtype = "float32"  # DequantizeLinear reads its scale as an initializer of the output type
        changes = {"bits": bits, "group_size": group_size, "symmetric": None if asymmetric is None else not asymmetric,
                   "float_zero_points": float_zero_points, "scale_dtype": scale_dtype}
        weights = dataclasses.replace(recipe.weights, **{k: v for k, v in changes.items() if v is not None})
        emit = recipe.emit
        for field, value in (("format", emit_format), ("accuracy_level", accuracy_level)):
            if value is not None:
                emit = dataclasses.replace(emit, **{field: value})
        recipe = dataclasses.replace(recipe, weights=weights, emit=emit)
        if embedding is not None:
            recipe = dataclasses.replace(recipe, embedding=embedding)
        if embedding_bits is not None:
            recipe = dataclasses.replace(recipe, embedding_bits=int(embedding_bits))
        if sequential is not None:
            recipe = dataclasses.replace(recipe, sequential=sequential)
        if tune_steps is not None:
            recipe = dataclasses.replace(recipe, tuning=dataclasses.replace(recipe.tuning, steps=tune_steps))
    calibration = recipe.calibration
    if calib_windows is not None:
        calibration = dataclasses.replace(calibration, windows=calib_windows)
    if calib_text is not None:
        calibration = dataclasses.replace(calibration, text_path=calib_text)
    recipe = dataclasses.replace(recipe, calibration=calibration)
    _check_side_outputs(model, output, save_recipe)
    run = quantize_model if is_w8a8 else quantize_weights
    before = _OutputFolder.snapshot(output.parent)
    if cache_config.active:
        result, cache_report = _quantize_with_cache(run, model, output, recipe, cache_config, tokenizer=tokenizer,
                                                    overwrite=overwrite)
        report = {**result.to_json(), "model_path": str(output), "attention_quant": cache_report}
    else:
        result = run(model, output, recipe, tokenizer_dir=tokenizer, overwrite=overwrite)
        report = result.to_json()
    texts = [(output.with_suffix(".graphq.json"), json.dumps(report, indent=2) + "\n")]
    if save_recipe is not None:
        texts.append((save_recipe, dump_recipe(recipe, save_recipe)))
    _write_or_withdraw(output, texts, before)
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
            f"({size['quantized_weights']} weights x {size['bits_per_quantized_weight']:.3f} bits "
            f"+ {size['float_initializer_bytes'] / 1e6:.1f} MB float initializers)"
        )
        if result.tuning is not None:
            tuning = result.tuning
            click.echo(f"  scale tuning: held-out distillation loss {tuning.loss_before:.4g} -> {tuning.loss_after:.4g} "
                       f"over {tuning.tuned_weights} weights in {tuning.seconds:.0f}s"
                       f"{'' if tuning.kept else '; not better, untuned scales kept'}")


def _quantize_cache(model: Path, output: Path, config, *, overwrite: bool) -> None:
    """``graphq quantize --kv-cache int8 [--attention int8]`` without a weight recipe."""
    from graphq.attention_quant import quantize_attention

    before = _OutputFolder.snapshot(output.parent)
    result = quantize_attention(model, output, config, overwrite=overwrite)
    report = result.to_json()
    _write_or_withdraw(output, [(output.with_suffix(".graphq.json"), json.dumps(report, indent=2) + "\n")], before)
    click.echo(_cache_summary(report))


def _cache_summary(report: dict) -> str:
    parts = []
    if report["kv_cache"]:
        parts.append(f"KV cache {report['kv_cache']} on {report['cache_tensors']} tensors "
                     f"({report['cache_bytes_per_token']} bytes/token vs {report['cache_bytes_per_token_float32']} float32 "
                     f"= {report['cache_ratio_vs_float32']}x)")
    if report["attention"]:
        parts.append(f"int8 attention inputs on {report['attention_matmul_pairs']} QK^T/PV pairs (QDQ simulation)")
    return f"{'; '.join(parts)} -> {report['model_path']}"


def _quantize_with_cache(run, model: Path, output: Path, recipe, cache_config, *, tokenizer: Path | None, overwrite: bool):
    """A weight recipe into a staging folder beside ``output``, then the attention/cache passes on its result."""
    from graphq.attention_quant import check_attention_quant, quantize_attention
    from graphq.modelio import load_model, staging_dir
    from graphq.quantize import resolve_quantize_paths

    # Refuse a bad output or a graph the cache/attention rewrite cannot take before the long part.
    source, _ = resolve_quantize_paths(model, output, overwrite=overwrite)
    check_attention_quant(load_model(source), cache_config)
    with staging_dir(output) as staging:
        weights = staging / output.name
        result = run(model, weights, recipe, tokenizer_dir=tokenizer, overwrite=False)
        cache = quantize_attention(weights, output, cache_config, overwrite=overwrite)
    click.echo(_cache_summary(cache.to_json()))
    return result, cache.to_json()


def _quantize_mixed(model: Path, output: Path, recipe, *, budget_bits: float | None, target_ratio: float | None,
                    analysis_path: Path | None, plan_path: Path | None, emit_format: str | None,
                    accuracy_level: int | None, embedding: str | None, calib_windows: int | None,
                    calib_text: Path | None, tokenizer: Path | None, save_recipe: Path | None, overwrite: bool) -> None:
    """``graphq quantize --recipe mixed``: a precision per MatMul from a plan or the planner."""
    import dataclasses

    from graphq.config import dump_recipe
    from graphq.mixed import quantize_mixed
    from graphq.planner import load_plan

    if budget_bits is not None and target_ratio is not None:
        raise GraphqError("give either --budget-bits or --target-ratio, not both")
    if budget_bits is not None:
        recipe = dataclasses.replace(recipe, budget_bits=budget_bits, target_ratio=None)
    elif target_ratio is not None:
        recipe = dataclasses.replace(recipe, budget_bits=None, target_ratio=target_ratio)
    emit = recipe.emit
    for field, value in (("format", emit_format), ("accuracy_level", accuracy_level)):
        if value is not None:
            emit = dataclasses.replace(emit, **{field: value})
    recipe = dataclasses.replace(recipe, emit=emit, **({"embedding": embedding} if embedding is not None else {}))
    calibration = recipe.calibration  # GPTQ Hessians; the analysis keeps its own windows
    if calib_windows is not None:
        calibration = dataclasses.replace(calibration, windows=calib_windows)
    if calib_text is not None:
        calibration = dataclasses.replace(calibration, text_path=calib_text)
        recipe = dataclasses.replace(recipe, analysis=dataclasses.replace(recipe.analysis, text_path=calib_text))
    recipe = dataclasses.replace(recipe, calibration=calibration)
    _check_side_outputs(model, output, save_recipe)
    plan = load_plan(plan_path) if plan_path is not None else None
    before = _OutputFolder.snapshot(output.parent)
    result = quantize_mixed(model, output, recipe, plan=plan, analysis=analysis_path, tokenizer_dir=tokenizer,
                            overwrite=overwrite)
    texts = [(output.with_suffix(".graphq.json"), json.dumps(result.to_json(), indent=2) + "\n")]
    if save_recipe is not None:
        texts.append((save_recipe, dump_recipe(recipe, save_recipe)))
    _write_or_withdraw(output, texts, before)
    plan = result.plan
    counts = ", ".join(f"{n} {p}" for p, n in sorted(plan.counts().items()))
    predicted = "" if plan.predicted_kl != plan.predicted_kl else f", predicted KL {plan.predicted_kl:.4f} (ppl x{plan.predicted_ratio:.3f})"
    click.echo(f"quantized {len(plan.assignments)} MatMuls (mixed: {counts}) at {plan.average_bits:.3f} bits per weight"
               f"{predicted} -> {output} in {result.seconds:.1f}s [{result.file_bytes / 1e6:.1f} MB]")


@app.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="Analysis JSON to write (also the cache: reused when it is this model's with the same options).")
@click.option("--windows", type=int, default=None, help="Calibration windows of wiki.valid.tokens (default 4).")
@click.option("--window-tokens", type=int, default=None, help="Tokens per calibration window (default 128).")
@click.option("--precisions", default=None, help="Comma-separated precisions to measure (default int4,int4-g32-asym,int4-g32-fzp,int8).")
@click.option("--measured-others", type=int, default=None,
              help="Replays at the non-int4 precisions, most damaged nodes first (default 16; -1: every node).")
@click.option("--lens", "lens_nodes", type=int, default=None, help="Nodes given the perturbation lens (default 8; 0: none).")
@click.option("--lens-nodes", "lens_select", multiple=True, help="Regular expression: lens these nodes (repeatable).")
@click.option("--lens-scope", type=click.Choice(["tensor", "group"]), default=None,
              help="Match the noise variance to the error per tensor (default) or per quantization group.")
@click.option("--outlier-ratio", type=float, default=None, help="Outlier channel: abs-max above this x the median (default 6).")
@click.option("--head-hot-fraction", type=float, default=None,
              help="Tied LM head: fraction of its rows (those the calibration text uses most) kept at int8 at every lower "
                   "precision (default 0: none; e.g. 0.05).")
@click.option("--calib-text", type=click.Path(path_type=Path), default=None, help="Calibration text file.")
@click.option("--threads", type=int, default=None, help="ONNX Runtime intra-op threads (default 2).")
@click.option("--tokenizer", type=click.Path(path_type=Path), default=None, help="Tokenizer folder (default: the model's).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output file even if it is another model's analysis.")
def analyze(model: Path, output: Path | None, windows: int | None, window_tokens: int | None, precisions: str | None,
            measured_others: int | None, lens_nodes: int | None, lens_select: tuple[str, ...], lens_scope: str | None,
            outlier_ratio: float | None, head_hot_fraction: float | None, calib_text: Path | None, threads: int | None,
            tokenizer: Path | None, overwrite: bool) -> None:
    """Sensitivity of every quantizable MatMul of MODEL (.onnx), activation statistics, perturbation lens."""
    from graphq.sensitivity import AnalysisConfig, analyze_model

    options = {"windows": windows, "window_tokens": window_tokens, "measured_others": measured_others,
               "lens_nodes": lens_nodes, "lens_scope": lens_scope, "outlier_ratio": outlier_ratio,
               "head_hot_fraction": head_hot_fraction, "text_path": calib_text, "threads": threads,
               "precisions": tuple(p.strip() for p in precisions.split(",") if p.strip()) if precisions else None,
               "lens_select": lens_select or None}
    config = AnalysisConfig(**{k: v for k, v in options.items() if v is not None})
    if windows is not None and config.batch > windows:
        config = AnalysisConfig(**{**{k: v for k, v in options.items() if v is not None}, "batch": windows})
    if output is not None:
        from graphq.modelio import check_output_path, resolve_model_file

        check_output_path(output, [resolve_model_file(model)])
    analysis = analyze_model(model, config, output=output, tokenizer_dir=tokenizer, overwrite=overwrite)
    ranked = sorted(analysis.nodes, key=lambda n: -n.damage["int4"].kl)
    click.echo(f"analysed {len(analysis.nodes)} MatMuls of {analysis.model_path} on {analysis.tokens} tokens "
               f"in {analysis.timing['seconds']:.0f}s ({analysis.timing['replays']} replays, "
               f"{analysis.timing['cpu_seconds']:.0f} CPU s); float NLL {analysis.float_nll:.4f}")
    click.echo("most sensitive at int4 (mean KL):")
    for node in ranked[:10]:
        click.echo(f"  {node.damage['int4'].kl:10.5f}  {node.name}")
    outliers = sorted({c for r in analysis.residual for c in r.outlier_channels[:3]})
    if outliers:
        click.echo(f"residual-stream outlier channels: {outliers}")
    if output is not None:
        click.echo(f"wrote {output}")


@app.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path), required=True, help="Report folder (index.html, model.onnx).")
@click.option("--analysis", "analysis_path", type=click.Path(path_type=Path), default=None,
              help="Sensitivity analysis (graphq analyze); default: the cache, else computed for MODEL.")
@click.option("--budget-bits", type=float, default=4.5, show_default=True, help="Budget of the plan shown.")
@click.option("--plan", "plan_path", type=click.Path(path_type=Path), default=None, help="Show this plan instead.")
@click.option("--measured", "measured_path", type=click.Path(path_type=Path), default=None,
              help="JSON list of measured plans [{label, average_bits, perplexity, float_perplexity}] for the Pareto plot.")
@click.option("--no-model", is_flag=True, help="Do not write the annotated copy of MODEL.")
@click.option("--serve", is_flag=True, help="Open the annotated model in Netron on localhost (netron package).")
@click.option("--overwrite", is_flag=True, help="Replace an existing report folder.")
def inspect(model: Path, output: Path, analysis_path: Path | None, budget_bits: float, plan_path: Path | None,
            measured_path: Path | None, no_model: bool, serve: bool, overwrite: bool) -> None:
    """A self-contained HTML report of MODEL's analysis and plan, and a copy with node metadata for Netron."""
    from graphq.report import ReportConfig, write_report

    result = write_report(model, output, ReportConfig(budget_bits=budget_bits), analysis=analysis_path, plan=plan_path,
                          measured=measured_path, annotate_model=not no_model, overwrite=overwrite)
    click.echo(f"wrote {result.html}" + (f" and {result.model}" if result.model else ""))
    if serve:
        if result.model is None:
            raise GraphqError("--serve needs the annotated model; drop --no-model")
        try:
            import netron
        except ImportError as error:
            raise GraphqError("--serve needs the netron package (pip install netron)") from error
        netron.start(str(result.model), browse=False)
        click.echo("Netron serves the model on localhost; press Ctrl+C to stop")
        netron.wait()


def _check_side_outputs(model: Path, output: Path, save_recipe: Path | None) -> None:
    """Refuse a --save-recipe path that would overwrite the input model, its external data, or the output."""
    from graphq.modelio import check_output_path, output_files, resolve_model_file

    if save_recipe is None:
        return
    check_output_path(save_recipe, [resolve_model_file(model)])
    if save_recipe.resolve() in {path.resolve() for path in output_files(output)}:
        raise OutputPathError(f"--save-recipe {save_recipe} is one of the output files of {output}; choose another path")


@dataclasses.dataclass(frozen=True)
class _OutputFolder:
    """The output folder before a command wrote to it: its entries, and the folders that did not exist."""

    folder: Path
    entries: frozenset[str]
    missing: tuple[Path, ...]

    @classmethod
    def snapshot(cls, folder: Path) -> _OutputFolder:
        from graphq.modelio import missing_folders

        entries = frozenset(os.listdir(folder)) if folder.is_dir() else frozenset()
        return cls(folder, entries, tuple(missing_folders(folder)))

    def withdraw(self, output: Path) -> None:
        """Remove the output files and everything new in the folder since the snapshot."""
        from graphq.modelio import output_files, remove_empty

        for path in output_files(output):
            path.unlink(missing_ok=True)
        if self.folder.is_dir():
            for name in set(os.listdir(self.folder)) - self.entries:
                if (self.folder / name).is_file():
                    (self.folder / name).unlink()
        remove_empty(list(self.missing))


def _write_or_withdraw(output: Path, texts: list[tuple[Path, str]], before: _OutputFolder) -> None:
    """Write the report files of a model just moved to ``output``; if one cannot be written, withdraw the
    model and everything the command added beside it, so a failed command leaves no partial output."""
    from graphq.modelio import write_text_atomic

    written: list[Path] = []
    try:
        for path, text in texts:
            write_text_atomic(path, text)
            written.append(path)
    except GraphqError:
        for path in written:
            path.unlink(missing_ok=True)
        before.withdraw(output)
        raise


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
