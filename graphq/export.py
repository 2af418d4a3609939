"""Export a language model to a verified, canonicalised ONNX graph.

Flow: resolve MODEL to a local Hugging Face folder -> optimum's ONNX exporter (task from the
architecture table below) -> load into ``onnx_ir`` -> canonicalisation passes (cleanup, tied-weight
deduplication, shape inference) -> save -> ``onnx.checker`` + ONNX Runtime session -> parity of the
final graph against the PyTorch model on a fixed input. Everything is built in a staging folder
beside the output and moved into place only when every check passed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from pathlib import Path

import numpy as np

from graphq.errors import GraphqError, OutputPathError, UnsupportedModelError
from graphq.genai_config import write_genai_config
from graphq.modelio import check_output_path, load_model, save_model, staging_dir
from graphq.models.resolve import resolve_model
from graphq.passes import FusionConfig, FusionPass, canonicalize_passes
from graphq.pipeline import PassRecord, run_pipeline
from graphq.runtime import GraphSignature, build_feeds, signature_of_model
from graphq.verify import cpu_session, verify_model_file

logger = logging.getLogger(__name__)

# Architecture-name suffix -> (optimum task without cache, with cache or None). First match wins.
ARCHITECTURE_TASKS: tuple[tuple[str, str, str | None], ...] = (
    ("ForCausalLM", "text-generation", "text-generation-with-past"),
    ("LMHeadModel", "text-generation", "text-generation-with-past"),
    ("ForMaskedLM", "feature-extraction", None),
    ("Model", "feature-extraction", None),
)

# Parity of the exported graph with PyTorch on a fixed input, float32 (max |difference| of logits).
PARITY_TOLERANCE = 1e-3


@dataclasses.dataclass(frozen=True)
class ExportConfig:
    with_past: bool = False
    overwrite: bool = False
    opset: int | None = None
    parity_tokens: int = 16
    fuse: bool = False  # also run graphq.passes.fusion (ORT contrib ops); parity is checked on the fused graph


@dataclasses.dataclass(frozen=True)
class ExportResult:
    model_path: Path
    task: str
    source: str
    passes: tuple[PassRecord, ...]
    parity_max_abs_diff: float
    file_bytes: int

    def to_json(self) -> dict:
        return {
            "model_path": str(self.model_path),
            "task": self.task,
            "source": self.source,
            "parity_max_abs_diff": self.parity_max_abs_diff,
            "file_bytes": self.file_bytes,
            "passes": [
                {"name": r.name, "modified": r.modified, "before": dataclasses.asdict(r.before),
                 "after": dataclasses.asdict(r.after), "seconds": round(r.seconds, 3)}
                for r in self.passes
            ],
        }


def export_task(hf_dir: Path, with_past: bool) -> str:
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    architectures = config.get("architectures") or []
    for suffix, task, task_with_past in ARCHITECTURE_TASKS:
        if any(a.endswith(suffix) for a in architectures):
            if with_past and task_with_past is None:
                raise UnsupportedModelError(
                    f"{hf_dir}: --with-past needs a decoder; {architectures[0]} has no KV cache"
                )
            return task_with_past if with_past else task
    raise UnsupportedModelError(
        f"{hf_dir}: cannot tell what to export from architectures={architectures}"
    )


def _run_optimum_export(hf_dir: Path, out_dir: Path, task: str, opset: int | None) -> None:
    from optimum.exporters.onnx import main_export

    try:
        main_export(
            str(hf_dir),
            output=str(out_dir),
            task=task,
            opset=opset,
            device="cpu",
            do_validation=False,
            trust_remote_code=False,
            library_name="transformers",
        )
    except GraphqError:
        raise
    except Exception as error:  # optimum raises many types for unsupported models
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UnsupportedModelError(f"{hf_dir}: the ONNX exporter failed: {first}") from error


def _torch_reference(hf_dir: Path, task: str, input_ids: np.ndarray) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if task.startswith("text-generation") else AutoModel
    model = loader.from_pretrained(str(hf_dir), dtype=torch.float32, use_safetensors=True).eval()
    with torch.no_grad():
        output = model(input_ids=torch.from_numpy(input_ids), use_cache=False)
    reference = output.logits if hasattr(output, "logits") else output.last_hidden_state
    return reference.numpy()


def parity_with_torch(model_path: Path, hf_dir: Path, task: str, tokens: int) -> float:
    """Max |ORT - PyTorch| of the main output on a fixed pseudo-random token sequence."""
    config = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
    rng = np.random.default_rng(0)
    input_ids = rng.integers(0, config["vocab_size"], size=(1, tokens), dtype=np.int64)
    session = cpu_session(model_path)
    signature = GraphSignature.of(session)
    (ort_output,) = session.run([signature.main_output], build_feeds(signature, input_ids))
    reference = _torch_reference(hf_dir, task, input_ids)
    return float(np.max(np.abs(ort_output - reference)))


def _move_into_place(staged: Path, output: Path) -> None:
    if output.exists():
        backup = output.with_name(f".{output.name}.old")
        shutil.rmtree(backup, ignore_errors=True)
        os.replace(output, backup)
        os.replace(staged, output)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        os.replace(staged, output)


def export_model(model: str | None, output_dir: str | os.PathLike, config: ExportConfig = ExportConfig()) -> ExportResult:
    """Export MODEL (None: the default model) into ``output_dir``/model.onnx with its tokenizer."""
    output = Path(output_dir)
    inputs = [Path(model)] if model and Path(model).exists() else []
    check_output_path(output, inputs)
    if output.exists() and (not output.is_dir() or any(output.iterdir())) and not config.overwrite:
        raise OutputPathError(f"output {output} already exists; pass --overwrite to replace it")
    resolved = resolve_model(model)
    check_output_path(output, [resolved.hf_dir])
    task = export_task(resolved.hf_dir, config.with_past)
    with staging_dir(output) as staging:
        raw_dir, final_dir = staging / "raw", staging / "final"
        logger.info("exporting %s (task %s)", resolved.source, task)
        _run_optimum_export(resolved.hf_dir, raw_dir, task, config.opset)
        graph = load_model(raw_dir / "model.onnx")
        passes = canonicalize_passes()
        if config.fuse:
            hf_config = json.loads((resolved.hf_dir / "config.json").read_text(encoding="utf-8"))
            passes.append(FusionPass(FusionConfig(max_positions=hf_config.get("max_position_embeddings"))))
        result = run_pipeline(graph, passes)
        final_dir.mkdir()
        result.model.metadata_props.update(
            {"graphq.source": resolved.source, "graphq.task": task}
        )
        save_model(result.model, final_dir / "model.onnx")
        for item in raw_dir.iterdir():
            if not item.name.startswith("model.onnx") and item.is_file():
                shutil.copy2(item, final_dir / item.name)
        write_genai_config(signature_of_model(result.model), "model.onnx", [final_dir, resolved.hf_dir], final_dir)
        verify_model_file(final_dir / "model.onnx")
        diff = parity_with_torch(final_dir / "model.onnx", resolved.hf_dir, task, config.parity_tokens)
        if not diff <= PARITY_TOLERANCE:
            raise GraphqError(
                f"exported graph disagrees with PyTorch: max |logit difference| {diff:.3g} "
                f"> {PARITY_TOLERANCE}"
            )
        logger.info("parity with PyTorch: max |difference| %.2e", diff)
        file_bytes = sum(p.stat().st_size for p in final_dir.glob("model.onnx*"))
        export_result = ExportResult(
            model_path=output / "model.onnx", task=task, source=resolved.source,
            passes=result.records, parity_max_abs_diff=diff, file_bytes=file_bytes,
        )
        (final_dir / "graphq_export.json").write_text(json.dumps(export_result.to_json(), indent=2))
        _move_into_place(final_dir, output)
    return export_result
