"""Class prototypes: the mean feature of each class, and nearest-class-mean (NCM) scoring.

Three protocols use them, and they differ only in which features a class mean is taken over:

- rehearsal-free NCM: each class's mean over its own task's training data with the adapters of
  the moment that task ends, never recomputed (CL-LoRA's prototype classifier; the `fix` baseline,
  whose features never change);
- the recomputed-prototype diagnostic (not rehearsal-free): every class's mean with the final
  model over that class's training data; its gap to the rehearsal-free NCM is prototype staleness;
- task-identity inference (HiDe-LoRA's way): means of the pre-trained model's features.

Features are L2-normalised before averaging, so every example weighs the same whatever its norm.
"""
from __future__ import annotations

from typing import Callable, Iterable, Sequence

import jax.numpy as jnp
import numpy as np


def class_means(features: Callable[[dict], np.ndarray], batches: Iterable[dict], num_classes: int,
                feature_dim: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean unit feature per class over `batches` (dicts with "labels" [B], "weight" [B] and the inputs).

    `features(batch) -> [B, feature_dim]`. Returns (means [num_classes, feature_dim] float32, counts
    [num_classes]); a class without examples has a zero mean and count 0.
    """
    sums = np.zeros((num_classes, feature_dim), np.float64)
    counts = np.zeros((num_classes,), np.float64)
    for batch in batches:
        weight = np.asarray(batch.pop("weight"), np.float64)
        labels = np.asarray(batch.pop("labels"))
        values = np.array(features(batch), np.float64)
        values /= np.linalg.norm(values, axis=-1, keepdims=True) + 1e-6
        np.add.at(sums, labels, values * weight[:, None])
        np.add.at(counts, labels, weight)
    means = sums / np.maximum(counts, 1.0)[:, None]
    return means.astype(np.float32), counts


def ncm_logits(features, prototypes):
    """[B, C] cosine similarity of features [B, d] to prototypes [C, d] (a zero prototype scores 0)."""
    features = features.astype(jnp.float32)
    features = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)
    prototypes = prototypes / (jnp.linalg.norm(prototypes, axis=-1, keepdims=True) + 1e-6)
    return features @ prototypes.T


def nearest(features: np.ndarray, means: np.ndarray, owners: Sequence[int]) -> np.ndarray:
    """[B] the owner (e.g. task) of each example's nearest mean by cosine. means [M, d], owners [M]."""
    features = features / (np.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)
    means = means / (np.linalg.norm(means, axis=-1, keepdims=True) + 1e-12)
    return np.asarray(owners)[np.argmax(features @ means.T, axis=-1)]
