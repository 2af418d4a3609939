"""Feeding exported language-model graphs in ONNX Runtime.

Optimum's exports name their inputs by convention; this module maps those names to arrays:
``input_ids``, ``attention_mask`` (ones: no padding), ``position_ids`` (positions after the cache),
``token_type_ids`` (zeros) and the KV cache ``past_key_values.<layer>.<key|value>`` with layout
``[batch, kv_heads, past_length, head_dim]``. An empty cache has ``past_length = 0``; the
``present.<layer>.<key|value>`` outputs become the next step's cache. A graph with an int8 cache
(passes/kv_cache_int8.py) also has ``past_key_values.<layer>.<key|value>_scale``
``[batch, kv_heads, past_length, 1]`` inputs fed back from ``present.<layer>.<key|value>_scale``.
"""

from __future__ import annotations

import dataclasses
import re

import numpy as np
import onnxruntime as ort
from onnxruntime.capi import onnxruntime_pybind11_state as _ort_state

from graphq.errors import GraphqError, UnsupportedModelError

PAST_INPUT = re.compile(r"^past_key_values\.(\d+)\.(key|value|key_scale|value_scale)$")
# The exception types ONNX Runtime raises from C++ (loading or running a session).
ORT_ERRORS: tuple[type[BaseException], ...] = tuple(
    error for error in vars(_ort_state).values() if isinstance(error, type) and issubclass(error, Exception)
)
PRESENT_OUTPUT = "present.{layer}.{kind}"

_ORT_TO_NUMPY = {
    "tensor(float)": np.float32,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(uint8)": np.uint8,
    "tensor(int8)": np.int8,
}


@dataclasses.dataclass(frozen=True)
class GraphSignature:
    """What an exported LM graph takes and gives, read from an ORT session."""

    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    past_inputs: tuple[str, ...]
    past_shapes: dict
    past_dtypes: dict

    @property
    def has_kv_cache(self) -> bool:
        return bool(self.past_inputs)

    @property
    def main_output(self) -> str:
        for name in ("logits", "last_hidden_state"):
            if name in self.output_names:
                return name
        return self.output_names[0]

    @classmethod
    def of(cls, session: ort.InferenceSession) -> GraphSignature:
        inputs = session.get_inputs()
        past = [i for i in inputs if PAST_INPUT.match(i.name)]
        return cls(
            input_names=tuple(i.name for i in inputs),
            output_names=tuple(o.name for o in session.get_outputs()),
            past_inputs=tuple(i.name for i in past),
            past_shapes={i.name: tuple(i.shape) for i in past},
            past_dtypes={i.name: _ORT_TO_NUMPY.get(i.type, np.float32) for i in past},
        )


def signature_of_model(model) -> GraphSignature:
    """The :class:`GraphSignature` of an ``onnx_ir`` model, read from its declared graph inputs/outputs."""
    past = [v for v in model.graph.inputs if PAST_INPUT.match(v.name)]
    return GraphSignature(
        input_names=tuple(v.name for v in model.graph.inputs),
        output_names=tuple(v.name for v in model.graph.outputs),
        past_inputs=tuple(v.name for v in past),
        past_shapes={v.name: tuple(d if isinstance(d, int) else str(d) for d in v.shape) if v.shape is not None else ()
                     for v in past},
        past_dtypes={v.name: v.dtype.numpy() if v.dtype is not None else np.float32 for v in past},
    )


def empty_cache(signature: GraphSignature, batch: int) -> dict[str, np.ndarray]:
    """A zero-length KV cache for every past input."""
    cache = {}
    for name in signature.past_inputs:
        _, heads, _, head_dim = signature.past_shapes[name]
        if not isinstance(heads, int) or not isinstance(head_dim, int):
            raise UnsupportedModelError(f"KV input {name} has no static head count/size: {signature.past_shapes[name]}")
        cache[name] = np.zeros((batch, heads, 0, head_dim), dtype=signature.past_dtypes[name])
    return cache


def build_feeds(
    signature: GraphSignature,
    input_ids: np.ndarray,
    cache: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Inputs for one forward pass over ``input_ids`` (batch x new tokens) after ``cache``."""
    batch, new_tokens = input_ids.shape
    if signature.has_kv_cache and cache is None:
        cache = empty_cache(signature, batch)
    past_length = next(iter(cache.values())).shape[2] if cache else 0
    total = past_length + new_tokens
    feeds: dict[str, np.ndarray] = {}
    for name in signature.input_names:
        if name == "input_ids":
            feeds[name] = input_ids.astype(np.int64)
        elif name == "attention_mask":
            feeds[name] = np.ones((batch, total), dtype=np.int64)
        elif name == "position_ids":
            feeds[name] = np.broadcast_to(np.arange(past_length, total, dtype=np.int64), (batch, new_tokens)).copy()
        elif name == "token_type_ids":
            feeds[name] = np.zeros((batch, new_tokens), dtype=np.int64)
        elif name in signature.past_inputs:
            feeds[name] = cache[name]
        else:
            raise UnsupportedModelError(
                f"graph input '{name}' is not one graphq knows how to feed (expected a language model exported "
                "by optimum: input_ids, attention_mask, position_ids, past_key_values.*)"
            )
    return feeds


def next_cache(signature: GraphSignature, outputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The ``present.*`` outputs of a step, renamed as the next step's ``past_key_values.*``."""
    cache = {}
    for name in signature.past_inputs:
        layer, kind = PAST_INPUT.match(name).groups()
        cache[name] = outputs[PRESENT_OUTPUT.format(layer=layer, kind=kind)]
    return cache


def embedding_rows(model) -> int | None:
    """Rows of the token embedding of an ``onnx_ir`` model: the constant table of the ``Gather`` that
    reads ``input_ids`` (None when there is no such plain lookup)."""
    for value in model.graph.inputs:
        if value.name != "input_ids":
            continue
        for node, index in value.uses():
            table = node.inputs[0]
            if (node.op_type == "Gather" and node.domain == "" and index == 1 and table is not None
                    and table.const_value is not None and len(table.const_value.shape) == 2):
                return int(table.const_value.shape[0])
    return None


def logits_size(session: ort.InferenceSession) -> int | None:
    """The vocabulary size of a session's ``logits`` output, when its last dimension is static."""
    for output in session.get_outputs():
        if output.name == "logits" and output.shape and isinstance(output.shape[-1], int):
            return output.shape[-1]
    return None


def check_token_ids(windows: np.ndarray, vocab_size: int | None, tokenizer_source: object) -> None:
    """Refuse token ids the model has no embedding for (a tokenizer that belongs to another model)."""
    if vocab_size is None or windows.size == 0:
        return
    low, high = int(windows.min()), int(windows.max())
    if low < 0 or high >= vocab_size:
        raise GraphqError(
            f"the tokenizer ({tokenizer_source}) gives token id {high if high >= vocab_size else low}, but the "
            f"model has {vocab_size} token embeddings; the tokenizer does not belong to this model "
            "(pass the model's own with --tokenizer)"
        )
