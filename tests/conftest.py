"""Shared fixtures: tiny random models exported once per test session (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx_ir as ir
import pytest

from graphq.verify import cpu_session


@pytest.fixture(scope="session", autouse=True)
def _isolated_cache(tmp_path_factory):
    os.environ.setdefault("GRAPHQ_CACHE", str(tmp_path_factory.mktemp("graphq-cache")))
    os.environ["HF_HUB_OFFLINE"] = "1"


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    from graphq.models.tiny import make_tiny_llama

    return make_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> Path:
    from graphq.models.tiny import make_tiny_bert

    return make_tiny_bert(tmp_path_factory.mktemp("tiny-bert"))


@pytest.fixture(scope="session")
def tiny_llama_onnx(tiny_llama_dir, tmp_path_factory) -> Path:
    from graphq.export import export_model

    return export_model(str(tiny_llama_dir), tmp_path_factory.mktemp("export") / "tiny").model_path


@pytest.fixture(scope="session")
def tiny_bert_onnx(tiny_bert_dir, tmp_path_factory) -> Path:
    from graphq.export import export_model

    return export_model(str(tiny_bert_dir), tmp_path_factory.mktemp("export") / "tiny-bert").model_path


@pytest.fixture(scope="session")
def tiny_llama_past_onnx(tiny_llama_dir, tmp_path_factory) -> Path:
    from graphq.export import ExportConfig, export_model

    out = tmp_path_factory.mktemp("export") / "tiny-past"
    return export_model(str(tiny_llama_dir), out, ExportConfig(with_past=True)).model_path


def run_model(model: ir.Model | Path, feeds: dict[str, np.ndarray], tmp_path: Path) -> list[np.ndarray]:
    """Run a model (saved to ``tmp_path`` first if it is in memory) on ORT's CPU EP at the basic optimisation
    level: constant folding only (float16 scales behind a Cast become constants, as in every deployment;
    ONNX Runtime 1.32's MatMulNBits at accuracy_level 4 computes zeros from unfolded scales), no fusions."""
    if isinstance(model, ir.Model):
        path = tmp_path / f"run-{id(model)}.onnx"
        ir.save(model, path)
    else:
        path = model
    return cpu_session(path, optimization="basic").run(None, feeds)


def single_matmul_model(w: np.ndarray, batch: tuple[int, ...], *, tied: bool = False) -> ir.Model:
    """``y = x @ W`` as one MatMul named ``proj`` (input ``x [*batch, K]``, output ``y``); with ``tied``, ``W``
    is stored transposed as ``embedding`` and read through a ``Transpose`` (``tie``), like a tied LM head."""
    k, n = w.shape
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([*batch, k]))
    nodes, initializers = [], []
    if tied:
        source = ir.Value(name="embedding", const_value=ir.tensor(w.T.copy()))
        transpose = ir.node("Transpose", [source], attributes={"perm": [1, 0]}, name="tie")
        nodes.append(transpose)
        initializers.append(source)
        weight = transpose.outputs[0]
    else:
        weight = ir.Value(name="w", const_value=ir.tensor(w))
        initializers.append(weight)
    matmul = ir.node("MatMul", [x, weight], name="proj")
    matmul.outputs[0].name = "y"
    matmul.outputs[0].dtype, matmul.outputs[0].shape = ir.DataType.FLOAT, ir.Shape([*batch, n])
    nodes.append(matmul)
    graph = ir.Graph([x], [matmul.outputs[0]], nodes=nodes, initializers=initializers, opset_imports={"": 18}, name="g")
    return ir.Model(graph, ir_version=10)


def sha256_tree(path: Path) -> dict[str, str]:
    """Digest of every file under ``path`` (or of the file itself): proof that nothing changed."""
    import hashlib

    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}
