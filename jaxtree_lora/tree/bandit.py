"""TreeLoRA's layer-wise bandit over past tasks: pure, jitted, no host synchronisation.

State per epoch (official) or per task: S [K, D], the running sums of NEGATIVE L1 distances between
the current task vector and each past task's, per module; N [K, D], selection counts.

Official selection (ZinYY/TreeLoRA `utils/kd_lora_tree.py` L192-262, reference/treelora.md §2.5), at
micro-step t of an epoch of T micro-steps, with n past tasks:

  mu    = S / N where N > 0, else 0                       (minus the mean L1 distance)
  beta  = sqrt(log(2 T (t+1)(t+2))) / sqrt(2 N + 1e-5)
  s     = -(mu - beta)                                    (mean distance + bonus: LARGER is likelier)
  s    += min(s)                                          (the code ADDS the minimum; option: subtract)
  f     ~ Categorical(softmax(sum_l s[:, l]))             (one task for the tree reweight)
  s[C] *= min(median_similarity(C), 1.5)                  (C: the root child holding f; 1.0 if a leaf)
  s     = s / (max(s) - min(s) + 1e-5)                    (global range over valid entries)
  p_l   ~ Categorical(softmax(s[:, l])) for each module l

and the update after the step, with c the running task vector INCLUDING the step:
  N[p_l, l] += 1;  S[p_l, l] -= ||c_l - G[p_l, l]||_1.

Paper selection (arXiv 2506.10355 §3, Eq. 2; a reconstruction from the extracted text): per module the
task minimising LCB_k = mu_hat_k - 2 sqrt(log t / n_k), mu_hat the mean L1 distance, unexplored arms
first; with `tree_bound` the descent from the root picks at each node the child with the smaller
smooth bound max(min over its tasks' LCB, LCB of the node's pooled statistics - delta), delta = |median
similarity| of the node.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtree_lora.tree.similarity import l1
from jaxtree_lora.tree.tree import Tree, root_child_factor

NEG = -1e30


def bonus(counts, t, steps_per_epoch):
    """beta = sqrt(log(2 T (t+1)(t+2))) / sqrt(2 N + 1e-5)."""
    t = jnp.asarray(t, jnp.float32)
    steps = jnp.asarray(steps_per_epoch, jnp.float32)
    return jnp.sqrt(jnp.log(2.0 * steps * (t + 1.0) * (t + 2.0))) / jnp.sqrt(2.0 * counts + 1e-5)


def official_scores(sums, counts, valid, t, steps_per_epoch, min_shift: str = "add"):
    """s = mean distance + bonus, shifted by the global min over valid rows. [K, D]."""
    mean = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), 0.0)
    scores = -(mean - bonus(counts, t, steps_per_epoch))
    smallest = jnp.min(jnp.where(valid[:, None], scores, jnp.inf))
    scores = scores + smallest if min_shift == "add" else scores - smallest
    return jnp.where(valid[:, None], scores, 0.0)


def normalise(scores, valid):
    """s / (max - min + 1e-5) over valid entries (the official global range normalisation)."""
    high = jnp.max(jnp.where(valid[:, None], scores, -jnp.inf))
    low = jnp.min(jnp.where(valid[:, None], scores, jnp.inf))
    return scores / (high - low + 1e-5)


def select_official(key, sums, counts, valid, tree: Tree, t, steps_per_epoch, min_shift: str = "add"):
    """One past task per module: [D] int32 (and the probabilities [K, D] used)."""
    scores = official_scores(sums, counts, valid, t, steps_per_epoch, min_shift)
    key_tree, key_modules = jax.random.split(key)
    total = jnp.where(valid, jnp.sum(scores, axis=1), NEG)
    focus = jax.random.categorical(key_tree, total)
    factor, rows = root_child_factor(tree, focus)
    scores = jnp.where(rows[:, None], scores * factor, scores)
    scores = normalise(scores, valid)
    logits = jnp.where(valid[:, None], scores, NEG)
    choice = jax.random.categorical(key_modules, logits, axis=0)
    return choice.astype(jnp.int32), jax.nn.softmax(logits, axis=0)


def lcb(sums, counts, t):
    """The paper's per-arm lower confidence bound on the mean L1 distance; -inf for unexplored arms."""
    mean = jnp.where(counts > 0, -sums / jnp.maximum(counts, 1.0), 0.0)
    width = 2.0 * jnp.sqrt(jnp.log(jnp.maximum(jnp.asarray(t, jnp.float32), 1.0) + 1.0) / jnp.maximum(counts, 1.0))
    return jnp.where(counts > 0, mean - width, -jnp.inf)


def select_paper(sums, counts, valid, tree: Tree, t, tree_bound: bool = True):
    """argmin LCB per module ([D] int32), optionally descending the tree with the smooth bound."""
    bounds = jnp.where(valid[:, None], lcb(sums, counts, t), jnp.inf)  # [K, D]
    if not tree_bound:
        return jnp.argmin(bounds, axis=0).astype(jnp.int32)
    members = tree.members.astype(jnp.float32)  # [nodes, K]
    node_counts = members @ counts  # [nodes, D]
    node_sums = members @ sums
    own = lcb(node_sums, node_counts, t) - jnp.abs(jnp.nan_to_num(tree.median))[:, None]
    child_min = jnp.min(jnp.where(tree.members[:, :, None], bounds[None], jnp.inf), axis=1)  # [nodes, D]
    smooth = jnp.maximum(child_min, own)

    def descend(_, node):  # node: [D] int32 slots
        left, right = tree.left[node], tree.right[node]
        is_leaf = left < 0
        modules = jnp.arange(node.shape[0])
        pick_left = smooth[jnp.maximum(left, 0), modules] <= smooth[jnp.maximum(right, 0), modules]
        return jnp.where(is_leaf, node, jnp.where(pick_left, left, right))

    leaf = jax.lax.fori_loop(0, tree.max_nodes, descend, jnp.zeros((sums.shape[1],), jnp.int32))
    # The leaf may still hold several tasks (depth limit): take its best arm.
    in_leaf = tree.members[leaf].T  # [K, D]
    return jnp.argmin(jnp.where(in_leaf, bounds, jnp.inf), axis=0).astype(jnp.int32)


def select_random(key, valid, modules: int):
    logits = jnp.where(valid, 0.0, NEG)
    return jax.random.categorical(key, logits, shape=(modules,)).astype(jnp.int32)


def update(sums, counts, choice, running, bank):
    """N[p_l, l] += 1; S[p_l, l] -= ||c_l - G[p_l, l]||_1 (c: running vector incl. this step)."""
    modules = jnp.arange(choice.shape[0])
    chosen = bank[choice, modules]  # [D, F]
    distance = jnp.sum(jnp.abs(running - chosen), axis=-1)
    return sums.at[choice, modules].add(-distance), counts.at[choice, modules].add(1.0)


def distances(running, bank, valid):
    """All L1 distances [K, D] (for analysis); invalid rows NaN."""
    return jnp.where(valid[:, None], l1(running, bank), jnp.nan)
