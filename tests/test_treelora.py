"""TreeLoRA's bandit and regulariser against the formulas of reference/treelora.md §2.5-2.6."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import EndTaskContext, ModelInfo, StreamInfo
from jaxtree_lora.methods.treelora import TreeLoRA
from jaxtree_lora.models.common import Site
from jaxtree_lora.tree import bandit, tree as tree_lib


def test_bonus_at_zero_count():
    t, steps = 3, 10
    expected = np.sqrt(np.log(2 * steps * (t + 1) * (t + 2))) / np.sqrt(1e-5)
    assert float(bandit.bonus(jnp.zeros(()), t, steps)) == pytest.approx(expected, rel=1e-5)
    assert float(bandit.bonus(jnp.asarray(2.0), t, steps)) == pytest.approx(
        np.sqrt(np.log(2 * steps * 4 * 5)) / np.sqrt(4 + 1e-5), rel=1e-5)


def test_official_scores_add_the_minimum_and_favour_larger_distances():
    # Three explored arms, one module, mean distances 100 / 300 / 900 (sums are negative distances).
    counts = jnp.asarray([[4.0], [4.0], [4.0]])
    sums = -jnp.asarray([[400.0], [1200.0], [3600.0]])
    valid = jnp.asarray([True, True, True])
    scores = bandit.official_scores(sums, counts, valid, 5, 100)
    beta = float(bandit.bonus(jnp.asarray(4.0), 5, 100))
    raw = np.asarray([100.0, 300.0, 900.0]) + beta
    np.testing.assert_allclose(np.asarray(scores)[:, 0], raw + raw.min(), rtol=1e-5)
    normalised = np.asarray(bandit.normalise(scores, valid))[:, 0]
    probabilities = np.exp(normalised) / np.exp(normalised).sum()
    assert probabilities[0] < probabilities[1] < probabilities[2], "official code prefers the LARGER distance"
    # reference/treelora.md §2.5 (a NumPy re-run of the official scoring): about 0.20 / 0.26 / 0.54
    np.testing.assert_allclose(probabilities, [0.20, 0.26, 0.54], atol=0.015)


def test_selection_frequencies_match_softmax_probabilities():
    """Per-module draws follow softmax of the normalised scores (no tree reweight: a one-task tree)."""
    k, d = 3, 2
    counts = jnp.asarray([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    sums = -jnp.asarray([[30.0, 5.0], [40.0, 20.0], [5.0, 90.0]])
    valid = jnp.asarray([True, True, True])
    tree = tree_lib.empty(k)  # root without children: factor 1
    draw = jax.jit(jax.vmap(lambda key: bandit.select_official(key, sums, counts, valid, tree, 4, 50)[0]))
    choices = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), 20000)))
    _, probabilities = bandit.select_official(jax.random.PRNGKey(1), sums, counts, valid, tree, 4, 50)
    for module in range(d):
        frequencies = np.bincount(choices[:, module], minlength=k) / len(choices)
        expected = np.asarray(probabilities)[:, module]
        # 4 standard errors of a binomial proportion with n = 20000
        assert np.all(np.abs(frequencies - expected) < 4 * np.sqrt(expected * (1 - expected) / 20000) + 1e-3)


def test_bandit_update_uses_the_running_vector_including_the_step():
    running = jnp.asarray([[1.0, 2.0], [0.0, 0.0]])
    bank = jnp.asarray([[[0.0, 0.0], [1.0, 1.0]], [[3.0, 3.0], [0.0, 0.0]]])  # [K=2, D=2, F=2]
    sums, counts = bandit.update(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.asarray([1, 0]), running, bank)
    # module 0 chose task 1: |1-3| + |2-3| = 3; module 1 chose task 0: |0-1| + |0-1| = 2
    np.testing.assert_allclose(np.asarray(sums), [[0.0, -2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(np.asarray(counts), [[0.0, 1.0], [1.0, 0.0]])


INFO = ModelInfo(sites={"attn.q_proj": Site(4, 3), "attn.v_proj": Site(4, 2)}, num_layers=2, feature_dim=3)


def make(lam=0.5, **options):
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=2.0, dropout=0.0)
    method = TreeLoRA(lora=spec, lam=lam, **options)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, StreamInfo(num_tasks=3, max_tasks=3,
                                                                         kind="classification"))
    return method, adapters, state


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
    (total, aux), grads = jax.value_and_grad(lambda tr: method.loss(tr, state, {}, key, task_loss), has_aux=True)(
        trainable)
    (plain, _), plain_grads = jax.value_and_grad(task_loss, has_aux=True)(trainable, None)
    a = method.modules(adapters)
    chosen = bank[aux["treelora_choice"], jnp.arange(4)]
    alignment = float(jnp.sum(a * chosen))
    lam_t = 0.5 * 2 / 4
    # value: L - lam_t * L * R / (R + 1e-5) with R = -alignment  ~= (1 - lam_t) L
    r = -alignment
    assert float(total) == pytest.approx(float(plain) - lam_t * float(plain) * r / (r + 1e-5), rel=1e-5)
    # d/dA: dL/dA - lam_t * L * (-G_p) / (R + 1e-5)  (spec §2.6)
    expected = np.asarray(method.modules(plain_grads["adapters"])) + lam_t * float(plain) * np.asarray(chosen) / (r + 1e-5)
    np.testing.assert_allclose(np.asarray(method.modules(grads["adapters"])), expected, rtol=2e-4, atol=1e-6)
    for site in adapters:
        np.testing.assert_allclose(np.asarray(grads["adapters"][site]["b"]), np.asarray(plain_grads["adapters"][site]["b"]),
                                   rtol=1e-6, err_msg="B must get the task loss's gradient only")


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
    method, adapters, state = make()
    for task in range(3):
        _, state = method.begin_task(adapters, state, task)
        state = method.begin_epoch(state, 0, 2)
        moved = jax.tree.map(lambda x: x * (task + 2.0), adapters)
        aux = {"treelora_a": method.modules(moved), "treelora_choice": jnp.zeros((4,), jnp.int32)}
        state = method.after_step(method.after_step(state, aux), aux)
        _, state = method.end_task({"adapters": moved, "head": {}}, state, EndTaskContext(task=task, steps_per_epoch=2))
        np.testing.assert_allclose(np.asarray(state["bank"][task]), np.asarray(state["running"]), rtol=1e-6)
    nested = tree_lib.to_nested(state["tree"])
    assert sorted(nested["tasks"]) == [0, 1, 2] and "left" in nested
    shapes_before = jax.tree.map(jnp.shape, state)
    assert jax.tree.map(jnp.shape, state) == shapes_before


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
