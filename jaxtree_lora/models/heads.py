"""The classification head over a backbone's features: its initial weights and its logits.

One head of every class of the stream; each task trains its own classes' columns (per-task heads,
concatenated at inference). It sits with the models, below evaluation and training, which both
read it: the train step's loss, the evaluator's classifier and the joint run's linear probe.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtree_lora import keys


def init_head(key, feature_dim: int, num_classes: int, kind: str = "cosine") -> dict:
    """Classification head over all classes of the stream: w [feature_dim, num_classes], b [num_classes].

    Each task trains only its own classes' columns (per-task heads, concatenated at inference).
    "linear" heads start at zero: a task then says only what its own steps taught it, and the classes of
    different tasks start level. A random start (torch's default) is noise the size of what a few dozen
    Adam steps learn, and continual streams often give a task no more than that. "cosine" heads need a
    direction to start from: w ~ N(0, 1/feature_dim)."""
    if num_classes == 0:
        return {}
    if kind == "linear":
        w = jnp.zeros((feature_dim, num_classes), jnp.float32)
    else:
        w = keys.settled(jax.random.normal(key, (feature_dim, num_classes), jnp.float32)) / jnp.sqrt(feature_dim)
    return {"w": w, "b": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, features, kind: str = "cosine", scale: float = 20.0):
    """Class logits [B, C] from features [B, d].

    "cosine": scale * cos(features, w_c) (CosFace-style, as CL-LoRA and LoDA use): logits of classes
    learned in different tasks share one scale, so evaluation over all seen classes is not dominated
    by whichever task's head grew largest. "linear": features @ w + b.
    """
    features = features.astype(jnp.float32)
    if kind == "cosine":
        f = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)
        w = head["w"] / (jnp.linalg.norm(head["w"], axis=0, keepdims=True) + 1e-6)
        return scale * (f @ w)
    return features @ head["w"] + head["b"]
