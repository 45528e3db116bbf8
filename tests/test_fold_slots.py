"""Folding frozen per-task slots into the kernels (`Method.fold_past`, `Run.forward_weights`): the
folded forward (the current slot alone on W + the past slots' sum) is the same function as every slot
summed at every site, and a folded run ends like an unfolded one."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_loop import make_run, tiny_config


def random_slots(run, seed=0):
    """An initial state whose every slot has non-zero A and B (as after several tasks), at task 2."""
    state = run.initial_state()
    key = jax.random.PRNGKey(seed)
    adapters = jax.tree.map(lambda leaf: 0.3 * jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape),
                            state.trainable["adapters"])
    adapters, method_state = run.method.begin_task(adapters, state.method_state, jnp.asarray(2, jnp.int32))
    return state.replace(trainable={**state.trainable, "adapters": adapters}, method_state=method_state)


def features(run, method, weights, state, batch):
    delta = lambda site, adapter, x, key: method.delta(state.method_state, site, adapter, x, key)
    return np.asarray(run.backbone.features(weights, batch, adapters=state.trainable["adapters"], delta=delta))


@pytest.mark.parametrize("method", ["inclora", "o_lora", "inflora"])
def test_folded_forward_equals_every_slot_summed(method, tmp_path):
    config = tiny_config(method)
    config.train.max_tasks = 5
    run = make_run(config, tmp_path / "run")
    assert run.folding.fold and run.forward_method.folded and not run.method.folded
    state = random_slots(run)
    batch = {name: np.asarray(value[:8]) for name, value in run.stream.tasks[0].test.inputs.items()}
    unfolded = features(run, run.method, run.frozen, state, batch)
    folded = features(run, run.forward_method, run.forward_weights(state.trainable, state.method_state), state, batch)
    assert np.abs(unfolded - features(run, run.method, run.frozen, run.initial_state(), batch)).max() > 1e-2, \
        "the slots change nothing: the comparison shows nothing"
    np.testing.assert_allclose(folded, unfolded, atol=1e-6, rtol=0,
                               err_msg="the folded forward is not the sum of the current and the past slots")
    # The future slots (after task 2) carry weights too and must stay out of both.
    later = features(run, run.method, run.frozen, state.replace(method_state={
        **state.method_state, "slots": jnp.ones_like(state.method_state["slots"])}), batch)
    assert np.abs(later - unfolded).max() > 1e-3


def test_fold_adds_exactly_the_past_slots_to_the_kernels(tmp_path):
    """Hand case: W' - W = scale * sum_{k < task} A_k^T B_k^T at each adapted site; other weights untouched."""
    run = make_run(tiny_config("inclora"), tmp_path / "run")
    state = random_slots(run)
    folded = run.forward_weights(state.trainable, state.method_state)
    scale = run.method.lora.scale
    for site, leaves in state.trainable["adapters"].items():
        a, b = np.asarray(leaves["a"], np.float64), np.asarray(leaves["b"], np.float64)  # [L, K, r, d], [L, K, o, r]
        expected = scale * sum(np.einsum("lri,lor->lio", a[:, k], b[:, k]) for k in range(2))
        name = run.backbone.site_kernel(site)
        got = np.asarray(folded["layers"][name][...], np.float64) - np.asarray(run.frozen["layers"][name][...], np.float64)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    untouched = np.asarray(folded["layers"]["key"][...]) - np.asarray(run.frozen["layers"]["key"][...])
    assert not np.any(untouched), "a kernel without an adapter changed"
    assert run.forward_weights(state.trainable, state.method_state) is folded, "the same state folded twice"


@pytest.mark.parametrize("method,dropout", [("inflora", 0.0), pytest.param("inclora", 0.1, marks=pytest.mark.slow)])
def test_folded_run_ends_like_an_unfolded_one(method, dropout, tmp_path):
    """InfLoRA (dropout 0) folds in training and evaluation; IncLoRA at dropout 0.1 only in evaluation
    (its past slots see the dropped input in training). Same matrices, same final adapters."""
    def config(fold):
        c = tiny_config(method, fold_slots=fold)
        c.lora.dropout = dropout
        return c

    folded_run = make_run(config(True), tmp_path / "folded")
    folded = folded_run.fit()
    plain_run = make_run(config(False), tmp_path / "plain")
    plain = plain_run.fit()
    assert folded_run.folding.fold and not plain_run.folding.fold
    assert folded_run.folding.in_training == (dropout == 0.0)
    np.testing.assert_array_equal(folded["matrix"], plain["matrix"])
    np.testing.assert_array_equal(folded["ncm_matrix"], plain["ncm_matrix"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
                 jax.device_get(folded["state"].trainable), jax.device_get(plain["state"].trainable))
    assert folded_run.train_step._cache_size() == 1 and folded_run.folding.merge._cache_size() == 1, \
        "folding compiled the step or the fold again between tasks"


def test_methods_whose_slots_are_not_a_frozen_sum_do_not_fold(tmp_path):
    for method in ("sd_lora", "hide_lora", "seqlora", "treelora"):
        assert not make_run(tiny_config(method), tmp_path / method).folding.fold, method
    config = tiny_config("inclora")
    config.model.compute_dtype = "bfloat16"
    assert not make_run(config, tmp_path / "bf16").folding.fold, \
        "W + dW in bfloat16 rounds the past slots to W's precision"
    assert dataclasses.replace(make_run(tiny_config("inclora"), tmp_path / "x").method).describe().get("folded") is None


def test_memory_plan_counts_the_folded_copy_of_the_adapted_kernels():
    from experiments.configs import default
    from jaxtree_lora.train.memory import plan_run

    config = default.get_config()  # MiniLM: 6 layers, query and value 384 x 384
    plans = {}
    for method in ("seqlora", "inclora"):
        config.method.name = method
        plans[method] = plan_run(config, check=False).frozen_bytes
    assert plans["inclora"] - plans["seqlora"] == 2 * 6 * 384 * 384 * 4, "the folded kernels' copy is not counted"
