"""Every method carries its state between tasks through the checkpoint: a run interrupted mid-task and
resumed ends bitwise equal to an uninterrupted one (matrix, trainable parameters, method state), and
the second and later tasks compile nothing new. Slow: two runs per method (TreeLoRA, InfLoRA and
C-LoRA have the same check in the default suite)."""
import jax
import numpy as np
import pytest

from jaxtree_lora import methods
from jaxtree_lora.train.loop import StopRequested

from test_loop import make_run, tiny_config as tiny_test_config


@pytest.mark.slow
@pytest.mark.parametrize("method", methods.names())
def test_resumed_run_equals_an_uninterrupted_one(method, tmp_path):
    def tiny_config(method, **train):
        config = tiny_test_config(method, **train)
        if method == "lilora":
            config.method.lilora.sub_rank = 1  # <= the tiny LoRA rank 2
        return config

    whole_run = make_run(tiny_config(method), tmp_path / "whole")
    whole = whole_run.fit()
    assert whole_run.train_step._cache_size() == 1, "a new task compiled the train step again"
    cut = make_run(tiny_config(method, checkpoint_every=1), tmp_path / "cut", stop_after_steps=7)
    with pytest.raises(StopRequested):
        cut.fit()
    resumed = make_run(tiny_config(method, checkpoint_every=1), tmp_path / "cut").fit(resume=True)
    np.testing.assert_array_equal(resumed["matrix"], whole["matrix"])
    for part in ("trainable", "method_state"):
        jax.tree.map(np.testing.assert_array_equal, jax.device_get(getattr(resumed["state"], part)),
                     jax.device_get(getattr(whole["state"], part)))
