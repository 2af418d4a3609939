"""Symbolic shape inference (ONNX Runtime's ``symbolic_shape_infer``).

ONNX's own inference gives up where a shape is computed at run time from other shapes: an
attention head split ``Reshape(q, Concat(Shape(q)[0], Shape(q)[1], -1, 64))`` of a ``[B, S, 576]``
tensor comes out as ``[B, S, unk, 64]``, and a broadcast of two such tensors gets fresh unknown
dims. ONNX Runtime's symbolic inference propagates the values of shape tensors (``Shape``,
``Gather``, ``Concat``, ...) as sympy expressions and merges equal dims, so the same Reshape comes out
as ``[B, S, 9, 64]`` and ``Mul(q, cos)`` keeps ``[B, 9, S, 64]``. The fusion rules need exactly
this: a fixed head count, and the same symbolic batch/sequence dims on query, key and value.

Only node outputs are annotated; graph inputs, outputs and the computation are untouched. Weights
are hidden from the tool (passed as typed graph inputs without data), so the serialised model
stays small. A shape replaces the one already there only when it has at least as many static
dims. When the tool fails (an op it cannot type), the model is left unchanged and the reason is
logged. The tool writes a debug file into the working directory on failure; it runs in a
temporary directory so nothing is left behind.
"""

from __future__ import annotations

import logging
import os
import tempfile

import onnx_ir as ir

logger = logging.getLogger(__name__)

# Initializers larger than this (bytes) are passed to the tool as typed inputs without data.
MAX_INLINE_INITIALIZER_BYTES = 1024


def _static_dims(shape: ir.Shape | None) -> int:
    return -1 if shape is None else sum(isinstance(d, int) for d in shape)


def _shape_skeleton(model: ir.Model):
    """The model as a ModelProto with big weights turned into data-free typed inputs."""
    skeleton = model.clone()  # shares tensors; the original is never touched
    graph = skeleton.graph
    for value in list(graph.initializers.values()):
        tensor = value.const_value
        if tensor is None or tensor.nbytes <= MAX_INLINE_INITIALIZER_BYTES:
            continue
        value.shape = value.shape or ir.Shape(tensor.shape)
        value.dtype = value.dtype or tensor.dtype
        graph.initializers.pop(value.name)
        value.const_value = None
        if value not in graph.inputs:
            graph.inputs.append(value)
    proto = ir.serde.serialize_model(skeleton)
    del proto.graph.value_info[:]  # start from scratch: stale unknown dims would pin the result
    return proto


def infer_symbolic_shapes(model: ir.Model) -> dict[str, ir.Shape]:
    """Node-output name -> shape inferred by ONNX Runtime's symbolic shape inference."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    proto = _shape_skeleton(model)
    previous = os.getcwd()
    with tempfile.TemporaryDirectory(prefix="graphq-symshape-") as scratch:
        os.chdir(scratch)
        try:
            inferred = SymbolicShapeInference.infer_shapes(proto, auto_merge=True)
        finally:
            os.chdir(previous)
    if inferred is None:
        raise ValueError("the tool supports opset 7 and above only")
    shapes = {}
    for info in inferred.graph.value_info:
        if info.type.HasField("tensor_type") and info.type.tensor_type.HasField("shape"):
            shapes[info.name] = ir.serde.deserialize_type_proto_for_shape(info.type)
    return shapes


class SymbolicShapeInferencePass(ir.passes.InPlacePass):
    """Annotate node outputs with ONNX Runtime's symbolic shapes (see module docstring)."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        try:
            shapes = infer_symbolic_shapes(model)
        except Exception as error:  # the tool raises bare Exceptions for ops it cannot type
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            logger.warning("symbolic shape inference failed (%s); shapes left as they were", first)
            return ir.passes.PassResult(model, modified=False)
        updated = 0
        for node in model.graph:
            for value in node.outputs:
                shape = shapes.get(value.name)
                if shape is None or value.is_graph_output() or shape == value.shape:
                    continue
                if _static_dims(shape) >= _static_dims(value.shape):
                    value.shape = shape
                    updated += 1
        logger.info("symbolic shape inference: %d node outputs got a better shape", updated)
        return ir.passes.PassResult(model, modified=updated > 0)
