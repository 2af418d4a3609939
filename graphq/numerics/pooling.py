"""Sentence embeddings from an encoder's token states, as sentence-transformers computes them.

Mean pooling over the real tokens, then L2 normalisation (all-MiniLM-L6-v2's ``1_Pooling`` +
``2_Normalize`` modules): for token states ``h [B, T, C]`` and attention mask ``m [B, T]``,

    e_b = sum_t m_bt h_bt / max(sum_t m_bt, eps),     u_b = e_b / max(||e_b||_2, eps)

so the cosine similarity of two sentence embeddings is the dot product ``u_a . u_b``.
"""

from __future__ import annotations

import numpy as np

EPS = 1e-9  # sentence-transformers clamps the token count at 1e-9 and the norm at 1e-12


def mean_pool(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``[B, T, C]`` token states, ``[B, T]`` mask (1: token, 0: padding) -> ``[B, C]`` mean over tokens."""
    weights = np.asarray(mask, dtype=np.float64)[..., None]
    summed = (np.asarray(hidden, dtype=np.float64) * weights).sum(axis=1)
    return summed / np.maximum(weights.sum(axis=1), EPS)


def l2_normalize(vectors: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    vectors = np.asarray(vectors, dtype=np.float64)
    return vectors / np.maximum(np.linalg.norm(vectors, axis=-1, keepdims=True), 1e-12)


def sentence_embeddings(hidden: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Unit-norm sentence embeddings ``[B, C]`` (float64): mean pooling, then L2 normalisation."""
    return l2_normalize(mean_pool(hidden, mask))


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine similarity of matching rows of ``a`` and ``b`` ``[N, C]`` -> ``[N]``."""
    return (l2_normalize(a) * l2_normalize(b)).sum(axis=-1)
