"""TreeLoRA's classification form (`treelora_hide`): TreeLoRA built into HiDe-LoRA's decomposition, as
the TreeLoRA paper's App. A.3 does for ViTs (per-task slots, task-identity head, Gaussian replay).

HiDe-LoRA's parts are `methods.hide_lora`'s, with its options; TreeLoRA's task vectors, bandit and
regulariser (`methods.treelora_llm`'s machinery) act in the within-task stage only, on the current
slot, whose tree modules are its adapted blocks (block l: the A matrices of every targeted site).
Defaults: HiDe-LoRA's LoRA spec, lam 0.1 and tree depth 5 (the paper's ViT settings). The name
`treelora` resolves to this form on classification streams (`jaxtree_lora.assemble`); docs/TREELORA.md
explains the reading of the paper this follows.
"""
from __future__ import annotations

import dataclasses
import functools
import math

import jax

from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.hide_lora import HiDeLoRA
from jaxtree_lora.methods.treelora_llm import TreeLoRALLM, TreeOptions


@dataclasses.dataclass(frozen=True)
class BlockTree(TreeLoRALLM):
    """TreeLoRA's task vectors, bandit and regulariser over the blocks of ONE slot.

    `modules(adapters)` takes one slot's adapters {site: {"a": [L, r, d_in]}} and returns [D, F]: one
    row per adapted block (D = the blocks that `lora.max_modules` leaves adapted), F = sites x r x d_in
    (the block's A matrices of every site, sites in sorted name order, each flattened row-major)."""

    def blocks(self, num_layers: int, num_sites: int) -> int:
        if self.lora.max_modules < 0:
            return num_layers
        return min(num_layers, math.ceil(self.lora.max_modules / num_sites))

    def modules(self, adapters) -> jax.Array:
        stacked = jax.numpy.stack([adapters[site]["a"] for site in sorted(adapters)], axis=1)  # [L, S, r, d_in]
        layers, sites = stacked.shape[:2]
        return stacked[: self.blocks(layers, sites)].reshape(self.blocks(layers, sites), -1).astype(jax.numpy.float32)

    def block_shapes(self, model: ModelInfo) -> tuple[int, int]:
        chosen = self.lora.select(model.sites)
        d_ins = {site.d_in for site in chosen.values()}
        if len(d_ins) != 1:
            raise ConfigError(f"treelora_hide stacks a block's A matrices of all targeted sites, which "
                              f"needs one input width; {list(chosen)} have widths {sorted(d_ins)}")
        return self.blocks(model.num_layers, len(chosen)), len(chosen) * self.lora.rank * d_ins.pop()


# The options that the block tree takes from this form (its lora is this form's, HiDe-LoRA's).
TREE_OPTIONS = tuple(field.name for field in dataclasses.fields(TreeOptions))


def current_slot(adapters, task):
    """One slot of a slot stack: {site: {name: [L, K, ...]}} -> {site: {name: [L, ...]}} (row `task`);
    the gradient of anything computed from it reaches that slot only."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, task, axis=1, keepdims=False), adapters)


@dataclasses.dataclass(frozen=True)
class TreeLoRAHiDe(HiDeLoRA, TreeOptions):
    """HiDe-LoRA (the parent, its options and LoRA spec) with TreeLoRA's within-task selection and
    regulariser (`tree`, a BlockTree built from this form's tree options: lam 0.1, tree_depth 5, the
    rest TreeLoRALLM's defaults)."""

    name = "treelora_hide"
    lam: float = 0.1
    tree_depth: int = 5

    def __post_init__(self):
        super().__post_init__()
        self.tree  # builds (and so checks) the tree options now

    @functools.cached_property
    def tree(self) -> BlockTree:
        return BlockTree(lora=self.lora, **{name: getattr(self, name) for name in TREE_OPTIONS})

    def init(self, key, model: ModelInfo, stream: StreamInfo):
        adapters, state = super().init(key, model, stream)
        blocks, features = self.tree.block_shapes(model)
        tasks = self.tree.max_tasks or stream.max_tasks
        tree_state = TreeLoRALLM.tree_state(blocks, features, tasks)
        tree_state.pop("task")  # the slot index is the task index
        return adapters, {**state, **tree_state}

    def begin_task(self, adapters, state, task):
        adapters, state = super().begin_task(adapters, state, task)
        return self.tree.begin_task(adapters, state, task)

    def begin_epoch(self, state, epoch, steps_per_epoch):
        return self.tree.begin_epoch(state, epoch, steps_per_epoch)

    def loss(self, trainable, state, batch, key, task_loss):
        """HiDe's WTP loss; TreeLoRA's regulariser on the current slot's A (the tree sees that slot)."""
        view = {**trainable, "adapters": current_slot(trainable["adapters"], state["task"])}
        own = lambda _view, k, b=None: HiDeLoRA.loss(self, trainable, state, batch, k, task_loss)
        return self.tree.loss(view, state, batch, key, own)

    def after_step(self, state, aux, grads=None):
        if grads is not None:
            grads = {**grads, "adapters": current_slot(grads["adapters"], state["task"])}
        return self.tree.after_step(state, aux, grads)

    def end_task(self, trainable, state, context):
        """The task vector into the bank and the tree rebuilt (before the merge moves the slot), then
        HiDe-LoRA's end of task."""
        trainable, state = self.tree.end_task(trainable, state, context)
        return super().end_task(trainable, state, context)

    def tree_text(self, state) -> str:
        return self.tree.tree_text(state)

    def draw_tree(self, state, path: str) -> None:
        self.tree.draw_tree(state, path)
