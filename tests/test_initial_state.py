"""`Run.initial_state` is one jitted program. Its values must be bit for bit those of the same code run
op by op (each jax.numpy / jax.random call its own program), as every run made them before: a draw
whose scale XLA fused into the draw's arithmetic (`0.02 * normal(key)`, `normal(key) / sqrt(d)`)
rounds some values differently, and every method would then start, and end, elsewhere than its
recorded results."""
import jax
import numpy as np
import pytest

from jaxtree_lora import keys, methods
from jaxtree_lora.train.loop import initial_values
from test_loop import make_run, tiny_config


def leaves(state):
    return [np.asarray(leaf) for leaf in jax.tree.leaves(state)]


# Every method with its own LoRA init; the other inits on four adapter layouts (plain, per-task slots,
# LiLoRA's, InfLoRA's).
CASES = [(method, None) for method in methods.names()] + [
    (method, init) for method in ("seqlora", "treelora_hide", "lilora", "inflora")
    for init in ("gaussian", "orthogonal")]


@pytest.mark.parametrize("method, init", CASES)
def test_jitted_initial_state_equals_op_by_op(method, init, tmp_path):
    config = tiny_config(method)
    config.method.lilora.sub_rank = 2  # at most the tiny run's rank
    if init is not None:
        config.lora.init = init
    run = make_run(config, tmp_path / "run")
    jitted = run.initial_state()
    by_op = initial_values(run, keys.for_purpose(config.seed, "init"))  # not under jit: op by op
    assert jax.tree.structure(jitted) == jax.tree.structure(by_op)
    for index, (a, b) in enumerate(zip(leaves(jitted), leaves(by_op))):
        assert a.dtype == b.dtype and a.shape == b.shape, f"leaf {index}: {a.dtype}{a.shape} vs {b.dtype}{b.shape}"
        assert a.tobytes() == b.tobytes(), (
            f"{method} ({init or 'its own'} init): leaf {index} {a.shape} differs from op by op by up to "
            f"{np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))}: a draw not kept apart (keys.settled)")


def test_the_initial_state_is_traced_once_per_run(tmp_path):
    """A run makes its initial state more than once (the joint run's probe starts every rate from it):
    the program is traced once, not once per call."""
    run = make_run(tiny_config("seqlora"), tmp_path / "run")
    first, second = run.initial_state(), run.initial_state()
    assert run._initial_program[1]._cache_size() == 1, "each call traced the initial state again"
    assert all(np.array_equal(a, b) for a, b in zip(leaves(first), leaves(second)))
