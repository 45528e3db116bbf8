"""TreeLoRA's layer-wise bandit over past tasks: pure, jitted, no host synchronisation.

State per epoch (official) or per task: S [K, D], the running sums of NEGATIVE L1 distances between
the current task vector and each past task's, per module; N [K, D], selection counts.
`select_official` is the official rule (ZinYY/TreeLoRA `utils/kd_lora_tree.py`): a bonus-adjusted score where
a larger distance is likelier, a tree reweight of the root child holding one sampled task, then one
softmax draw per module; `update` adds the step's L1 distances. The paper's rule (arXiv 2506.10355
Eq. 2, a reconstruction from garbled text; `select_paper`) takes the lowest confidence bound per module, optionally
through the smooth tree bound. Formulas, step by step: docs/METHODS.md, section TreeLoRA.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxtree_lora.tree.similarity import l1
from jaxtree_lora.tree.tree import Tree, root_child_factor

NEG = -1e30


def bonus(counts, t, steps_per_epoch):
    """beta = sqrt(log(2 T (t+1)(t+2))) / sqrt(2 N + 1e-5), shaped like counts (N, e.g. [K, D]);
    t: the micro-step in the epoch (0-based), steps_per_epoch: T."""
    t = jnp.asarray(t, jnp.float32)
    steps = jnp.asarray(steps_per_epoch, jnp.float32)
    return jnp.sqrt(jnp.log(2.0 * steps * (t + 1.0) * (t + 2.0))) / jnp.sqrt(2.0 * counts + 1e-5)


def official_scores(sums, counts, valid, t, steps_per_epoch, min_shift: str = "add"):
    """s = mean distance + bonus, shifted by the global min over valid rows, [K, D] (0 on invalid rows).

    sums: [K, D] sums of negative L1 distances; counts: [K, D]; valid: [K] bool. min_shift "add" is
    the official `sim += torch.min(sim)`; "subtract" is what its comment ("make positive") meant."""
    if min_shift not in ("add", "subtract"):
        raise ValueError(f"min_shift must be 'add' or 'subtract', got {min_shift!r}")
    # The official `sim[valid_mask] /= N[valid_mask]`: only arms with N > 0 are divided, S stays elsewhere.
    mean = jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), sums)
    scores = -(mean - bonus(counts, t, steps_per_epoch))
    smallest = jnp.min(jnp.where(valid[:, None], scores, jnp.inf))
    scores = scores + smallest if min_shift == "add" else scores - smallest
    return jnp.where(valid[:, None], scores, 0.0)


def normalise(scores, valid):
    """s / (max - min + 1e-5), the range over valid entries only (the official global range
    normalisation; the official tensor has only the n past rows). scores: [K, D]; valid: [K]."""
    high = jnp.max(jnp.where(valid[:, None], scores, -jnp.inf))
    low = jnp.min(jnp.where(valid[:, None], scores, jnp.inf))
    return scores / (high - low + 1e-5)


def focus_logits(scores, valid):
    """Logits of the tree-focus draw: sum_l s[:, l] per past task, [K] (masked rows NEG)."""
    return jnp.where(valid, jnp.sum(scores, axis=1), NEG)


def module_logits(scores, valid, tree: Tree, focus):
    """The per-module logits [K, D] after the tree reweight of the root child holding `focus` and the
    global range normalisation; rows that are not past tasks are NEG (probability 0)."""
    factor, rows = root_child_factor(tree, focus)
    scores = jnp.where(rows[:, None], scores * factor, scores)
    return jnp.where(valid[:, None], normalise(scores, valid), NEG)


def select_official(key, sums, counts, valid, tree: Tree, t, steps_per_epoch, min_shift: str = "add"):
    """One past task per module, [D] int32, and the per-module probabilities used, [K, D].

    sums, counts: [K, D]; valid: [K] bool (the past tasks); t: the micro-step in the epoch (0-based);
    steps_per_epoch: T. Two draws from `key`: the focus task, then one task per module."""
    scores = official_scores(sums, counts, valid, t, steps_per_epoch, min_shift)
    key_tree, key_modules = jax.random.split(key)
    focus = jax.random.categorical(key_tree, focus_logits(scores, valid))
    logits = module_logits(scores, valid, tree, focus)
    choice = jax.random.categorical(key_modules, logits, axis=0)
    return choice.astype(jnp.int32), jax.nn.softmax(logits, axis=0)


def lcb(sums, counts, rounds):
    """The paper's lower confidence bound on the mean L1 distance, mu_hat - 2 sqrt(log t / n).

    sums, counts: [..., D] (sums of NEGATIVE distances, as the official statistics); rounds: t, the
    selections made so far plus one, broadcastable to [..., D]. Unexplored arms get -inf so that
    argmin tries them first."""
    mean = -sums / jnp.maximum(counts, 1.0)
    rounds = jnp.maximum(jnp.asarray(rounds, jnp.float32), 1.0)
    width = 2.0 * jnp.sqrt(jnp.log(rounds) / jnp.maximum(counts, 1.0))
    return jnp.where(counts > 0, mean - width, -jnp.inf)


def smooth_bounds(tree: Tree, arm_bounds, sums, counts, rounds):
    """The smooth-tree bound of every node, [nodes, D] (a reconstruction of the paper's Eq. 2).

    Leaf: the smallest LCB of its tasks (one task, or several under a depth limit). Internal node:
    max(min over its two children's bounds, LCB of the node's pooled statistics - delta), with delta =
    |median similarity| of the node's split, the only per-node spread the official tree keeps. Children
    sit in higher slots than their parent, so one pass over the slots from the last to the first sees
    every child before its parent. arm_bounds: [K, D] with +inf for tasks that are not in the past."""
    members = tree.members.astype(jnp.float32)  # [nodes, K]
    own = lcb(members @ sums, members @ counts, rounds) - jnp.abs(jnp.nan_to_num(tree.median))[:, None]
    at_leaf = jnp.min(jnp.where(tree.members[:, :, None], arm_bounds[None], jnp.inf), axis=1)  # [nodes, D]
    last = tree.max_nodes - 1

    def body(index, bounds):
        slot = last - index
        left, right = tree.left[slot], tree.right[slot]
        children = jnp.minimum(bounds[jnp.maximum(left, 0)], bounds[jnp.maximum(right, 0)])
        value = jnp.where(left >= 0, jnp.maximum(children, own[slot]), at_leaf[slot])
        return bounds.at[slot].set(jnp.where(tree.valid[slot], value, jnp.inf))

    return jax.lax.fori_loop(0, tree.max_nodes, body, jnp.full(at_leaf.shape, jnp.inf, jnp.float32))


def select_paper(sums, counts, valid, tree: Tree, tree_bound: bool = True):
    """The paper's deterministic selection: per module the past task of minimum LCB ([D] int32).

    t (the round) is per module: the selections made so far plus one, so the bound is the same whether
    the statistics reset per epoch or per task. With `tree_bound` the choice descends from the root,
    at each node into the child of smaller smooth bound, then takes the best arm of the leaf reached."""
    rounds = jnp.sum(counts, axis=0, keepdims=True) + 1.0  # [1, D]
    bounds = jnp.where(valid[:, None], lcb(sums, counts, rounds), jnp.inf)  # [K, D]
    if not tree_bound:
        return jnp.argmin(bounds, axis=0).astype(jnp.int32)
    smooth = smooth_bounds(tree, bounds, sums, counts, rounds)
    modules = jnp.arange(sums.shape[1])

    def descend(_, node):  # node: [D] int32 slots, one walk per module
        left, right = tree.left[node], tree.right[node]
        pick_left = smooth[jnp.maximum(left, 0), modules] <= smooth[jnp.maximum(right, 0), modules]
        return jnp.where(left < 0, node, jnp.where(pick_left, left, right))

    # A path is at most K - 1 edges long.
    leaf = jax.lax.fori_loop(0, tree.members.shape[1], descend, jnp.zeros((sums.shape[1],), jnp.int32))
    in_leaf = tree.members[leaf].T  # [K, D]
    # An empty tree (no task stored yet) has no valid leaf: fall back to the flat argmin.
    in_leaf = jnp.where(tree.valid[0], in_leaf, True)
    return jnp.argmin(jnp.where(in_leaf, bounds, jnp.inf), axis=0).astype(jnp.int32)


def select_random(key, valid, modules: int):
    """Uniform over the past tasks, independently per module (the paper's "random search" ablation)."""
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
