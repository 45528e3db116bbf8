"""KV-cached generation for the Llama decoder: one prefill pass, then one token per loop step.

Jittable end to end (`max_new_tokens` and `temperature` are Python values, fixed at trace time):

    tokens = jax.jit(lambda p, ids, mask, key: generate(nnx.merge(graphdef, p), ids, mask, max_new_tokens=32,
                                                        temperature=0.0, key=key, eos_id=2, pad_id=2))(...)
The prompt is LEFT-padded ([batch, prompt] with its mask), so every row's last prompt token sits in
the same column and its next token is written to the same cache slot. The cache is preallocated
[num_layers, batch, kv_heads, prompt + max_new_tokens, head_dim]; the decode loop is a
`lax.while_loop` that stops early once every row has produced an EOS, or at `limit` tokens (a traced
value: one compiled program serves tasks whose answers need different lengths). A shared prefix can
be given apart (`prefix_ids`): prefilled once, copied into each row's cache.
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
             limit: Optional[jax.Array] = None, prefix_ids: Optional[jax.Array] = None,
             prefix_mask: Optional[jax.Array] = None) -> jax.Array:
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
      prefix_ids, prefix_mask: [prefix] int32, left-padded: tokens that come before every row's prompt
        (the rows then hold only their own part), prefilled once. Not with a sliding attention window
        (its slot arithmetic assumes a row's tokens are contiguous).
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

    head = 0 if prefix_ids is None else int(prefix_ids.shape[-1])
    cache = model.init_cache(batch, head + prompt_length + max_new_tokens, dtype=compute_dtype)
    if prefix_ids is not None:
        cache = shared_prefix_cache(model, cache, prefix_ids, prefix_mask, **kwargs)
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


def shared_prefix_cache(model, cache: dict, prefix_ids: jax.Array, prefix_mask: Optional[jax.Array] = None,
                        **kwargs) -> dict:
    """`cache` (empty; k, v [layers, batch, kv_heads, slots, head_dim]) with `prefix_ids` [prefix] prefilled
    once (batch 1) and its keys and values copied into every row's first `prefix` slots; mask, next slot and each row's next
    rotary position follow it. The rows' own parts then go in the next slots, positions counted on from
    the prefix's real tokens; attention masks the gap, so a row computes what its whole prompt computes,
    up to float rounding (other matmul shapes)."""
    if getattr(model.config, "sliding_window", None) is not None:
        raise ValueError("a shared prompt prefix needs full attention: this model has a sliding window")
    head = prefix_ids.shape[-1]
    prefix_mask = jnp.ones((head,), jnp.int32) if prefix_mask is None else prefix_mask.astype(jnp.int32)
    one = model.init_cache(1, head, dtype=cache["k"].dtype)
    _, one = model.hidden_states(prefix_ids[None], prefix_mask[None], cache=one, **kwargs)
    batch = cache["mask"].shape[0]
    copy = lambda full, part: full.at[:, :, :, :head].set(jnp.broadcast_to(part, part.shape[:1] + (batch,) + part.shape[2:]))
    return {"k": copy(cache["k"], one["k"]), "v": copy(cache["v"], one["v"]),
            "mask": cache["mask"].at[:, :head].set(jnp.broadcast_to(prefix_mask, (batch, head))),
            "index": jnp.asarray(head, jnp.int32),
            "positions": jnp.full((batch,), jnp.sum(prefix_mask), jnp.int32)}
