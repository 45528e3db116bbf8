"""O-LoRA and EWC: their extra terms on hand-computed cases."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import TaskContext, ModelInfo, StreamInfo
from jaxtree_lora.methods.ewc import EWC
from jaxtree_lora.methods.o_lora import OLoRA
from jaxtree_lora.models.common import Site

INFO = ModelInfo(sites={"proj": Site(3, 2)}, num_layers=1, feature_dim=2)
STREAM = StreamInfo(num_tasks=3, max_tasks=3, kind="classification", num_classes=4)


def test_o_lora_penalty_is_abs_sum_of_old_times_new_down_projections():
    method = OLoRA(lora=lora_lib.LoraSpec(targets=("proj",), rank=1, alpha=1.0, dropout=0.0), lambda_1=0.5)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, STREAM)
    a = np.zeros((1, 3, 1, 3), np.float32)
    a[0, 0, 0] = [1.0, 2.0, 0.0]   # task 0
    a[0, 1, 0] = [0.0, -1.0, 3.0]  # task 1 (current)
    a[0, 2, 0] = [5.0, 5.0, 5.0]   # task 2: in the future, must not count
    adapters = {"proj": {"a": jnp.asarray(a), "b": adapters["proj"]["b"]}}
    _, state = method.begin_task(adapters, state, 1)
    # |<[1,2,0], [0,-1,3]>| = |-2| = 2
    assert float(method.orthogonality(adapters, state["task"])) == 2.0
    squared = OLoRA(lora=method.lora, penalty="squared")
    assert float(squared.orthogonality(adapters, state["task"])) == 4.0

    def task_loss(trainable, key):
        return jnp.zeros(()), {}

    loss, aux = method.loss({"adapters": adapters, "head": {}}, state, {}, None, task_loss)
    assert float(loss) == 0.5 * 2.0, "the total must be task loss + lambda_1 * penalty"
    # At task 0 there is no earlier adapter: the penalty is 0 whatever A is.
    _, state0 = method.begin_task(adapters, state, 0)
    assert float(method.orthogonality(adapters, state0["task"])) == 0.0


def test_ewc_penalty_uses_fisher_and_anchor_of_the_previous_task():
    method = EWC(lora=lora_lib.LoraSpec(targets=("proj",), rank=1, alpha=1.0, dropout=0.0), lam=2.0, gamma=1.0)
    adapters, state = method.init(jax.random.PRNGKey(0), INFO, STREAM)
    trainable = {"adapters": adapters, "head": {}}
    assert float(method.penalty(adapters, state)) == 0.0, "no penalty before the first task ends"
    fisher = jax.tree.map(lambda leaf: jnp.full(leaf.shape, 3.0), trainable)
    context = TaskContext(task=0, steps_per_epoch=1, fisher=lambda tr, st: fisher)
    _, state = method.end_task(trainable, state, context)
    moved = jax.tree.map(lambda leaf: leaf + 0.5, adapters)
    count = lora_lib.count(adapters)
    # sum F (theta - theta*)^2 = 3 * 0.25 * count
    np.testing.assert_allclose(float(method.penalty(moved, state)), 0.75 * count, rtol=1e-6)

    def task_loss(trainable, key):
        return jnp.ones(()), {}

    loss, _ = method.loss({"adapters": moved, "head": {}}, state, {}, None, task_loss)
    np.testing.assert_allclose(float(loss), 1.0 + 0.5 * 2.0 * 0.75 * count, rtol=1e-6)
    # A second task's Fisher adds to the first (gamma = 1).
    _, state2 = method.end_task({"adapters": moved, "head": {}}, state, context)
    np.testing.assert_allclose(np.asarray(jax.tree.leaves(state2["fisher"])[0]), 6.0)
