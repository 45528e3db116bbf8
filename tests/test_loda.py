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


TWO_LAYERS = ModelInfo(sites={"q": Site(2, 2)}, num_layers=2, feature_dim=2)


def gao_hand_case(task):
    """LoDA at `task` with rank 1 over two layers, a linear task loss with a fixed gradient per
    entry whose layers differ 10x in size, and a recorder of every evaluation of the task loss
    (through jax.debug.callback, so it records what runs, not what is traced)."""
    method = LoDA(lora=lora_lib.LoraSpec(targets=("q",), rank=1), rho=0.3)
    adapters, state = method.init(jax.random.PRNGKey(0), TWO_LAYERS, STREAM)
    state = {**state, "task": jnp.asarray(task, jnp.int32)}
    adapters = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 0.5, jnp.float32), adapters)
    # d loss / d leaf = slope * sum(weight): layer 0 is 10x layer 1.
    slope = {"q": {name: jnp.stack([10.0 * jnp.arange(1.0, leaf[0].size + 1).reshape(leaf.shape[1:]),
                                    jnp.arange(1.0, leaf[0].size + 1).reshape(leaf.shape[1:])])
                   for name, leaf in adapters["q"].items()}}
    labels = jnp.asarray([0, 0, 1, 1])
    batch = {"labels": labels, "weight": jnp.ones(4)}
    evaluated = []

    def task_loss(trainable, key, src=None):
        src = batch if src is None else src
        jax.debug.callback(lambda w, a: evaluated.append((np.asarray(w), jax.tree.map(np.asarray, a))),
                           src["weight"], trainable["adapters"])
        linear = sum(jnp.sum(s * p) for s, p in zip(jax.tree.leaves(slope), jax.tree.leaves(trainable["adapters"])))
        return linear * jnp.sum(src["weight"]), {"accuracy": jnp.zeros(()), "tokens": jnp.sum(src["weight"])}

    return method, {"adapters": adapters, "head": {}}, state, batch, task_loss, evaluated


def test_gao_look_ahead_moves_only_trainable_entries_by_rho_per_layer():
    """theta' = theta + rho' g / ||g||, ||.|| per layer of each trainable tensor: every layer of B_G and
    B_I moves by the same distance |rho'| along its own gradient; A_I (always fixed) and A_G (fixed
    after task 0) do not move. Per stacked tensor, layer 1 (10x smaller gradient) would move 10x less."""
    method, trainable, state, batch, task_loss, evaluated = gao_hand_case(task=1)
    method.loss(trainable, state, batch, jax.random.PRNGKey(2), task_loss)
    jax.effects_barrier()
    looked = [adapters for weight, adapters in evaluated
              if not all(np.allclose(a, 0.5) for a in jax.tree.leaves(adapters))]
    assert len(looked) == 2, "one look-ahead per direction (B1 -> B2, B2 -> B1)"
    for adapters in looked:
        moved = jax.tree.map(lambda a: a - 0.5, adapters["q"])
        np.testing.assert_array_equal(moved["a_i"], 0.0, "A_I is fixed: the look-ahead must not move it")
        np.testing.assert_array_equal(moved["a_g"], 0.0, "A_G is fixed after task 0")
        distances = [float(np.linalg.norm(moved[name][layer])) for name in ("b_g", "b_i") for layer in range(2)]
        assert distances[0] > 0
        np.testing.assert_allclose(distances, distances[0], rtol=1e-5,
                                   err_msg="the step is normalised per layer of each tensor")
        assert distances[0] <= 0.3 + 1e-6, "|rho'| = rho u, u in [0, 1)"
        for name in ("b_g", "b_i"):
            for layer in range(2):
                direction = moved[name][layer].ravel()
                gradient = (10.0 if layer == 0 else 1.0) * np.arange(1.0, direction.size + 1)
                cosine = direction @ gradient / (np.linalg.norm(direction) * np.linalg.norm(gradient))
                np.testing.assert_allclose(cosine, -1.0, rtol=1e-5, err_msg="a descent step along g")


def test_gao_at_task_zero_also_moves_the_general_down_projection():
    method, trainable, state, batch, task_loss, evaluated = gao_hand_case(task=0)
    method.loss(trainable, state, batch, jax.random.PRNGKey(2), task_loss)
    jax.effects_barrier()
    looked = [adapters for weight, adapters in evaluated
              if not all(np.allclose(a, 0.5) for a in jax.tree.leaves(adapters))]
    for adapters in looked:
        moved = jax.tree.map(lambda a: a - 0.5, adapters["q"])
        assert np.all(np.linalg.norm(moved["a_g"].reshape(2, -1), axis=1) > 0), "A_G trains at task 0"
        np.testing.assert_array_equal(moved["a_i"], 0.0)


def test_gao_evaluates_the_plain_loss_only_when_it_is_used():
    """With two classes GAO's loss is used, and the plain loss (whole batch, unmoved weights) must not
    run; with one class the plain loss is the fallback and runs once, without the look-aheads."""
    method, trainable, state, batch, task_loss, evaluated = gao_hand_case(task=1)
    jax.jit(lambda tr: method.loss(tr, state, batch, jax.random.PRNGKey(2), task_loss))(trainable)
    jax.effects_barrier()
    whole = [weight for weight, _ in evaluated if np.all(weight == 1.0)]
    assert not whole, f"the plain loss ran {len(whole)} time(s) although GAO's loss was used"
    evaluated.clear()
    one_class = {**batch, "labels": jnp.zeros(4, jnp.int32)}
    loss, _ = jax.jit(lambda tr: method.loss(tr, state, one_class, jax.random.PRNGKey(2), task_loss))(trainable)
    jax.effects_barrier()
    assert len(evaluated) == 1 and np.all(evaluated[0][0] == 1.0), "one class: only the plain loss runs"
    plain, _ = task_loss(trainable, None)
    np.testing.assert_allclose(loss, plain, rtol=1e-6)


@pytest.mark.parametrize("gao", [True, False])
def test_run_compiles_once_and_merges_every_task(gao, tmp_path):
    config = tiny_config("loda")
    config.method.loda.gao = gao
    run = make_run(config, tmp_path / "run")
    outcome = run.fit()
    assert run.train_step._cache_size() == 1, "a new task compiled the train step again"
    merged = np.asarray(outcome["state"].method_state["merged_b"]["attn.query"])
    assert all(np.any(merged[:, task]) for task in range(3)), "every task merged into its slot"


def test_run_learns_a_stream_that_needs_training(tmp_path):
    from test_loop import assert_learns, learning_config, xor_stream

    config = learning_config("loda")
    # LoDA's branches are scaled down (gamma 0.25 / 0.5, A divided by sqrt 3): at the shared lr 2e-2 it
    # does not learn within the budget (diag 40.6 / 43.8 / 56.3 vs untrained 40.6 / 43.8 / 59.4); at 0.2 it does.
    config.optimizer.learning_rate = 0.2
    run = make_run(config, tmp_path / "run", stream=xor_stream())
    assert_learns(run, run.fit())
