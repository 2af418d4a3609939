"""Sentence embeddings from an exported encoder graph (``feature-extraction``: ``last_hidden_state``).

The graph stays as optimum exports it (token states out); pooling happens here, in numpy
(:mod:`graphq.numerics.pooling`: mean over the attention mask, then L2 normalisation, as
sentence-transformers does). Sentences are tokenised with the model's tokenizer in batches, padded
to the longest sentence of the batch and truncated at ``max_tokens`` (special tokens included), and
the tokenizer's ``input_ids`` / ``attention_mask`` / ``token_type_ids`` are fed as they are.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnxruntime as ort

from graphq.errors import GraphqError
from graphq.numerics.pooling import sentence_embeddings

TOKEN_STATES = "last_hidden_state"


def embed_sentences(session: ort.InferenceSession, tokenizer, sentences: Sequence[str], *, batch_size: int = 32,
                    max_tokens: int = 256) -> np.ndarray:
    """Unit-norm sentence embeddings ``[len(sentences), C]`` (float64) from an encoder session."""
    if batch_size < 1 or max_tokens < 2:
        raise GraphqError(f"batch size must be at least 1 and max tokens at least 2, got {batch_size}, {max_tokens}")
    outputs = [o.name for o in session.get_outputs()]
    if TOKEN_STATES not in outputs:
        raise GraphqError(f"not an encoder graph: no '{TOKEN_STATES}' output (outputs: {', '.join(outputs)})")
    inputs = [i.name for i in session.get_inputs()]
    embeddings = []
    for start in range(0, len(sentences), batch_size):
        batch = tokenizer(list(sentences[start:start + batch_size]), padding=True, truncation=True,
                          max_length=max_tokens, return_tensors="np")
        missing = [name for name in inputs if name not in batch]
        if missing:
            raise GraphqError(f"the tokenizer gives no {', '.join(missing)} for the graph's inputs")
        feeds = {name: np.asarray(batch[name], dtype=np.int64) for name in inputs}
        (hidden,) = session.run([TOKEN_STATES], feeds)
        embeddings.append(sentence_embeddings(hidden, feeds["attention_mask"] if "attention_mask" in feeds
                                              else np.ones(hidden.shape[:2])))
    return np.concatenate(embeddings) if embeddings else np.zeros((0, 0))
