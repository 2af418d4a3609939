"""Shape and type inference.

Runs ONNX's shape inference (with data propagation) over the graph and writes every inferred
dtype and shape back onto the ``onnx_ir`` values. Large initializers are hidden from the ONNX API
while it runs, so models past the 2 GB protobuf limit work. Inference that fails leaves the model
unchanged (the pass reports ``modified=False`` and logs why); it never alters computation.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import ShapeInferencePass as _OnnxShapeInference

logger = logging.getLogger(__name__)


def count_typed_values(model: ir.Model) -> int:
    """Number of node outputs whose dtype and full shape (rank and every dim) are known."""
    return sum(
        1
        for node in model.graph.all_nodes()
        for value in node.outputs
        if value.dtype is not None and value.shape is not None
    )


class ShapeInferencePass(ir.passes.InPlacePass):
    """Annotate every value with its inferred dtype and shape."""

    def __init__(self, *, data_propagation: bool = True) -> None:
        super().__init__()
        self.data_propagation = data_propagation

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        typed_before = count_typed_values(model)
        result = _OnnxShapeInference(
            check_type=True, strict_mode=False, data_prop=self.data_propagation
        )(model)
        typed_after = count_typed_values(result.model)
        logger.info(
            "shape inference: %d -> %d node outputs with known dtype and shape",
            typed_before,
            typed_after,
        )
        return ir.passes.PassResult(result.model, modified=result.modified)
