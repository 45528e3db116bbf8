"""The train state, the stream-specific losses and the one jitted train step.

Everything here is a pure function of pytrees. The step takes

    state  = TrainState(trainable, opt_state, method_state, step)     (donated)
    frozen = backbone parameters                                       (never differentiated)
    consts = stream constants: per-task class masks [max_tasks, num_classes]
    batch  = micro-batches with a leading [accumulation] axis
    key    = the step's PRNG key (fold_in(task) -> fold_in(epoch) -> fold_in(batch))

and scans the micro-batches: for each one the method's loss (task loss plus the method's terms) is
differentiated with respect to `trainable` only, `method.after_step` updates the method's statistics
(bandit counts, running averages) and the gradients are summed. Then one optimiser update, masked by
`method.update_mask` so frozen slots never move. The task index lives in the method state as a traced
integer, so the compiled step serves every task.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxtree_lora.errors import ConfigError
from jaxtree_lora.models.common import SiteRecorder

PyTree = Any


@flax.struct.dataclass
class TrainState:
    trainable: PyTree
    opt_state: PyTree
    method_state: PyTree
    step: jax.Array
    # Class prototypes [num_classes, feature_dim] (mean feature of each learned class) for
    # prototype (nearest-class-mean) evaluation; [1, 1] when unused.
    prototypes: jax.Array = None


def make_optimizer(config) -> optax.GradientTransformation:
    """Adam(W) with global-norm clipping and a constant or cosine learning rate.

    Official TreeLoRA: Adam(0.9, 0.95), weight decay 0, constant lr 1e-4, clip 1.0.
    """
    opt = config.optimizer
    lr = float(opt.learning_rate)
    if not lr > 0 or lr == float("inf"):
        raise ConfigError(f"optimizer.learning_rate must be a finite number > 0, got {lr}")
    schedule = lr
    if opt.get("schedule", "constant") == "cosine":
        schedule = optax.cosine_decay_schedule(lr, max(int(opt.get("decay_steps", 1000)), 1))
    elif opt.get("schedule", "constant") != "constant":
        raise ConfigError(f"unknown optimizer.schedule {opt.schedule!r}: constant or cosine")
    chain = []
    if float(opt.get("clip_norm", 0.0)) > 0:
        chain.append(optax.clip_by_global_norm(float(opt.clip_norm)))
    b1, b2 = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999))
    weight_decay = float(opt.get("weight_decay", 0.0))
    if weight_decay > 0:
        chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    else:
        chain.append(optax.adam(schedule, b1=b1, b2=b2))
    return optax.chain(*chain)


def init_head(key, feature_dim: int, num_classes: int, kind: str = "cosine") -> dict:
    """Classification head over all classes of the stream: w [feature_dim, num_classes], b [num_classes].

    Each task trains only its own classes' columns (per-task heads, concatenated at inference).
    "linear" heads start at zero: a task then says only what its own steps taught it, and the classes of
    different tasks start level. A random start (torch's default) is noise the size of what a few dozen
    Adam steps learn, and continual streams often give a task no more than that. "cosine" heads need a
    direction to start from: w ~ N(0, 1/feature_dim)."""
    if num_classes == 0:
        return {}
    if kind == "linear":
        w = jnp.zeros((feature_dim, num_classes), jnp.float32)
    else:
        w = jax.random.normal(key, (feature_dim, num_classes), jnp.float32) / jnp.sqrt(feature_dim)
    return {"w": w, "b": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: dict, features, kind: str = "cosine", scale: float = 20.0):
    """Class logits [B, C] from features [B, d].

    "cosine": scale * cos(features, w_c) (CosFace-style, as CL-LoRA and LoDA use): logits of classes
    learned in different tasks share one scale, so evaluation over all seen classes is not dominated
    by whichever task's head grew largest. "linear": features @ w + b.
    """
    features = features.astype(jnp.float32)
    if kind == "cosine":
        f = features / (jnp.linalg.norm(features, axis=-1, keepdims=True) + 1e-6)
        w = head["w"] / (jnp.linalg.norm(head["w"], axis=0, keepdims=True) + 1e-6)
        return scale * (f @ w)
    return features @ head["w"] + head["b"]


def masked_cross_entropy(logits, labels, class_mask, weight):
    """Mean CE over weighted rows with logits outside `class_mask` removed. logits [B,C], labels [B]."""
    logits = jnp.where(class_mask[None, :], logits.astype(jnp.float32), -1e9)
    logp = jax.nn.log_softmax(logits, axis=-1)
    nll = -jnp.take_along_axis(logp, labels[:, None], axis=-1)[:, 0]
    correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
    total = jnp.maximum(jnp.sum(weight), 1.0)
    return jnp.sum(nll * weight) / total, {"accuracy": jnp.sum(correct * weight) / total}


def token_weights(batch) -> jax.Array:
    """Which tokens of a batch count: attention mask x example weight [batch, seq] for text, the
    example weight [batch] for images (every patch of a real example counts)."""
    if "attention_mask" in batch:
        return batch["attention_mask"] * batch["weight"][:, None]
    return batch["weight"]


def make_task_loss(backbone, method, kind: str, train_mask: str = "task", head: str = "cosine",
                   head_scale: float = 20.0) -> Callable:
    """Returns task_loss(trainable, frozen, consts, method_state, batch, key) -> (loss, aux)."""

    def delta_for(method_state, weight):
        delta = lambda site, adapter, x, key: method.delta(method_state, site, adapter, x, key)
        if getattr(method, "record", None) is None:
            return delta
        # The method measures something per site (returned to its loss as aux["site_records"]).
        record = lambda site, adapter, x, w: method.record(method_state, site, adapter, x, w)
        return SiteRecorder(delta, record, weight)

    def records_of(delta) -> dict:
        return {"site_records": delta.records} if isinstance(delta, SiteRecorder) else {}

    if kind == "classification":

        def task_loss(trainable, frozen, consts, method_state, batch, key):
            adapters = method.forward_adapters(trainable["adapters"], method_state)
            delta = delta_for(method_state, token_weights(batch))
            features = backbone.features(frozen, batch, adapters=adapters, delta=delta, rng=key)
            logits = head_logits(trainable["head"], features, head, head_scale)
            task = method_state["task"]
            mask = consts["task_classes"][task] if train_mask == "task" else consts["seen_classes"][task]
            loss, aux = masked_cross_entropy(logits, batch["labels"], mask, batch["weight"])
            # The logits over the trained classes (others at -1e9) for methods that distil (CL-LoRA).
            class_logits = jnp.where(mask[None, :], logits.astype(jnp.float32), -1e9)
            # The features [B, d] for methods with a loss on them (HiDe-LoRA's contrastive term).
            return loss, {**aux, "tokens": jnp.sum(batch.get("attention_mask", batch["weight"])),
                          "class_logits": class_logits, "features": features.astype(jnp.float32),
                          **records_of(delta)}

        return task_loss

    if kind == "instruction":

        def task_loss(trainable, frozen, consts, method_state, batch, key):
            tokens, attention = batch["input_ids"], batch["attention_mask"]
            delta = delta_for(method_state, token_weights(batch))
            logits = backbone.logits(frozen, tokens, attention,
                                     adapters=method.forward_adapters(trainable["adapters"], method_state),
                                     delta=delta, rng=key)
            # Predict token t+1 from position t; loss only on answer tokens (TRACE: labels -100 on the prompt).
            logp = jax.nn.log_softmax(logits[:, :-1].astype(jnp.float32), axis=-1)
            target = tokens[:, 1:]
            nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            mask = batch["loss_mask"][:, 1:].astype(jnp.float32) * batch["weight"][:, None]
            count = jnp.maximum(jnp.sum(mask), 1.0)
            loss = jnp.sum(nll * mask) / count
            return loss, {"answer_tokens": jnp.sum(mask), "tokens": jnp.sum(attention * batch["weight"][:, None]),
                          **records_of(delta)}

        return task_loss

    raise ValueError(f"unknown stream kind {kind!r}")


def make_train_step(method, task_loss: Callable, optimizer: optax.GradientTransformation,
                    freeze_other_classes: bool = False) -> Callable:
    """step(state, frozen, consts, batch, key) -> (state, metrics). batch leaves: [accum, micro, ...].

    freeze_other_classes: with task-local training (logits masked to the current task's classes) the
    head columns of other classes get no gradient, but Adam's momentum would still move them; this
    masks their updates so an old class's head stays exactly as its task left it.
    """

    def step(state: TrainState, frozen, consts, batch, key):
        accum = jax.tree.leaves(batch)[0].shape[0]

        def micro(carry, xs):
            grads_sum, method_state, loss_sum, acc_sum, tokens = carry
            micro_batch, index = xs
            micro_key = jax.random.fold_in(key, index)

            def loss_fn(trainable):
                # A method may evaluate the task loss on a re-weighted batch (e.g. LoDA's class halves).
                closure = lambda tr, k, b=None: task_loss(tr, frozen, consts, method_state,
                                                          micro_batch if b is None else b, k)
                return method.loss(trainable, method_state, micro_batch, micro_key, closure)

            (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.trainable)
            method_state = method.after_step(method_state, aux, grads)
            grads_sum = jax.tree.map(jnp.add, grads_sum, grads)
            acc = aux.get("accuracy", jnp.zeros((), jnp.float32))
            return (grads_sum, method_state, loss_sum + loss, acc_sum + acc,
                    tokens + aux.get("tokens", jnp.zeros((), jnp.float32))), None

        zeros = jax.tree.map(jnp.zeros_like, state.trainable)
        init = (zeros, state.method_state, jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                jnp.zeros((), jnp.float32))
        (grads, method_state, loss_sum, acc_sum, tokens), _ = jax.lax.scan(
            micro, init, (batch, jnp.arange(accum)))
        grads = jax.tree.map(lambda g: g / accum, grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        mask = method.update_mask(method_state, state.trainable)
        if mask is not None:
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
        if freeze_other_classes and updates.get("head"):
            columns = consts["task_classes"][method_state["task"]].astype(jnp.float32)
            updates = {**updates, "head": {"w": updates["head"]["w"] * columns[None, :],
                                           "b": updates["head"]["b"] * columns}}
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / accum, "accuracy": acc_sum / accum, "tokens": tokens,
                   "grad_norm": optax.tree.norm(grads)}
        new_state = state.replace(trainable=trainable, opt_state=opt_state, method_state=method_state,
                                  step=state.step + 1)
        return new_state, metrics

    return step
