"""graphq's cache folder: ``$GRAPHQ_CACHE``, or ``~/.cache/graphq``."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    root = os.environ.get("GRAPHQ_CACHE")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "graphq"
    path.mkdir(parents=True, exist_ok=True)
    return path
