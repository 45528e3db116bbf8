"""The evaluation protocols of a run, in one place: the loop asks, this module answers.

    evaluator = Evaluator(...)
    state = evaluator.update_prototypes(state, task)            # after a task: its classes' means
    scores = evaluator.evaluate(state, task, trained_upto, key)  # one cell of each accuracy matrix
    final = evaluator.recomputed_prototype_scores(state)         # diagnostic, after the last task

Classification streams are scored by two classifiers from the same forward pass:

- "score", the method's own protocol (`protocol["classifier"]`): "head" (argmax over the seen
  classes' head logits; per-task heads concatenated) or "prototype" (nearest class mean);
- "ncm", the rehearsal-free nearest class mean, for every method, so that protocol and features can
  be told apart.

How an example's features are taken is the method's inference rule: one forward with the final
adapters (task-identity free), one forward per task slot with each class scored by its own task's
features (`per_task_inference`, CL-LoRA), the evaluated task's slot (`task_identity_at_inference`,
LiLoRA), the slot of the task inferred from pre-trained class means (`identity="inferred"`), or the
slot of the task the method infers itself (`Method.infer_task`, HiDe-LoRA's TII head).
Instruction streams generate answers and score them with each task's metric.
"""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora.evaluation import generation as generation_lib
from jaxtree_lora.evaluation import prototypes as prototypes_lib
from jaxtree_lora.evaluation.identity import TaskIdentity
from jaxtree_lora.faults import kill_point
from jaxtree_lora.train.step import head_logits


def classification_arrays(split) -> dict:
    arrays = dict(split.inputs)
    arrays["labels"] = np.asarray(split.labels, np.int32)
    return arrays


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
      batches: batches(arrays, task_index) -> iterator of evaluation batches (fixed size, "weight").
      host_batch: a host batch -> arrays every process holds whole.
      out_sharding: the sharding of every jitted output (replicated).
      identity: "given" or "inferred" (only for methods whose protocol is told the task).
      temperature: sampling temperature of generation (0: greedy).
    """

    def __init__(self, *, backbone, method, stream, protocol: dict, consts: dict, frozen, batches: Callable,
                 host_batch: Callable, out_sharding, identity: str = "given", temperature: float = 0.0,
                 weights: Optional[Callable] = None):
        self.backbone, self.method, self.stream = backbone, method, stream
        self.protocol, self.consts, self.frozen = protocol, consts, frozen
        self.weights = weights or (lambda trainable, method_state: frozen)
        self.batches, self.host_batch = batches, host_batch
        self.kind = stream.kind
        self.temperature = float(temperature)
        # The method's own task inference (`infer_task`) when it has one, else the pre-trained class means.
        self.own_identity = getattr(method, "infer_task", None) is not None
        self.infer_identity = method.task_identity_at_inference and (identity == "inferred" or self.own_identity)
        self.identity_hits = [0.0, 0.0]  # examples whose task was inferred right, examples (one evaluate call)
        self._features = jax.jit(self._features_fn, out_shardings=out_sharding)
        self._predict = jax.jit(self._predict_fn, out_shardings=out_sharding)
        pretrained = jax.jit(lambda frozen, batch: backbone.features(frozen, batch).astype(jnp.float32),
                             out_shardings=out_sharding)
        self.identity = TaskIdentity(self._pretrained_task_means,
                                     lambda batch: np.asarray(pretrained(self.frozen, batch)))
        self._pretrained = pretrained
        if self.own_identity:
            self._infer_task = jax.jit(lambda method_state, frozen, batch, seen_upto: method.infer_task(
                method_state, backbone.features(frozen, batch).astype(jnp.float32), seen_upto),
                out_shardings=out_sharding)
        self._generate = None
        self._out_sharding = out_sharding
        # Generated answers of a model that never trains (`fix`) do not depend on how many tasks were
        # seen: with greedy decoding each task's score is computed once, not after every task.
        self._untrained_scores: dict[int, float] = {}

    # -- features and classifiers (pure, jitted) -----------------------------------------------
    def _features_fn(self, trainable, frozen, method_state, batch):
        method = self.method
        delta = lambda site, adapter, x, key: method.delta(method_state, site, adapter, x, key)
        adapters = method.forward_adapters(trainable["adapters"], method_state)
        return self.backbone.features(frozen, batch, adapters=adapters, delta=delta).astype(jnp.float32)

    def _predict_fn(self, trainable, frozen, consts, method_state, prototypes, batch, seen_upto, example_tasks=None,
                    given_task=None):
        """[2, B] predicted global classes: row 0 under the method's protocol, row 1 by the rehearsal-free
        nearest class mean, among the classes seen up to task `seen_upto`. `example_tasks` [B] (inferred
        identity): each example scored with its task's slot; among that task's classes where the identity
        stands in for a given one, among every seen class where the method infers it itself (HiDe-LoRA's
        TII: the slot is chosen by the identity head, the aligned head scores every seen class). `given_task` (the
        identity is given): only that task's classes compete, as a method told the task knows its label
        space."""
        protocol = self.protocol

        def both_logits(method_state):  # [2, B, C]
            features = self._features_fn(trainable, frozen, method_state, batch)
            ncm = prototypes_lib.ncm_logits(features, prototypes)
            own = ncm if protocol["classifier"] == "prototype" else head_logits(
                trainable["head"], features, protocol["head"], protocol["head_scale"])
            return jnp.stack([own, ncm])

        def per_slot():  # [K, 2, B, C]: one forward per task slot learned so far (<= seen_upto), zeros after
            skipped = jax.eval_shape(both_logits, method_state)

            def slot(k):
                return jax.lax.cond(k <= seen_upto, lambda: both_logits({**method_state, "task": k}),
                                    lambda: jnp.zeros(skipped.shape, skipped.dtype))

            return jax.lax.map(slot, jnp.arange(consts["task_classes"].shape[0]))

        if example_tasks is not None and self.method.per_example_task:
            logits = both_logits({**method_state, "task": example_tasks})  # each example through its own slot
        elif example_tasks is not None:
            logits = jnp.take_along_axis(per_slot(), example_tasks[None, None, :, None], axis=0)[0]
        elif self.method.per_task_inference:
            # Each task's classes are scored with that task's features (CL-LoRA's forward_test).
            logits = jnp.sum(jnp.where(consts["task_classes"][:, None, None, :], per_slot(), 0.0), axis=0)
        else:
            logits = both_logits(method_state)
        if example_tasks is not None and not self.own_identity:
            # A task inferred for a method whose protocol is told it (LiLoRA): its classes compete, as for a given one.
            allowed = consts["task_classes"][example_tasks][None, :, :]
        elif given_task is not None:
            allowed = consts["task_classes"][given_task][None, None, :]
        else:
            allowed = consts["seen_classes"][seen_upto][None, None, :]
        logits = jnp.where(allowed, logits, -jnp.inf)
        return jnp.argmax(logits, axis=-1)

    # -- prototypes ---------------------------------------------------------------------------
    def _feature_state(self, state, task: int):
        """The method state whose features score task `task`'s classes: that task's slot where the method's
        inference rule picks a slot per task (per-task inference, a given identity), else the state as is."""
        if self.method.per_task_inference or self.method.task_identity_at_inference:
            return {**state.method_state, "task": jnp.asarray(task, jnp.int32)}
        return state.method_state

    def _task_class_means(self, state, task: int) -> np.ndarray:
        task_data = self.stream.tasks[task]
        method_state = self._feature_state(state, task)
        weights = self.weights(state.trainable, method_state)
        features = lambda batch: self._features(state.trainable, weights, method_state, self.host_batch(batch))
        means, _ = prototypes_lib.class_means(features, self.batches(classification_arrays(task_data.train), task),
                                              state.prototypes.shape[0], state.prototypes.shape[1])
        return means

    def update_prototypes(self, state, task: int):
        """The rehearsal-free prototypes of task `task`'s classes (its training data, the adapters as the task
        ends) written into the state; other classes' prototypes are left as they were."""
        means = self._task_class_means(state, task)
        prototypes = np.asarray(state.prototypes).copy()
        rows = list(self.stream.tasks[task].classes)
        prototypes[rows] = means[rows]
        return state.replace(prototypes=self.host_batch(prototypes))

    def recomputed_prototype_scores(self, state) -> list[float]:
        """Diagnostic, NOT rehearsal-free: every class's prototype recomputed with this (final) model over
        its training data, then every task scored by nearest class mean. Its gap to the rehearsal-free
        NCM is prototype staleness; its gap to `fix` is what the features gained or lost."""
        prototypes = np.asarray(state.prototypes).copy()
        for task in range(len(self.stream.tasks)):
            rows = list(self.stream.tasks[task].classes)
            prototypes[rows] = self._task_class_means(state, task)[rows]
        state = state.replace(prototypes=self.host_batch(prototypes))
        last = len(self.stream.tasks) - 1
        return [self.evaluate(state, task, last)["ncm"] for task in range(len(self.stream.tasks))]

    def _pretrained_task_means(self, task: int) -> np.ndarray:
        task_data = self.stream.tasks[task]
        features = lambda batch: np.asarray(self._pretrained(self.frozen, self.host_batch(batch)))
        means, _ = prototypes_lib.class_means(features, self.batches(classification_arrays(task_data.train), task),
                                              int(self.stream.num_classes), int(self.backbone.info.feature_dim))
        return means[list(task_data.classes)]

    # -- scoring -------------------------------------------------------------------------------
    def evaluate(self, state, task: int, trained_upto: int, key: Optional[jax.Array] = None) -> dict:
        """Scores (0-100) on task `task`'s test split with the state after task `trained_upto`:
        {"score"} (the method's protocol), plus {"ncm"} on classification streams and {"identity"} (the
        share of examples whose task was inferred right) where the identity is inferred."""
        given_task = None
        if self.method.task_identity_at_inference and not self.infer_identity:
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
        for batch in self.batches(classification_arrays(self.stream.tasks[task].test), task):
            weight = np.asarray(batch.pop("weight"))
            labels = np.asarray(batch.pop("labels"))
            batch = self.host_batch(batch)
            example_tasks = None
            if self.infer_identity:
                if self.own_identity:
                    inferred = np.asarray(self._infer_task(state.method_state, self.frozen, batch,
                                                           jnp.asarray(trained_upto, jnp.int32)))
                else:
                    inferred = self.identity.infer(batch, trained_upto)
                hits += float(np.sum((inferred == task) * weight))
                example_tasks = self.host_batch(inferred.astype(np.int32))
            predictions = np.asarray(self._predict(state.trainable, weights, self.consts, state.method_state,
                                                   state.prototypes, batch, trained_upto, example_tasks, given_task))
            correct += np.sum((predictions == labels[None, :]) * weight[None, :], axis=1)
            total += float(np.sum(weight))
            kill_point("evaluation")
        scores = 100.0 * correct / max(total, 1.0)
        out = {"score": float(scores[0]), "ncm": float(scores[1])}
        if self.infer_identity:
            out["identity"] = 100.0 * hits / max(total, 1.0)
        return out

    def _generation_score(self, state, task: int, key) -> float:
        from flax import nnx

        from jaxtree_lora.models.generate import generate

        method, backbone, tokenizer = self.method, self.backbone, self.backbone.tokenizer
        if self._generate is None:
            def generate_fn(trainable, frozen, method_state, prompt_ids, prompt_mask, key, max_new_tokens):
                delta = lambda site, adapter, x, k: method.delta(method_state, site, adapter, x, k)
                model = nnx.merge(backbone.graphdef, frozen)
                pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
                return generate(model, prompt_ids, prompt_mask, max_new_tokens=max_new_tokens,
                                temperature=self.temperature, key=key, eos_id=int(tokenizer.eos_token_id),
                                pad_id=int(pad), adapters=method.forward_adapters(trainable["adapters"], method_state),
                                delta=delta)

            self._generate = jax.jit(generate_fn, static_argnums=(6,), out_shardings=self._out_sharding)
        max_new = max(int(t.max_new_tokens) for t in self.stream.tasks)
        task_data = self.stream.tasks[task]
        arrays = {"prompt_ids": task_data.test.arrays["prompt_ids"], "prompt_mask": task_data.test.arrays["prompt_mask"]}
        key = jax.random.PRNGKey(0) if key is None else key
        weights = self.weights(state.trainable, state.method_state)

        def run(batch, number):
            batch = self.host_batch(batch)
            return self._generate(state.trainable, weights, state.method_state, batch["prompt_ids"],
                                  batch["prompt_mask"], jax.random.fold_in(key, number), max_new)

        score, _ = generation_lib.generate_and_score(
            task_data, self.batches(arrays, task), run,
            lambda ids: tokenizer.decode(ids, skip_special_tokens=True), lambda: kill_point("evaluation"))
        return score
