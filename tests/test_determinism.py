"""Quantizing the same model twice with the same recipe gives byte-identical model files.

Both runs happen in this one process (so module-level counters, caches or dict/set ordering that
leak into the graph would show) and write to different folders (so no output path may leak into
the model). The report (``.graphq.json``) records the output path and the seconds taken; apart from
those two fields it must be identical too.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from graphq.cli import main

RECIPES = ("w8a8", "w8a8-static", "w4-rtn", "w4-gptq")
RUN_DEPENDENT_REPORT_FIELDS = ("model_path", "seconds")


def _quantize(model: Path, out: Path, recipe: str) -> dict[str, str]:
    code = main(["-q", "quantize", str(model), "-o", str(out / "model.onnx"), "--recipe", recipe,
                 "--calib-windows", "2"])
    assert code == 0
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.iterdir()) if p.is_file()}


def _report(out: Path) -> dict:
    report = json.loads((out / "model.graphq.json").read_text())
    return {key: value for key, value in report.items() if key not in RUN_DEPENDENT_REPORT_FIELDS}


@pytest.mark.parametrize("recipe", RECIPES)
def test_quantize_twice_gives_identical_files(recipe, tiny_llama_onnx, tmp_path):
    first = _quantize(tiny_llama_onnx, tmp_path / "first", recipe)
    second = _quantize(tiny_llama_onnx, tmp_path / "second", recipe)

    models = [name for name in first if name.startswith("model.onnx")]
    assert models, first
    for name in models:
        assert first[name] == second[name], f"{name} differs between two runs of {recipe}"
    assert _report(tmp_path / "first") == _report(tmp_path / "second")
    assert first.keys() == second.keys()
    for name in first.keys() - {"model.graphq.json"}:
        assert first[name] == second[name], name


@pytest.mark.parametrize("recipe", ["w8a8", "w4-gptq"])
def test_identical_across_processes_with_different_hash_seeds(recipe, tiny_llama_onnx, tmp_path):
    """String hashing differs between processes (PYTHONHASHSEED): set iteration order must not leak
    into the model."""
    import os
    import subprocess
    import sys

    digests = []
    for seed in ("1", "2"):
        out = tmp_path / seed
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONWARNINGS": "ignore"}
        subprocess.run([sys.executable, "-m", "graphq", "-q", "quantize", str(tiny_llama_onnx), "-o",
                        str(out / "model.onnx"), "--recipe", recipe, "--calib-windows", "2"],
                       env=env, check=True, capture_output=True, timeout=600)
        digests.append(hashlib.sha256((out / "model.onnx").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
