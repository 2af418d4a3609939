"""Where models come from: the bundled default, local Hugging Face folders, GGUF files, and tiny
random models for tests."""

from graphq.models.resolve import DEFAULT_MODEL_NAME, ResolvedModel, resolve_model

__all__ = ["DEFAULT_MODEL_NAME", "ResolvedModel", "resolve_model"]
