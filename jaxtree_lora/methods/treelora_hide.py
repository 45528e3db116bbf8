"""TreeLoRA in HiDe-LoRA's decomposition (TreeLoRA paper App. A.3: "we incorporate HiDeLoRA's task
decomposition methodology into TreeLoRA"; reference/methods.md §8b). The `treelora` option
`form="hide"` (the default on classification streams through `form="auto"`) builds it.

HiDe-LoRA's parts are kept as `jaxtree_lora.methods.hide_lora` has them: the per-task slots (copy of
the previous slot, momentum merge), the contrastive within-task loss, the task-identity head on
pre-trained features and the Gaussian-replay head alignment, with the options under
`config.method.hide_lora`. TreeLoRA's parts act in the within-task stage only, on the CURRENT slot:

- the tree's layers are the slot's adapted blocks: module l is block l's A matrices of every targeted
  site (k and v), flattened together, so the default 5 adapted blocks give D = 5 and tree depth 5;
- the task vector of task t is the running mean over each epoch's micro-steps of slot t's A values
  (the official LLM code's `lora_a_average`, on the slot being trained), stored in the bank when task
  t ends, before HiDe's momentum merge changes the slot (the official code stores the running mean,
  not the final weights);
- at each micro-step of task t > 0 the bandit selects one past task per block, and the official
  log-alignment regulariser penalises slot t's A against the selected tasks' STORED vectors. The paper
  leaves open whether the penalised A is the current slot's or the selected past task's slot; the
  official LLM code has one adapter, penalised against stored vectors, and the reading closest to it
  is the current slot against the bank. Its gradient reaches slot t only (past slots never enter it);
- lam 0.1 and tree depth 5 (TreeLoRA Table 6, ViTs) unless the config sets them; every other tree
  option (selection, regulariser, ...) is TreeLoRA's.
"""
from __future__ import annotations

import dataclasses
import math

import jax

from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.hide_lora import HiDeLoRA
from jaxtree_lora.methods.treelora import TreeLoRA

# TreeLoRA's ViT settings (Table 6), used by the hide form where the config does not set them.
HIDE_TREE_DEFAULTS = {"lam": 0.1, "tree_depth": 5}


@dataclasses.dataclass(frozen=True)
class BlockTree(TreeLoRA):
    """TreeLoRA's task vectors, bandit and regulariser over the blocks of ONE slot.

    `modules(adapters)` takes one slot's adapters {site: {"a": [L, r, d_in]}} and returns [D, F]: one
    row per adapted block (D = the blocks that `lora.max_modules` leaves adapted), F = sites x r x d_in
    (the block's A matrices of every site, sites in sorted name order, each flattened row-major)."""

    form: str = "llm"

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
            raise ConfigError(f"treelora (hide form) stacks a block's A matrices of all targeted sites, which "
                              f"needs one input width; {list(chosen)} have widths {sorted(d_ins)}")
        return self.blocks(model.num_layers, len(chosen)), len(chosen) * self.lora.rank * d_ins.pop()


def current_slot(adapters, task):
    """One slot of a slot stack: {site: {name: [L, K, ...]}} -> {site: {name: [L, ...]}} (row `task`);
    the gradient of anything computed from it reaches that slot only."""
    return jax.tree.map(lambda leaf: jax.lax.dynamic_index_in_dim(leaf, task, axis=1, keepdims=False), adapters)


@dataclasses.dataclass(frozen=True)
class TreeHiDeLoRA(HiDeLoRA):
    """HiDe-LoRA (the parent) with TreeLoRA's within-task selection and regulariser (`tree`)."""

    name = "treelora"
    tree: BlockTree = BlockTree(lam=HIDE_TREE_DEFAULTS["lam"], tree_depth=HIDE_TREE_DEFAULTS["tree_depth"],
                                lora=HiDeLoRA.lora)

    def init(self, key, model: ModelInfo, stream: StreamInfo):
        adapters, state = super().init(key, model, stream)
        blocks, features = self.tree.block_shapes(model)
        tasks = self.tree.max_tasks or stream.max_tasks
        tree_state = TreeLoRA.tree_state(blocks, features, tasks)
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

    def describe(self) -> dict:
        return {**super().describe(), "form": "hide"}


def hide_form(tree: TreeLoRA, hide_options: dict, given: frozenset) -> TreeHiDeLoRA:
    """TreeLoRA's options (`tree`) and HiDe-LoRA's (`hide_options`) -> the hide form.

    `given` names what the config sets: TreeLoRA option names and LoRA keys as "lora.KEY". The LoRA
    spec is HiDe-LoRA's (k and v of the first 5 blocks, rank 4, alpha 1) with the given keys' values
    from `tree.lora` on top; lam and tree_depth are TreeLoRA's ViT values (HIDE_TREE_DEFAULTS) unless
    given; every other option is `tree`'s. A given key keeps its value even where it equals a default."""
    lora_keys = {name.split(".", 1)[1] for name in given if name.startswith("lora.")}
    spec = dataclasses.replace(HiDeLoRA.lora, **{key: getattr(tree.lora, key) for key in lora_keys})
    options = {field.name: getattr(tree, field.name) for field in dataclasses.fields(TreeLoRA)
               if field.name not in ("lora", "form")}
    options.update({key: value for key, value in HIDE_TREE_DEFAULTS.items() if key not in given})
    block_tree = BlockTree(lora=spec, **options)
    return TreeHiDeLoRA(lora=spec, tree=block_tree, **hide_options)
