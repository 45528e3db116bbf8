"""C-LoRA: the routed delta B (R_old + R_delta) A x with the old route stopped in the backward pass,
the orthogonality term on a hand-computed case, the end-of-task merge, the non-degenerate start, and a
whole run (compile once, tasks learned, state carried through a resume)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import ModelInfo, StreamInfo, TaskContext
from jaxtree_lora.methods.c_lora import CLoRA, orthonormal_basis
from jaxtree_lora.models.common import Site

from test_loop import interrupted_and_resumed, tiny_config

INFO = ModelInfo(sites={"q": Site(3, 2)}, num_layers=1, feature_dim=3)
STREAM = StreamInfo(num_tasks=3, max_tasks=3, kind="classification")


def method(**options):
    return CLoRA(lora=lora_lib.LoraSpec(targets=("q",), rank=2, alpha=2.0), **options)


def test_delta_is_b_r_a_x_and_only_the_new_route_has_gradients():
    m = method()
    adapters, state = m.init(jax.random.PRNGKey(0), INFO, STREAM)
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(1, 2, 3)), rng.normal(size=(1, 2, 2))
    r_old, r_delta = rng.normal(size=(1, 2, 2)), rng.normal(size=(1, 2, 2))
    adapters = {"q": {"a": jnp.asarray(a, jnp.float32), "b": jnp.asarray(b, jnp.float32),
                      "r_delta": jnp.asarray(r_delta, jnp.float32)}}
    state = {**state, "r_old": {"q": jnp.asarray(r_old, jnp.float32)}}
    x = rng.normal(size=(4, 3)).astype(np.float32)

    def out(adapters, state):
        layer = jax.tree.map(lambda leaf: leaf[0], m.forward_adapters(adapters, state)["q"])
        return m.delta(state, "q", layer, jnp.asarray(x), None)

    expected = 1.0 * x @ (b[0] @ (r_old[0] + r_delta[0]) @ a[0]).T  # scale alpha / r = 1
    np.testing.assert_allclose(np.asarray(out(adapters, state)), expected, rtol=1e-5, atol=1e-5)
    # Gradients equal those of the new route alone: the old route is a constant.
    grads = jax.grad(lambda ad: jnp.sum(out(ad, state) ** 2))(adapters)
    new_only = lambda ad: jnp.sum((jnp.asarray(x) @ (ad["q"]["b"][0] @ ad["q"]["r_delta"][0] @ ad["q"]["a"][0]).T
                                   + jax.lax.stop_gradient(jnp.asarray(expected - x @ (b[0] @ r_delta[0] @ a[0]).T,
                                                                       jnp.float32))) ** 2)
    by_hand = jax.grad(new_only)(adapters)
    jax.tree.map(lambda g, h: np.testing.assert_allclose(np.asarray(g), np.asarray(h), rtol=1e-4, atol=1e-5),
                 grads, by_hand)


def test_first_task_starts_as_plain_lora_so_nothing_is_degenerate():
    m = method()
    adapters, state = m.init(jax.random.PRNGKey(0), INFO, STREAM)
    np.testing.assert_array_equal(np.asarray(adapters["q"]["r_delta"][0]), np.eye(2))
    x = jnp.ones((2, 3))
    grads = jax.grad(lambda ad: jnp.sum(m.delta(state, "q", jax.tree.map(lambda leaf: leaf[0],
                                                                         m.forward_adapters(ad, state)["q"]), x, None)))(adapters)
    assert np.any(np.asarray(grads["q"]["b"])), "with R = I and B = 0, B must still get a gradient"


def test_orthogonality_term_on_a_hand_case_and_the_end_of_task_merge():
    m = method(lam=0.5)
    adapters, state = m.init(jax.random.PRNGKey(0), INFO, STREAM)
    r_delta = np.array([[[1.0, 2.0], [3.0, 4.0]]], np.float32)
    adapters = {"q": {**adapters["q"], "r_delta": jnp.asarray(r_delta)}}
    state = {**state, "u_old": {"q": jnp.asarray([[[1.0, 0.0], [0.0, 0.0]]], jnp.float32)}}  # U_old = e1
    # ||e1^T R_delta||^2 = 1^2 + 2^2 = 5
    assert float(m.orthogonality(adapters, state)) == pytest.approx(5.0)
    trainable, state = m.end_task({"adapters": adapters, "head": {}}, state, TaskContext(task=0, steps_per_epoch=1))
    np.testing.assert_allclose(np.asarray(state["r_old"]["q"]), r_delta, err_msg="R_old <- R_old + R_delta")
    assert not np.any(np.asarray(trainable["adapters"]["q"]["r_delta"])), "R_delta restarts at 0"
    # R_old's energies (squared singular values) are 29.87 and 0.13: 99.6% in the first direction, so
    # U_old with basis_energy 0.99 is that one left singular vector.
    u = np.asarray(state["u_old"]["q"][0])
    top = np.linalg.svd(r_delta[0].astype(np.float64))[0][:, 0]
    np.testing.assert_allclose(np.abs(u[:, 0]), np.abs(top), atol=1e-6)
    assert not np.any(u[:, 1]), "the second direction holds < 1% of the energy"


def test_basis_keeps_the_energy_share():
    matrix = np.diag([3.0, 1.0])  # energies 9 and 1
    assert np.count_nonzero(np.linalg.norm(orthonormal_basis(matrix, 0.85), axis=0)) == 1
    assert np.count_nonzero(np.linalg.norm(orthonormal_basis(matrix, 0.95), axis=0)) == 2
    with pytest.raises(ConfigError):
        method(lam=-1.0)


def test_run_compiles_once_and_resumes_equal(tmp_path):
    whole_run, whole = interrupted_and_resumed(lambda **train: tiny_config("c_lora", **train), tmp_path)
    assert whole_run.train_step._cache_size() == 1, "a new task compiled the train step again"
    assert np.any(np.asarray(whole["state"].method_state["r_old"]["attn.query"])), "R_old carried between tasks"


def test_run_learns_a_stream_that_needs_training(tmp_path):
    from test_loop import assert_learns, learning_config, make_run, xor_stream

    run = make_run(learning_config("c_lora"), tmp_path / "run", stream=xor_stream())
    assert_learns(run, run.fit())


def test_frozen_factors_option_keeps_a_and_b_from_the_second_task_on(tmp_path):
    """factors=frozen_after_first: the first task trains A and B (and the routing), later tasks move
    only R_delta, so the old route B R_old A is unchanged; the default keeps training A and B."""
    from test_loop import make_run

    def factors_after(option):
        config = tiny_config("c_lora")
        config.method.c_lora.factors = option
        run = make_run(config, tmp_path / option, stop_after_steps=None)
        seen = {}
        original_end = run.method.end_task

        def end_task(trainable, state, context):
            seen[context.task] = jax.tree.map(np.asarray, trainable["adapters"]["attn.query"])
            return original_end(trainable, state, context)

        object.__setattr__(run.method, "end_task", end_task)
        run.fit()
        assert run.train_step._cache_size() == 1, f"factors={option}: a new task compiled the train step again"
        return seen

    frozen = factors_after("frozen_after_first")
    for name in ("a", "b"):
        np.testing.assert_array_equal(frozen[2][name], frozen[0][name], err_msg=f"{name} moved after task 0")
    assert not np.array_equal(frozen[2]["r_delta"], np.zeros_like(frozen[2]["r_delta"])), "R_delta learns"
    trained = factors_after("trained")
    assert not np.array_equal(trained[2]["b"], trained[0]["b"]), "the default keeps training B"


def test_unknown_factors_reading_names_the_choices():
    with pytest.raises(ConfigError, match="'trained' or 'frozen_after_first'"):
        method(factors="both")
