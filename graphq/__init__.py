"""graphq: quantize transformer language models as ONNX graphs.

Public API (everything the CLI does is available from Python):

- :func:`export_model` -- HF folder / GGUF / bundled default -> verified ONNX folder.
- :func:`load_model`, :func:`save_model` -- safe loading and atomic saving of ``onnx_ir`` models.
- :func:`run_pipeline` -- apply graph passes in order, recording what each changed.
- :func:`evaluate_model` -- perplexity, prefill latency, decode tokens/s, size.
- :func:`verify_model_file` -- ``onnx.checker`` plus an ONNX Runtime session.
- :func:`analyze_model` -- per-node sensitivity (KL of each MatMul quantized alone), activation statistics.
- :func:`quantize_mixed` -- int4 / int8 / float per MatMul from a plan or a bits budget.
"""

from graphq.errors import GraphqError
from graphq.evaluate import EvalConfig, EvalResult, evaluate_model
from graphq.export import ExportConfig, ExportResult, export_model
from graphq.modelio import load_model, save_model
from graphq.pipeline import PipelineResult, run_pipeline
from graphq.verify import verify_model_file
from graphq.sensitivity import AnalysisConfig, analyze_model
from graphq.mixed import MixedRecipe, quantize_mixed

__version__ = "0.1.0"

__all__ = [
    "AnalysisConfig",
    "MixedRecipe",
    "analyze_model",
    "quantize_mixed",
    "EvalConfig",
    "EvalResult",
    "ExportConfig",
    "ExportResult",
    "GraphqError",
    "PipelineResult",
    "evaluate_model",
    "export_model",
    "load_model",
    "run_pipeline",
    "save_model",
    "verify_model_file",
]
