"""GGUF file -> float32 Hugging Face folder.

transformers' GGUF loader dequantizes every tensor (Q4_1 blocks: w = d * q + m) into a float32
PyTorch model; it is saved with ``save_pretrained`` as safetensors together with the tokenizer
that the GGUF carries. The folder is cached under the GGUF's SHA-256, so a second run is instant.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from graphq.errors import InvalidModelError, UnsupportedModelError
from graphq.models.cache import cache_dir
from graphq.models.default_model import file_sha256

logger = logging.getLogger(__name__)

GGUF_MAGIC = b"GGUF"


def is_gguf(path: Path) -> bool:
    try:
        with open(path, "rb") as handle:
            return handle.read(4) == GGUF_MAGIC
    except OSError:
        return False


def gguf_architecture(path: Path) -> str:
    """The ``general.architecture`` field of a GGUF file."""
    from gguf import GGUFReader

    try:
        reader = GGUFReader(str(path))
        field = reader.fields["general.architecture"]
        return bytes(field.parts[field.data[0]]).decode("utf-8")
    except KeyError as error:
        raise InvalidModelError(f"{path}: GGUF file has no general.architecture field") from error
    except Exception as error:  # the reader raises ValueError/IndexError/struct errors on bad bytes
        raise InvalidModelError(f"{path}: not a readable GGUF file ({error})") from error


def supported_gguf_architectures() -> frozenset[str]:
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return frozenset(GGUF_SUPPORTED_ARCHITECTURES)


def gguf_to_hf(path: Path) -> Path:
    """Convert ``path`` to a cached float32 HF folder and return the folder."""
    if not is_gguf(path):
        raise InvalidModelError(f"{path}: not a GGUF file (missing the GGUF magic bytes)")
    architecture = gguf_architecture(path)
    supported = supported_gguf_architectures()
    if architecture not in supported:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture '{architecture}' cannot be loaded by transformers "
            f"(supported: {', '.join(sorted(supported))})"
        )
    target = cache_dir() / "hf" / f"{path.stem}-{file_sha256(path)[:16]}"
    if (target / "config.json").is_file():
        logger.info("using cached conversion %s", target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("dequantizing %s (architecture %s) to float32", path.name, architecture)
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
    except (ValueError, KeyError, NotImplementedError, OSError) as error:
        raise UnsupportedModelError(
            f"{path}: transformers cannot load this GGUF ({str(error).strip().splitlines()[0]})"
        ) from error
    # A dequantized model carries no quantizer: make sure none is serialised with it.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target
