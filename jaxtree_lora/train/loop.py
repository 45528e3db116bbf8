"""The continual loop: the imperative shell around the jitted step.

    for task t:   begin_task -> epochs x jitted steps -> end_task (host) -> evaluate tasks 0..t
                  -> one column of the accuracy matrix -> checkpoint -> metrics.jsonl

Host work happens only between steps: metrics are fetched every `log_every` steps, the progress bar
is updated then, checkpoints are written every `checkpoint_every` steps and at every task end. The
batch order and every PRNG key are pure functions of (seed, task, epoch, batch), so a run resumed
from any checkpoint replays exactly the steps an uninterrupted run takes. `Run` reads top to bottom;
its pieces live beside it: the batch plan (plan.py), folded weights (fold.py), a method's passes over
a task (passes.py), restoring the newest good checkpoint (checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import resource
import signal
import threading
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import assemble
from jaxtree_lora import checkpoint as checkpoint_lib
from jaxtree_lora import keys
from jaxtree_lora import ledger as ledger_lib
from jaxtree_lora.data import batching as batching_lib
from jaxtree_lora.data.stream import check_stream
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.evaluation.evaluator import Evaluator, classification_arrays, effective_rule
from jaxtree_lora.faults import kill_point
from jaxtree_lora.assemble import method_from_config
from jaxtree_lora.methods.base import InferenceRule, MethodNotApplicable, StreamInfo
from jaxtree_lora.models.heads import init_head
from jaxtree_lora.reporting.results import MetricsWriter
from jaxtree_lora.train import fold as fold_lib
from jaxtree_lora.train import mesh as mesh_lib
from jaxtree_lora.train import plan
from jaxtree_lora.train.passes import TaskPasses
from jaxtree_lora.train.step import (TrainState, build_optimizer, make_task_loss, make_train_step,
                                     optimizer_settings, task_hooks)


class NonFiniteLoss(RuntimeError):
    pass


class Preempted(Exception):
    """SIGTERM arrived: a checkpoint was saved at the current position and the run stopped."""


class StopRequested(Exception):
    """Raised by the test hook `stop_after_steps` to end a run as if it had been killed."""


# ----------------------------------------------------------------------------------------------
# building pieces from the config
# ----------------------------------------------------------------------------------------------

# The method a run trains is built in one place (`assemble.method_from_config`); the names below stay
# importable from here.
LORA_KEYS, lora_spec_for, build_method = assemble.LORA_KEYS, assemble.lora_spec_for, assemble.build_method


def protocol_of(config, method) -> dict:
    """The head and classifier a run uses: the method's own unless the config names them."""
    head = config.train.get("head", "") or method.default_head
    classifier = config.eval.get("classifier", "") or method.default_classifier
    return {"head": head, "classifier": classifier,
            "head_scale": float(config.train.get("head_scale", 20.0)),
            "train_mask": config.train.get("train_mask", "task")}


def optimizer_for(config, method) -> dict:
    """The optimiser settings of `method`'s run: its own (`Method.default_optimizer` at the run's global
    batch) unless the config chooses one (`train.step.optimizer_settings`)."""
    return optimizer_settings(config, method.default_optimizer(int(config.train.get("batch_size", 1))))


def validate(config) -> None:
    """Checks what can be checked before any weights or data are loaded (fails in one clear line)."""
    method = method_from_config(config, assemble.stream_kind(config.get("data", {})), max_tasks=1)
    build_optimizer(optimizer_for(config, method))
    train = config.train
    for key in ("batch_size", "accumulation"):
        if int(train.get(key, 1)) < 1:
            raise ConfigError(f"train.{key} must be >= 1, got {train.get(key)}")
    epochs = train.epochs
    for value in (epochs if isinstance(epochs, (list, tuple)) else [epochs]):
        if int(value) < 1:
            raise ConfigError(f"train.epochs must be >= 1 (per task), got {epochs}")
    if train.get("head", "") not in ("", "cosine", "linear"):
        raise ConfigError(f"train.head must be '' (the method's own), 'cosine' or 'linear', got {train.head!r}")
    if train.get("train_mask", "task") not in ("task", "seen"):
        raise ConfigError(f"train.train_mask must be 'task' or 'seen', got {train.train_mask!r}")
    if config.eval.get("classifier", "") not in ("", "prototype", "head"):
        raise ConfigError(f"eval.classifier must be '' (the method's own), 'prototype' or 'head', "
                          f"got {config.eval.classifier!r}")
    if config.eval.get("task_identity", "given") not in ("given", "inferred"):
        raise ConfigError(f"eval.task_identity must be 'given' or 'inferred', got {config.eval.task_identity!r}")
    if float(config.eval.get("temperature", 0.0)) < 0:
        raise ConfigError(f"eval.temperature must be >= 0 (0 = greedy), got {config.eval.temperature}")
    if config.eval.get("batch_size", None) is not None and int(config.eval.batch_size) < 1:
        raise ConfigError(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")
    mesh = list(train.get("mesh", None) or [])
    if mesh and (len(mesh) != 3 or any(not isinstance(v, int) or v < 1 for v in mesh)):
        raise ConfigError(f"train.mesh must be [] (all devices on data) or three positive integers "
                          f"[data, fsdp, tensor], got {mesh}")
    dtype = config.model.get("compute_dtype", None)
    if dtype not in (None, "", "float32", "bfloat16"):
        raise ConfigError(f"model.compute_dtype must be float32 or bfloat16, got {dtype!r}")
    tasks = config.get("data", {}).get("num_tasks", None)
    if tasks is not None and int(tasks) < 1:
        raise ConfigError(f"data.num_tasks must be >= 1, got {tasks}")


def fingerprint(config) -> str:
    """What must match for a checkpoint to be resumed: model, method, LoRA, data, training, optimiser
    (a resumed run at another learning rate would be neither run), seed."""
    relevant = {k: config.to_dict().get(k) for k in ("model", "method", "lora", "data", "train", "optimizer", "seed")}
    relevant["train"] = {k: v for k, v in (relevant["train"] or {}).items()
                         if k not in ("log_every", "checkpoint_every")}
    return hashlib.sha256(json.dumps(relevant, sort_keys=True, default=str).encode()).hexdigest()[:16]


def peak_memory_mb() -> float:
    """Peak host resident memory of this process (MiB); device peak where the backend reports it."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    try:
        stats = jax.devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in stats:
            return float(stats["peak_bytes_in_use"]) / 2 ** 20
    except Exception:
        pass
    return peak


def check_fits(method, kind: str, backbone) -> None:
    """Fails in one line where `method` cannot learn this stream's kind, or its LoRA targets match
    none of the backbone's sites (naming them)."""
    if kind not in method.stream_kinds:
        raise MethodNotApplicable(
            method.not_applicable_reason
            or f"{method.name} learns {' or '.join(method.stream_kinds)} streams, this one is {kind}")
    if hasattr(method, "lora"):
        method.lora.select(backbone.info.sites)


def split_arrays(split, kind: str) -> dict:
    """Arrays the step consumes from one data split."""
    if kind == "classification":
        return classification_arrays(split)
    return {k: split.arrays[k] for k in ("input_ids", "attention_mask", "loss_mask")}


def initial_values(run, key) -> TrainState:
    """`Run.initial_state`'s values from the run's initialisation key (traced once, under jit)."""
    init_key, head_key = jax.random.split(key)
    adapters, method_state = run.method.init(init_key, run.backbone.info, run.stream_info)
    head = init_head(head_key, run.backbone.info.feature_dim, run.stream_info.num_classes, run.protocol["head"]) \
        if run.kind == "classification" else {}
    trainable = {"adapters": adapters, "head": head}
    classes = run.stream_info.num_classes
    prototypes = jnp.zeros((classes, run.backbone.info.feature_dim) if classes else (1, 1), jnp.float32)
    return TrainState(trainable=trainable, opt_state=run.optimizer.init(trainable),
                      method_state=method_state, step=jnp.zeros((), jnp.int32), prototypes=prototypes)


# the run
# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Run:
    """Everything a continual run needs, built once, top to bottom: the method, the mesh, the batches,
    the weights, the compiled functions, the evaluator; `fit()` drives the loop."""

    config: Any
    backbone: Any
    stream: Any
    workdir: str
    progress: bool = True
    logger: Optional[Callable[[dict], None]] = None
    stop_after_steps: Optional[int] = None  # for tests: stop (as if killed) after this many steps
    ledger: Any = None  # where the run's time goes (`jaxtree_lora.ledger.Ledger`); its own when not given

    def __post_init__(self):
        config = self.config
        self._own_ledger = self.ledger is None
        if self._own_ledger:
            self.ledger = ledger_lib.Ledger(since_process_start=False)

        # The stream and the method that learns it.
        self.kind = self.stream.kind
        check_stream(self.stream, int(getattr(self.backbone, "vocab_size", 0) or 0))
        self.num_tasks = len(self.stream.tasks)
        self.max_tasks = max(int(config.train.get("max_tasks", 0) or 0), self.num_tasks)
        self.method = method_from_config(config, self.kind, self.max_tasks)
        check_fits(self.method, self.kind, self.backbone)
        self.stream_info = StreamInfo(num_tasks=self.num_tasks, max_tasks=self.max_tasks, kind=self.kind,
                                      num_classes=int(getattr(self.stream, "num_classes", 0) or 0))

        # The mesh and the batches: widths, packing, class masks.
        self.mesh = mesh_lib.make_mesh(tuple(config.train.get("mesh", ()) or ()))
        self.micro_batch = int(config.train.batch_size)
        self.accumulation = int(config.train.get("accumulation", 1))
        if self.micro_batch < 1 or self.accumulation < 1:
            raise ConfigError("train.batch_size and train.accumulation must be >= 1")
        self.batching = plan.batching(config, self.stream, self.micro_batch * self.accumulation)
        devices = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
        self.packer = plan.packer(config, self.stream, self.backbone, devices, self.micro_batch, self.accumulation)
        if self.micro_batch % devices:
            raise ConfigError(f"train.batch_size={self.micro_batch} must be divisible by the "
                              f"{devices} data-parallel devices of the mesh")
        self.batch_sharding = mesh_lib.batch_sharding(self.mesh)
        # This process's rows of each global batch (all of them with one process).
        self.local_rows = (None if jax.process_count() == 1 else
                           mesh_lib.local_batch_rows(self.batch_sharding, self.accumulation, self.micro_batch))
        self.consts = plan.stream_consts(self.stream, self.max_tasks)

        # The optimiser and the protocol (head, classifier, task identity).
        self.optimizer_settings = optimizer_for(config, self.method)
        self.optimizer = build_optimizer(self.optimizer_settings)
        self.protocol = protocol_of(config, self.method)
        if not self.method.trains and self.protocol["classifier"] != "prototype" and self.kind == "classification":
            raise ConfigError(f"{self.method.name} trains nothing, so it has no trained head: its classifier is the "
                              f"nearest class mean (leave eval.classifier unset or set it to 'prototype')")
        # How test examples are scored (`evaluator.effective_rule`): the method's inference rule, a given
        # task's slot turned into an inferred one by eval.task_identity=inferred (HiDe-LoRA's way).
        self.identity = config.eval.get("task_identity", "given")
        self.inference_rule = effective_rule(self.method, self.identity)
        self.infer_identity = self.inference_rule is InferenceRule.INFERRED_TASK_SLOT
        if self.infer_identity and self.kind != "classification":
            raise ConfigError("eval.task_identity=inferred needs a classification stream (the task is inferred from "
                              "class means of pre-trained features): use eval.task_identity=given here")

        # The frozen weights on the mesh, and the past slots folded into them where the method allows.
        min_size = int(config.train.get("fsdp_min_size", 2 ** 18))
        self.frozen = mesh_lib.to_global(self.backbone.params,
                                         mesh_lib.backbone_sharding(self.mesh, self.backbone.params, min_size))
        self.folding = fold_lib.Folding(config, self.method, self.backbone, self.mesh, self.frozen)
        self.forward_method, self.train_method = self.folding.forward_method, self.folding.train_method
        self.forward_weights, self.train_frozen = self.folding.weights, self.frozen

        # The compiled functions: the step, the task and epoch hooks. Every output is replicated: with
        # several processes each one can then read it whole.
        replicated = mesh_lib.replicated(self.mesh)
        self.task_loss = make_task_loss(self.backbone, self.train_method, self.kind, self.protocol["train_mask"],
                                        self.protocol["head"], self.protocol["head_scale"],
                                        plan.answer_window(self.stream))
        step = make_train_step(self.train_method, self.task_loss, self.optimizer,
                               freeze_other_classes=config.train.get("train_mask", "task") == "task")
        self.train_step = jax.jit(step, donate_argnums=(0,), out_shardings=replicated)
        begin_task, begin_epoch = task_hooks(self.method)
        self.begin_task = jax.jit(begin_task, donate_argnums=(0,), out_shardings=replicated)
        self.begin_epoch = jax.jit(begin_epoch, donate_argnums=(0,), out_shardings=replicated)

        # The evaluator, and the passes over a task's data that a method may ask for.
        options = plan.evaluation_options(config, self.stream)  # the batch size: chosen once, for every reader
        self.feature_packer = plan.feature_packer(config, self.stream, self.backbone)  # no compute on padding
        self.evaluator = Evaluator(
            backbone=self.backbone, method=self.forward_method, stream=self.stream, protocol=self.protocol,
            consts=self.consts, frozen=self.frozen, weights=self.forward_weights, host_batch=self._host_batch,
            out_sharding=replicated, identity=self.identity, **options,
            batches=plan.feature_batches(self.batching, self.feature_packer, options["batch_size"], self.stream))
        self.passes = TaskPasses(
            backbone=self.backbone, method=self.forward_method, task_loss=self.task_loss, consts=self.consts,
            weights=self.forward_weights, train_weights=self.folding.train_weights, evaluator=self.evaluator,
            host_batch=self._host_batch, out_sharding=replicated, ledger=self.ledger, batch_size=self.micro_batch,
            batches=lambda arrays, task, seed: self.batching.batches(arrays, self.micro_batch, seed=seed, task=task,
                                                                     epoch=0, shuffle=False))

    def initial_state(self) -> TrainState:
        """Before the first task: the method's adapters and state, the head, the optimiser state, as one
        program (not a program per operation), traced once per optimiser (the joint probe's rates)."""
        made_for, program = getattr(self, "_initial_program", (None, None))
        if made_for is not self.optimizer:
            program = jax.jit(functools.partial(initial_values, self), out_shardings=mesh_lib.replicated(self.mesh))
            self._initial_program = (self.optimizer, program)
        return program(keys.for_purpose(self.config.seed, "init"))

    def _host_batch(self, batch: dict) -> dict:
        """A batch every process holds whole (evaluation, statistics) -> replicated global arrays."""
        return mesh_lib.to_global(batch, mesh_lib.replicated(self.mesh))

    def _on_mesh(self, tree):
        """Results of host-side method work back on the mesh. One process: left where they are."""
        return tree if jax.process_count() == 1 else mesh_lib.to_global(tree, mesh_lib.replicated(self.mesh))

    # -- the loop ---------------------------------------------------------------------------------
    def fit(self, resume: bool = False, wait_for_checkpoint: bool = True) -> dict:
        """Trains and evaluates task after task (from the newest good checkpoint with `resume`).
        Returns {"matrix", "timings", "state"} (+ "ncm_matrix", "recomputed_prototype_scores" on
        classification streams). `wait_for_checkpoint=False`: the last checkpoint may still be being
        written on return; the caller ends it with `finish_checkpoints()` (the CLI, after its reports)."""
        config = self.config
        ledger = self.ledger
        os.makedirs(self.workdir, exist_ok=True)
        books = _Books(self, resume)
        with ledger.phase("checkpoint restore" if resume else "setup"):
            state = books.start(self.initial_state())
            self.train_frozen = self.folding.train_weights(state.trainable, state.method_state)
        try:
            for task_index in range(books.position["task"], self.num_tasks):
                arrays = split_arrays(self.stream.tasks[task_index].train, self.kind)
                steps_per_epoch = self.batching.num_batches(len(next(iter(arrays.values()))),
                                                            self.micro_batch * self.accumulation)
                position = books.position
                resumed_here = task_index == position["task"] and (position["epoch"] or position["batch"])
                if not resumed_here:
                    # Host work first (subspaces from the new task's inputs, ...), then the jitted begin_task.
                    with ledger.phase(f"prepare_task: {self.method.name}"):
                        trainable, method_state = self._on_mesh(self.method.prepare_task(
                            state.trainable, state.method_state,
                            self.passes.context(task_index, arrays, steps_per_epoch, int(config.seed))))
                    with ledger.phase("train"):
                        state = self.begin_task(state.replace(trainable=trainable, method_state=method_state),
                                                jnp.asarray(task_index, jnp.int32))
                        # The task's past slots are frozen: one fold serves every step of it.
                        self.train_frozen = self.folding.train_weights(state.trainable, state.method_state)
                task_start = time.perf_counter()
                with ledger.phase("train"):
                    state = self._train_task(state, task_index, arrays, steps_per_epoch, books)
                    jax.block_until_ready(state)
                books.timings["train_seconds"][task_index] += time.perf_counter() - task_start
                state = self._end_task(state, task_index, arrays, steps_per_epoch, books)
                books.position = {"task": task_index + 1, "epoch": 0, "batch": 0}
                books.save(state, books.position)  # written while the next task trains (next save / close waits)
        except BaseException:
            if self._own_ledger:
                ledger.close()  # its jax.monitoring listener goes with it, as on success
            with ledger.phase("checkpoint"):
                books.close()
            raise
        self.finish_checkpoints = books.close
        if wait_for_checkpoint:
            with ledger.phase("checkpoint"):
                self.finish_checkpoints()
        self.final_state = state
        outcome = {"matrix": books.matrix, "timings": books.timings, "state": state, "restored": books.restored}
        if books.identity is not None:
            outcome["task_identity_accuracy"] = books.identity  # after the last task, per task
        if self.kind == "classification":
            outcome.update(ncm_matrix=books.ncm_matrix, **classification_diagnostics(self, state))
        if self._own_ledger:
            outcome["time"] = ledger.table()
            ledger.close()
        return outcome

    def _train_task(self, state, task_index: int, arrays: dict, steps_per_epoch: int, books: "_Books"):
        """The task's epochs from the books' position (`fix`, which trains nothing, takes no step)."""
        position = books.position
        epochs = plan.epochs_for(self.config, task_index) if self.method.trains else 0
        start_epoch = position["epoch"] if task_index == position["task"] else 0
        bar = progress_bar(self.progress and books.primary, epochs * steps_per_epoch, task_index, self.num_tasks,
                           start_epoch * steps_per_epoch + (position["batch"] if task_index == position["task"] else 0))
        for epoch in range(start_epoch, epochs):
            start_batch = position["batch"] if (task_index == position["task"] and epoch == position["epoch"]) else 0
            if start_batch == 0:
                # The method counts micro-steps (the official code's T): optimiser steps x accumulation.
                state = self.begin_epoch(state, jnp.asarray(epoch, jnp.int32),
                                         jnp.asarray(steps_per_epoch * self.accumulation, jnp.int32))
            state = self._train_epoch(state, task_index, epoch, start_batch, arrays, steps_per_epoch, books, bar)
        if bar is not None:
            bar.close()
        return state

    def _train_epoch(self, state, task_index: int, epoch: int, start_batch: int, arrays: dict, steps_per_epoch: int,
                     books: "_Books", bar):
        """One epoch of jitted steps. The host fetches metrics only every `log_every` steps and writes
        checkpoints when asked; a SIGTERM saves the position and stops."""
        seed = int(self.config.seed)
        pending = []
        window_start = time.perf_counter()
        # Packed batches are built from full-width ones (their row count varies instead): one compile per row count.
        source = self.batching.batches if self.packer is None else batching_lib.batches
        batches = source(arrays, self.micro_batch * self.accumulation, seed=seed, task=task_index,
                         epoch=epoch, shuffle=True, start=start_batch, take=self.local_rows)
        for batch_index, batch in enumerate(batches, start=start_batch):
            if self.packer is not None:
                batch = self.packer(batch)
            batch = mesh_lib.global_batch(batch, self.batch_sharding, self.accumulation, self.micro_batch)
            key = keys.train_step_key(seed, task_index, epoch, batch_index)
            state, metrics = self.train_step(state, self.train_frozen, self.consts, batch, key)
            kill_point("step")
            pending.append(metrics)
            books.steps_done += 1
            books.host_step += 1
            last = batch_index + 1 == steps_per_epoch
            if len(pending) >= books.log_every or last:
                books.log_steps(jax.device_get(pending), time.perf_counter() - window_start, task_index, epoch,
                                batch_index, bar)
                pending = []
                window_start = time.perf_counter()
            books.after_step(state, task_index, epoch, batch_index, last)
        return state

    def _end_task(self, state, task_index: int, arrays: dict, steps_per_epoch: int, books: "_Books"):
        """The method's end-of-task host work, the task's prototypes, then one column of the accuracy
        matrices: every task seen so far scored with the state after this task."""
        context = self.passes.context(task_index, arrays, steps_per_epoch, int(self.config.seed))
        ledger = self.ledger
        with ledger.phase(f"end_task: {self.method.name}"):
            trainable, method_state = self._on_mesh(self.method.end_task(state.trainable, state.method_state,
                                                                         context))
            jax.block_until_ready((trainable, method_state))  # its dispatched work counts in this phase
            state = state.replace(trainable=trainable, method_state=method_state)
        if self.kind == "classification":
            with ledger.phase("prototypes"):
                state = self.evaluator.update_prototypes(state, task_index)
        eval_start = time.perf_counter()
        identity = []
        with ledger.phase("evaluation"):
            for seen in range(task_index + 1):
                scores = self.evaluator.evaluate(state, seen, task_index,
                                                 keys.generation_key(self.config.seed, task_index, seen))
                books.matrix[seen, task_index] = scores["score"]
                books.ncm_matrix[seen, task_index] = scores.get("ncm", np.nan)
                identity.append(scores.get("identity"))
        books.end_column(task_index, self.stream.tasks[task_index].name, time.perf_counter() - eval_start,
                         identity if self.infer_identity else None)
        return state


STEP_FIELDS = ("loss", "accuracy", "tokens", "grad_norm")


def classification_diagnostics(run: Run, state) -> dict:
    """After the last task of a classification stream: the scores printed beside the run's own."""
    out, ledger = {}, run.ledger
    if bool(run.config.eval.get("recomputed_prototypes", True)):
        # Diagnostic, not rehearsal-free: every class's prototype from the final model.
        with ledger.phase("evaluation: recomputed prototypes"):
            out["recomputed_prototype_scores"] = run.evaluator.recomputed_prototype_scores(state)
    if run.method.trains and len(run.passes.pretrained_train) == run.num_tasks:
        # The frozen model's nearest-class-mean score (what `fix` scores) from the pre-trained
        # features this run computed anyway (HiDe-LoRA's task identity): printed beside its own.
        with ledger.phase("evaluation: frozen NCM"):
            out["frozen_ncm_scores"] = run.evaluator.frozen_ncm_scores(run.passes.pretrained_train)
    return out


def progress_bar(show: bool, total: int, task_index: int, num_tasks: int, initial: int):
    """A tqdm bar over one task's steps, or None."""
    if not show:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=f"task {task_index + 1}/{num_tasks}", initial=initial, leave=True,
                dynamic_ncols=True)


def _none_for_nan(matrix) -> list:
    return [[None if np.isnan(v) else float(v) for v in row] for row in matrix]


def _nan_for_none(rows) -> np.ndarray:
    return np.array([[np.nan if v is None else v for v in row] for row in rows], float)


class _Books:
    """The host-side record of one `fit`: position, accuracy matrices, timings, step counters, the
    checkpointer and the metrics log. What a checkpoint saves beside the state (`loop`) comes from
    here, and a resumed run starts from what it read back."""

    def __init__(self, run: Run, resume: bool):
        config = run.config
        self.run, self.resume = run, resume
        self.restored = False  # set by start(): whether a checkpoint was restored
        self.checkpoints = checkpoint_lib.Checkpointer(os.path.join(run.workdir, "checkpoints"),
                                                       keep=int(config.train.get("keep_checkpoints", 2)))
        self.fingerprint = fingerprint(config)
        self.matrix = np.full((run.num_tasks, run.num_tasks), np.nan)
        self.ncm_matrix = np.full((run.num_tasks, run.num_tasks), np.nan)  # rehearsal-free NCM (classification)
        self.position = {"task": 0, "epoch": 0, "batch": 0}
        self.timings = {"train_seconds": [0.0] * run.num_tasks, "eval_seconds": [0.0] * run.num_tasks,
                        "tokens": [0.0] * run.num_tasks}
        self.log_every = max(int(config.train.get("log_every", 10)), 1)
        self.checkpoint_every = int(config.train.get("checkpoint_every", 0) or 0)
        self.host_step = 0  # mirrors state.step on the host, so the loop never waits on the device
        self.steps_done = 0  # steps taken by this call (the test hook stop_after_steps counts them)
        self.primary = jax.process_index() == 0  # with several processes, only the first writes logs and results
        self.metrics_log = MetricsWriter(os.path.join(run.workdir, "metrics.jsonl") if self.primary else os.devnull)
        self.preempted: list = []
        self.identity: Optional[list] = None  # task-identity accuracy per task after the latest task evaluated
        self._previous_handler = None

    def start(self, state):
        """The state to start from: `state` (fresh), or the newest good checkpoint with `resume`. Installs
        the SIGTERM handler (a pre-emption saves the position at the next step)."""
        self.restored = self.resume and self.checkpoints.latest() is not None
        if self.restored:
            state, loop = checkpoint_lib.restore_newest_good(self.checkpoints, state, self.fingerprint)
            self.position = loop["position"]
            self.matrix, self.ncm_matrix = _nan_for_none(loop["matrix"]), _nan_for_none(loop["ncm_matrix"])
            self.timings = loop["timings"]
        self.host_step = int(state.step)
        if threading.current_thread() is threading.main_thread():
            self._previous_handler = signal.signal(signal.SIGTERM, lambda signum, frame: self.preempted.append(signum))
        return state

    def emit(self, record: dict) -> None:
        self.metrics_log.write(record)
        if self.run.logger:
            self.run.logger(record)

    def save(self, state, position: dict, wait: bool = False) -> None:
        with self.run.ledger.phase("checkpoint"):
            loop = {"position": position, "fingerprint": self.fingerprint, "timings": self.timings,
                    "matrix": _none_for_nan(self.matrix), "ncm_matrix": _none_for_nan(self.ncm_matrix),
                    "state_digest": checkpoint_lib.state_digest(state)}
            self.checkpoints.save(self.host_step, state, loop)
            if wait:
                self.checkpoints.wait()

    def end_column(self, task_index: int, name: str, eval_seconds: float, identity: Optional[list]) -> None:
        """Records the column of task `task_index` (its scores are in the matrices): the evaluation
        time, the task-identity accuracy where the identity is inferred, one "task" line of the log."""
        self.timings["eval_seconds"][task_index] = eval_seconds
        if identity is not None:
            self.identity = identity
        column = lambda matrix: [float(matrix[i, task_index]) for i in range(task_index + 1)]
        classification = self.run.kind == "classification"
        self.emit({"type": "task", "task": task_index, "name": name, "scores": column(self.matrix),
                   **({"ncm_scores": column(self.ncm_matrix)} if classification else {}),
                   "train_seconds": self.timings["train_seconds"][task_index],
                   "eval_seconds": self.timings["eval_seconds"][task_index],
                   **({"task_identity_accuracy": identity} if identity is not None else {})})

    def log_steps(self, fetched: list, elapsed: float, task_index: int, epoch: int, batch_index: int, bar=None) -> dict:
        """One step record from the metrics of the steps since the last one (fetched from the device);
        the progress bar, where there is one, moved on by those steps."""
        tokens = float(sum(m["tokens"] for m in fetched))
        loss = float(fetched[-1]["loss"])
        if not np.isfinite(loss):
            raise NonFiniteLoss(f"loss became {loss} at task {task_index}, epoch {epoch}, batch {batch_index} "
                                f"(global step {self.host_step}): lower optimizer.learning_rate or set "
                                f"optimizer.clip_norm; the last good checkpoint is kept")
        self.timings["tokens"][task_index] += tokens
        record = {"type": "step", "task": task_index, "epoch": epoch, "batch": batch_index, "step": self.host_step,
                  "loss": loss, "accuracy": float(fetched[-1]["accuracy"]),
                  "grad_norm": float(fetched[-1]["grad_norm"]), "tokens_per_second": tokens / max(elapsed, 1e-9),
                  # the method's own step scalars (Method.step_metrics), averaged over these steps
                  **{name: float(np.mean([float(m[name]) for m in fetched]))
                     for name in fetched[-1] if name not in STEP_FIELDS}}
        self.emit(record)
        if bar is not None:
            bar.set_postfix(epoch=epoch + 1, loss=f"{loss:.3f}", tok_s=f"{record['tokens_per_second']:.0f}")
            bar.update(len(fetched))
        return record

    def after_step(self, state, task_index: int, epoch: int, batch_index: int, last: bool) -> None:
        """Checkpoints after a step (`last`: the epoch's last): on SIGTERM (then stop), every
        `checkpoint_every` steps; the test hook."""
        after = ({"task": task_index, "epoch": epoch + 1, "batch": 0} if last else
                 {"task": task_index, "epoch": epoch, "batch": batch_index + 1})
        if self.preempted:
            self.save(state, after, wait=True)
            raise Preempted(f"SIGTERM: saved a checkpoint at step {self.host_step} (task {after['task']}, epoch "
                            f"{after['epoch']}, batch {after['batch']}); continue with --resume and the same --workdir")
        if self.checkpoint_every and self.host_step % self.checkpoint_every == 0:
            self.save(state, after)
        if self.run.stop_after_steps is not None and self.steps_done >= self.run.stop_after_steps:
            self.checkpoints.wait()
            raise StopRequested(f"stopped after {self.steps_done} steps (test hook)")

    def close(self) -> None:
        if self._previous_handler is not None:
            signal.signal(signal.SIGTERM, self._previous_handler)
        self.metrics_log.close()
        self.checkpoints.close()
