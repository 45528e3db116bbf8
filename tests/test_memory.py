"""The memory planner: byte counts of abstract pytrees and the activation formula checked by hand,
FSDP dividing the frozen weights, and a plan that does not fit refused with its numbers."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora.train import memory


def abstract(shape, dtype):
    return jax.ShapeDtypeStruct(shape, dtype)


def test_plan_counts_bytes_by_hand():
    frozen = {"w": abstract((1024, 1024), jnp.bfloat16), "b": abstract((1024,), jnp.float32)}  # 2 MiB + 4 KiB
    trainable = {"a": abstract((8, 1024), jnp.float32), "b": abstract((1024, 8), jnp.float32)}  # 64 KiB
    method = {"bank": abstract((4, 2, 8192), jnp.float32)}  # 256 KiB
    plan = memory.plan(frozen, trainable, method, kind="encoder", hidden=64, heads=4, layers=2, seq=16,
                       micro_batch=8, data_parallel=2, fsdp=2, compute_bytes=2, capacity_bytes=None, check=False)
    assert plan.frozen_bytes == (2 * 1024 * 1024 + 4 * 1024) / 2, "frozen weights divided over fsdp"
    assert plan.trainable_bytes == 64 * 1024 and plan.optimizer_bytes == 2 * 64 * 1024, "Adam: two moments"
    assert plan.method_bytes == 4 * 2 * 8192 * 4
    # Per-device micro-batch 8 / (2 * 2) = 2; per layer 34*s*b*h + 5*a*s^2*b = 34*16*2*64 + 5*4*256*2.
    per_layer = 34 * 16 * 2 * 64 + 5 * 4 * 16 * 16 * 2
    assert plan.activation_bytes == 2 * per_layer
    assert plan.total == plan.frozen_bytes + plan.trainable_bytes + plan.optimizer_bytes + plan.method_bytes \
        + plan.activation_bytes
    remat = memory.activation_bytes("encoder", 64, 4, 2, 16, 2, remat=True)
    assert remat == 2 * 2 * 16 * 2 * 64 + per_layer, "remat keeps each block's input plus one block"
    assert "total per device" in plan.table()


def test_plan_that_does_not_fit_is_refused_with_the_numbers():
    frozen = {"w": abstract((4096, 4096, 16), jnp.bfloat16)}  # 0.5 GiB
    with pytest.raises(memory.PlanDoesNotFit, match=r"needs 0\.\d+ GiB per device but the device has 0\.25 GiB"):
        memory.plan(frozen, {}, {}, kind="decoder", hidden=64, heads=4, layers=2, seq=16, micro_batch=1,
                    data_parallel=1, fsdp=1, capacity_bytes=0.25 * 2 ** 30)
    fits = memory.plan(frozen, {}, {}, kind="decoder", hidden=64, heads=4, layers=2, seq=16, micro_batch=1,
                       data_parallel=1, fsdp=8, capacity_bytes=0.25 * 2 ** 30)
    assert fits.frozen_bytes == 2 ** 29 / 8, "FSDP over 8 devices makes the same model fit"
