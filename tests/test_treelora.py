"""The TreeLoRA method on the Method contract: layout, running vector, regulariser (docs/METHODS.md,
TreeLoRA), end of task, options, and one compiled step for every task. The bandit itself is in
tests/test_bandit.py, the tree in tests/test_tree.py."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import TaskContext, ModelInfo, StreamInfo
from jaxtree_lora.methods.treelora_llm import TreeLoRALLM as TreeLoRA
from jaxtree_lora.models.common import Site
from jaxtree_lora.tree import tree as tree_lib


INFO = ModelInfo(sites={"attn.q_proj": Site(4, 3), "attn.v_proj": Site(4, 2)}, num_layers=2, feature_dim=3)


def make(lam=0.5, **options):
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=2.0, dropout=0.0)
    method = TreeLoRA(lora=spec, lam=lam, **options)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, StreamInfo(num_tasks=3, max_tasks=3,
                                                                         kind="classification"))
    return method, adapters, state


def second_task_step(method, adapters, state):
    """From `make`'s adapters and state: a micro-step of task 1 (a random stored vector for task 0, t = 3 of T = 4: lam_t = 0.375, the
    regulariser on) on a quadratic task loss of the layer-1 adapters: (state, aux, the step's gradients
    of the total loss, the task loss's own gradients)."""
    bank = jax.random.normal(jax.random.PRNGKey(3), state["bank"].shape)
    state = {**state, "bank": bank, "tree": tree_lib.build(bank, 1)}
    _, state = method.begin_task(adapters, state, 1)
    state = method.begin_epoch(state, 0, 4)
    state = {**state, "t": jnp.asarray(3, jnp.int32)}
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 4))
    trainable = {"adapters": jax.tree.map(lambda v: v + 0.1, adapters), "head": {}}

    def task_loss(trainable, key):
        return sum(jnp.sum(lora_lib.apply(jax.tree.map(lambda l: l[1], trainable["adapters"][s]), x, 1.0) ** 2)
                   for s in trainable["adapters"]), {}

    (_, aux), grads = jax.value_and_grad(lambda tr: method.loss(tr, state, {}, jax.random.PRNGKey(0), task_loss),
                                         has_aux=True)(trainable)
    return state, aux, grads, jax.grad(lambda tr: task_loss(tr, None)[0])(trainable)


def test_modules_are_layer_major():
    method, adapters, _ = make()
    a = method.modules(adapters)
    assert a.shape == (4, 8), "D = 2 layers x 2 sites, F = r * d_in"
    np.testing.assert_array_equal(a[0], adapters["attn.q_proj"]["a"][0].reshape(-1))
    np.testing.assert_array_equal(a[1], adapters["attn.v_proj"]["a"][0].reshape(-1))
    np.testing.assert_array_equal(a[2], adapters["attn.q_proj"]["a"][1].reshape(-1))


def test_running_average_has_the_factor_d_and_the_lambda_ramps():
    method, adapters, state = make()
    _, state = method.begin_task(adapters, state, 0)
    state = method.begin_epoch(state, 0, 4)
    a = method.modules(adapters)
    for step in range(2):
        aux = {"treelora_a": a, "treelora_choice": jnp.zeros((4,), jnp.int32)}
        assert float(method.lam_at(state)) == pytest.approx(0.5 * step / 4), "lambda_t = lambda * t / T"
        state = method.after_step(state, aux)
    np.testing.assert_allclose(np.asarray(state["running"]), 4 * 2 * np.asarray(a) / 4, rtol=1e-6,
                               err_msg="c = D * sum_t A_t / T with D = 4 modules")
    no_factor, _, s2 = make(d_factor=False)
    s2 = no_factor.begin_epoch(s2, 0, 4)
    s2 = no_factor.after_step(s2, {"treelora_a": a, "treelora_choice": jnp.zeros((4,), jnp.int32)})
    np.testing.assert_allclose(np.asarray(s2["running"]), np.asarray(a) / 4, rtol=1e-6)


def test_regulariser_gradient_matches_the_closed_form_and_spares_b():
    method, adapters, state = make(lam=0.5)
    # Pretend task 0 ended with some stored vector, then train task 1 at micro-step t = 2 of T = 4.
    bank = jax.random.normal(jax.random.PRNGKey(3), state["bank"].shape)
    state = {**state, "bank": bank}
    state = {**state, "tree": tree_lib.build(bank, 1)}
    _, state = method.begin_task(adapters, state, 1)
    state = method.begin_epoch(state, 0, 4)
    state = {**state, "t": jnp.asarray(2, jnp.int32)}
    adapters = jax.tree.map(lambda x: x + 0.1, adapters)
    x = jax.random.normal(jax.random.PRNGKey(4), (5, 4))

    def task_loss(trainable, key):
        out = sum(jnp.sum(lora_lib.apply(jax.tree.map(lambda l: l[0], trainable["adapters"][s]), x, 1.0) ** 2)
                  for s in trainable["adapters"])
        return out, {}

    trainable = {"adapters": adapters, "head": {}}
    key = jax.random.PRNGKey(9)
    (total, aux), grads = jax.jit(jax.value_and_grad(lambda tr: method.loss(tr, state, {}, key, task_loss),
                                                     has_aux=True))(trainable)
    (plain, _), plain_grads = jax.value_and_grad(task_loss, has_aux=True)(trainable, None)
    a = method.modules(adapters)
    chosen = bank[aux["treelora_choice"], jnp.arange(4)]
    alignment = float(jnp.sum(a * chosen))
    lam_t = 0.5 * 2 / 4
    # value: L - lam_t * L * R / (R + 1e-5) with R = -alignment  ~= (1 - lam_t) L
    r = -alignment
    assert float(total) == pytest.approx(float(plain) - lam_t * float(plain) * r / (r + 1e-5), rel=1e-5)
    # d/dA: dL/dA - lam_t * L * (-G_p) / (R + 1e-5)  (the official regulariser)
    plain_a = np.asarray(method.modules(plain_grads["adapters"]))
    expected = plain_a + lam_t * float(plain) * np.asarray(chosen) / (r + 1e-5)
    np.testing.assert_allclose(np.asarray(method.modules(grads["adapters"])), expected, rtol=2e-4, atol=1e-6)
    for site in adapters:
        np.testing.assert_allclose(np.asarray(grads["adapters"][site]["b"]),
                                   np.asarray(plain_grads["adapters"][site]["b"]), rtol=1e-6,
                                   err_msg="B must get the task loss's gradient only")


@pytest.mark.parametrize("regulariser", ["official", "paper_l1"])
def test_regulariser_share_is_its_gradient_norm_over_the_task_gradient_norm(regulariser):
    """reg_ratio (logged as treelora_reg_ratio) = ||d(L_total - L)/dA|| / ||dL/dA||, both from autodiff
    here: wrong if the closed-form gradient in aux drifts from the penalty the loss really adds."""
    method, adapters, state = make(lam=0.5, regulariser=regulariser)
    state, aux, grads, plain_grads = second_task_step(method, adapters, state)
    plain = np.asarray(method.modules(plain_grads["adapters"]))
    penalty = np.asarray(method.modules(grads["adapters"])) - plain
    np.testing.assert_allclose(np.asarray(aux["treelora_regulariser_grad"]), penalty, rtol=1e-4, atol=1e-6)
    new = method.after_step(state, aux, grads)
    expected = np.linalg.norm(penalty) / np.linalg.norm(plain)
    assert expected > 1e-3, "the regulariser must act here, or the test proves nothing"
    assert float(method.step_metrics(new)["treelora_reg_ratio"]) == pytest.approx(expected, rel=1e-3)
    first = method.after_step({**state, "task": jnp.asarray(0, jnp.int32)}, aux, grads)
    assert float(first["reg_ratio"]) == 0.0, "no regulariser (and no share) on the first task"


def test_no_regulariser_and_no_statistics_during_the_first_task():
    method, adapters, state = make()
    _, state = method.begin_task(adapters, state, 0)
    state = method.begin_epoch(state, 0, 4)

    def task_loss(trainable, key):
        return jnp.asarray(2.0), {}

    total, aux = method.loss({"adapters": adapters, "head": {}}, state, {}, jax.random.PRNGKey(0), task_loss)
    assert float(total) == 2.0
    state = method.after_step(state, aux)
    assert float(jnp.sum(state["counts"])) == 0.0 and float(jnp.sum(state["sums"])) == 0.0


def test_end_task_stores_the_running_vector_and_rebuilds_the_tree():
    """G[task] = c = D * sum_t A_t / T (here two steps of the same A over T = 2: c = 4 A with D = 4), the
    rows of later tasks stay 0, the tree is the one built from the expected bank, and the state keeps
    the shapes init gave it."""
    method, adapters, state = make()
    initial_shapes = jax.tree.map(jnp.shape, state)
    expected_bank = np.zeros(state["bank"].shape, np.float32)
    for task in range(3):
        _, state = method.begin_task(adapters, state, task)
        state = method.begin_epoch(state, 0, 2)
        moved = jax.tree.map(lambda x: x * (task + 2.0), adapters)
        aux = {"treelora_a": method.modules(moved), "treelora_choice": jnp.zeros((4,), jnp.int32)}
        state = method.after_step(method.after_step(state, aux), aux)
        _, state = method.end_task({"adapters": moved, "head": {}}, state, TaskContext(task=task, steps_per_epoch=2))
        expected_bank[task] = 4.0 * (task + 2.0) * np.asarray(method.modules(adapters))
        np.testing.assert_allclose(np.asarray(state["bank"]), expected_bank, rtol=1e-6, atol=1e-7,
                                   err_msg="G[task] = D * mean of A over the epoch; other rows unchanged")
    expected_tree = tree_lib.to_nested(tree_lib.build(jnp.asarray(expected_bank), 3))
    assert tree_lib.to_nested(state["tree"]) == expected_tree
    assert sorted(expected_tree["tasks"]) == [0, 1, 2] and "left" in expected_tree
    assert jax.tree.map(jnp.shape, state) == initial_shapes, "end_task must keep the state's shapes"


@pytest.mark.parametrize("selection", ["official", "paper_lcb", "random"])
def test_selection_options_pick_only_past_tasks(selection):
    method, adapters, state = make(selection=selection)
    bank = jax.random.normal(jax.random.PRNGKey(3), state["bank"].shape)
    state = {**state, "bank": bank, "tree": tree_lib.build(bank, 2)}
    _, state = method.begin_task(adapters, state, 2)
    state = method.begin_epoch(state, 0, 8)
    for step in range(6):
        choice = method.select(state, jax.random.PRNGKey(step))
        assert np.all(np.asarray(choice) < 2), "only tasks 0 and 1 are in the past"
        aux = {"treelora_a": method.modules(adapters), "treelora_choice": choice}
        state = method.after_step(state, aux)
    if selection == "paper_lcb":
        # unexplored arms first: after 2 steps every module has tried both past tasks once
        assert np.all(np.asarray(state["counts"])[:2] >= 1)


def test_gradient_task_vector_accumulates_the_task_loss_gradient_only():
    """task_vector 'gradient': c += D * dL/dA / T, with the regulariser's share of the step's gradient
    removed (the paper's expected task gradient, not the gradient of the total loss)."""
    method, adapters, state = make(lam=0.5, task_vector="gradient")
    state, aux, grads, plain_grads = second_task_step(method, adapters, state)
    change = jnp.abs(method.modules(grads["adapters"]) - method.modules(plain_grads["adapters"]))
    assert float(jnp.max(change)) > 1e-4, \
        "the regulariser should change the step's gradient here, or the test proves nothing"
    new = method.after_step(state, aux, grads)
    np.testing.assert_allclose(np.asarray(new["running"]), 4 * np.asarray(method.modules(plain_grads["adapters"])) / 4,
                               rtol=1e-4, atol=1e-6, err_msg="c must accumulate D * dL/dA / T")
    with pytest.raises(TypeError, match="needs the step's gradients"):
        method.after_step(state, aux)


def test_bad_options_and_shapes_are_refused_with_the_fix():
    from jaxtree_lora.errors import ConfigError

    with pytest.raises(ConfigError, match="selection must be one of"):
        TreeLoRA(selection="greedy")
    with pytest.raises(ConfigError, match="task_vector 'lora_a_average'"):
        TreeLoRA(regulariser="paper_l1", task_vector="gradient")
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "mlp.down_proj"), rank=2, alpha=2.0)
    sites = {"attn.q_proj": Site(4, 4), "mlp.down_proj": Site(8, 4)}
    with pytest.raises(ConfigError, match="same d_in"):
        TreeLoRA(lora=spec).init(jax.random.PRNGKey(0), ModelInfo(sites=sites, num_layers=1, feature_dim=4),
                                 StreamInfo(num_tasks=2, max_tasks=2, kind="classification"))
    with pytest.raises(ConfigError, match="max_tasks"):
        make_with = TreeLoRA(lora=lora_lib.LoraSpec(rank=2), max_tasks=2)
        make_with.init(jax.random.PRNGKey(0), INFO, StreamInfo(num_tasks=3, max_tasks=3, kind="classification"))


def test_max_tasks_and_max_modules_fix_the_state_shapes():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=2.0, max_modules=3)
    method = TreeLoRA(lora=spec, max_tasks=6)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, StreamInfo(num_tasks=3, max_tasks=3,
                                                                            kind="classification"))
    assert state["bank"].shape == (6, 3, 8), "bank [max_tasks, D, F]: D = first 3 modules, F = r * d_in"
    assert method.modules(adapters).shape == (3, 8)
    assert state["tree"].members.shape == (11, 6), "tree nodes 2 * max_tasks - 1"


def test_one_compiled_step_for_every_task_end_to_end():
    """A tiny linear model through three tasks: the jitted micro-step (loss, gradient, after_step)
    compiles once, end_task compiles once, the bank and the tree grow, and the bandit counts the
    selections of tasks 1 and 2 only (D per micro-step)."""
    from jaxtree_lora.methods import treelora_llm as treelora_module

    import optax

    method, adapters, state = make(lam=0.5)
    trainable = {"adapters": adapters, "head": {}}
    traces = []
    # The official optimiser: clipping at 1.0, then Adam. (Plain SGD can blow up: the regulariser's
    # gradient lam_t L G / R is unbounded as the alignment R passes through 0.)
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.adam(1e-2, b1=0.9, b2=0.95))
    opt_state = optimizer.init(trainable)

    def step(trainable, opt_state, state, x, key):
        traces.append(1)

        def task_loss(trainable, key):
            out = sum(lora_lib.apply(jax.tree.map(lambda l: l[0], trainable["adapters"][s]), x, 4.0).sum(-1)
                      for s in sorted(trainable["adapters"]))
            return jnp.mean((out - 1.0) ** 2), {}

        (loss, aux), grads = jax.value_and_grad(lambda tr: method.loss(tr, state, {}, key, task_loss),
                                                has_aux=True)(trainable)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        return optax.apply_updates(trainable, updates), opt_state, method.after_step(state, aux, grads), loss

    step = jax.jit(step)
    steps_per_epoch, counted, cache_sizes = 3, [], []
    for task in range(3):
        trainable["adapters"], state = method.begin_task(trainable["adapters"], state, task)
        for epoch in range(2):
            state = method.begin_epoch(state, epoch, steps_per_epoch)
            for index in range(steps_per_epoch):
                key = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(task), epoch), index)
                x = jax.random.normal(key, (6, 4)) + task
                trainable, opt_state, state, loss = step(trainable, opt_state, state, x, key)
                assert np.isfinite(float(loss))
        counted.append(float(jnp.sum(state["counts"])))
        trainable, state = method.end_task(trainable, state, TaskContext(task=task, steps_per_epoch=steps_per_epoch))
        cache_sizes.append(treelora_module._store_task._cache_size())
        assert sorted(tree_lib.to_nested(state["tree"])["tasks"]) == list(range(task + 1))
    assert len(traces) == 1, "a new task must not compile the step again"
    assert cache_sizes[0] == cache_sizes[-1], "end_task must not compile again for a new task"
    assert counted == [0.0, 4.0 * steps_per_epoch, 4.0 * steps_per_epoch], \
        "statistics: none in task 0, D selections per micro-step in the last epoch of tasks 1, 2"
    assert float(jnp.sum(jnp.abs(state["bank"][2]))) > 0 and float(jnp.sum(jnp.abs(state["bank"][2:]))) == \
        float(jnp.sum(jnp.abs(state["bank"][2])))


def test_treelora_run_differs_from_seqlora_once_the_regulariser_is_on(tmp_path):
    """The same stream, seed and LoRA: TreeLoRA trains task 0 exactly as sequential LoRA (no past task,
    no regulariser), then its regulariser and bandit must change the training. If TreeLoRA's terms
    were inert (lam_t stuck at 0, a zero penalty gradient) the two runs would end equal."""
    import json

    from test_loop import make_run, tiny_config

    runs = {}
    for name in ("seqlora", "treelora"):
        config = tiny_config(name)
        config.method.treelora.lam = 0.5
        run = make_run(config, tmp_path / name)
        outcome = run.fit()
        records = [json.loads(line) for line in open(tmp_path / name / "metrics.jsonl")]
        losses = {task: [r["loss"] for r in records if r["type"] == "step" and r["task"] == task] for task in range(3)}
        runs[name] = (outcome, losses)
    (seq, seq_losses), (tree, tree_losses) = runs["seqlora"], runs["treelora"]
    np.testing.assert_allclose(tree_losses[0], seq_losses[0], rtol=1e-5,
                               err_msg="task 0 has no past task: TreeLoRA must train as sequential LoRA")
    for task in (1, 2):
        assert not np.allclose(tree_losses[task], seq_losses[task], rtol=1e-3), f"task {task}: the same losses"
    a_seq = jax.tree.leaves(jax.device_get(seq["state"].trainable["adapters"]))
    a_tree = jax.tree.leaves(jax.device_get(tree["state"].trainable["adapters"]))
    assert max(float(np.max(np.abs(x - y))) for x, y in zip(a_seq, a_tree)) > 1e-3, \
        "the final adapters are the same: the regulariser did not act"
    assert float(np.sum(np.asarray(tree["state"].method_state["counts"]))) > 0, "the bandit never selected"
