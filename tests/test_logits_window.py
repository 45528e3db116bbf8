"""Logits only where they are read: the instruction loss over the answer window, the generation
prefill at the last position. Both must equal the full-sequence computation they replace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.data.tokenize import answer_window
from jaxtree_lora.methods.base import StreamInfo
from jaxtree_lora.methods.seqlora import SeqLoRA
from jaxtree_lora.models import llama
from jaxtree_lora.models.generate import generate
from jaxtree_lora.train.backbone import build_tiny
from jaxtree_lora.train.step import loss_positions, make_task_loss


def instruction_batch(seed=0, rows=4, width=12, vocab=128):
    """Left-padded prompt + right-aligned answer rows, as tokenize_instruction lays them out."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(1, vocab, (rows, width)).astype(np.int32)
    attention = np.zeros((rows, width), np.int32)
    loss = np.zeros((rows, width), np.int32)
    for row, (prompt, answer) in enumerate([(3, 2), (5, 4), (7, 3), (2, 1)][:rows]):
        attention[row, width - prompt - answer:] = 1
        loss[row, width - answer:] = 1
        ids[row, :width - prompt - answer] = 0
    return {"input_ids": ids, "attention_mask": attention, "loss_mask": loss,
            "weight": np.asarray([1, 1, 1, 0], np.float32)[:rows]}


def test_answer_window_is_the_longest_right_aligned_answer():
    batch = instruction_batch()
    assert answer_window([batch["loss_mask"]]) == 4, "the longest answer (4 tokens) sets the window"
    # A loss token far from the right end (not right-aligned) widens the window to cover it.
    odd = batch["loss_mask"].copy()
    odd[3, 2] = 1
    assert answer_window([batch["loss_mask"], odd]) == 12 - 2
    assert answer_window([np.zeros((3, 5), np.int32)]) == 0, "no loss tokens: no window"


def test_loss_positions_cover_exactly_the_targets_of_the_window():
    assert loss_positions(12, 4) == (7, 11), "positions 7..10 predict tokens 8..11 (the last 4)"
    assert loss_positions(12, None) == (0, 11) and loss_positions(12, 11) == (0, 11) and loss_positions(5, 9) == (0, 4)


def test_windowed_instruction_loss_and_gradients_equal_the_full_sequence():
    backbone = build_tiny("tiny-llama", {}, seed=0)
    method = SeqLoRA(lora=lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=4.0, dropout=0.0))
    adapters, method_state = method.init(jax.random.PRNGKey(1), backbone.info,
                                         StreamInfo(num_tasks=1, max_tasks=1, kind="instruction"))
    # Non-zero B so the adapters change the loss and receive gradient in both A and B.
    adapters = jax.tree.map(lambda leaf: leaf + 0.05 * jax.random.normal(jax.random.PRNGKey(2), leaf.shape), adapters)
    trainable = {"adapters": adapters, "head": {}}
    batch = {k: jnp.asarray(v) for k, v in instruction_batch().items()}
    window = answer_window([np.asarray(batch["loss_mask"])])
    losses = {}
    for name, size in (("full", None), ("window", window)):
        task_loss = make_task_loss(backbone, method, "instruction", answer_window=size)
        fn = jax.jit(jax.value_and_grad(lambda tr: task_loss(tr, backbone.params, {}, method_state, batch, None),
                                        has_aux=True))
        (loss, aux), grads = fn(trainable)
        losses[name] = (float(loss), float(aux["answer_tokens"]), grads)
    assert losses["window"][1] == losses["full"][1] == 2 + 4 + 3, "the window must keep every weighted answer token"
    np.testing.assert_allclose(losses["window"][0], losses["full"][0], rtol=1e-6,
                               err_msg="loss over the answer window differs from the loss over the sequence")
    for full, windowed in zip(jax.tree.leaves(losses["full"][2]), jax.tree.leaves(losses["window"][2])):
        np.testing.assert_allclose(np.asarray(windowed), np.asarray(full), rtol=1e-5, atol=1e-7,
                                   err_msg="gradients through the windowed LM head differ")


@pytest.fixture(scope="module")
def model():
    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64, rope_theta=100.0)
    module = llama.LlamaDecoder(config, rngs=nnx.Rngs(3))
    module.embed.set_value(module.embed[...] * 50)
    module.lm_head.set_value(module.lm_head[...] * 50)
    return module


def test_logits_window_is_the_slice_of_the_full_logits(model):
    tokens = jnp.asarray([[0, 0, 4, 8, 15, 16], [3, 1, 4, 1, 5, 9]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6])
    full = np.asarray(model(tokens, mask))
    part = np.asarray(model(tokens, mask, logits_window=(2, 5)))
    assert part.shape == (2, 3, 40)
    np.testing.assert_allclose(part, full[:, 2:5], rtol=1e-6, atol=1e-6)


def test_generation_with_last_position_prefill_equals_full_prefill_argmax(model):
    """The first generated token (from the windowed prefill) and the rest equal greedy decoding
    driven by the full prefill logits' last column."""
    ids = jnp.asarray([[0, 0, 5, 9, 13], [7, 1, 22, 30, 2]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1] * 5])
    tokens = np.asarray(jax.jit(lambda i, m: generate(model, i, m, max_new_tokens=5, eos_id=-1, pad_id=0))(ids, mask))
    cache = model.init_cache(2, 10)
    logits, cache = model(ids, mask, cache=cache)  # the old prefill: logits everywhere, last column read
    expected = [np.argmax(np.asarray(logits[:, -1]), axis=-1)]
    for _ in range(4):
        logits, cache = model(jnp.asarray(expected[-1][:, None], jnp.int32), jnp.ones((2, 1), jnp.int32), cache=cache)
        expected.append(np.argmax(np.asarray(logits[:, -1]), axis=-1))
    np.testing.assert_array_equal(tokens, np.stack(expected, axis=1))
