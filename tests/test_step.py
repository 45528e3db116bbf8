"""The jitted train step and the baseline methods, on a one-layer linear 'backbone' with one LoRA site.

The backbone here is deliberately trivial (features = x W + LoRA delta) so that every number can be
checked by hand; the real backbones are tested in test_llama/test_bert/test_vit and end to end in
test_loop.
"""
import dataclasses

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.inclora import IncLoRA
from jaxtree_lora.methods.seqlora import SeqLoRA
from jaxtree_lora.models.common import Site
from jaxtree_lora.models.heads import init_head
from jaxtree_lora.train.step import TrainState, loss_classes, make_optimizer, make_task_loss, make_train_step

D_IN, D_OUT, CLASSES = 6, 5, 4


@dataclasses.dataclass
class LinearBackbone:
    """features(x) = x W + delta("proj", adapter[layer 0], x): one layer, one site."""

    info = ModelInfo(sites={"proj": Site(D_IN, D_OUT)}, num_layers=1, feature_dim=D_OUT)

    def features(self, params, batch, *, adapters=None, delta=None, rng=None):
        x = batch["x"]
        y = x @ params["w"]
        if adapters and "proj" in adapters:
            layer0 = jax.tree.map(lambda leaf: leaf[0], adapters["proj"])
            y = y + delta("proj", layer0, x, rng)
        return y


def optimizer_config(lr=0.05, clip=0.0):
    return ml_collections.ConfigDict({"optimizer": {"learning_rate": lr, "b1": 0.9, "b2": 0.95, "clip_norm": clip,
                                                    "weight_decay": 0.0, "schedule": "constant"}})


def setup(method, max_tasks=3, lr=0.05):
    backbone = LinearBackbone()
    frozen = {"w": jax.random.normal(jax.random.PRNGKey(0), (D_IN, D_OUT))}
    adapters, method_state = method.init(jax.random.PRNGKey(1), backbone.info,
                                         StreamInfo(num_tasks=max_tasks, max_tasks=max_tasks,
                                                    kind="classification", num_classes=CLASSES))
    # Give B a non-zero start so A receives gradient from the first step (B = 0 would leave A's
    # gradient, and with it every check on A below, trivially zero).
    adapters = {site: {**leaves, "b": 0.3 * jax.random.normal(jax.random.fold_in(jax.random.PRNGKey(6), index),
                                                              leaves["b"].shape)}
                for index, (site, leaves) in enumerate(adapters.items())}
    trainable = {"adapters": adapters, "head": init_head(jax.random.PRNGKey(2), D_OUT, CLASSES)}
    optimizer = make_optimizer(optimizer_config(lr))
    state = TrainState(trainable=trainable, opt_state=optimizer.init(trainable), method_state=method_state,
                       step=jnp.zeros((), jnp.int32))
    consts = {"task_classes": jnp.ones((max_tasks, CLASSES), bool), "seen_classes": jnp.ones((max_tasks, CLASSES), bool)}
    task_loss = make_task_loss(backbone, method, "classification")
    return backbone, frozen, state, consts, optimizer, task_loss


def batch_of(key, rows, accum=1):
    x = jax.random.normal(key, (accum, rows // accum, D_IN))
    labels = jax.random.randint(jax.random.fold_in(key, 1), (accum, rows // accum), 0, CLASSES)
    return {"x": x, "labels": labels, "weight": jnp.ones((accum, rows // accum))}


def test_accumulation_matches_one_big_batch():
    """Two micro-batches of 4 must give the same update as one batch of 8 (mean loss, equal weights)."""
    method = SeqLoRA(lora=lora_lib.LoraSpec(targets=("proj",), rank=2, alpha=4.0, dropout=0.0))
    _, frozen, state, consts, optimizer, task_loss = setup(method)
    step = jax.jit(make_train_step(method, task_loss, optimizer))
    big = batch_of(jax.random.PRNGKey(3), 8, accum=1)
    small = jax.tree.map(lambda leaf: leaf.reshape((2, 4) + leaf.shape[2:]), big)
    one, _ = step(state, frozen, consts, big, jax.random.PRNGKey(4))
    two, _ = step(state, frozen, consts, small, jax.random.PRNGKey(4))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), one.trainable, two.trainable)


def test_inclora_trains_only_the_current_slot_and_sums_all_learned_slots():
    method = IncLoRA(lora=lora_lib.LoraSpec(targets=("proj",), rank=2, alpha=2.0, dropout=0.0))
    backbone, frozen, state, consts, optimizer, task_loss = setup(method)
    step = jax.jit(make_train_step(method, task_loss, optimizer))
    initial = jax.device_get(state.trainable["adapters"]["proj"])
    adapters, method_state = method.begin_task(state.trainable["adapters"], state.method_state, 0)
    state = state.replace(method_state=method_state)
    for index in range(3):
        state, _ = step(state, frozen, consts, batch_of(jax.random.PRNGKey(10 + index), 8), jax.random.PRNGKey(index))
    after_task0 = jax.device_get(state.trainable["adapters"]["proj"])
    _, method_state = method.begin_task(state.trainable["adapters"], state.method_state, 1)
    state = state.replace(method_state=method_state)
    for index in range(3):
        state, _ = step(state, frozen, consts, batch_of(jax.random.PRNGKey(20 + index), 8), jax.random.PRNGKey(index))
    after_task1 = jax.device_get(state.trainable["adapters"]["proj"])
    # Slot 0 is frozen during task 1 even though Adam still carries momentum for it.
    np.testing.assert_array_equal(after_task0["a"][:, 0], after_task1["a"][:, 0], "a frozen slot moved")
    np.testing.assert_array_equal(after_task0["b"][:, 0], after_task1["b"][:, 0], "a frozen slot moved")
    assert np.abs(after_task1["b"][:, 1]).sum() > 0, "the current slot was not trained"
    assert np.abs(after_task0["a"][:, 0] - initial["a"][:, 0]).sum() > 0, "A of the current slot was not trained"
    np.testing.assert_array_equal(after_task1["a"][:, 2], initial["a"][:, 2], "a future slot was trained")
    np.testing.assert_array_equal(after_task1["b"][:, 2], initial["b"][:, 2], "a future slot was trained")
    # The delta is the sum of the learned slots' deltas (slot 2 is masked out even if it were non-zero).
    x = jax.random.normal(jax.random.PRNGKey(5), (3, D_IN))
    layer0 = jax.tree.map(lambda leaf: leaf[0], state.trainable["adapters"]["proj"])
    got = method.delta(state.method_state, "proj", layer0, x, None)
    expected = sum(lora_lib.apply({"a": layer0["a"][k], "b": layer0["b"][k]}, x, method.lora.scale) for k in (0, 1))
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_train_step_compiles_once_across_tasks():
    """A new task must not compile the step again: the task index is traced data in the method state."""
    method = IncLoRA(lora=lora_lib.LoraSpec(targets=("proj",), rank=2, alpha=2.0, dropout=0.0))
    _, frozen, state, consts, optimizer, task_loss = setup(method)
    traces = []
    raw = make_train_step(method, task_loss, optimizer)

    def counted(*args):
        traces.append(1)
        return raw(*args)

    step = jax.jit(counted)
    begin = jax.jit(method.begin_task)
    for task in range(3):
        adapters, method_state = begin(state.trainable["adapters"], state.method_state, jnp.asarray(task, jnp.int32))
        state = state.replace(method_state=method_state)
        state, _ = step(state, frozen, consts, batch_of(jax.random.PRNGKey(task), 8), jax.random.PRNGKey(task))
    assert len(traces) == 1, f"train step traced {len(traces)} times over 3 tasks"


def test_make_optimizer_clips_the_global_norm_before_adam():
    """make_optimizer with clip_norm c: each step's gradient is scaled to global norm <= c, then Adam.
    The same optimiser without clipping, fed the gradients scaled by hand, must give the same
    parameters; fed them unscaled it must not (or the case does not exercise the clip)."""
    grads = [{"a": jnp.asarray([30.0, -40.0]), "b": jnp.asarray([0.0])},   # norm 50: clipped to 1
             {"a": jnp.asarray([0.3, 0.1]), "b": jnp.asarray([-0.2])}]     # norm < 1: unchanged
    scaled = [jax.tree.map(lambda g: g / 50.0, grads[0]), grads[1]]

    def run(optimizer, sequence):
        params = {"a": jnp.zeros(2), "b": jnp.zeros(1)}
        state = optimizer.init(params)
        for g in sequence:
            updates, state = optimizer.update(g, state, params)
            params = jax.tree.map(jnp.add, params, updates)
        return params

    clipped = run(make_optimizer(optimizer_config(lr=0.1, clip=1.0)), grads)
    by_hand = run(make_optimizer(optimizer_config(lr=0.1, clip=0.0)), scaled)
    unclipped = run(make_optimizer(optimizer_config(lr=0.1, clip=0.0)), grads)
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6), clipped, by_hand)
    assert not np.allclose(np.asarray(clipped["a"]), np.asarray(unclipped["a"]), rtol=1e-3), \
        "clipping made no difference: the case does not test it"
    with pytest.raises(ValueError, match="learning_rate"):
        make_optimizer(optimizer_config(lr=-1.0))


def test_sgd_follows_torch_sgd_with_momentum_and_coupled_weight_decay():
    """optimizer.name "sgd" is torch.optim.SGD(lr, momentum, weight_decay): buf = m buf + (g + wd p),
    p -= lr buf (the first step's buffer is the gradient itself), computed here by hand for three steps.
    Adam's update, or decoupled decay, would give other numbers."""
    config = ml_collections.ConfigDict({"optimizer": {"name": "sgd", "learning_rate": 0.1, "momentum": 0.9,
                                                      "weight_decay": 0.01, "clip_norm": 0.0, "schedule": "constant"}})
    optimizer = make_optimizer(config)
    grads = [np.array([1.0, -2.0]), np.array([0.5, 0.5]), np.array([-1.0, 0.0])]
    params = {"w": jnp.asarray([1.0, 1.0])}
    state = optimizer.init(params)
    p, buf = np.array([1.0, 1.0]), None
    for g in grads:
        updates, state = optimizer.update({"w": jnp.asarray(g)}, state, params)
        params = optax.apply_updates(params, updates)
        d = g + 0.01 * p
        buf = d if buf is None else 0.9 * buf + d
        p = p - 0.1 * buf
    np.testing.assert_allclose(np.asarray(params["w"]), p, rtol=1e-6)
    with pytest.raises(ValueError, match="optimizer.name"):
        make_optimizer(ml_collections.ConfigDict({"optimizer": {"name": "lion", "learning_rate": 0.1}}))


class LeafMethod:
    """A stand-in method over two plain leaves: `update_mask` freezes "frozen" (from `frozen_from`
    on: the step's method_state["open"] says whether it is still trainable)."""

    record = None

    def loss(self, trainable, state, batch, key, task_loss):
        return task_loss(trainable, key)

    def after_step(self, state, aux, grads):
        return state

    def step_metrics(self, state):
        return {}

    def update_mask(self, state, trainable):
        if "frozen" not in trainable:
            return None
        return {"live": jnp.ones((), jnp.float32), "frozen": state["open"]}


def leaf_task_loss(huge):
    """loss = 1/2 |live - target|^2 + huge * sum(frozen): the frozen leaf's gradient is `huge` per entry."""

    def task_loss(trainable, frozen, consts, method_state, batch, key):
        loss = 0.5 * jnp.sum(jnp.square(trainable["live"] - batch["target"][0]))
        if "frozen" in trainable:
            loss = loss + huge * jnp.sum(trainable["frozen"])
        return loss, {}

    return task_loss


def test_frozen_leaves_do_not_enter_clipping_or_adam_moments():
    """A frozen leaf with a huge gradient must change nothing: the trainable leaf's updates equal those
    of a run without that leaf at all (the clip's global norm is over trainable entries only), and
    Adam's moments of the frozen leaf stay as they were when it was frozen."""
    optimizer = make_optimizer(ml_collections.ConfigDict(
        {"optimizer": {"learning_rate": 0.1, "b1": 0.9, "b2": 0.95, "clip_norm": 0.5, "schedule": "constant"}}))
    method = LeafMethod()
    live = jnp.array([0.3, -1.2, 2.0])
    targets = [jnp.array([2.0, 1.0, -1.0]), jnp.array([0.1, 0.0, 0.2]), jnp.array([-3.0, 4.0, 0.5])]

    def run(trainable, open_steps, huge):
        step = jax.jit(make_train_step(method, leaf_task_loss(huge), optimizer))
        state = TrainState(trainable=trainable, opt_state=optimizer.init(trainable), method_state={"open": 1.0},
                           step=jnp.zeros((), jnp.int32))
        history = []
        for index, target in enumerate(targets):
            state = state.replace(method_state={"open": jnp.float32(index < open_steps)})
            state, _ = step(state, None, {}, {"target": target[None]}, jax.random.PRNGKey(index))
            history.append(state)
        return history

    alone = run({"live": live}, open_steps=0, huge=0.0)
    with_frozen = run({"live": live, "frozen": jnp.zeros((4,))}, open_steps=0, huge=1e12)
    for step_alone, step_with in zip(alone, with_frozen):
        np.testing.assert_allclose(step_with.trainable["live"], step_alone.trainable["live"], rtol=1e-6,
                                   err_msg="a frozen leaf's gradient changed the trainable leaf's update")
        np.testing.assert_array_equal(step_with.trainable["frozen"], 0.0, "a frozen leaf moved")

    # Trainable for the first step, frozen after: its Adam moments stay those of step 1.
    history = run({"live": live, "frozen": jnp.zeros((4,))}, open_steps=1, huge=3.0)
    adam = lambda opt_state: next(s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: hasattr(s, "mu"))
                                  if hasattr(s, "mu"))
    first = adam(history[0].opt_state)
    assert float(jnp.abs(first.mu["frozen"]).sum()) > 0, "the open step did not reach Adam"
    for later in history[1:]:
        np.testing.assert_array_equal(adam(later.opt_state).mu["frozen"], first.mu["frozen"])
        np.testing.assert_array_equal(adam(later.opt_state).nu["frozen"], first.nu["frozen"])
        np.testing.assert_array_equal(later.trainable["frozen"], history[0].trainable["frozen"])


def test_a_task_of_one_class_is_trained_against_the_seen_classes():
    """One class per task (or a task column's lone class): a softmax over the task's one class has loss 0
    and no gradient, so its head column never learned and the run scored it 0 when told apart from the
    earlier classes. It is trained against the seen classes; the earlier columns stay frozen."""
    method = SeqLoRA(lora=lora_lib.LoraSpec(targets=("proj",), rank=2, alpha=4.0, dropout=0.0))
    _, frozen, state, _, optimizer, task_loss = setup(method)
    task_classes = jnp.asarray([[1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]], bool)  # tasks of 2, 1 and 1 classes
    consts = {"task_classes": task_classes, "seen_classes": jnp.cumsum(task_classes, axis=0) > 0}
    _, method_state = method.begin_task(state.trainable["adapters"], state.method_state, 1)
    state = state.replace(method_state=method_state)
    batch = {**batch_of(jax.random.PRNGKey(3), 8), "labels": jnp.full((1, 8), 2)}
    step = jax.jit(make_train_step(method, task_loss, optimizer, freeze_other_classes=True))
    new, metrics = step(state, frozen, consts, batch, jax.random.PRNGKey(4))
    assert float(metrics["loss"]) > 0.1 and float(metrics["grad_norm"]) > 0, "the one-class task learned nothing"
    moved = np.abs(np.asarray(new.trainable["head"]["w"] - state.trainable["head"]["w"])).sum(axis=0)
    assert moved[2] > 0 and (moved[[0, 1, 3]] == 0).all(), f"head columns moved: {moved}"
    # A task of two or more classes keeps its task-local softmax: only its own classes enter the loss.
    np.testing.assert_array_equal(loss_classes(consts, 0), [True, True, False, False])
    np.testing.assert_array_equal(loss_classes(consts, 2), [True, True, True, True])
    np.testing.assert_array_equal(loss_classes(consts, 2, "seen"), [True, True, True, True])
