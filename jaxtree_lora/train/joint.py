"""The run of the `joint` upper bound: every task's training data at once, rate and epochs chosen on held-out data.

`JointRun` is a `Run` over a one-task stream merging every task's training split (one head over every
class; on instruction streams the union). `fit` holds out a seeded share of each task's training rows,
selects between the linear probe alone and LP-FT (LoRA + head from the probe's head) at each rate and
epoch on the held-out part, retrains the chosen setting on all the training data (the probe first, as
in selection), and scores every task's test set with the run's evaluator over every class. The probe
comes first because a head starting from zero pulls the features hard in its first steps (LP-FT's
argument). No checkpoints are written: an interrupted joint run starts again. docs/METHODS.md, JOINT.
"""
from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtree_lora import keys
from jaxtree_lora.data import batching as batching_lib
from jaxtree_lora.data.stream import Split, Stream, Task
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.models.heads import head_logits, init_head
from jaxtree_lora.reporting.results import MetricsWriter
from jaxtree_lora.train import mesh as mesh_lib
from jaxtree_lora.train import plan
from jaxtree_lora.train.loop import NonFiniteLoss, Run, split_arrays
from jaxtree_lora.train.step import build_optimizer, make_train_step


# -- data ------------------------------------------------------------------------------------------
def take_rows(split: Split, rows) -> Split:
    """The rows `rows` of a split (every array, label, text, prompt and answer)."""
    rows = np.asarray(rows, np.int64)
    pick = lambda items: [items[i] for i in rows] if items else []
    return Split(inputs={k: np.asarray(v)[rows] for k, v in split.inputs.items()},
                 labels=None if split.labels is None else np.asarray(split.labels)[rows],
                 prompts=pick(split.prompts), answers=pick(split.answers),
                 arrays={k: np.asarray(v)[rows] for k, v in split.arrays.items()}, texts=pick(split.texts))


def concat_splits(splits: Sequence[Split], side: str = "right") -> Split:
    """The splits' rows one after the other. Token arrays of different widths are padded with zeros
    (masked) on `side`: "right" for classification text, "left" for instruction arrays."""

    def join(dicts):
        if not dicts[0]:
            return {}
        out = {}
        for key in dicts[0]:
            parts = [np.asarray(d[key]) for d in dicts]
            if parts[0].ndim == 2 and len({p.shape[1] for p in parts}) > 1:
                width = max(p.shape[1] for p in parts)
                parts = [np.pad(p, ((0, 0), (width - p.shape[1], 0) if side == "left" else (0, width - p.shape[1])))
                         for p in parts]
            out[key] = np.concatenate(parts)
        return out

    every = lambda name: sum((list(getattr(s, name)) for s in splits), []) if all(
        getattr(s, name) for s in splits) else []
    labels = None if splits[0].labels is None else np.concatenate([s.labels for s in splits]).astype(np.int32)
    return Split(inputs=join([s.inputs for s in splits]), labels=labels, prompts=every("prompts"),
                 answers=every("answers"), arrays=join([s.arrays for s in splits]), texts=every("texts"))


def merge_stream(stream: Stream) -> Stream:
    """One task holding every task's training split (and test split) and every class."""
    side = "right" if stream.kind == "classification" else "left"
    tasks = stream.tasks
    classes = tuple(sorted({int(c) for task in tasks for c in task.classes}))
    merged = Task(index=0, name=f"all {len(tasks)} tasks", train=concat_splits([t.train for t in tasks], side),
                  test=concat_splits([t.test for t in tasks], side), classes=classes, metric=tasks[0].metric,
                  max_new_tokens=max(int(t.max_new_tokens) for t in tasks))
    return dataclasses.replace(stream, tasks=[merged])


def holdout_rows(split: Split, kind: str, fraction: float, seed: int, task: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept rows, held-out rows) of a task's training split: a seeded `fraction` of each class's rows
    (classification) or of all rows (instruction), at least one and never all of a group of two or more."""
    generator = np.random.default_rng([int(seed), int(task), 0x301A7])
    count = len(split)
    groups = ([np.flatnonzero(np.asarray(split.labels) == c) for c in np.unique(split.labels)]
              if kind == "classification" else [np.arange(count)])
    held = []
    for rows in groups:
        if fraction <= 0 or len(rows) < 2:
            continue
        take = min(max(int(round(fraction * len(rows))), 1), len(rows) - 1)
        held.extend(generator.permutation(rows)[:take].tolist())
    held = np.sort(np.asarray(held, np.int64))
    return np.setdiff1d(np.arange(count), held), held


# -- the probe and the choice ------------------------------------------------------------------------
FINE_TUNED = ("lp-ft", "ft")  # candidates that train the adapters: from the probe's head, or from the zero head

@functools.partial(jax.jit, static_argnames=("num_classes", "kind", "steps"))
def fit_probe(features, labels, key, l2, learning_rate, scale, *, num_classes: int, kind: str, steps: int):
    """The head (`models.heads.head_logits` of `kind`) fitted to frozen features [N, d] with labels [N]:
    multinomial logistic regression, full-batch Adam for `steps` steps, plus l2 * |w|^2."""
    features = features.astype(jnp.float32)
    head = init_head(key, features.shape[1], num_classes, kind)
    optimizer = optax.adam(learning_rate)

    def loss(head):
        logp = jax.nn.log_softmax(head_logits(head, features, kind, scale), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, labels[:, None], axis=-1)) + l2 * jnp.sum(jnp.square(head["w"]))

    def step(carry, _):
        head, opt_state = carry
        updates, opt_state = optimizer.update(jax.grad(loss)(head), opt_state, head)
        return (optax.apply_updates(head, updates), opt_state), None

    (head, _), _ = jax.lax.scan(step, (head, optimizer.init(head)), None, length=steps)
    return head


def probe_accuracy(head, features, labels, kind: str, scale: float) -> float:
    """Accuracy (%) of the head's argmax over every class."""
    predictions = np.asarray(jnp.argmax(head_logits(head, jnp.asarray(features), kind, scale), axis=-1))
    return 100.0 * float(np.mean(predictions == np.asarray(labels)))


def choose(candidates: Sequence[dict]) -> dict:
    """The candidate with the best held-out score; on a tie the earliest (the probe, then lower rates and
    fewer epochs), so fine-tuning is chosen only where it beats the probe."""
    scored = [c for c in candidates if c.get("heldout") is not None and np.isfinite(c["heldout"])]
    if not scored:
        raise ConfigError("joint: no candidate of the selection could be scored on the held-out data: "
                          "lower config.method.joint.learning_rates")
    return max(scored, key=lambda c: c["heldout"])


# -- the run ----------------------------------------------------------------------------------------
@dataclasses.dataclass
class JointRun(Run):
    """A `Run` of the `joint` method: builds on the merged stream, scores on the stream's own tasks."""

    def __post_init__(self):
        if jax.process_count() > 1:
            raise ConfigError("joint runs in one process (its selection reads every feature on the host): "
                              "run it without --coordinator")
        if self.config.eval.get("classifier", "") == "prototype":
            raise ConfigError("joint is scored by its head over every class (its selection chooses the head): "
                              "leave eval.classifier unset or set it to 'head'")
        self.task_stream = self.stream
        self.stream = merge_stream(self.stream)
        super().__post_init__()
        self._steps = {}

    # -- pieces ---------------------------------------------------------------------------------
    def _use_rate(self, learning_rate: float) -> None:
        """The train step at this rate (compiled once per rate)."""
        self.optimizer_settings = {**self.optimizer_settings, "learning_rate": float(learning_rate)}
        if learning_rate not in self._steps:
            optimizer = build_optimizer(self.optimizer_settings)
            step = make_train_step(self.train_method, self.task_loss, optimizer,
                                   freeze_other_classes=self.config.train.get("train_mask", "task") == "task")
            self._steps[learning_rate] = (optimizer, jax.jit(step, donate_argnums=(0,),
                                                             out_shardings=mesh_lib.replicated(self.mesh)))
        self.optimizer, self.train_step = self._steps[learning_rate]

    def _start(self, head):
        """Fresh adapters and optimiser, the given head (the probe's), task 0 begun."""
        state = self.initial_state()
        if head:
            # From host copies: the train step donates the state, and the same head starts every rate.
            head = mesh_lib.to_global(jax.tree.map(np.asarray, head), mesh_lib.replicated(self.mesh))
            state = state.replace(trainable={**state.trainable, "head": head})
        return self.begin_task(state, jnp.asarray(0, jnp.int32))

    def _epoch(self, state, arrays: dict, epoch: int):
        """One epoch of jitted steps over `arrays`; metrics fetched once, at its end. -> (state, loss, tokens)."""
        seed = int(self.config.seed)
        rows = len(next(iter(arrays.values())))
        steps = self.batching.num_batches(rows, self.micro_batch * self.accumulation)
        state = self.begin_epoch(state, jnp.asarray(epoch, jnp.int32), jnp.asarray(steps * self.accumulation, jnp.int32))
        source = self.batching.batches if self.packer is None else batching_lib.batches
        pending = []
        for index, batch in enumerate(source(arrays, self.micro_batch * self.accumulation, seed=seed, task=0,
                                             epoch=epoch, shuffle=True)):
            if self.packer is not None:
                batch = self.packer(batch)
            batch = mesh_lib.global_batch(batch, self.batch_sharding, self.accumulation, self.micro_batch)
            state, metrics = self.train_step(state, self.train_frozen, self.consts, batch,
                                             keys.train_step_key(seed, 0, epoch, index))
            pending.append(metrics)
        fetched = jax.device_get(pending)
        loss = float(np.mean([m["loss"] for m in fetched]))
        if not np.isfinite(loss):
            raise NonFiniteLoss(f"joint: the loss became {loss} in epoch {epoch} at learning rate "
                                f"{self.optimizer_settings['learning_rate']:g}: lower optimizer.learning_rate")
        return state, loss, float(sum(m["tokens"] for m in fetched))

    def _train(self, arrays: dict, head, learning_rate: float, epochs: int, after_epoch=None):
        """LP-FT: fresh adapters from `head`, `epochs` epochs at `learning_rate`. -> (state, tokens)."""
        self._use_rate(learning_rate)
        state, tokens = self._start(head), 0.0
        for epoch in range(epochs):
            state, loss, epoch_tokens = self._epoch(state, arrays, epoch)
            tokens += epoch_tokens
            self._log.write({"type": "joint_epoch", "learning_rate": learning_rate, "epoch": epoch, "loss": loss,
                             "rows": len(next(iter(arrays.values())))})
            if after_epoch is not None:
                after_epoch(state, epoch)
        return state, tokens

    def _features(self, split: Split) -> tuple[np.ndarray, np.ndarray]:
        """Pre-trained features [N, d] and labels [N] of a classification split (padding rows dropped)."""
        features, labels = [], []
        for batch_features, batch_labels, weight in self.passes.features(split_arrays(split, "classification"), 0,
                                                                     remember=False):
            keep = np.asarray(weight) > 0
            features.append(batch_features[keep])
            labels.append(batch_labels[keep])
        return np.concatenate(features), np.concatenate(labels).astype(np.int32)

    def _probe(self, features, labels, l2: float):
        method = self.method
        return fit_probe(jnp.asarray(features), jnp.asarray(labels), keys.for_purpose(self.config.seed, "init"),
                         float(l2), float(method.probe_learning_rate), float(self.protocol["head_scale"]),
                         num_classes=int(self.stream.num_classes), kind=self.protocol["head"],
                         steps=int(method.probe_steps))

    def _evaluator_on(self, stream: Stream):
        """The run's evaluator reading `stream`'s tasks (the classes of the merged task, every class, compete)."""
        return self.evaluator.reading(stream)

    def _scores(self, evaluator, state) -> list[dict]:
        seed = int(self.config.seed)
        return [evaluator.evaluate(state, task, 0, keys.generation_key(seed, 0, task))
                for task in range(len(evaluator.stream.tasks))]

    # -- selection ------------------------------------------------------------------------------
    def select(self, fit_split: Split, heldout: Stream, rates: Sequence[float], max_epochs: int) -> dict:
        """Every candidate's held-out score (mean over tasks) and the chosen one (`choose`)."""
        method, candidates = self.method, []
        evaluator = self._evaluator_on(heldout)
        probe_l2 = None
        if self.kind == "classification":
            fit_features, fit_labels = self._features(fit_split)
            held = [self._features(task.test) for task in heldout.tasks]
            probes = []
            for l2 in method.probe_l2:
                head = self._probe(fit_features, fit_labels, l2)
                score = float(np.mean([probe_accuracy(head, f, y, self.protocol["head"], self.protocol["head_scale"])
                                       for f, y in held]))
                probes.append({"l2": float(l2), "heldout": score, "head": head})
            best = max(probes, key=lambda p: p["heldout"])
            start_head, probe_l2 = (best["head"] if method.probe_first else {}), best["l2"]
            candidates.append({"candidate": "probe", "learning_rate": None, "epochs": 0, "heldout": best["heldout"],
                               "probe_l2": probe_l2})
            probe_grid = [{"l2": p["l2"], "heldout": p["heldout"]} for p in probes]
        else:
            start_head, probe_grid = {}, []
            scores = self._scores(evaluator, self._start({}))
            candidates.append({"candidate": "pre-trained", "learning_rate": None, "epochs": 0,
                               "heldout": float(np.mean([s["score"] for s in scores]))})
        fit_arrays = split_arrays(fit_split, self.kind)
        tuned = "lp-ft" if start_head else "ft"  # fine-tuning from the probe's head, or from the zero head
        for rate in rates:
            scores = []
            record = lambda state, epoch: scores.append(float(np.mean([s["score"] for s in self._scores(evaluator, state)])))
            try:
                self._train(fit_arrays, start_head, rate, max_epochs, record)
            except NonFiniteLoss:
                pass  # this rate diverged: its later epochs are not candidates
            for epoch in range(max_epochs):
                candidates.append({"candidate": tuned, "learning_rate": float(rate), "epochs": epoch + 1,
                                   "heldout": scores[epoch] if epoch < len(scores) else None,
                                   **({"probe_l2": probe_l2} if probe_l2 is not None else {})})
        chosen = choose(candidates)
        return {"holdout": float(method.holdout), "heldout_rows": int(sum(len(t.test) for t in heldout.tasks)),
                "fit_rows": len(fit_split), "probe_grid": probe_grid, "candidates": candidates, "chosen": chosen}

    # -- the whole run --------------------------------------------------------------------------------
    def fit(self, resume: bool = False, wait_for_checkpoint: bool = True) -> dict:
        """Selection, the chosen setting on all the training data, every task scored. Returns what
        `Run.fit` returns, plus "selection". It writes no checkpoint: `finish_checkpoints` has nothing
        to wait for."""
        self.finish_checkpoints = lambda: None
        method, seed, tasks = self.method, int(self.config.seed), self.task_stream.tasks
        os.makedirs(self.workdir, exist_ok=True)
        self._log = MetricsWriter(os.path.join(self.workdir, "metrics.jsonl"))
        try:
            outcome = self._fit(method, seed, tasks)
            if self._own_ledger:
                outcome["time"] = self.ledger.table()
            return outcome
        finally:
            self._log.close()
            if self._own_ledger:
                self.ledger.close()

    def _fit(self, method, seed: int, tasks) -> dict:
        max_epochs = int(method.max_epochs) or plan.epochs_for(self.config, 0)
        rates = tuple(float(r) for r in method.learning_rates) or (float(self.optimizer_settings["learning_rate"]),)
        side = "right" if self.kind == "classification" else "left"
        configured_rate = float(self.optimizer_settings["learning_rate"])
        started = time.perf_counter()
        if method.select:
            parts = [holdout_rows(task.train, self.kind, float(method.holdout), seed, task.index) for task in tasks]
            if not any(len(held) for _, held in parts):
                raise ConfigError("joint: the held-out part is empty (too few training rows per class): raise "
                                  "config.method.joint.holdout or set config.method.joint.select=False")
            fit_split = concat_splits([take_rows(task.train, kept) for task, (kept, _) in zip(tasks, parts)], side)
            heldout = dataclasses.replace(self.task_stream, tasks=[
                dataclasses.replace(task, test=take_rows(task.train, held))
                for task, (_, held) in zip(tasks, parts) if len(held)])
            with self.ledger.phase("joint: selection"):
                selection = self.select(fit_split, heldout, rates, max_epochs)
        else:
            selection = {"candidates": [], "chosen": {"candidate": "lp-ft" if method.probe_first else "ft",
                                                       "learning_rate": rates[0],
                                                       "epochs": max_epochs, "probe_l2": float(method.probe_l2[0])}}
        selection["seconds"] = time.perf_counter() - started
        chosen = selection["chosen"]
        print(describe_selection(selection), flush=True)
        self._log.write({"type": "joint_selection", **selection})

        train_start = time.perf_counter()
        merged = self.stream.tasks[0].train
        head = {}
        with self.ledger.phase("train"):
            if self.kind == "classification" and (method.probe_first or chosen["candidate"] == "probe"):
                features, labels = self._features(merged)
                head = self._probe(features, labels, chosen.get("probe_l2", 0.0))
            if chosen["candidate"] in FINE_TUNED:
                state, tokens = self._train(split_arrays(merged, self.kind), head, chosen["learning_rate"],
                                            chosen["epochs"])
            else:
                # Nothing fine-tuned: the protocol's record keeps the config's rate, not the last one tried.
                self._use_rate(configured_rate)
                state, tokens = self._start(head), 0.0
            jax.block_until_ready(state)
        train_seconds = time.perf_counter() - train_start

        eval_start = time.perf_counter()
        with self.ledger.phase("evaluation"):
            if self.kind == "classification":
                state = self.evaluator.update_prototypes(state, 0)  # every class's mean, from the final model
            scores = self._scores(self._evaluator_on(self.task_stream), state)
        eval_seconds = time.perf_counter() - eval_start
        count = len(tasks)
        matrix, ncm = np.full((count, count), np.nan), np.full((count, count), np.nan)
        for task, score in enumerate(scores):
            # One model: its score on task i stands in every column from i on (no "after task j").
            matrix[task, task:] = score["score"]
            ncm[task, task:] = score.get("ncm", np.nan)
            self._log.write({"type": "task", "task": task, "name": tasks[task].name, "score": score["score"],
                             **({"ncm": score["ncm"]} if "ncm" in score else {})})
        self.final_state = state
        zeros = [0.0] * (count - 1)
        outcome = {"matrix": matrix, "state": state, "selection": selection,
                   "timings": {"train_seconds": zeros + [train_seconds], "eval_seconds": zeros + [eval_seconds],
                               "tokens": zeros + [tokens]}}
        if self.kind == "classification":
            outcome["ncm_matrix"] = ncm
            # The prototypes above are every class's mean under the final model: the recomputed ones.
            outcome["recomputed_prototype_scores"] = [s["ncm"] for s in scores]
        return outcome


def describe_selection(selection: dict) -> str:
    """Lines for the terminal: every candidate's held-out score and the chosen setting."""
    lines = ["joint selection (held-out score, mean over tasks):"]
    for probe in selection.get("probe_grid", []):
        lines.append(f"  probe l2 {probe['l2']:g}: {probe['heldout']:.2f}")
    for c in selection["candidates"]:
        if c["candidate"] not in FINE_TUNED:
            lines.append(f"  {c['candidate']}: {c['heldout']:.2f}")
    rows = sorted({(c["candidate"], c["learning_rate"]) for c in selection["candidates"] if c["candidate"] in FINE_TUNED})
    for name, rate in rows:
        row = [c for c in selection["candidates"] if c["candidate"] == name and c["learning_rate"] == rate]
        cells = ", ".join("diverged" if c["heldout"] is None else f"{c['heldout']:.2f}" for c in row)
        lines.append(f"  {name} lr {rate:g}, epochs 1..{len(row)}: {cells}")
    chosen = selection["chosen"]
    what = (f"{chosen['candidate']} lr {chosen['learning_rate']:g}, {chosen['epochs']} epoch(s)"
            if chosen["candidate"] in FINE_TUNED else chosen["candidate"])
    score = chosen.get("heldout")
    lines.append(f"  chosen: {what}" + ("" if score is None else f" (held-out {score:.2f})")
                 + f"; selection took {selection.get('seconds', 0.0):.0f} s")
    return "\n".join(lines)
