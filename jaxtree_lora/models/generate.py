"""KV-cached generation for the decoder: prefill the prompt, then one token per step under scan.

Jittable end to end (static `max_new_tokens`): the cache is preallocated [L, B, P + max_new, kv, hd],
the prompt is LEFT-padded (positions come from its mask), temperature 0 is greedy and otherwise
tokens are drawn from softmax(logits / temperature). Tokens after a row's EOS are `pad_id`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def sample(logits, key, temperature: float):
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def generate(model, prompt_ids, prompt_mask, *, max_new_tokens: int, temperature: float = 0.0, key=None, eos_id: int,
             pad_id: int, adapters=None, delta=None, compute_dtype=None):
    """[B, max_new_tokens] int32 continuations of left-padded prompts [B, P]."""
    batch, prompt_len = prompt_ids.shape
    if key is None:
        key = jax.random.PRNGKey(0)
    cache = model.init_cache(batch, prompt_len + max_new_tokens,
                             dtype=compute_dtype or model.embed[...].dtype)
    kwargs = dict(adapters=adapters, delta=delta, compute_dtype=compute_dtype)
    logits, cache = model(prompt_ids, prompt_mask, cache=cache, **kwargs)
    first = sample(logits[:, -1], jax.random.fold_in(key, 0), temperature)

    def step(carry, index):
        token, done, cache = carry
        emitted = jnp.where(done, pad_id, token)
        done = done | (token == eos_id)
        logits, cache = model(token[:, None], jnp.ones((batch, 1), jnp.int32), cache=cache, **kwargs)
        following = sample(logits[:, -1], jax.random.fold_in(key, index + 1), temperature)
        return (following, done, cache), emitted

    (_, _, _), tokens = jax.lax.scan(step, (first, jnp.zeros((batch,), bool), cache), jnp.arange(max_new_tokens))
    return tokens.T
