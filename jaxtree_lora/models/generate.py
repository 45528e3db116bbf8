"""KV-cached generation for the Llama decoder: one prefill pass, then one token per loop step.

Jittable end to end (`max_new_tokens` and `temperature` are Python values, fixed at trace time):

    tokens = jax.jit(lambda p, ids, mask, key: generate(nnx.merge(graphdef, p), ids, mask, max_new_tokens=32,
                                                        temperature=0.0, key=key, eos_id=2, pad_id=2))(...)

The prompt is LEFT-padded ([batch, prompt] with its mask), so every row's last prompt token sits in
the same column and its next token is written to the same cache slot. The cache is preallocated
[num_layers, batch, prompt + max_new_tokens, kv_heads, head_dim]; the decode loop is a
`lax.while_loop` that stops early once every row has produced an EOS, or at `limit` tokens (a traced
value: one compiled program serves tasks whose answers need different lengths).
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import jax
import jax.numpy as jnp


def sample(logits: jax.Array, key: jax.Array, temperature: float) -> jax.Array:
    """Next tokens [batch] from logits [batch, vocab]: argmax at temperature 0, else softmax(logits / T)."""
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    if temperature < 0.0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    return jax.random.categorical(key, logits.astype(jnp.float32) / temperature, axis=-1).astype(jnp.int32)


def generate(model, prompt_ids: jax.Array, prompt_mask: Optional[jax.Array] = None, *, max_new_tokens: int,
             temperature: float = 0.0, key: Optional[jax.Array] = None, eos_id: Union[int, Sequence[int]],
             pad_id: int, adapters=None, delta=None, compute_dtype=None,
             limit: Optional[jax.Array] = None) -> jax.Array:
    """Continuations [batch, max_new_tokens] int32 of left-padded prompts.

    Args:
      model: a `LlamaDecoder` (typically `nnx.merge(graphdef, params)` inside jit).
      prompt_ids: [batch, prompt] int32, padding on the left.
      prompt_mask: [batch, prompt], 1 for real tokens (None: no padding).
      max_new_tokens: tokens to produce per row.
      temperature: 0 for greedy decoding, otherwise categorical sampling from softmax(logits / temperature).
      key: PRNG key for sampling (step i uses fold_in(key, i)); unused when greedy.
      eos_id: one id or several; a row's EOS is kept and everything after it is `pad_id`.
      adapters, delta: LoRA adapters and delta function, as in `LlamaDecoder.__call__`.
      limit: int32 scalar <= max_new_tokens (None: max_new_tokens): tokens produced per row; the columns
        after it are `pad_id`. The tokens before it are those an unlimited run produces.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    batch, prompt_length = prompt_ids.shape
    if prompt_mask is None:
        prompt_mask = jnp.ones((batch, prompt_length), jnp.int32)
    if key is None:
        key = jax.random.PRNGKey(0)
    stop_ids = jnp.asarray([eos_id] if isinstance(eos_id, int) else list(eos_id), jnp.int32)
    is_stop = lambda tokens: jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)
    kwargs = dict(adapters=adapters, delta=delta, compute_dtype=compute_dtype)

    cache = model.init_cache(batch, prompt_length + max_new_tokens, dtype=compute_dtype)
    # Only the last prompt position's logits are read: the prefill skips the LM head elsewhere.
    logits, cache = model(prompt_ids, prompt_mask, cache=cache, logits_window=(prompt_length - 1, prompt_length),
                          **kwargs)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature)
    tokens = jnp.full((batch, max_new_tokens), pad_id, jnp.int32).at[:, 0].set(first)
    done = is_stop(first)

    limit = max_new_tokens if limit is None else jnp.minimum(jnp.asarray(limit, jnp.int32), max_new_tokens)

    def unfinished(state):
        step, _, done, _, _ = state
        return (step < limit) & ~jnp.all(done)

    def decode(state):
        step, previous, done, cache, tokens = state
        logits, cache = model(previous[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache, **kwargs)
        token = sample(logits[:, -1], jax.random.fold_in(key, step), temperature)
        token = jnp.where(done, pad_id, token)
        tokens = jax.lax.dynamic_update_slice(tokens, token[:, None], (0, step))
        return step + 1, token, done | is_stop(token), cache, tokens

    state = (jnp.ones((), jnp.int32), first, done, cache, tokens)
    return jax.lax.while_loop(unfinished, decode, state)[-1]
