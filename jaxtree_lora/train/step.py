"""The train state, the stream-specific losses and the one jitted train step.

A pure function of pytrees: `step(state, frozen, consts, batch, key)` scans the micro-batches (a
leading accumulation axis), differentiates the method's loss with respect to the trainable pytree
only, lets `method.after_step` update its statistics, sums the gradients and applies one optimiser
update masked by `method.update_mask`, so frozen slots never move (their gradients zeroed before
clipping, their optimiser moments kept). The task index is a traced integer in the method state, so
the compiled step serves every task; the state is donated.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.struct
import jax
import jax.numpy as jnp
import optax

from jaxtree_lora import keys
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.models.common import SiteRecorder
from jaxtree_lora.models.heads import head_logits

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


DEFAULT_LEARNING_RATE = 1e-4  # the official TreeLoRA rate: a method without its own takes it
OPTIMIZERS = ("adam", "sgd")


def optimizer_settings(config, own: Optional[dict] = None) -> dict:
    """The optimiser a run uses, as one flat dict (name, learning_rate, b1, b2, momentum, weight_decay,
    clip_norm, schedule, decay_steps).

    `own` is the method's own optimiser (`Method.default_optimizer`: the official code's, e.g. LoDA's
    SGD 0.005 with momentum 0.9). It applies, on top of the config's `optimizer` keys, only when the
    config chooses neither `optimizer.name` nor `optimizer.learning_rate`: a user who sets either gets
    the config's optimiser for every method (Adam unless named), so methods compared under one user
    setting share it. Unset everywhere: Adam at 1e-4 (the official TreeLoRA setting).
    """
    settings = dict(config.optimizer.to_dict())
    if own and settings.get("name") is None and settings.get("learning_rate") is None:
        settings.update(own)
    settings["name"] = settings.get("name") or "adam"
    if settings.get("learning_rate") is None:
        settings["learning_rate"] = DEFAULT_LEARNING_RATE
    return settings


def make_optimizer(config, own: Optional[dict] = None) -> optax.GradientTransformation:
    """The optimiser of `config` (with the method's `own` settings, see `optimizer_settings`)."""
    return build_optimizer(optimizer_settings(config, own))


def build_optimizer(opt: dict) -> optax.GradientTransformation:
    """The optimiser of resolved settings (`optimizer_settings`): global-norm clipping (clip_norm > 0),
    then Adam(W) (b1, b2; decoupled weight decay) or SGD (momentum; PyTorch's coupled weight decay,
    added to the gradient as `torch.optim.SGD` does), at a constant or cosine learning rate.

    Official TreeLoRA: Adam(0.9, 0.95), weight decay 0, constant lr 1e-4, clip 1.0.
    """
    name = opt["name"]
    if name not in OPTIMIZERS:
        raise ConfigError(f"unknown optimizer.name {name!r}: one of {', '.join(OPTIMIZERS)}")
    try:
        lr = float(opt["learning_rate"])
    except (TypeError, ValueError):
        lr = float("nan")
    if not lr > 0 or lr == float("inf"):
        raise ConfigError(f"optimizer.learning_rate must be a finite number > 0, got {opt['learning_rate']}")
    schedule = lr
    if opt.get("schedule", "constant") == "cosine":
        schedule = optax.cosine_decay_schedule(lr, max(int(opt.get("decay_steps", 1000)), 1))
    elif opt.get("schedule", "constant") != "constant":
        raise ConfigError(f"unknown optimizer.schedule {opt['schedule']!r}: constant or cosine")
    chain = []
    if float(opt.get("clip_norm", 0.0)) > 0:
        chain.append(optax.clip_by_global_norm(float(opt["clip_norm"])))
    weight_decay = float(opt.get("weight_decay", 0.0))
    if name == "sgd":
        momentum = float(opt.get("momentum", 0.9))
        if weight_decay > 0:
            chain.append(optax.add_decayed_weights(weight_decay))
        chain.append(optax.sgd(schedule, momentum=momentum if momentum > 0 else None))
        return optax.chain(*chain)
    b1, b2 = float(opt.get("b1", 0.9)), float(opt.get("b2", 0.999))
    if weight_decay > 0:
        chain.append(optax.adamw(schedule, b1=b1, b2=b2, weight_decay=weight_decay))
    else:
        chain.append(optax.adam(schedule, b1=b1, b2=b2))
    return optax.chain(*chain)


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
    if "segment_ids" in batch:  # packed rows (data.packing): each token takes its own example's weight
        segments = batch["segment_ids"]
        return batch["attention_mask"] * jnp.where(segments > 0, jnp.take(batch["weight"], jnp.maximum(segments - 1, 0)),
                                                   0.0)
    if "attention_mask" in batch:
        return batch["attention_mask"] * batch["weight"][:, None]
    return batch["weight"]


def loss_positions(seq: int, answer_window: Optional[int]) -> tuple[int, int]:
    """Static (start, stop) of the positions whose next-token logits the instruction loss reads.

    Position t predicts token t + 1, so a loss over the last `answer_window` tokens reads positions
    seq - answer_window - 1 .. seq - 2. None (or a window as long as the sequence): every position.
    """
    if answer_window is None or answer_window >= seq - 1:
        return 0, seq - 1
    return seq - 1 - int(answer_window), seq - 1


def loss_classes(consts, task, train_mask: str = "task") -> jax.Array:
    """[C] bool: the classes task `task`'s loss is over, its own (train_mask "task") or every seen one.
    A task of one class is trained against the seen classes: a softmax over one class has loss 0, so
    its head column and adapters would never be trained (one class per task, a task column's lone class)."""
    own, seen = consts["task_classes"][task], consts["seen_classes"][task]
    if train_mask != "task":
        return seen
    return jnp.where(jnp.sum(own) > 1, own, seen)


def make_task_loss(backbone, method, kind: str, train_mask: str = "task", head: str = "cosine",
                   head_scale: float = 20.0, answer_window: Optional[int] = None) -> Callable:
    """Returns task_loss(trainable, frozen, consts, method_state, batch, key) -> (loss, aux).

    answer_window (instruction streams): every loss token lies in the last `answer_window` columns
    of the batch (`tokenize.answer_window`: answers are right-aligned), so the LM head runs over
    those positions only. None: over the whole sequence.
    """

    def dropout_key(key):
        # Adapter dropout draws per layer and site (small integer fold-ins) under its own purpose,
        # so a method's draws from the same step key (keys.derive(key, NAME)) never reuse a mask's key.
        return None if key is None else keys.derive(key, "dropout")

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
            features = backbone.features(frozen, batch, adapters=adapters, delta=delta, rng=dropout_key(key))
            logits = head_logits(trainable["head"], features, head, head_scale)
            task = method_state["task"]
            mask = loss_classes(consts, task, train_mask)
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
            start, stop = loss_positions(tokens.shape[1], answer_window)
            logits = backbone.logits(frozen, tokens, attention,
                                     adapters=method.forward_adapters(trainable["adapters"], method_state),
                                     delta=delta, rng=dropout_key(key), window=(start, stop))
            # Predict token t+1 from position t; loss only on answer tokens (TRACE: labels -100 on the prompt).
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            target = tokens[:, start + 1:]
            nll = -jnp.take_along_axis(logp, target[..., None], axis=-1)[..., 0]
            mask = batch["loss_mask"][:, start + 1:].astype(jnp.float32) * batch["weight"][:, None]
            count = jnp.maximum(jnp.sum(mask), 1.0)
            loss = jnp.sum(nll * mask) / count
            return loss, {"answer_tokens": jnp.sum(mask), "tokens": jnp.sum(attention * batch["weight"][:, None]),
                          **records_of(delta)}

        return task_loss

    raise ValueError(f"unknown stream kind {kind!r}")


def keep_frozen_moments(new_opt_state, old_opt_state, mask, trainable):
    """Optimiser state with the frozen entries' per-parameter statistics (Adam's mu and nu: every
    sub-state shaped like `trainable`) taken from `old_opt_state`; scalars such as step counts are new.

    mask: like `trainable`, leaves broadcastable to its leaves, > 0 where an entry is trainable.
    """
    params_def = jax.tree.structure(trainable)
    if params_def.num_leaves < 2:  # a one-leaf trainable would match every scalar of the state too
        return new_opt_state
    like_params = lambda node: jax.tree.structure(node) == params_def

    def select(new, old):
        if not like_params(new):
            return new
        return jax.tree.map(lambda n, o, m: jnp.where(m > 0, n, o), new, old, mask)

    return jax.tree.map(select, new_opt_state, old_opt_state, is_leaf=like_params)


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
        mask = method.update_mask(method_state, state.trainable)
        if mask is not None:
            # Frozen entries' gradients are zeroed before the optimiser: otherwise they enter the
            # clip's global norm (a frozen leaf with a large gradient would shrink every trainable
            # update) and Adam's moments. `where`, not a product, so a non-finite frozen gradient stays out.
            grads = jax.tree.map(lambda g, m: jnp.where(m > 0, g, jnp.zeros_like(g)), grads, mask)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.trainable)
        if mask is not None:
            # A zero gradient still decays Adam's moments: frozen entries keep theirs, and never move.
            opt_state = keep_frozen_moments(opt_state, state.opt_state, mask, state.trainable)
            updates = jax.tree.map(lambda u, m: u * m.astype(u.dtype), updates, mask)
        if freeze_other_classes and updates.get("head"):
            columns = consts["task_classes"][method_state["task"]].astype(jnp.float32)
            updates = {**updates, "head": {"w": updates["head"]["w"] * columns[None, :],
                                           "b": updates["head"]["b"] * columns}}
        trainable = optax.apply_updates(state.trainable, updates)
        metrics = {"loss": loss_sum / accum, "accuracy": acc_sum / accum, "tokens": tokens,
                   "grad_norm": optax.tree.norm(grads), **method.step_metrics(method_state)}
        new_state = state.replace(trainable=trainable, opt_state=opt_state, method_state=method_state,
                                  step=state.step + 1)
        return new_state, metrics

    return step


def task_hooks(method):
    """(begin_task(state, task), begin_epoch(state, epoch, steps_per_epoch)): the method's start of a
    task and of an epoch on the train state, for the caller to jit."""

    def begin_task(state, task):
        adapters, method_state = method.begin_task(state.trainable["adapters"], state.method_state, task)
        trainable = {**state.trainable, "adapters": adapters}
        return state.replace(trainable=trainable, method_state=method_state)

    def begin_epoch(state, epoch, steps_per_epoch):
        return state.replace(method_state=method.begin_epoch(state.method_state, epoch, steps_per_epoch))

    return begin_task, begin_epoch
