"""Dead-code cleanup.

Removes nodes none of whose outputs reach a graph output (iterated to a fixed point), initializers
no node uses, functions nothing calls and opset imports nothing needs. Graph inputs and outputs
are never removed, so the model's signature is unchanged; the computed outputs are bit-identical.
"""

from __future__ import annotations

import logging

import onnx_ir as ir
from onnx_ir.passes.common import (
    RemoveUnusedFunctionsPass,
    RemoveUnusedNodesPass,
    RemoveUnusedOpsetsPass,
)

logger = logging.getLogger(__name__)


class CleanupPass(ir.passes.InPlacePass):
    """Drop dead nodes, unused initializers, unused functions and unused opset imports."""

    def call(self, model: ir.Model) -> ir.passes.PassResult:
        modified = False
        for sub_pass in (RemoveUnusedNodesPass(), RemoveUnusedFunctionsPass(), RemoveUnusedOpsetsPass()):
            result = sub_pass(model)
            model = result.model
            modified = modified or result.modified
        return ir.passes.PassResult(model, modified=modified)
