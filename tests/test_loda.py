"""LoDA: the subspace solvers and the recalibration on hand-computed cases, the merge that keeps the
model's function (task 0) or shrinks the general branch by 1 - eta (later tasks), GAO's class halves,
and a whole run (compile once, tasks learned, merged slots filled)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import ModelInfo, StreamInfo, TaskContext
from jaxtree_lora.methods.loda import LoDA, generalised_top, recalibration, top_eigenvectors
from jaxtree_lora.models.common import Site

from test_loop import make_run, tiny_config

INFO = ModelInfo(sites={"q": Site(3, 2)}, num_layers=1, feature_dim=3)
STREAM = StreamInfo(num_tasks=2, max_tasks=2, kind="classification")


def test_subspace_solvers():
    np.testing.assert_allclose(np.abs(top_eigenvectors(np.diag([1.0, 5.0, 3.0]), 2)), np.eye(3)[:, [1, 2]])
    # Equal new energy everywhere, old energy 4, 1, 0.25: the ratio is largest along e3, then e2.
    directions = generalised_top(np.eye(3), np.diag([4.0, 1.0, 0.25]), 2)
    np.testing.assert_allclose(np.abs(directions), np.eye(3)[:, [2, 1]], atol=1e-9)
    # A singular past (a direction never seen) is handled by jitter, and that direction wins.
    directions = generalised_top(np.eye(3), np.diag([1.0, 1.0, 0.0]), 1)
    np.testing.assert_allclose(np.abs(directions[:, 0]), [0.0, 0.0, 1.0], atol=1e-6)


def test_recalibration_eta_on_hand_numbers():
    a = np.array([[1.0, 0.0], [0.0, 2.0]])
    eta = recalibration(a, previous=np.diag([2.0, 1.0]), current=np.diag([1.0, 0.0]), kappa=3.0)
    # row 1: e_prev 2, e_cur 1 -> 2 / (2 + 3) = 0.4; row 2: e_prev 4, e_cur 0 -> 1
    np.testing.assert_allclose(eta, [0.4, 1.0], rtol=1e-9)


def delta_of(method, adapters, state, x):
    layer = jax.tree.map(lambda leaf: leaf[0], method.forward_adapters(adapters, state)["q"])
    return np.asarray(method.delta(state, "q", layer, x, None))


def test_merge_keeps_the_function_at_task_zero_and_shrinks_by_one_minus_eta_later():
    method = LoDA(lora=lora_lib.LoraSpec(targets=("q",), rank=1), double_count=False)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, STREAM)
    rng = np.random.default_rng(0)
    trained = {"q": {"a_g": jnp.asarray([[[1.0, 0.0, 0.0]]]), "b_g": jnp.asarray(rng.normal(size=(1, 2, 1)), jnp.float32),
                     "a_i": jnp.zeros((1, 1, 3)), "b_i": jnp.zeros((1, 2, 1))}}
    x = jnp.asarray(rng.normal(size=(4, 3)), jnp.float32)
    before = delta_of(method, trained, state, x)
    moments = {"q": jnp.asarray(np.diag([1.0, 0.5, 0.25])[None], jnp.float32)}
    context = TaskContext(task=0, steps_per_epoch=1, site_moments=lambda tr, st: (moments, 10.0))
    merged, state = method.end_task({"adapters": trained, "head": {}}, state, context)
    np.testing.assert_allclose(delta_of(method, merged["adapters"], state, x), before, rtol=1e-5, atol=1e-6,
                               err_msg="task 0 merges without recalibration: the function is unchanged")
    assert not np.any(np.asarray(merged["adapters"]["q"]["b_g"])), "B_G restarts at 0"
    np.testing.assert_allclose(np.asarray(state["m_prev"]["q"][0]), np.diag([1.0, 0.5, 0.25]))
    # Task 1: e_prev = 1 (M_prev along e1), e_cur = 1 -> eta = 1 / (1 + 3) = 0.25; the general branch
    # enters the merge scaled by 0.75.
    _, state = method.begin_task(merged["adapters"], state, 1)
    new = {"q": {**trained["q"], "b_g": jnp.asarray(rng.normal(size=(1, 2, 1)), jnp.float32)}}
    general_before = delta_of(method, new, state, x) - delta_of(method, merged["adapters"], state, x)
    context = TaskContext(task=1, steps_per_epoch=1, site_moments=lambda tr, st: (
        {"q": jnp.asarray(np.diag([1.0, 0.0, 0.0])[None], jnp.float32)}, 10.0))
    after, state = method.end_task({"adapters": new, "head": {}}, state, context)
    general_after = delta_of(method, after["adapters"], state, x) - before
    np.testing.assert_allclose(general_after, 0.75 * general_before, rtol=1e-5, atol=1e-6)


def test_gao_halves_split_the_classes_of_the_batch():
    method = LoDA()
    labels = jnp.asarray([0, 0, 1, 1, 2, 2, 2, 0])
    weight = jnp.asarray([1, 1, 1, 1, 1, 1, 1, 0], jnp.float32)  # the last example is padding
    first, second, usable = method._halves(labels, weight, jax.random.PRNGKey(3))
    first, second = np.asarray(first), np.asarray(second)
    assert bool(usable)
    assert np.all(first + second == np.asarray(weight)), "every real example is in exactly one half"
    classes_first = set(np.asarray(labels)[first > 0].tolist())
    classes_second = set(np.asarray(labels)[second > 0].tolist())
    assert len(classes_first) == 1 and len(classes_second) == 2 and not classes_first & classes_second, \
        "floor(3/2) = 1 class in the first half, whole classes only"
    _, _, usable = method._halves(jnp.asarray([4, 4, 4]), jnp.ones(3), jax.random.PRNGKey(0))
    assert not bool(usable), "one class: the plain loss is used"


@pytest.mark.parametrize("gao", [True, False])
def test_run_compiles_once_and_learns(gao, tmp_path):
    config = tiny_config("loda")
    config.method.loda.gao = gao
    run = make_run(config, tmp_path / "run")
    outcome = run.fit()
    assert run.train_step._cache_size() == 1, "a new task compiled the train step again"
    assert np.all(np.diag(outcome["matrix"]) > 50.0), "each task is learned (2 classes: chance is 50)"
    merged = np.asarray(outcome["state"].method_state["merged_b"]["attn.query"])
    assert all(np.any(merged[:, task]) for task in range(3)), "every task merged into its slot"
