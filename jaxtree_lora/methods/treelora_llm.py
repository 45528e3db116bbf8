"""TreeLoRA's LLM form (`treelora_llm`): ONE LoRA adapter trained through every task, the gradient
tree over stored task vectors and the bandit-selected alignment regulariser, as the official code
(ZinYY/TreeLoRA, `model/Regular/Tree_LoRA.py`, `utils/kd_lora_tree.py`) runs it on instruction streams.

Every default is the official code's; each place where code and paper differ is a named option
(selection, task_vector, regulariser, d_factor, bandit_reset, min_shift, lam_ramp, tree_depth). The
name `treelora` resolves to this form on instruction streams (`jaxtree_lora.assemble`). The D tree
modules are the A matrices in layer-major order (layer0.q, layer0.v, layer1.q, ...), all targeted
sites sharing d_in; `lora.max_modules` keeps the first ones. docs/TREELORA.md explains each part.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import Method, ModelInfo, StreamInfo
from jaxtree_lora import keys
from jaxtree_lora.tree import bandit, tree as tree_lib

SELECTIONS = ("official", "paper_lcb", "random")
TASK_VECTORS = ("lora_a_average", "gradient")
REGULARISERS = ("official", "paper_l1", "none")


@dataclasses.dataclass(frozen=True)
class TreeOptions:
    """TreeLoRA's tree, bandit and regulariser options, declared once for both forms (`TreeLoRALLM`
    below documents each; the HiDe form overrides lam and tree_depth)."""

    lam: float = 0.5
    max_tasks: int = 0
    selection: str = "official"
    task_vector: str = "lora_a_average"
    regulariser: str = "official"
    d_factor: bool = True
    bandit_reset: str = "epoch"
    min_shift: str = "add"
    lam_ramp: bool = True
    tree_depth: int = -1
    tree_bound: bool = True


@dataclasses.dataclass(frozen=True)
class TreeLoRALLM(TreeOptions, Method):
    """TreeLoRA's LLM form on the Method contract. Every default is the official code's (ZinYY/TreeLoRA c6a9b6d):

    lora          rank 8, alpha 32, dropout 0.1 (`training/main.py` L340-342), A kaiming_uniform(a=sqrt 5),
                  B 0 (`utils/my_peft/tuners/lora.py` L523-525); targets q_proj, v_proj of every layer
                  (`utils/my_peft/utils/other.py` L184-212; the run's config decides, encoders/ViTs name
                  their own sites); lora.max_modules -1 = all (`--lora_depth`, main.py L206-209).
    lam           0.5 (`scripts/lora_based_methods/Tree_LoRA.sh` L19, `--reg`).
    max_tasks     0: room for the stream's max_tasks (bank and tree are sized once; no recompiles).
    selection     "official": softmax sampling, larger L1 distance likelier (`utils/kd_lora_tree.py`
                  L192-262).
    task_vector   "lora_a_average": the running mean of the live A VALUES (`model/Regular/Tree_LoRA.py`
                  L78-90 passes the parameters, not gradients; `utils/kd_lora_tree.py` L173-181).
    regulariser   "official": L - lam_t sg(L) R / (sg(R) + 1e-5), R = -sum_l <A_l, G[p_l]_l>
                  (`utils/kd_lora_tree.py` L76-90, L264-271; `model/Regular/Tree_LoRA.py` L101-106).
    d_factor      True: c += D sg(A) / T, the loop-over-modules quirk of `insert_grad` (L173-181).
    bandit_reset  "epoch": S, N, c and t reset by `new_epoch_init` (L117-124) at every epoch start.
    min_shift     "add": `sim += torch.min(sim)` (L237).
    lam_ramp      True: lam_t = lam t / T restarting every epoch (L169-171).
    tree_depth    -1: leaves at depth D (the number of modules, `end_task` L131, L158-163).
    tree_bound    True: the smooth tree bound in the paper selection (unused by the official selection).

    Options that are NOT the code: selection "paper_lcb" (arXiv 2506.10355 Eq. 2, reconstructed, see
    `jaxtree_lora.tree.bandit`) and "random" (Table 5's "penalty + random search"); task_vector
    "gradient" (the paper's expected task gradient: a running mean of dL/dA, the task loss only);
    regulariser "paper_l1" (Eq. 3's lam ||g_n - g_k||_1 between f*A and the selected G, averaged over
    entries so that lam does not grow with D*F; f = D with d_factor, so that f*A is on G's scale) and
    "none" (selection runs, no penalty).
    """

    name = "treelora_llm"
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(dropout=0.1)

    def __post_init__(self):
        for value, allowed, field in ((self.selection, SELECTIONS, "selection"),
                                      (self.task_vector, TASK_VECTORS, "task_vector"),
                                      (self.regulariser, REGULARISERS, "regulariser"),
                                      (self.bandit_reset, ("epoch", "task"), "bandit_reset"),
                                      (self.min_shift, ("add", "subtract"), "min_shift")):
            if value not in allowed:
                raise ConfigError(f"treelora {field} must be one of {', '.join(allowed)}, got {value!r}: "
                                 f"set --config.method.treelora.{field} to one of them")
        if self.lam < 0:
            raise ConfigError(f"treelora lam must be >= 0, got {self.lam}: set --config.method.treelora.lam >= 0")
        if self.max_tasks < 0:
            raise ConfigError(f"treelora max_tasks must be >= 0 (0: the stream's), got {self.max_tasks}")
        if self.regulariser == "paper_l1" and self.task_vector == "gradient":
            raise ConfigError("treelora regulariser 'paper_l1' compares the live A with stored A averages, but "
                             "task_vector 'gradient' stores gradients: use task_vector 'lora_a_average' with it, "
                             "or regulariser 'official' / 'none'")

    # -- layout ---------------------------------------------------------------------------------
    def modules(self, adapters) -> jax.Array:
        """The live A matrices as [D, F] in layer-major module order (gradients flow through).

        {site: {"a": [L, r, d_in]}} -> stack the sites on axis 1 -> [L, S, r, d_in] -> reshape
        [L * S, r * d_in]: row l * S + s is layer l's site s, each row A flattened row-major (the
        official `loranew_A.reshape(-1)`). Sites are taken in sorted name order, the order jax's
        pytree functions give a dict, so the layout does not depend on how the dict was built
        (attn.q_proj before attn.v_proj, as the official named_modules order)."""
        stacked = jnp.stack([adapters[site]["a"] for site in sorted(adapters)], axis=1)  # [L, S, r, d_in]
        layers, sites = stacked.shape[:2]
        flat = stacked.reshape(layers * sites, -1).astype(jnp.float32)
        if self.lora.max_modules >= 0:
            flat = flat[: self.lora.max_modules]
        return flat

    def _shapes(self, model: ModelInfo):
        chosen = self.lora.select(model.sites)
        d_ins = {site.d_in for site in chosen.values()}
        if len(d_ins) != 1:
            raise ConfigError(f"treelora stacks the A matrices of all targeted sites, which needs one input "
                             f"width; the targets {list(chosen)} have widths {sorted(d_ins)}: target sites "
                             f"with the same d_in (e.g. attn.q_proj and attn.v_proj)")
        if self.lora.max_modules >= 0 and list(chosen) != sorted(chosen):
            # lora.layer_mask counts modules in the backbone's site order, `modules` in sorted order.
            raise ConfigError(f"treelora with lora.max_modules needs target sites whose backbone order is their "
                              f"sorted name order (as attn.q_proj, attn.v_proj); got {list(chosen)}: target "
                              f"such sites or set lora.max_modules to -1")
        modules = model.num_layers * len(chosen)
        if self.lora.max_modules >= 0:
            modules = min(modules, self.lora.max_modules)
        return modules, self.lora.rank * d_ins.pop()

    # -- contract ---------------------------------------------------------------------------------
    def init(self, key, model: ModelInfo, stream: StreamInfo):
        adapters = lora_lib.init(key, self.lora, model.sites, model.num_layers)
        modules, features = self._shapes(model)
        tasks = self.max_tasks or stream.max_tasks
        if tasks < stream.num_tasks:
            raise ConfigError(f"treelora max_tasks={tasks} cannot hold a stream of {stream.num_tasks} tasks: "
                             f"raise --config.train.max_tasks to at least {stream.num_tasks}")
        # reg_ratio: ||regulariser's gradient on A|| / ||task loss's gradient on A|| at the last micro-step
        # (0 on task 0), logged per step. Kept out of tree_state, which the HiDe form shares: its
        # checkpoints from before this field restore unchanged.
        return adapters, {**self.tree_state(modules, features, tasks), "reg_ratio": jnp.zeros((), jnp.float32)}

    @staticmethod
    def tree_state(modules: int, features: int, tasks: int) -> dict:
        """The task-vector bank, bandit statistics and tree for D = `modules` rows of F = `features`."""
        return {
            "task": jnp.zeros((), jnp.int32),
            "epoch": jnp.zeros((), jnp.int32),
            "t": jnp.zeros((), jnp.int32),
            "steps_per_epoch": jnp.ones((), jnp.int32),
            "running": jnp.zeros((modules, features), jnp.float32),
            "bank": jnp.zeros((tasks, modules, features), jnp.float32),
            "sums": jnp.zeros((tasks, modules), jnp.float32),
            "counts": jnp.zeros((tasks, modules), jnp.float32),
            "tree": tree_lib.empty(tasks),
            "last_choice": jnp.zeros((modules,), jnp.int32),
        }

    def begin_task(self, adapters, state, task):
        task = jnp.asarray(task, jnp.int32)
        state = {**state, "task": task}
        if self.bandit_reset == "task":
            state = {**state, "sums": jnp.zeros_like(state["sums"]), "counts": jnp.zeros_like(state["counts"])}
        return adapters, state

    def begin_epoch(self, state, epoch, steps_per_epoch):
        state = {**state, "epoch": jnp.asarray(epoch, jnp.int32), "t": jnp.zeros((), jnp.int32),
                 "steps_per_epoch": jnp.asarray(steps_per_epoch, jnp.int32),
                 "running": jnp.zeros_like(state["running"])}
        if self.bandit_reset == "epoch":
            state = {**state, "sums": jnp.zeros_like(state["sums"]), "counts": jnp.zeros_like(state["counts"])}
        return state

    def lam_at(self, state):
        if not self.lam_ramp:
            return jnp.asarray(self.lam, jnp.float32)
        return self.lam * state["t"].astype(jnp.float32) / jnp.maximum(state["steps_per_epoch"], 1).astype(jnp.float32)

    def select(self, state, key):
        """[D] past-task index per module (only meaningful when task > 0)."""
        valid = jnp.arange(state["bank"].shape[0]) < state["task"]
        if self.selection == "official":
            choice, _ = bandit.select_official(key, state["sums"], state["counts"], valid, state["tree"], state["t"],
                                               state["steps_per_epoch"], self.min_shift)
        elif self.selection == "paper_lcb":
            choice = bandit.select_paper(state["sums"], state["counts"], valid, state["tree"], self.tree_bound)
        else:
            choice = bandit.select_random(key, valid, state["running"].shape[0])
        return choice

    def factor(self, state) -> float:
        return float(state["running"].shape[0]) if self.d_factor else 1.0

    def loss(self, trainable, state, batch, key, task_loss):
        """L_total = L - lam_t sg(L) R / (sg(R) + 1e-5) while task > 0 (official regulariser).

        aux adds treelora_choice [D] int32 (the selected past task per module), treelora_a [D, F]
        (sg(A), the live A of this step), treelora_penalty [] and treelora_regulariser_grad [D, F]
        (the closed-form gradient of L_total - L w.r.t. A: after_step removes it from the step's
        gradient to leave dL/dA, for task_vector "gradient" and for the regulariser's share)."""
        loss, aux = task_loss(trainable, key)
        a = self.modules(trainable["adapters"])  # [D, F], live
        if key is None:  # deterministic evaluation of the loss (e.g. a Fisher pass): a fixed draw
            key = jax.random.PRNGKey(0)
        choice = self.select(state, keys.derive(key, "treelora_selection"))
        modules = jnp.arange(a.shape[0])
        chosen = state["bank"][choice, modules]  # [D, F] constants
        lam_t = self.lam_at(state)
        # Python branches below are on static options; the task index only enters through jnp.where.
        active = state["task"] > 0
        sg_loss = jax.lax.stop_gradient(loss)
        regulariser_grad = jnp.zeros_like(a)
        if self.regulariser == "official":
            r = -jnp.sum(a * chosen)
            sg_r = jax.lax.stop_gradient(r)
            penalty = lam_t * sg_loss * r / (sg_r + 1e-5)
            total = loss - jnp.where(active, penalty, 0.0)
            # d(-penalty)/dA = lam_t L G_p / (R + 1e-5)  (the penalty's closed-form gradient)
            regulariser_grad = jnp.where(active, lam_t * sg_loss / (sg_r + 1e-5), 0.0) * chosen
        elif self.regulariser == "paper_l1":
            factor = self.factor(state)
            penalty = lam_t * jnp.mean(jnp.abs(factor * a - chosen))
            total = loss + jnp.where(active, penalty, 0.0)
            # d(penalty)/dA = lam_t f sign(f A - G_p) / (D F)  (the mean's closed-form gradient)
            regulariser_grad = jnp.where(active, lam_t * factor / a.size, 0.0) * jnp.sign(factor * a - chosen)
        else:
            penalty = jnp.zeros((), jnp.float32)
            total = loss
        aux = {**aux, "treelora_choice": choice, "treelora_a": jax.lax.stop_gradient(a),
               "treelora_penalty": jnp.where(active, penalty, 0.0),
               "treelora_regulariser_grad": jax.lax.stop_gradient(regulariser_grad)}
        return total, aux

    def after_step(self, state, aux, grads=None):
        """c += f * v / T (v: sg(A), or dL/dA for task_vector "gradient"); while task > 0 also
        N[p_l, l] += 1 and S[p_l, l] -= ||c_l - G[p_l, l]||_1 with the updated c; t += 1; with the
        step's gradients and a state that keeps it (this form's), reg_ratio = ||dR/dA|| / ||dL/dA||."""
        task_grad, logged = None, {}
        if grads is not None:
            task_grad = self.modules(grads["adapters"]) - aux["treelora_regulariser_grad"]  # dL/dA
            if "reg_ratio" in state:
                ratio = jnp.linalg.norm(aux["treelora_regulariser_grad"]) / jnp.maximum(jnp.linalg.norm(task_grad), 1e-30)
                logged = {"reg_ratio": jnp.where(state["task"] > 0, ratio, 0.0)}
        if self.task_vector == "gradient":
            if task_grad is None:
                raise TypeError("treelora task_vector 'gradient' needs the step's gradients: call "
                                 "after_step(state, aux, grads) as jaxtree_lora/train/step.py does")
            vector = task_grad
        else:
            vector = aux["treelora_a"]
        steps = jnp.maximum(state["steps_per_epoch"], 1).astype(jnp.float32)
        running = state["running"] + self.factor(state) * vector / steps
        sums, counts = bandit.update(state["sums"], state["counts"], aux["treelora_choice"], running, state["bank"])
        active = state["task"] > 0
        return {**state, "running": running, "t": state["t"] + 1,
                "sums": jnp.where(active, sums, state["sums"]), "counts": jnp.where(active, counts, state["counts"]),
                "last_choice": aux["treelora_choice"], **logged}

    def step_metrics(self, state) -> dict:
        return {"treelora_reg_ratio": state["reg_ratio"]} if "reg_ratio" in state else {}

    def end_task(self, trainable, state, context):
        """G[task] = c; the tree is rebuilt from scratch over tasks 0..task (one compiled function for
        every task: the task index is traced)."""
        return trainable, _store_task(state, self.tree_depth)

    def trainable_count(self, trainable, state):
        return lora_lib.count(trainable)

    # -- reporting --------------------------------------------------------------------------------
    def tree_text(self, state) -> str:
        return tree_lib.format_tree(state["tree"])

    def draw_tree(self, state, path: str) -> None:
        from jaxtree_lora.tree.draw import draw

        draw(state["tree"], path, title="TreeLoRA task tree (official rule)")


@functools.partial(jax.jit, static_argnames=("depth_limit",))
def _store_task(state, depth_limit: int):
    bank = state["bank"].at[state["task"]].set(state["running"])
    tree = tree_lib.build(bank, state["task"] + 1, depth_limit)
    return {**state, "bank": bank, "tree": tree}
