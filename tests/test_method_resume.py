"""Every method carries its state between tasks through the checkpoint: a run interrupted mid-task and
resumed ends bitwise equal to an uninterrupted one (matrix, trainable parameters, method state), and
the second and later tasks compile nothing new. Slow: two runs per method (TreeLoRA, InfLoRA and
C-LoRA have the same check in the default suite)."""
import pytest

from jaxtree_lora import methods

from test_loop import interrupted_and_resumed, tiny_config as tiny_test_config


@pytest.mark.slow
@pytest.mark.parametrize("method", [name for name in methods.names() if name not in ("fix", "joint")])
# fix takes no step; joint is not continual (no task after task, no checkpoint)
def test_resumed_run_equals_an_uninterrupted_one(method, tmp_path):
    def tiny_config(method, **train):
        config = tiny_test_config(method, **train)
        if method == "lilora":
            config.method.lilora.sub_rank = 1  # <= the tiny LoRA rank 2
        return config

    whole_run, _ = interrupted_and_resumed(lambda **train: tiny_config(method, **train), tmp_path)
    assert whole_run.train_step._cache_size() == 1, "a new task compiled the train step again"
