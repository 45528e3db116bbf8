"""The Method contract: what every continual-learning method provides.

A method is a frozen dataclass of hyper-parameters plus pure functions over pytrees; it never imports
a backbone (`ModelInfo` and `StreamInfo` tell it the LoRA sites, sizes, tasks and classes). Its
trainable pytree is `{"adapters": ..., "head": ...}`, adapter leaves with a leading layer axis. The
hooks that run inside jit (`begin_task`, `begin_epoch`, `loss`, `after_step`, `update_mask`) take the
task index as a traced integer, so a new task never compiles the step again; `prepare_task` and
`end_task` are host work. How it scores at test time is one `InferenceRule`. The life cycle and every
hook: docs/ARCHITECTURE.md, "The one seam".
"""
from __future__ import annotations

import contextlib
import dataclasses
import enum
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models.common import Site

Array = jax.Array
PyTree = Any
# task_loss(trainable, key, batch=None) -> (loss, aux): the stream's loss on the current batch (closure over
# it), or on `batch` when given (same shapes, e.g. the current batch with other example weights).
TaskLoss = Callable[[PyTree, Optional[Array]], tuple[Array, dict]]


@dataclasses.dataclass(frozen=True)
class ModelInfo:
    """What a method may know about the backbone."""

    sites: Mapping[str, Site]
    num_layers: int
    feature_dim: int


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    """What a method may know about the stream before it starts."""

    num_tasks: int
    max_tasks: int
    kind: str  # "classification" or "instruction"
    num_classes: int = 0


@dataclasses.dataclass(frozen=True)
class TaskContext:
    """Host-side helpers for `prepare_task` and `end_task` (methods that need passes over a task's data).

    Each helper runs jitted passes over the task's training data with the trainable and method state
    it is given; none of them changes anything.
    """

    task: int
    steps_per_epoch: int
    # The rows of one training micro-batch (what a method's own host-side trainer batches by); 0: unknown.
    batch_size: int = 0
    # batches() -> iterator over the task's training batches (fixed shapes, "weight" marks padding).
    batches: Optional[Callable[[], Any]] = None
    # fisher(trainable, method_state) -> pytree like trainable: mean over the task's training examples
    # of the squared per-example gradient of the task loss (the diagonal empirical Fisher).
    fisher: Optional[Callable[[Any, Any], Any]] = None
    # site_moments(trainable, method_state) -> ({site: [num_layers, d_in, d_in]}, tokens): the mean of
    # x x^T over the task's real tokens of each adapted site's input x (models.common.input_moment through a SiteRecorder).
    site_moments: Optional[Callable[[Any, Any], Any]] = None
    # features(trainable, method_state) -> iterator of (features [B, d], labels [B], weight [B]) numpy
    # arrays over the task's training data (classification): the backbone's features with these
    # adapters and this method state (HiDe-LoRA's class statistics under the task's slot), in evaluation
    # batches; the task's prototypes reuse this pass where the forward reads the same inputs.
    features: Optional[Callable[[Any, Any], Any]] = None
    # pretrained_features() -> the same iterator with the frozen pre-trained backbone (no adapters), also
    # in evaluation batches.
    pretrained_features: Optional[Callable[[], Any]] = None
    # phase(part) -> a context manager: a part of the method's own host work (e.g. "head training") timed as
    # its own line of the run's time ledger, "end_task: <method>: <part>" in `end_task`; block on the
    # part's results inside it, or its dispatched work is counted wherever it is next waited for.
    phase: Callable[[str], Any] = lambda part: contextlib.nullcontext()



class InferenceRule(enum.Enum):
    """How a method scores a classification test example: one value per method (`Method.inference_rule`),
    dispatched by the evaluator from one table (`evaluation.evaluator.RULES`). The value is what the
    protocol line and results.json print."""

    # One forward with the adapters as they are (task-identity free): the LoRA baselines, TreeLoRA's LLM form.
    FINAL_ADAPTERS = "final adapters"
    # The evaluated task's slot (the protocol is told the task), only that task's classes compete: LiLoRA.
    GIVEN_TASK_SLOT = "given task's slot"
    # Each example through the slot of the task the method infers itself (`infer_task`; `delta` then takes
    # state["task"] of shape [B]), every seen class competing: HiDe-LoRA, TreeLoRA's HiDe form.
    INFERRED_TASK_SLOT = "inferred task's slot"
    # One forward per task slot learned so far, each task's classes scored with its own slot: CL-LoRA.
    PER_SLOT_SCORING = "per-task features"
    # Nearest class mean of features that never change (nothing trained), each example forwarded once: fix.
    PROTOTYPES = "unchanging features, nearest class mean"


class MethodNotApplicable(ValueError):
    """The method cannot run on this kind of stream (e.g. a classifier-only method on instructions)."""


class Method:
    """Base class: sequential-LoRA behaviour; subclasses override what differs.

    Subclasses are frozen dataclasses with a `lora: LoraSpec` field and a class attribute `name`.
    `stream_kinds` lists the kinds of stream the method can learn; a run on another kind stops before
    training and `jaxtree-lora compare` reports the method as not applicable, with `not_applicable_reason`.
    """

    name: str = "base"
    # record(state, site, adapter, x, weight) -> array: a method that needs a per-site, per-layer
    # measurement inside the forward pass (e.g. LiLoRA's stability term) defines it; its loss then
    # finds `aux["site_records"] = {site: [num_layers, ...]}` in what `task_loss` returns.
    record = None
    # How the method scores a test example (one value of InferenceRule; `eval.task_identity=inferred`
    # turns GIVEN_TASK_SLOT into INFERRED_TASK_SLOT with the task inferred from pre-trained class means).
    inference_rule: InferenceRule = InferenceRule.FINAL_ADAPTERS
    stream_kinds: tuple = ("classification", "instruction")
    not_applicable_reason: str = ""
    # The method's own classification protocol (its official code's), used unless the config names
    # another (`train.head`, `eval.classifier`):
    #   default_head: "linear" (per-task linear heads: each task trains its own classes' columns, the
    #     logits of all seen classes are concatenated at inference; InfLoRA, SD-LoRA, the LoRA
    #     baselines) or "cosine" (CosFace-style cosine heads with a fixed scale; LoDA, CL-LoRA's proxies);
    #   default_classifier: "head" (argmax over the seen classes' head logits) or "prototype"
    #     (nearest class mean of the features; CL-LoRA's prototype classifier, the `fix` baseline).
    default_head: str = "linear"
    default_classifier: str = "head"
    # infer_task(method_state, pretrained_features [B, d], seen_upto) -> [B] int32: defined by a method whose
    # rule is INFERRED_TASK_SLOT (HiDe-LoRA's task-identity head on pre-trained features); pure and jittable.
    infer_task = None
    # False for the `fix` baseline: the loop runs no optimiser step (the pre-trained model is evaluated).
    trains: bool = True
    # False for the `joint` upper bound: every task's data at once, so its accuracy matrix holds one
    # model's scores and BWT, forgetting and the incremental averages mean nothing for it.
    continual: bool = True
    # fold_past(adapters, state) -> {site: {"a": [L, R, d_in], "b": [L, d_out, R]}}: defined by a method
    # whose forward adds a sum of per-task slots with the earlier slots frozen (IncLoRA, O-LoRA, InfLoRA):
    # the slots before state["task"] as one adapter (rank R = slots x r, the scale in B). The run merges
    # it into the frozen kernels (`lora.merge`) each time state["task"] changes and runs `dataclasses.replace(method, folded=True)`, whose delta
    # applies the current slot alone: one slot's matmuls per site instead of `max_tasks`, same function.
    fold_past = None
    # slot_inputs(trainable, method_state, task) -> pytree: defined by a method whose features under a
    # task's slot (a slot inference rule) read from the trainable and method state only these values
    # (HiDe-LoRA: that slot of the adapters). Equal values, same weights: the same features, so the
    # evaluator reuses what it took with them (the recomputed-prototype diagnostic). Pure.
    slot_inputs = None
    lora: lora_lib.LoraSpec

    @property
    def delta_scale(self) -> Optional[float]:
        """The factor on B A x in the forward, for the protocol's record: alpha / r, or the method's own
        `scale` where its code applies no alpha / r (CL-LoRA, InfLoRA, SD-LoRA); None where the method
        weighs its branches itself (LoDA)."""
        own = getattr(self, "scale", None)
        return float(own) if isinstance(own, (int, float)) else self.lora.scale

    def default_optimizer(self, batch_size: int) -> dict:
        """The optimiser of the method's own protocol at this global batch size, as `config.optimizer`
        keys (name "adam" | "sgd", learning_rate, momentum, b1, b2, weight_decay, clip_norm). It applies
        when the config sets neither `optimizer.name` nor `optimizer.learning_rate`
        (`train.step.optimizer_settings`); {}: the config's optimiser, Adam at 1e-4 by default (the
        official TreeLoRA setting)."""
        return {}

    # -- set-up -------------------------------------------------------------------------------
    def init(self, key: Array, model: ModelInfo, stream: StreamInfo) -> tuple[PyTree, PyTree]:
        """Returns (adapters, method_state). Shapes are fixed for the whole stream."""
        adapters = lora_lib.init(key, self.lora, model.sites, model.num_layers)
        return adapters, {"task": jnp.zeros((), jnp.int32)}

    def prepare_task(self, trainable: PyTree, state: PyTree, context: TaskContext) -> tuple[PyTree, PyTree]:
        """Host-side work before a task's first step (not repeated when a run resumes mid-task):
        e.g. subspaces from the new task's input statistics. Must keep every shape."""
        return trainable, state

    def begin_task(self, adapters: PyTree, state: PyTree, task: Array) -> tuple[PyTree, PyTree]:
        return adapters, {**state, "task": jnp.asarray(task, jnp.int32)}

    def begin_epoch(self, state: PyTree, epoch: Array, steps_per_epoch: int) -> PyTree:
        return state

    # -- inside the step ----------------------------------------------------------------------
    def forward_adapters(self, adapters: PyTree, state: PyTree) -> PyTree:
        """The adapter pytree the backbone sees, built from the trainable one (identity by default).

        Lets a method keep parameters that are not per-site, per-layer leaves (e.g. SD-LoRA's one
        magnitude per task shared by every layer and site) and hand them to `delta` through the
        per-site pytrees; gradients flow back through this function to the tied parameters. Every
        forward pass (training, evaluation, statistics, generation) goes through it."""
        return adapters

    def delta(self, state: PyTree, site: str, adapter: PyTree, x: Array, key: Optional[Array]) -> Array:
        """What the adapter adds at one site of one layer: x [..., d_in] -> [..., d_out]."""
        x = lora_lib.dropout(x, self.lora.dropout, key)
        return lora_lib.apply(adapter, x, self.lora.scale)

    def loss(self, trainable: PyTree, state: PyTree, batch: Mapping[str, Array], key: Optional[Array],
             task_loss: TaskLoss) -> tuple[Array, dict]:
        """Task loss plus the method's own terms. aux must be a dict of arrays."""
        return task_loss(trainable, key)

    def after_step(self, state: PyTree, aux: Mapping[str, Array], grads: Optional[PyTree] = None) -> PyTree:
        """Statistics after one micro-step; `grads` are that micro-step's gradients of the total loss."""
        return state

    def step_metrics(self, state: PyTree) -> dict:
        """Scalars of the method state after a step, logged with the step's loss (metrics.jsonl)."""
        return {}

    def update_mask(self, state: PyTree, trainable: PyTree) -> Optional[PyTree]:
        """A pytree like `trainable` (leaves broadcastable) of 0/1: which entries the optimiser may
        change. None means everything trainable is updated."""
        return None

    # -- between tasks --------------------------------------------------------------------------
    def end_task(self, trainable: PyTree, state: PyTree, context: TaskContext) -> tuple[PyTree, PyTree]:
        return trainable, state

    # -- reporting ------------------------------------------------------------------------------
    def trainable_count(self, trainable: PyTree, state: PyTree) -> int:
        """Parameters trained for one task (for the trainable-parameter share)."""
        return lora_lib.count(trainable)

    def describe(self) -> dict:
        """Hyper-parameters for results.json."""
        out = {}
        for field in dataclasses.fields(self):
            if field.name == "folded":  # how the run computes the forward, not a hyper-parameter
                continue
            value = getattr(self, field.name)
            out[field.name] = dataclasses.asdict(value) if dataclasses.is_dataclass(value) else value
        out["inference_rule"] = self.inference_rule.name
        return out
