"""The evaluation protocols of a run, in one place: the loop asks, this module answers
(`update_prototypes` after a task, `evaluate` for one cell of each accuracy matrix).

Classification is scored by two classifiers from one forward: the method's own ("head": argmax over
the seen classes' logits, or "prototype") and the rehearsal-free nearest class mean, for every
method, so protocol and features can be told apart. How an example's features are taken is the
method's inference rule (`methods.base.InferenceRule`), dispatched from one table (`RULES`).
Instruction streams generate answers, decoding no further than the task's metric reads. Features
that never change (the pre-trained model's, all of `fix`'s) are computed once per example per run.
"""
from __future__ import annotations

import copy

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora.data import tokenize
from jaxtree_lora.evaluation import generation as generation_lib
from jaxtree_lora.evaluation import prototypes as prototypes_lib
from jaxtree_lora.evaluation.identity import TaskIdentity
from jaxtree_lora.faults import kill_point
from jaxtree_lora.methods import forward
from jaxtree_lora.methods.base import InferenceRule
from jaxtree_lora.models.heads import head_logits


# Metrics that read only the start of a prediction, so decoding may stop after the longest reference.
PREFIX_METRICS = ("accuracy", "first_char")


def classification_arrays(split) -> dict:
    arrays = dict(split.inputs)
    arrays["labels"] = np.asarray(split.labels, np.int32)
    return arrays


def examples_in(batch: dict) -> int:
    """Examples a batch holds (padding examples included): one per row, or `examples` of packed rows."""
    if "examples" in batch:
        return int(np.shape(batch["examples"])[0])
    return int(next(iter(batch.values())).shape[0])


def token_tasks(batch: dict, example_tasks):
    """Each example's task where the backbone reads it: [B] as given, or per token [R, W] of packed rows
    (`data.packing`: segment s + 1 is example s; padding tokens take task 0 and count for nothing)."""
    if "segment_ids" not in batch:
        return example_tasks
    return jnp.concatenate([jnp.zeros((1,), example_tasks.dtype), example_tasks])[batch["segment_ids"]]


def same_slot_state(taken, now) -> bool:
    """Whether two `Evaluator._slot_state` records read the same: the very same weights, equal slot inputs."""
    if taken is None or now is None or len(taken[0]) != len(now[0]) or len(taken[1]) != len(now[1]):
        return False
    return (all(a is b for a, b in zip(taken[0], now[0]))
            and all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(taken[1], now[1])))


def effective_rule(method, identity: str = "given") -> InferenceRule:
    """The rule a run scores by: the method's own, except that `eval.task_identity=inferred` turns a
    given task's slot (LiLoRA) into the slot of the task inferred from pre-trained class means."""
    rule = method.inference_rule
    if rule is InferenceRule.GIVEN_TASK_SLOT and identity == "inferred":
        return InferenceRule.INFERRED_TASK_SLOT
    return rule


# Rules whose features for a task's classes come from that task's slot (prototypes included).
SLOT_RULES = (InferenceRule.GIVEN_TASK_SLOT, InferenceRule.INFERRED_TASK_SLOT, InferenceRule.PER_SLOT_SCORING)


# Tokens decoded past the longest reference for a prefix metric: EOS plus up to three tokens of the
# leading whitespace or line breaks a model may emit first (the metric strips them).
DECODE_MARGIN = 4

class Evaluator:
    """Scores a state on the stream's tasks under the method's protocol (see the module docstring).

    Args:
      backbone, method, stream: the run's.
      protocol: {"head", "classifier", "head_scale"} (train.loop.protocol_of).
      consts: {"task_classes" [max_tasks, C], "seen_classes" [max_tasks, C]} bool masks.
      frozen: the pre-trained backbone weights on the mesh.
      weights: weights(trainable, method_state) -> the weights the method's forward runs on in that state
        (`Run.forward_weights`: `frozen` with the frozen past slots folded into the kernels where the run
        folds them); `frozen` when not given.
      batches: batches(arrays, task_index, few=False) -> iterator of evaluation batches (fixed size,
        "weight"; `few`: a few examples forwarded again, `train.plan.feature_batches`).
      host_batch: a host batch -> arrays every process holds whole.
      out_sharding: the sharding of every jitted output (replicated).
      identity: "given" or "inferred" (only for methods whose protocol is told the task).
      temperature: sampling temperature of generation (0: greedy).
    """

    def __init__(self, *, backbone, method, stream, protocol: dict, consts: dict, frozen, batches: Callable,
                 host_batch: Callable, out_sharding, identity: str = "given", temperature: float = 0.0,
                 weights: Optional[Callable] = None, share_prefix: bool = True, batch_size: int = 0):
        self.backbone, self.method, self.stream = backbone, method, stream
        self.protocol, self.consts, self.frozen = protocol, consts, frozen
        self.weights = weights or (lambda trainable, method_state: frozen)
        self.batches, self.host_batch = batches, host_batch
        self.kind = stream.kind
        self.temperature = float(temperature)
        self.rule = effective_rule(method, identity)
        # INFERRED_TASK_SLOT as the method's own rule: its `infer_task` names each example's task, every
        # seen class competes and one forward applies each example's slot; as `eval.task_identity=inferred`
        # on a given-slot method: pre-trained class means name it, its classes compete, one forward per slot.
        self.method_infers_task = method.inference_rule is InferenceRule.INFERRED_TASK_SLOT
        self.one_forward_per_example = self.method_infers_task
        self.identity_hits = [0.0, 0.0]  # examples whose task was inferred right, examples (one evaluate call)
        self._features = jax.jit(self._features_fn, out_shardings=out_sharding)
        # With the features of its one forward (kept for the last column); `_predict`: predictions alone.
        self._predict_and_features = jax.jit(self._predict_fn, out_shardings=out_sharding)
        self._predict = jax.jit(lambda *args: self._predict_fn(*args)[0], out_shardings=out_sharding)
        self._classify = jax.jit(self._classify_fn, out_shardings=out_sharding)
        self._pretrained = jax.jit(lambda frozen, batch: forward.pretrained_features(backbone, frozen, batch),
                                   out_shardings=out_sharding)
        # Features that never change within a run, computed once per example and kept on the host:
        # {(kind, task, split): [per evaluation batch: [B, d] float32]}; kind "pretrained" (task identity,
        # HiDe-LoRA's TII head) or "fixed" (the features of a method that trains nothing: `fix`).
        self._frozen_features: dict[tuple, list] = {}
        self.forward_count = 0  # examples (padding examples included) forwarded through the backbone
        self.identity = TaskIdentity(self._pretrained_task_means, None)
        if method.infer_task is not None:
            self._infer_task = jax.jit(lambda method_state, features, seen_upto: method.infer_task(
                method_state, features, seen_upto), out_shardings=out_sharding)
        # Features that never change (`fix`, nothing trained): each example is forwarded once per run.
        self.fixed_features = self.rule is InferenceRule.PROTOTYPES and self.kind == "classification"
        self._generate = None
        self._out_sharding = out_sharding
        # Generation: each task's shared prompt prefix prefilled once per batch (`SharedPrompts`).
        self.share_prefix, self.batch_size = bool(share_prefix), int(batch_size)
        self._shared_prompts = False  # not built yet (None: nothing shared)
        # Generated answers of a model that never trains (`fix`) do not depend on how many tasks were
        # seen: with greedy decoding each task's score is computed once, not after every task.
        self._untrained_scores: dict[int, float] = {}
        self._limits: dict[int, int] = {}  # tokens each task's answers need (`decode_limit`)
        # (the arrays of the state scored in the last column, [per task: its test batches' features])
        self._final: Optional[tuple] = None
        # A method's end-of-task pass over a task's training data, kept for that task's prototypes:
        # (task, the forward's inputs: structure and leaves, which leaves it reads, [(features, labels, weight)]).
        self._kept_pass: Optional[tuple] = None
        self._reads: dict = {}  # input structure -> [whether the forward reads each input]
        # Per task, what its slot's forward read when its prototypes were taken (`Method.slot_inputs`, host
        # copies) and the weights it ran on: the diagnostic reuses those prototypes while both still hold.
        self._slot_taken: dict[int, tuple] = {}
        # Test features under each slot, for a method that infers each example's slot and says what a slot's
        # forward reads (`slot_inputs`): {slot: (what it read, {(task, example): [d] float32})}. A slot that
        # no longer reads the same drops its rows; an example keeps its row while its slot is unchanged.
        self._slot_features: dict[int, tuple] = {}

    def reading(self, stream) -> "Evaluator":
        """This evaluator (its compiled functions) over another stream's tasks, with none of the
        per-task values it kept for its own stream (frozen features, untrained scores, decode limits)."""
        other = copy.copy(self)
        other.stream, other._frozen_features, other._untrained_scores = stream, {}, {}
        other._limits, other._final, other._kept_pass, other._slot_taken = {}, None, None, {}
        other._slot_features = {}
        other.identity = TaskIdentity(other._pretrained_task_means, None)
        return other

    # -- the forward, for the run's passes over a task's training data as well ---------------------
    def features(self, trainable, weights, method_state, batch) -> jax.Array:
        """[B, d] float32 features of a batch on the mesh (`host_batch`) through the method's adapters in
        `method_state`, on `weights` (the run's forward weights); counted in `forward_count`."""
        self.forward_count += examples_in(batch)
        return self._features(trainable, weights, method_state, batch)

    def pretrained_features(self, batch) -> jax.Array:
        """[B, d] float32 features of a batch on the mesh through the pre-trained backbone alone."""
        self.forward_count += examples_in(batch)
        return self._pretrained(self.frozen, batch)

    def train_features(self, trainable, method_state, task: int, keep: bool = False):
        """Yields (features [B, d], labels [B], weight [B]) numpy arrays over task `task`'s training data in
        evaluation batches, through these adapters in `method_state`. `keep`: the pass is kept for the
        task's prototypes, which read it back instead of forwarding again where every input the forward
        reads is the same (HiDe-LoRA's class statistics under the task's slot are taken with the model
        whose prototypes follow). Bit-equal to a fresh pass: the same program on the same batches."""
        weights = self.weights(trainable, method_state)
        inputs, structure = jax.tree.flatten((trainable, weights, method_state))
        kept = self._kept_pass
        self._kept_pass = None  # read at most once: no arrays are held past the task's prototypes
        if kept is not None and kept[:2] == (task, structure) and _same_reads(kept[2], inputs, kept[3]):
            yield from kept[4]
            return
        passed = []
        for batch in self.batches(classification_arrays(self.stream.tasks[task].train), task):
            weight, labels = np.asarray(batch.pop("weight")), np.asarray(batch.pop("labels"))
            batch = self.host_batch(batch)
            passed.append((np.asarray(self.features(trainable, weights, method_state, batch)), labels, weight))
            yield passed[-1]
        if keep and passed:
            reads = self._forward_reads(trainable, weights, method_state, batch)
            self._kept_pass = (task, structure, inputs, reads, passed)

    def _forward_reads(self, trainable, weights, method_state, batch) -> list:
        """Per leaf of (trainable, weights, method_state): whether the compiled forward reads it, from its
        traced program (a cache hit after a call). A leaf whose only use is discarded counts as read."""
        structure = jax.tree.structure((trainable, weights, method_state))
        if structure not in self._reads:
            program = self._features.trace(trainable, weights, method_state, batch).jaxpr
            used = {var for eqn in program.eqns for var in eqn.invars if not hasattr(var, "val")}
            used |= {var for var in program.jaxpr.outvars if not hasattr(var, "val")}
            self._reads[structure] = [var in used for var in program.jaxpr.invars[: structure.num_leaves]]
        return self._reads[structure]

    # -- features and classifiers (pure, jitted) -----------------------------------------------
    def _features_fn(self, trainable, frozen, method_state, batch):
        return forward.features(self.backbone, self.method, trainable, frozen, method_state, batch)

    @property
    def infer_identity(self) -> bool:
        """Whether each test example's task is inferred (and the identity accuracy reported)."""
        return self.rule is InferenceRule.INFERRED_TASK_SLOT

    def _predict_fn(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto, example_tasks=None,
                    given_task=None):
        """[2, B] predicted global classes: row 0 under the method's protocol, row 1 by the rehearsal-free
        nearest class mean, under the run's inference rule (`RULES`). `example_tasks` [B]: the tasks
        inferred per example (INFERRED_TASK_SLOT); `given_task`: the evaluated task (GIVEN_TASK_SLOT).
        Returns (predictions, features [B, d] of the one forward where a single forward scores the batch
        among every seen class, else None)."""
        logits, allowed, features = RULES[self.rule](self, trainable, frozen, consts, method_state, prototypes,
                                                     batch, seen_upto, example_tasks, given_task)
        return jnp.argmax(jnp.where(allowed, logits, -jnp.inf), axis=-1), features

    # Each rule's scoring of a batch: (logits [2, B, C], allowed classes broadcastable to them, features or None).
    def _one_forward(self, trainable, frozen, method_state, prototypes, batch):
        features = self._features_fn(trainable, frozen, method_state, batch)
        return self._logits_fn(trainable, prototypes, features), features

    def _per_slot(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto):
        """[K, 2, B, C]: one forward per task slot learned so far (<= seen_upto), zeros after."""
        def both_logits(state):
            return self._logits_fn(trainable, prototypes, self._features_fn(trainable, frozen, state, batch))

        skipped = jax.eval_shape(both_logits, method_state)

        def slot(k):
            return jax.lax.cond(k <= seen_upto, lambda: both_logits({**method_state, "task": k}),
                                lambda: jnp.zeros(skipped.shape, skipped.dtype))

        return jax.lax.map(slot, jnp.arange(consts["task_classes"].shape[0]))

    def _score_final_adapters(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto,
                              example_tasks, given_task):
        """One forward with the adapters as they are, every seen class competing."""
        logits, features = self._one_forward(trainable, frozen, method_state, prototypes, batch)
        return logits, consts["seen_classes"][seen_upto][None, None, :], features

    def _score_given_task_slot(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto,
                               example_tasks, given_task):
        """The evaluated task's slot (`evaluate` put it in the state); only that task's classes compete, as
        a method told the task knows its label space."""
        logits, _ = self._one_forward(trainable, frozen, method_state, prototypes, batch)
        return logits, consts["task_classes"][given_task][None, None, :], None

    def _score_inferred_task_slot(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto,
                                  example_tasks, given_task):
        """Each example with its inferred task's slot. The method's own rule (HiDe-LoRA's TII): one forward
        with per-example slots, every seen class competing (the aligned head scores them all). A given-slot
        method under `eval.task_identity=inferred`: one forward per slot, the inferred task's classes
        competing, as for a given one."""
        features = None
        if self.one_forward_per_example:
            logits, features = self._one_forward(trainable, frozen,
                                                 {**method_state, "task": token_tasks(batch, example_tasks)},
                                                 prototypes, batch)
        else:
            logits = jnp.take_along_axis(self._per_slot(trainable, frozen, consts, method_state, prototypes, batch,
                                                        seen_upto), example_tasks[None, None, :, None], axis=0)[0]
        if self.method_infers_task:
            return logits, consts["seen_classes"][seen_upto][None, None, :], features
        return logits, consts["task_classes"][example_tasks][None, :, :], None

    def _score_per_slot(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto,
                        example_tasks, given_task):
        """Each task's classes scored with that task's slot (CL-LoRA's forward_test), every seen class competing."""
        per_slot = self._per_slot(trainable, frozen, consts, method_state, prototypes, batch, seen_upto)
        logits = jnp.sum(jnp.where(consts["task_classes"][:, None, None, :], per_slot, 0.0), axis=0)
        return logits, consts["seen_classes"][seen_upto][None, None, :], None

    def _logits_fn(self, trainable, prototypes, features):
        """[2, B, C] logits from features [B, d]: the method's protocol, then the nearest class mean."""
        protocol = self.protocol
        ncm = prototypes_lib.ncm_logits(features, prototypes)
        own = ncm if protocol["classifier"] == "prototype" else head_logits(
            trainable["head"], features, protocol["head"], protocol["head_scale"])
        return jnp.stack([own, ncm])

    def _classify_fn(self, trainable, consts, prototypes, features, seen_upto):
        """`_predict_fn` for features computed beforehand (a method whose features never change)."""
        logits = self._logits_fn(trainable, prototypes, features)
        return jnp.argmax(jnp.where(consts["seen_classes"][seen_upto][None, None, :], logits, -jnp.inf), axis=-1)

    # -- prototypes ---------------------------------------------------------------------------
    def _feature_state(self, state, task: int):
        """The method state whose features score task `task`'s classes: that task's slot where the method's
        inference rule picks a slot per task (per-task inference, a given identity), else the state as is."""
        if self.rule in SLOT_RULES:
            return {**state.method_state, "task": jnp.asarray(task, jnp.int32)}
        return state.method_state

    def _task_class_means(self, state, task: int) -> np.ndarray:
        task_data = self.stream.tasks[task]
        method_state = self._feature_state(state, task)
        if self.fixed_features:
            features = self._cached_features("fixed", task, "train", state)
            batches = self.batches(classification_arrays(task_data.train), task)
        else:
            features = lambda batch: batch["features"]
            batches = (dict(features=values, labels=labels, weight=weight)
                       for values, labels, weight in self.train_features(state.trainable, method_state, task))
        means, _ = prototypes_lib.class_means(features, batches, state.prototypes.shape[0], state.prototypes.shape[1])
        return means

    def update_prototypes(self, state, task: int):
        """The rehearsal-free prototypes of task `task`'s classes (its training data, the adapters as the task
        ends) written into the state; other classes' prototypes are left as they were."""
        means = self._task_class_means(state, task)
        prototypes = np.asarray(state.prototypes).copy()
        rows = list(self.stream.tasks[task].classes)
        prototypes[rows] = means[rows]
        taken = self._slot_state(state, task)
        if taken is not None:
            self._slot_taken[task] = taken
        return state.replace(prototypes=self.host_batch(prototypes))

    def _slot_state(self, state, task: int):
        """(the weights' leaves, host copies of `Method.slot_inputs`) of task `task`'s slot forward in
        `state`, or None where the method does not say what that forward reads."""
        slot_inputs = getattr(self.method, "slot_inputs", None)
        if slot_inputs is None or self.rule not in SLOT_RULES or self.fixed_features:
            return None
        weights = jax.tree.leaves(self.weights(state.trainable, state.method_state))
        return weights, [np.asarray(leaf) for leaf in jax.tree.leaves(slot_inputs(state.trainable, state.method_state,
                                                                                  task))]

    def _slot_unchanged(self, state, task: int) -> bool:
        """Whether task `task`'s slot forward reads now what it read when its prototypes were taken."""
        return same_slot_state(self._slot_taken.get(task), self._slot_state(state, task))

    def recomputed_prototype_scores(self, state) -> list[float]:
        """Diagnostic, NOT rehearsal-free: every class's prototype recomputed with this (final) model over
        its training data, then every task scored by nearest class mean. Its gap to the rehearsal-free
        NCM is prototype staleness; its gap to `fix` is what the features gained or lost."""
        last = len(self.stream.tasks) - 1
        prototypes = np.asarray(state.prototypes).copy()
        for task in range(len(self.stream.tasks)):
            if task == last and self._same_model(state):
                continue  # the last task's prototypes were taken with this model when it ended
            if self._slot_unchanged(state, task):
                continue  # its slot and weights as when its prototypes were taken: the same features
            rows = list(self.stream.tasks[task].classes)
            prototypes[rows] = self._task_class_means(state, task)[rows]
        prototypes = self.host_batch(prototypes)
        if not self._same_model(state) or len(self._final[1]) <= last:
            state = state.replace(prototypes=prototypes)
            return [self.evaluate(state, task, last)["ncm"] for task in range(len(self.stream.tasks))]
        # The last column's forwards were made with this model: their features, the new prototypes.
        scores = []
        for task in range(len(self.stream.tasks)):
            correct, total = 0.0, 0.0
            kept = iter(self._final[1][task])
            for batch in self.batches(classification_arrays(self.stream.tasks[task].test), task):
                weight, labels = np.asarray(batch.pop("weight")), np.asarray(batch.pop("labels"))
                predictions = np.asarray(self._classify(state.trainable, self.consts, prototypes,
                                                        self.host_batch(next(kept)), last))
                correct += float(np.sum((predictions[1] == labels) * weight))
                total += float(np.sum(weight))
            scores.append(100.0 * correct / max(total, 1.0))
        return scores

    def _same_model(self, state) -> bool:
        """Whether `state` is the one whose last column `_final` holds (the very same arrays)."""
        if self._final is None:
            return False
        leaves = jax.tree.leaves((state.trainable, state.method_state, state.prototypes))
        return len(leaves) == len(self._final[0]) and all(a is b for a, b in zip(leaves, self._final[0]))

    def frozen_ncm_scores(self, train_features: dict) -> Optional[list]:
        """Per task, the score (0-100) of the pre-trained model by nearest class mean over every class of
        the stream (`fix` after the last task), from `train_features` {task: [(features [B, d], labels
        [B], weight [B])]} the run kept, and the test splits' pre-trained features where the evaluator
        kept them (None when some test split was never forwarded: nothing is computed for this)."""
        tasks = range(len(self.stream.tasks))
        if any(("pretrained", task, "test") not in self._frozen_features for task in tasks):
            return None
        batches = (dict(labels=labels, weight=weight, features=features)
                   for task in tasks for features, labels, weight in train_features[task])
        means, _ = prototypes_lib.class_means(lambda batch: batch["features"], batches,
                                              int(self.stream.num_classes), int(self.backbone.info.feature_dim))
        scores = []
        for task in tasks:
            features = self._cached_features("pretrained", task, "test")
            correct = total = 0.0
            for batch in self.batches(classification_arrays(self.stream.tasks[task].test), task):
                weight, labels = np.asarray(batch.pop("weight")), np.asarray(batch.pop("labels"))
                predicted = prototypes_lib.nearest(np.asarray(features(batch), np.float64), means,
                                                   np.arange(len(means)))
                correct += float(np.sum((predicted == labels) * weight))
                total += float(np.sum(weight))
            scores.append(100.0 * correct / max(total, 1.0))
        return scores

    def _pretrained_task_means(self, task: int) -> np.ndarray:
        task_data = self.stream.tasks[task]
        means, _ = prototypes_lib.class_means(self._cached_features("pretrained", task, "train"),
                                              self.batches(classification_arrays(task_data.train), task),
                                              int(self.stream.num_classes), int(self.backbone.info.feature_dim))
        return means[list(task_data.classes)]

    def _cached_features(self, kind: str, task: int, split: str, state=None) -> Callable[[dict], np.ndarray]:
        """features(batch) -> [B, d] for the evaluation batches of task `task`'s `split`, taken in order:
        each batch's features computed on the first pass over the split and read back on later ones.
        kind "pretrained": the pre-trained backbone's; "fixed": `_features` of `state` (a method whose
        features never change). The batches of a split are the same on every pass (fixed order, no
        shuffling), so the n-th call of a pass is the n-th batch."""
        stored = self._frozen_features.setdefault((kind, task, split), [])
        position = [0]

        def features(batch: dict) -> np.ndarray:
            number = position[0]
            position[0] += 1
            if number < len(stored):
                return stored[number]
            batch = self.host_batch(batch)
            if kind == "pretrained":
                values = self._pretrained(self.frozen, batch)
            else:
                values = self._features(state.trainable, self.weights(state.trainable, state.method_state),
                                        state.method_state, batch)
            self.forward_count += examples_in(batch)
            stored.append(np.asarray(values))
            return stored[-1]

        return features

    # -- scoring -------------------------------------------------------------------------------
    def evaluate(self, state, task: int, trained_upto: int, key: Optional[jax.Array] = None) -> dict:
        """Scores (0-100) on task `task`'s test split with the state after task `trained_upto`:
        {"score"} (the method's protocol), plus {"ncm"} on classification streams and {"identity"} (the
        share of examples whose task was inferred right) where the identity is inferred."""
        given_task = None
        if self.rule is InferenceRule.GIVEN_TASK_SLOT:
            # The method's protocol gives the task identity at test time (e.g. LiLoRA's set_task): its slot
            # scores the example, and only that task's classes compete (task-incremental scoring).
            given_task = jnp.asarray(task, jnp.int32)
            state = state.replace(method_state={**state.method_state, "task": given_task})
        if self.kind != "classification":
            if self.method.trains or self.temperature != 0.0:
                return {"score": self._generation_score(state, task, key)}
            if task not in self._untrained_scores:
                self._untrained_scores[task] = self._generation_score(state, task, key)
            return {"score": self._untrained_scores[task]}
        correct = np.zeros((2,), np.float64)
        total, hits = 0.0, 0.0
        weights = self.weights(state.trainable, state.method_state)
        pretrained = self._cached_features("pretrained", task, "test") if self.infer_identity else None
        fixed = self._cached_features("fixed", task, "test", state) if self.fixed_features else None
        # The last column's features, for the recomputed-prototype diagnostic that follows (same model),
        # where one forward scores each example among every seen class (`_classify`'s rule).
        last = trained_upto == len(self.stream.tasks) - 1
        keep = last and fixed is None
        if last and not self._same_model(state):
            self._final = (jax.tree.leaves((state.trainable, state.method_state, state.prototypes)), [])
        kept = []
        if self.reuses_slot_features and fixed is None and given_task is None:
            correct, total, hits, kept = self._score_by_slot_features(state, task, trained_upto, weights, pretrained)
            keep = keep and bool(kept)
            batches = ()
        else:
            batches = self.batches(classification_arrays(self.stream.tasks[task].test), task)
        for batch in batches:
            weight = np.asarray(batch.pop("weight"))
            labels = np.asarray(batch.pop("labels"))
            example_tasks = None
            if self.infer_identity:
                inferred = self._inferred_tasks(state, pretrained(batch), trained_upto)
                hits += float(np.sum((inferred == task) * weight))
                example_tasks = self.host_batch(inferred.astype(np.int32))
            if fixed is not None:
                predictions = np.asarray(self._classify(state.trainable, self.consts, state.prototypes,
                                                        self.host_batch(fixed(batch)), trained_upto))
            else:
                batch = self.host_batch(batch)
                self.forward_count += len(weight)
                predictions, features = self._predict_and_features(
                    state.trainable, weights, self.consts, state.method_state, state.prototypes, batch, trained_upto,
                    example_tasks, given_task)
                predictions = np.asarray(predictions)
                keep = keep and features is not None  # the rule scored the batch in one forward
                if keep:
                    kept.append(np.asarray(features))
            correct += np.sum((predictions == labels[None, :]) * weight[None, :], axis=1)
            total += float(np.sum(weight))
            kill_point("evaluation")
        if keep and len(self._final[1]) == task:
            self._final[1].append(kept)
        scores = 100.0 * correct / max(total, 1.0)
        out = {"score": float(scores[0]), "ncm": float(scores[1])}
        if self.infer_identity:
            out["identity"] = 100.0 * hits / max(total, 1.0)
        return out

    def _inferred_tasks(self, state, pretrained_features, trained_upto: int) -> np.ndarray:
        """[B] each example's inferred task: the method's own rule (`infer_task`) or the pre-trained
        class means (`eval.task_identity=inferred`)."""
        if self.method_infers_task:
            return np.asarray(self._infer_task(state.method_state, self.host_batch(pretrained_features),
                                               jnp.asarray(trained_upto, jnp.int32)))
        return self.identity.infer(pretrained_features, trained_upto)

    @property
    def reuses_slot_features(self) -> bool:
        """Whether test features are kept per (example, slot): the method infers each example's slot, one
        forward scores it, and the method says what a slot's forward reads (`slot_inputs`)."""
        return (self.kind == "classification" and self.method_infers_task and self.one_forward_per_example
                and getattr(self.method, "slot_inputs", None) is not None and not self.fixed_features)

    def _score_by_slot_features(self, state, task: int, trained_upto: int, weights, pretrained):
        """`evaluate` for a method whose slots are inferred per example (HiDe-LoRA, TreeLoRA's ViT form):
        each test example's features under its inferred slot are computed once and reused while that slot
        reads the same values (`slot_inputs`; the earlier tasks' slots never change after their task), so
        after task t only the examples whose (example, slot) pair is new are forwarded (`batches(..., few=True)`),
        and every example is scored from its kept features by the current heads (`_classify`). Returns
        (correct [2], total, identity hits, the batches' features)."""
        arrays = classification_arrays(self.stream.tasks[task].test)
        rows, offset = [], 0  # per batch: (its examples' indices, labels, weight, their inferred slots)
        hits = 0.0
        for batch in self.batches(arrays, task):
            weight = np.asarray(batch.pop("weight"))
            labels = np.asarray(batch.pop("labels"))
            real = int(np.count_nonzero(weight))  # real rows first, filler after (`batching.batches`)
            inferred = self._inferred_tasks(state, pretrained(batch), trained_upto).astype(np.int32)
            hits += float(np.sum((inferred == task) * weight))
            rows.append((np.arange(offset, offset + real), labels, weight, inferred))
            offset += real
        slots = np.concatenate([inferred[:len(index)] for index, _, _, inferred in rows])
        stores = {}
        for slot in np.unique(slots).tolist():
            now = self._slot_state(state, slot)
            held = self._slot_features.get(slot)
            if held is None or not same_slot_state(held[0], now):
                held = self._slot_features[slot] = (now, {})
            stores[slot] = held[1]
        missing = np.array([example for example, slot in enumerate(slots.tolist())
                            if (task, example) not in stores[slot]], np.int64)
        if len(missing):
            subset = {name: np.asarray(value)[missing] for name, value in arrays.items()}
            done = 0
            for batch in self.batches(subset, task, few=True):
                weight = np.asarray(batch.pop("weight"))
                batch.pop("labels")
                real = int(np.count_nonzero(weight))
                chosen = missing[done:done + real]
                example_tasks = np.zeros((len(weight),), np.int32)
                example_tasks[:real] = slots[chosen]
                self.forward_count += len(weight)
                _, features = self._predict_and_features(
                    state.trainable, weights, self.consts, state.method_state, state.prototypes, self.host_batch(batch),
                    trained_upto, self.host_batch(example_tasks), None)
                features = np.asarray(features)
                for row, example in enumerate(chosen.tolist()):
                    stores[int(slots[example])][(task, example)] = features[row]
                done += real
                kill_point("evaluation")
        correct, total, kept = np.zeros((2,), np.float64), 0.0, []
        dim = int(self.backbone.info.feature_dim)
        for index, labels, weight, _ in rows:
            features = np.zeros((len(weight), dim), np.float32)
            for row, example in enumerate(index.tolist()):
                features[row] = stores[int(slots[example])][(task, example)]
            predictions = np.asarray(self._classify(state.trainable, self.consts, state.prototypes,
                                                    self.host_batch(features), trained_upto))
            kept.append(features)
            correct += np.sum((predictions == labels[None, :]) * weight[None, :], axis=1)
            total += float(np.sum(weight))
        return correct, total, hits, kept

    def _generation_score(self, state, task: int, key) -> float:
        from flax import nnx

        from jaxtree_lora.models.generate import generate

        method, backbone, tokenizer = self.method, self.backbone, self.backbone.tokenizer
        if self._generate is None:
            def generate_fn(trainable, frozen, method_state, prompt_ids, prompt_mask, key, limit, max_new_tokens,
                            prefix_ids=None, prefix_mask=None):
                delta = lambda site, adapter, x, k: method.delta(method_state, site, adapter, x, k)
                model = nnx.merge(backbone.graphdef, frozen)
                return generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                temperature=self.temperature, key=key, eos_id=int(tokenizer.eos_token_id),
                                pad_id=self._pad_id(), adapters=method.forward_adapters(trainable["adapters"], method_state),
                                delta=delta, limit=limit, prefix_ids=prefix_ids, prefix_mask=prefix_mask)

            self._generate = jax.jit(generate_fn, static_argnums=(7,), out_shardings=self._out_sharding)
        max_new = max(int(t.max_new_tokens) for t in self.stream.tasks)
        task_data = self.stream.tasks[task]
        limit = jnp.asarray(self.decode_limit(task), jnp.int32)
        shared = self.shared_prompts()
        if shared is not None and task in shared.ids:
            batches = shared.batches(task, self.batch_size)
        else:
            batches = self.batches({"prompt_ids": task_data.test.arrays["prompt_ids"],
                                    "prompt_mask": task_data.test.arrays["prompt_mask"]}, task)
        key = jax.random.PRNGKey(0) if key is None else key
        weights = self.weights(state.trainable, state.method_state)

        def run(batch, number):
            batch = self.host_batch(batch)
            return self._generate(state.trainable, weights, state.method_state, batch["prompt_ids"],
                                  batch["prompt_mask"], jax.random.fold_in(key, number), limit, max_new,
                                  batch.get("prefix_ids"), batch.get("prefix_mask"))

        score, _ = generation_lib.generate_and_score(
            task_data, batches, run,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), lambda: kill_point("evaluation"))
        return score

    def _pad_id(self) -> int:
        return int(tokenize.pad_id(self.backbone.tokenizer))

    def shared_prompts(self) -> Optional[generation_lib.SharedPrompts]:
        """The stream's test prompts split into each task's shared prefix and the rows' own parts, built
        once per run; None where sharing is off (`eval.share_prefix`), the model has a sliding
        attention window, no batch size was given, or no task's prompts share enough tokens."""
        if self._shared_prompts is False:
            window = getattr(getattr(self.backbone.module(), "config", None), "sliding_window", None)
            usable = self.share_prefix and self.batch_size > 0 and window is None
            self._shared_prompts = (generation_lib.SharedPrompts.for_stream(
                self.stream.tasks, self._pad_id(), self.batch_size) if usable else None)
        return self._shared_prompts

    def decode_limit(self, task: int) -> int:
        """Tokens generated for task `task`'s prompts: its budget (`max_new_tokens`), and for a metric that
        reads only the answer's first characters (accuracy: the stripped prediction cut to the target's
        length; first_char) the longest reference in tokens plus DECODE_MARGIN: EOS, and leading
        whitespace or newline tokens the metric strips before it reads. Computed once per task."""
        if task not in self._limits:
            task_data = self.stream.tasks[task]
            limit = int(task_data.max_new_tokens)
            if task_data.metric in PREFIX_METRICS and len(task_data.test.answers):
                tokenizer = self.backbone.tokenizer
                # An answer after "Answer:" may start with a space, which tokenises differently: the longer.
                longest = max(len(tokenizer(text, add_special_tokens=False)["input_ids"])
                              for answer in task_data.test.answers for text in (str(answer), " " + str(answer)))
                limit = min(limit, longest + DECODE_MARGIN)
            self._limits[task] = max(limit, 1)
        return self._limits[task]



def _same_reads(kept: list, inputs: list, reads: list) -> bool:
    """Whether the leaves `inputs` give the forward what `kept` (of the same structure) gave it: each leaf
    it reads the same array, or a scalar of the same value (a method state's task index, set afresh by
    each caller)."""
    for old, new, read in zip(kept, inputs, reads):
        if not read or old is new:
            continue
        if np.ndim(old) or np.ndim(new) or np.asarray(old).dtype != np.asarray(new).dtype or old != new:
            return False
    return True


# The one dispatch on the inference rule (PROTOTYPES: one forward of unchanging features, read back from
# the host cache by `evaluate`, scored like the final adapters).
RULES = {
    InferenceRule.FINAL_ADAPTERS: Evaluator._score_final_adapters,
    InferenceRule.GIVEN_TASK_SLOT: Evaluator._score_given_task_slot,
    InferenceRule.INFERRED_TASK_SLOT: Evaluator._score_inferred_task_slot,
    InferenceRule.PER_SLOT_SCORING: Evaluator._score_per_slot,
    InferenceRule.PROTOTYPES: Evaluator._score_final_adapters,
}
