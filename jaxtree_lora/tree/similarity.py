"""Similarity between task vectors, vmapped over past tasks and modules.

Task vectors are stacked per module: a query is [D, F] (D modules, F features per module) and a bank
of K past tasks is [K, D, F]. Every function returns [K, D]: one value per (past task, module).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

KINDS = ("l1", "dot", "cosine")


def l1(query, bank):
    """||q_l - g_{k,l}||_1 for every past task k and module l: [K, D]."""
    return jax.vmap(lambda g: jnp.sum(jnp.abs(query - g), axis=-1))(bank)


def dot(query, bank):
    """<q_l, g_{k,l}>: [K, D]."""
    return jax.vmap(lambda g: jnp.sum(query * g, axis=-1))(bank)


def cosine(query, bank, eps: float = 1e-8):
    """<q_l, g_{k,l}> / (||q_l|| ||g_{k,l}||): [K, D]."""
    qn = jnp.linalg.norm(query, axis=-1)
    return jax.vmap(lambda g: jnp.sum(query * g, axis=-1) / (qn * jnp.linalg.norm(g, axis=-1) + eps))(bank)


def pairwise(query, bank, kind: str = "l1", valid=None):
    """Similarity of `kind` between query [D, F] and bank [K, D, F]; rows where `valid` [K] is False
    are NaN so that a masked reduction never mistakes an empty slot for a task."""
    if kind not in KINDS:
        raise ValueError(f"unknown similarity {kind!r}: choose one of {', '.join(KINDS)}")
    values = {"l1": l1, "dot": dot, "cosine": cosine}[kind](query.astype(jnp.float32), bank.astype(jnp.float32))
    if valid is not None:
        values = jnp.where(valid[:, None], values, jnp.nan)
    return values
