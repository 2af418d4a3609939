"""Graph passes, one per module. Each is an ``onnx_ir`` pass: ``call(model) -> PassResult``."""

from graphq.passes.cleanup import CleanupPass
from graphq.passes.dedupe_initializers import DeduplicateInitializersPass
from graphq.passes.fusion import FusionConfig, FusionPass
from graphq.passes.shape_inference import ShapeInferencePass


def canonicalize_passes() -> list:
    """The passes every graph goes through after export, in order."""
    return [CleanupPass(), DeduplicateInitializersPass(), ShapeInferencePass()]


__all__ = [
    "CleanupPass",
    "DeduplicateInitializersPass",
    "FusionConfig",
    "FusionPass",
    "ShapeInferencePass",
    "canonicalize_passes",
]
