"""The extra passes over a task's training data that a method asks for through its `TaskContext`.

Fisher (EWC): the diagonal empirical Fisher of the task loss. Site statistics (InfLoRA, LoDA): each
adapted site's input second moment, recorded through the layer scan. Features (HiDe-LoRA): the
task's features with given adapters (the evaluator's pass, which the task's prototypes then reuse),
or the pre-trained backbone's, kept after the first full pass.
Every pass reads the training data in order, one micro-batch at a time, with no dropout and nothing
trained; the features come from the evaluator's public forward, the statistics from the same
`methods.forward.features` it runs. Each pass is a line of the run's time ledger.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora.methods import forward
from jaxtree_lora.methods.base import TaskContext
from jaxtree_lora.models.common import SiteRecorder, input_moment
from jaxtree_lora.train.step import token_weights


class TaskPasses:
    """The passes of one run: each compiled on first use, the pre-trained features kept per task.

    Args:
      backbone, ledger: the run's.
      method: the method the forward runs (the run's `forward_method`: folded where the run folds).
      task_loss, consts: the train step's loss and stream constants (the Fisher pass differentiates them).
      weights: weights(trainable, method_state) -> the forward's weights (`Folding.weights`).
      train_weights: the same for the task loss (folded only where training folds).
      evaluator: its `features` and `pretrained_features` (one compile shared with evaluation).
      batches: batches(arrays, task, seed) -> the task's training data in order, one micro-batch each.
      batch_size: the rows of one training micro-batch (`TaskContext.batch_size`).
      host_batch: a host batch -> arrays every process holds whole.
      out_sharding: the sharding of every jitted output (replicated).
    """

    def __init__(self, *, backbone, method, task_loss: Callable, consts: dict, weights: Callable,
                 train_weights: Callable, evaluator, batches: Callable, host_batch: Callable, out_sharding,
                 ledger, batch_size: int = 0):
        self.batch_size = int(batch_size)
        self.backbone, self.method, self.task_loss, self.consts = backbone, method, task_loss, consts
        self.weights, self.train_weights, self.evaluator = weights, train_weights, evaluator
        self.batches, self.host_batch, self.out_sharding, self.ledger = batches, host_batch, out_sharding, ledger
        self.pretrained_train: dict[int, list] = {}  # task -> the pre-trained features of its training data
        self._fisher_batch = self._moments_batch = None

    def context(self, task_index: int, arrays: dict, steps_per_epoch: int, seed: int) -> TaskContext:
        """Host-side access to a task's data for `Method.prepare_task` and `Method.end_task`; the ledger
        lines of the method's own parts (`phase`) are named after the phase open when they run."""
        ledger = self.ledger

        def timed(name, function):  # each extra pass over the task's data is a line of the time ledger
            def call(*args):
                with ledger.phase(name):
                    return function(*args)
            return call

        return TaskContext(
            task=task_index, steps_per_epoch=steps_per_epoch, batch_size=self.batch_size,
            batches=lambda: self.batches(arrays, task_index, seed),
            fisher=timed("pass: fisher", lambda trainable, method_state: self.fisher(
                trainable, method_state, arrays, task_index)),
            site_moments=timed("pass: site statistics", lambda trainable, method_state: self.site_moments(
                trainable, method_state, arrays, task_index)),
            features=lambda trainable, method_state: ledger.timed("pass: features", self.features(
                arrays, task_index, trainable, method_state)),
            pretrained_features=lambda: ledger.timed("pass: pre-trained features",
                                                     self.features(arrays, task_index)),
            phase=lambda part: ledger.phase(f"{ledger.current}: {part}"))

    def fisher(self, trainable, method_state, arrays: dict, task_index: int):
        """Diagonal empirical Fisher of the task loss: mean over examples of squared per-example grads."""
        if self._fisher_batch is None:
            # The frozen weights are an argument, not a closure: a closed-over array becomes a
            # compile-time constant (slow constant folding, and a copy inside the executable).
            def one(trainable, frozen, method_state, example, key):
                batch = jax.tree.map(lambda leaf: leaf[None], example)
                loss, _ = self.task_loss(trainable, frozen, self.consts, method_state, batch, key)
                return loss

            def squared_sum(trainable, frozen, method_state, batch, key):
                grads = jax.vmap(jax.grad(one), in_axes=(None, None, None, 0, None))(trainable, frozen, method_state,
                                                                                   batch, key)
                return jax.tree.map(lambda g: jnp.sum(jnp.square(g.astype(jnp.float32)), axis=0), grads)

            self._fisher_batch = jax.jit(squared_sum, out_shardings=self.out_sharding)
        total, count = None, 0.0
        for batch in self.batches(arrays, task_index, 0):
            count += float(np.sum(batch["weight"]))
            sums = self._fisher_batch(trainable, self.train_weights(trainable, method_state), method_state,
                                      self.host_batch(batch), None)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return jax.tree.map(lambda leaf: leaf / max(count, 1.0), total)

    def site_moments(self, trainable, method_state, arrays: dict, task_index: int):
        """Input statistics of every adapted site over the task's training data, with the current adapters.

        Returns ({site: [num_layers, d_in, d_in] float32 mean of x x^T over real tokens}, token count).
        """
        if self._moments_batch is None:
            method, backbone = self.method, self.backbone

            def moments(trainable, frozen, method_state, batch):
                weight = token_weights(batch)
                recorder = SiteRecorder(forward.method_delta(method, method_state), input_moment, weight)
                forward.features(backbone, method, trainable, frozen, method_state, batch, delta=recorder)
                return recorder.records, jnp.sum(weight.astype(jnp.float32))

            self._moments_batch = jax.jit(moments, out_shardings=self.out_sharding)
        total, count = None, 0.0
        for batch in self.batches(arrays, task_index, 0):
            sums, tokens = self._moments_batch(trainable, self.weights(trainable, method_state), method_state,
                                               self.host_batch(batch))
            count += float(tokens)
            total = sums if total is None else jax.tree.map(jnp.add, total, sums)
        return jax.tree.map(lambda leaf: leaf / max(count, 1.0), total), count

    def features(self, arrays: dict, task_index: int, trainable=None, method_state=None, remember: bool = True):
        """Yields (features [B, d], labels [B], weight [B]) numpy arrays over a classification task's
        training data: with these adapters and method state, or the pre-trained backbone's (None).
        With adapters, `arrays` are the task's training split: the evaluator's pass over it, kept for
        the task's prototypes (`Evaluator.train_features`: one pass where they see the same model).
        The pre-trained ones never change: kept after the first full pass (`pretrained_train`) and
        read back on later ones, by task index; `remember=False` for arrays that are not that task's
        training data (neither read nor kept)."""
        if trainable is not None:
            yield from self.evaluator.train_features(trainable, method_state, task_index, keep=True)
            return
        if remember and task_index in self.pretrained_train:
            yield from self.pretrained_train[task_index]
            return
        kept = []
        for batch in self.evaluator.batches(arrays, task_index):  # evaluation batches: fewer, larger forwards
            weight, labels = np.asarray(batch.pop("weight")), np.asarray(batch.pop("labels"))
            kept.append((np.asarray(self.evaluator.pretrained_features(self.host_batch(batch))), labels, weight))
            yield kept[-1]
        if remember:
            self.pretrained_train[task_index] = kept
