"""TreeLoRA's gradient-similarity tree, held as fixed-shape arrays and built under jit.

The official rule (ZinYY/TreeLoRA `utils/kd_lora_tree.py`; checked against the official code in
tests/fixtures/tree_partition.json) splits the stored task vectors' consecutive differences one
module per depth: each member's dot product with the node's mean, the lower median as threshold,
>= goes left, a positional split when a side is empty (docs/METHODS.md, section TreeLoRA).
Nodes live in slots of a breadth-first array of size 2K-1 (K = max_tasks); children always get
higher slots than their parent, so one `fori_loop` over slots builds the tree and building for 2
tasks and for 50 compiles once. Per node the arrays hold its member mask [nodes, K], parent, left
and right slot (-1: none), depth and median similarity.
"""
from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np


@flax.struct.dataclass
class Tree:
    members: jax.Array   # [nodes, K] bool: the tasks under each node
    parent: jax.Array    # [nodes] int32, -1 at the root and in unused slots
    depth: jax.Array     # [nodes] int32
    median: jax.Array    # [nodes] float32: the split's lower median (NaN at leaves)
    left: jax.Array      # [nodes] int32, -1 at leaves
    right: jax.Array     # [nodes] int32, -1 at leaves
    valid: jax.Array     # [nodes] bool: the slot holds a node
    num_tasks: jax.Array  # [] int32: n

    @property
    def max_nodes(self) -> int:
        return self.members.shape[0]


def empty(max_tasks: int) -> Tree:
    nodes = 2 * max_tasks - 1
    return Tree(members=jnp.zeros((nodes, max_tasks), bool), parent=jnp.full((nodes,), -1, jnp.int32),
                depth=jnp.zeros((nodes,), jnp.int32),
                median=jnp.full((nodes,), jnp.nan, jnp.float32), left=jnp.full((nodes,), -1, jnp.int32),
                right=jnp.full((nodes,), -1, jnp.int32), valid=jnp.zeros((nodes,), bool),
                num_tasks=jnp.zeros((), jnp.int32))


def differences(bank, num_tasks):
    """Delta_0 = G_0, Delta_i = G_i - G_{i-1} for i < num_tasks; zero rows after. bank: [K, D, F]."""
    previous = jnp.concatenate([jnp.zeros_like(bank[:1]), bank[:-1]], axis=0)
    delta = bank - previous
    return jnp.where((jnp.arange(bank.shape[0]) < num_tasks)[:, None, None], delta, 0.0)


def lower_median(values, mask):
    """torch.median of values[mask]: the lower of the two middle values for an even count."""
    count = jnp.sum(mask)
    ordered = jnp.sort(jnp.where(mask, values, jnp.inf))
    return ordered[jnp.maximum(count - 1, 0) // 2]


def split(delta_module, members):
    """One split of a node. delta_module: [K, F] (Delta at this node's module); members: [K] bool.
    Returns (left [K] bool, right [K] bool, median)."""
    count = jnp.sum(members)
    weights = members.astype(jnp.float32)
    mean = jnp.sum(delta_module * weights[:, None], axis=0) / jnp.maximum(count, 1)
    scores = delta_module @ mean
    median = lower_median(scores, members)
    left = members & (scores >= median)
    right = members & (scores < median)
    by_position = (jnp.sum(left) == 0) | (jnp.sum(right) == 0)
    rank = jnp.cumsum(members) - 1
    left = jnp.where(by_position, members & (rank < count // 2), left)
    right = jnp.where(by_position, members & (rank >= count // 2), right)
    return left, right, median


def build(bank, num_tasks, depth_limit: int = -1) -> Tree:
    """The tree over tasks 0..num_tasks-1 of `bank` [K, D, F] (jit-friendly; num_tasks may be traced;
    depth_limit is static).

    depth_limit: leaves at this depth (the paper's "tree depth"; -1: D, the official rule)."""
    max_tasks, modules = bank.shape[0], bank.shape[1]
    limit = modules if depth_limit is None or depth_limit < 0 else min(depth_limit, modules)
    delta = differences(bank.astype(jnp.float32), num_tasks)
    tree = empty(max_tasks)
    root = jnp.arange(max_tasks) < num_tasks
    tree = tree.replace(members=tree.members.at[0].set(root), valid=tree.valid.at[0].set(num_tasks > 0),
                        num_tasks=jnp.asarray(num_tasks, jnp.int32))

    def body(slot, carry):
        tree, next_free = carry
        members = tree.members[slot]
        depth = tree.depth[slot]
        internal = tree.valid[slot] & (depth < limit) & (jnp.sum(members) > 1)
        module = jnp.minimum(depth, modules - 1)
        left, right, median = split(jax.lax.dynamic_index_in_dim(delta, module, axis=1, keepdims=False), members)
        a, b = next_free, next_free + 1
        safe_a = jnp.minimum(a, tree.max_nodes - 1)
        safe_b = jnp.minimum(b, tree.max_nodes - 1)

        def grow(tree):
            return tree.replace(
                members=tree.members.at[safe_a].set(left).at[safe_b].set(right),
                parent=tree.parent.at[safe_a].set(slot).at[safe_b].set(slot),
                depth=tree.depth.at[safe_a].set(depth + 1).at[safe_b].set(depth + 1),
                valid=tree.valid.at[safe_a].set(True).at[safe_b].set(True),
                left=tree.left.at[slot].set(a), right=tree.right.at[slot].set(b),
                median=tree.median.at[slot].set(median))

        tree = jax.lax.cond(internal, grow, lambda t: t, tree)
        return tree, next_free + 2 * internal.astype(jnp.int32)

    tree, _ = jax.lax.fori_loop(0, tree.max_nodes, body, (tree, jnp.ones((), jnp.int32)))
    return tree


def leaf_of(tree: Tree, task) -> jax.Array:
    """[nodes] bool: the nodes on the path from the root to `task`'s leaf."""
    return tree.valid & tree.members[:, task]


def root_child_factor(tree: Tree, task):
    """The official tree reweight factor for rows of the root child containing `task`:
    min(child.median_similarity, 1.5), or 1.0 for a leaf child; and that child's member mask.
    When the root is a leaf (one task) the factor is 1 for every row."""
    has_children = tree.left[0] >= 0
    in_left = tree.members[jnp.maximum(tree.left[0], 0), task]
    child = jnp.where(in_left, tree.left[0], tree.right[0])
    child = jnp.maximum(child, 0)
    child_is_leaf = tree.left[child] < 0
    factor = jnp.where(child_is_leaf, 1.0, jnp.minimum(tree.median[child], 1.5))
    factor = jnp.where(has_children, factor, 1.0)
    rows = jnp.where(has_children, tree.members[child], jnp.ones_like(tree.members[0]))
    return factor, rows


def to_nested(tree: Tree, slot: int = 0) -> dict:
    """The tree as nested dicts (host side), for printing and JSON."""
    tree = jax.device_get(tree)
    if not bool(tree.valid[slot]):
        return {}
    node: dict[str, Any] = {"tasks": [int(i) for i in np.flatnonzero(tree.members[slot])],
                            "depth": int(tree.depth[slot])}
    if tree.left[slot] >= 0:
        node["median_similarity"] = float(tree.median[slot])
        node["left"] = to_nested(tree, int(tree.left[slot]))
        node["right"] = to_nested(tree, int(tree.right[slot]))
    return node


def format_tree(tree: Tree) -> str:
    """A text print of the tree, one node per line, children indented (like the paper's Fig. 5)."""
    lines = []

    def walk(node, indent, label):
        if not node:
            return
        text = f"{'  ' * indent}{label}tasks={node['tasks']}"
        if "median_similarity" in node:
            text += f" median_similarity={node['median_similarity']:.4g} (module {node['depth']})"
        lines.append(text)
        if "left" in node:
            walk(node["left"], indent + 1, "L: ")
            walk(node["right"], indent + 1, "R: ")

    walk(to_nested(tree), 0, "root: ")
    return "\n".join(lines) if lines else "(empty tree)"
