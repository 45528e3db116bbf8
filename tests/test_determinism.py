"""Same seed and config give bitwise-identical results on CPU: two independent runs of the loop end with
the same accuracy matrix, adapters, head, optimiser and method state (TreeLoRA, whose bandit draws
random numbers, with adapter dropout on); another seed gives another run."""
import jax
import numpy as np

from test_loop import make_run, tiny_config


def test_two_runs_with_one_seed_are_bitwise_equal_and_another_seed_differs(tmp_path):
    config = tiny_config("treelora")
    config.lora.dropout = 0.1
    first = make_run(config, tmp_path / "first").fit()
    second = make_run(config, tmp_path / "second").fit()
    np.testing.assert_array_equal(first["matrix"], second["matrix"])
    for part in ("trainable", "method_state", "opt_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(first["state"], part)),
                     jax.device_get(getattr(second["state"], part)))
    config.seed = 1
    other = make_run(config, tmp_path / "other").fit()
    a = jax.tree.leaves(jax.device_get(first["state"].trainable["adapters"]))
    b = jax.tree.leaves(jax.device_get(other["state"].trainable["adapters"]))
    assert any(not np.array_equal(x, y) for x, y in zip(a, b)), "the seed does not reach the run"
