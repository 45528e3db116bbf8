"""CL-LoRA: the shared / task-specific split with block weights, the fixed orthonormal shared A, the
code's gradient reassignment and block-weight orthogonality on hand cases, and a whole run with
task-identity-free inference (each task's classes scored with that task's adapters)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import ModelInfo, StreamInfo
from jaxtree_lora.methods.cl_lora import CLLoRA, random_orthonormal, reassign

from test_loop import assert_learns, learning_config, make_run, xor_stream
from jaxtree_lora.models.common import Site

INFO = ModelInfo(sites={"q": Site(4, 3)}, num_layers=2, feature_dim=4)
STREAM = StreamInfo(num_tasks=2, max_tasks=2, kind="classification")


def method(**options):
    return CLLoRA(lora=lora_lib.LoraSpec(targets=("q",), rank=2), **options)


def test_shared_a_rows_are_orthonormal():
    a = np.asarray(random_orthonormal(jax.random.PRNGKey(0), (3, 2, 5)))
    np.testing.assert_allclose(np.einsum("lri,lsi->lrs", a, a), np.broadcast_to(np.eye(2), (3, 2, 2)), atol=1e-5)


def test_first_half_is_shared_second_half_task_specific_with_block_weights():
    m = method()
    adapters, state = m.init(jax.random.PRNGKey(0), INFO, STREAM)
    rng = np.random.default_rng(0)
    adapters = {"q": {**adapters["q"], "b_s": jnp.asarray(rng.normal(size=(2, 3, 2)), jnp.float32),
                      "b_t": jnp.asarray(rng.normal(size=(2, 2, 3, 2)), jnp.float32)}}
    adapters, state = m.begin_task(adapters, state, 1)
    forward = m.forward_adapters(adapters, state)["q"]
    x = jnp.asarray(rng.normal(size=(5, 4)), jnp.float32)
    leaves = {k: np.asarray(v) for k, v in adapters["q"].items()}
    for layer in range(2):
        got = np.asarray(m.delta(state, "q", jax.tree.map(lambda leaf: leaf[layer], forward), x, None))
        if layer == 0:  # layers [0, L/2): the shared adapter
            expected = np.asarray(x) @ leaves["a_s"][0].T @ leaves["b_s"][0].T
        else:           # layers [L/2, L): task 1's adapter times its block weight
            expected = leaves["w"][1, 1] * np.asarray(x) @ leaves["a_t"][1, 1].T @ leaves["b_t"][1, 1].T
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5, err_msg=f"layer {layer}")
    mask = m.update_mask(state, {"adapters": adapters, "head": {}})["adapters"]["q"]
    assert float(mask["a_s"]) == 0.0, "the shared A is fixed from the start"
    np.testing.assert_array_equal(np.asarray(mask["w"])[0], [0.0, 1.0], err_msg="only task 1's block weights")


def test_gradient_reassignment_and_importance():
    m = method()
    teacher = jnp.asarray([[[1.0, 0.0], [0.0, 3.0]]])  # row norms 1 and 3 -> weights 0.5 and 1.5
    np.testing.assert_allclose(np.asarray(m.importance(teacher))[0, :, 0], [0.5, 1.5])
    b = jnp.ones((1, 2, 2))
    grad = jax.grad(lambda b: jnp.sum(reassign(b, m.importance(teacher)) * 2.0))(b)
    np.testing.assert_allclose(np.asarray(grad)[0], [[1.0, 1.0], [3.0, 3.0]],
                               err_msg="KD gradient rows scaled by the teacher's row importance")
    np.testing.assert_array_equal(np.asarray(reassign(b, m.importance(teacher))), np.asarray(b))


def test_block_weight_orthogonality_on_a_hand_case():
    m = method()
    w = jnp.asarray([[1.0, 1.0], [0.0, 1.0]])  # one site, 2 layers, 2 tasks: w_0 = (1, 0), w_1 = (1, 1)
    value = m.orthogonality({"q": {"w": w}}, jnp.asarray(1))
    assert float(value) == pytest.approx(1 / np.sqrt(2), rel=1e-6)
    assert float(m.orthogonality({"q": {"w": w}}, jnp.asarray(0))) == 0.0, "nothing to be orthogonal to at task 0"


def test_run_compiles_once_learns_and_infers_without_task_identity(tmp_path):
    run = make_run(learning_config("cl_lora"), tmp_path / "run", stream=xor_stream())
    outcome = run.fit()
    assert run.train_step._cache_size() == 1, "a new task compiled the train step again"
    assert_learns(run, outcome)
    state = outcome["state"]
    np.testing.assert_array_equal(np.asarray(state.method_state["teacher"]["attn.query"]),
                                  np.asarray(state.trainable["adapters"]["attn.query"]["b_s"]),
                                  err_msg="the last shared B is the next teacher")
    assert run.method.describe()["inference_rule"] == "PER_SLOT_SCORING"
