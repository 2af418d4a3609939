"""Deduplication of identical initializers, including transposed copies.

Two initializers ``A`` and ``B`` are *identical* when they have the same dtype, shape and bytes;
every use of ``B`` is then rewired to ``A`` and ``B`` is deleted. A 2-D initializer ``B`` (shape
``(n, m)``, ``n != m`` or square) is a *transposed copy* of ``A`` (shape ``(m, n)``) when
``B == A^T`` element for element; its uses are rewired to ``Transpose(A)``, which ONNX Runtime folds
at session creation. This is how exporters store tied weights: the embedding ``E`` (vocab x d) feeds
``Gather`` while the LM head multiplies by ``E^T`` (d x vocab), a second copy of the largest matrix
of a small LLM (SmolLM2-135M: 49152 x 576 float32 = 113 MB).

Candidates are grouped by a SHA-256 digest of their bytes (and of their transpose's bytes for 2-D
tensors) and confirmed with an exact element-wise comparison, so a hash collision can never merge
different tensors. Initializers that are graph inputs or outputs are left alone. The rewrite is
exact: the model computes bit-identical outputs.
"""

from __future__ import annotations

import hashlib
import logging

import numpy as np
import onnx_ir as ir

logger = logging.getLogger(__name__)

# Tensors smaller than this (in elements) are not worth a Transpose node when only a transposed
# copy exists; exact duplicates of any size are merged.
MIN_TRANSPOSED_ELEMENTS = 1024

_Key = tuple[ir.DataType, tuple[int, ...], str]


def _digest(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _is_candidate(value: ir.Value) -> bool:
    return (
        value.const_value is not None
        and not value.is_graph_input()
        and not value.is_graph_output()
        and not value.const_value.dtype.is_string()
    )


class DeduplicateInitializersPass(ir.passes.InPlacePass):
    """Merge initializers that are equal, or equal up to a 2-D transpose."""

    def __init__(self, *, merge_transposed: bool = True) -> None:
        super().__init__()
        self.merge_transposed = merge_transposed

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        graph = model.graph
        kept: dict[_Key, tuple[ir.Value, np.ndarray]] = {}
        modified = False
        for value in list(graph.initializers.values()):
            if not _is_candidate(value):
                continue
            array = value.const_value.numpy()
            dtype = value.const_value.dtype
            key = (dtype, tuple(array.shape), _digest(array))
            match = kept.get(key)
            if match is not None and np.array_equal(match[1], array):
                logger.info("initializer '%s' duplicates '%s': merged", value.name, match[0].name)
                self._replace(graph, value, match[0])
                modified = True
                continue
            if self.merge_transposed and array.ndim == 2 and array.size >= MIN_TRANSPOSED_ELEMENTS:
                transposed_key = (dtype, tuple(array.shape[::-1]), _digest(array.T))
                match = kept.get(transposed_key)
                if match is not None and np.array_equal(match[1].T, array):
                    logger.info(
                        "initializer '%s' is the transpose of '%s': replaced by Transpose",
                        value.name,
                        match[0].name,
                    )
                    self._replace(graph, value, self._transpose_of(graph, match[0], value.name))
                    modified = True
                    continue
            kept[key] = (value, array)
        return ir.passes.PassResult(model, modified=modified)

    @staticmethod
    def _replace(graph: ir.Graph, duplicate: ir.Value, canonical: ir.Value) -> None:
        duplicate.replace_all_uses_with(canonical)
        graph.initializers.pop(duplicate.name)

    @staticmethod
    def _transpose_of(graph: ir.Graph, source: ir.Value, name: str) -> ir.Value:
        node = ir.node(
            "Transpose",
            inputs=[source],
            attributes={"perm": [1, 0]},
            name=f"{name}/dedupe_transpose",
        )
        output = node.outputs[0]
        output.name = f"{name}/transposed"
        output.dtype = source.const_value.dtype
        output.shape = ir.Shape(list(source.const_value.shape)[::-1])
        # Its only input is an initializer, so the graph's first position keeps it sorted.
        graph.insert_before(next(iter(graph)), node)
        return output
