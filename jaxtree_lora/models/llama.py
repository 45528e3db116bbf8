"""A Llama-family decoder in Flax NNX: Llama 2/3.x, Mistral, SmolLM2, Qwen2 (q/k/v biases).

Stacked blocks under `common.scan_layers` (one compiled block), kernels [d_in, d_out]; grouped-query
attention with rotate-half rotary embeddings, RMSNorm, SwiGLU. Rotary positions are
`cumsum(mask) - 1`, so left padding (generation) and right padding (training) both see the unpadded
positions. LoRA sites: "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj",
"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"; after each frozen projection (bias included) the
block calls `hook(site, x, y)`. `init_cache(batch, length)` preallocates the KV cache; a call with
`cache=` writes at the next slot (see `generate.py`). Pure use:

    graphdef, params = nnx.split(model)
    logits = jax.jit(lambda p, ids, mask: apply(graphdef, p, ids, mask))(params, ids, mask)
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import Site, attention, dense, rms_norm, scan_layers, silu, stash, unstash
from jaxtree_lora.models.stacked import Stacked

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
    """Shapes and constants of a Llama-family decoder.

    Attributes:
      attention_bias: biases on q/k/v (Qwen2; Llama configs with `attention_bias=True`).
      attention_output_bias: bias on o_proj (Llama's `attention_bias=True` biases o_proj too; Qwen2 does not).
      mlp_bias: biases on gate/up/down (Llama's `mlp_bias`).
      rope_scaling: Llama 3.x "llama3" scaling as (factor, low_freq_factor, high_freq_factor,
        original_max_position), or None.
      rope_frequency_factors: per-frequency divisors of the inverse frequencies [head_dim // 2]
        (llama.cpp's `rope_freqs` tensor, the GGUF form of llama3 scaling), or None.
      sliding_window: Mistral's attention window: a query attends to the `sliding_window` most
        recent keys (itself included). None attends to everything before it.
      dtype: default compute dtype (None: the parameters' dtype); `__call__(compute_dtype=)` overrides it.
      param_dtype: dtype of the parameters a fresh module creates.
      remat: rematerialise each scanned block in the backward pass.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_layers: int = 32
    num_heads: int = 32
    num_kv_heads: int = 32
    head_dim: int = 128
    rope_theta: float = 10000.0
    rms_norm_eps: float = 1e-5
    max_position: int = 4096
    tie_embeddings: bool = False
    attention_bias: bool = False
    attention_output_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: Optional[tuple] = None
    rope_frequency_factors: Optional[tuple] = None
    sliding_window: Optional[int] = None
    dtype: Any = None
    param_dtype: Any = jnp.float32
    remat: bool = False

    def __post_init__(self):
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of num_kv_heads={self.num_kv_heads}: "
                             f"grouped-query attention needs whole groups")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for rotary embeddings")
        if self.rope_scaling is not None and len(self.rope_scaling) != 4:
            raise ValueError("rope_scaling is (factor, low_freq_factor, high_freq_factor, original_max_position)")
        if self.rope_frequency_factors is not None and len(self.rope_frequency_factors) != self.head_dim // 2:
            raise ValueError(f"rope_frequency_factors has {len(self.rope_frequency_factors)} entries, "
                             f"expected head_dim // 2 = {self.head_dim // 2}")

    @classmethod
    def from_hf(cls, config, **overrides) -> "LlamaConfig":
        """From a transformers LlamaConfig / MistralConfig / Qwen2Config (or one read by AutoConfig)."""
        model_type = getattr(config, "model_type", "")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise hf.CheckpointError(
                f"model_type {model_type!r} is not a supported Llama-family decoder: use a checkpoint whose "
                f"config.json has model_type {', '.join(SUPPORTED_MODEL_TYPES)}")
        activation = getattr(config, "hidden_act", "silu")
        if activation != "silu":
            raise hf.CheckpointError(f"hidden_act {activation!r} is not supported: this decoder's MLP is SwiGLU (silu)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        theta = rope.get("rope_theta") or getattr(config, "rope_theta", None) or 10000.0
        scaling = None
        if rope_type == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise hf.CheckpointError(f"rope_type {rope_type!r} is not supported: only 'default' and 'llama3' are")
        window = None
        if model_type == "mistral":
            window = getattr(config, "sliding_window", None)
        elif model_type == "qwen2" and getattr(config, "use_sliding_window", False):
            # Qwen2 windows only some layers (max_window_layers); the scanned block is one program
            # for every layer, so a per-layer window is not represented.
            raise hf.CheckpointError("Qwen2 with use_sliding_window=true is not supported: set use_sliding_window "
                                     "to false in config.json (exact for sequences shorter than sliding_window)")
        biased = bool(getattr(config, "attention_bias", False))
        values = dict(
            vocab_size=config.vocab_size, hidden_size=config.hidden_size,
            intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers, num_heads=heads,
            num_kv_heads=getattr(config, "num_key_value_heads", None) or heads, head_dim=head_dim,
            rope_theta=float(theta), rms_norm_eps=float(config.rms_norm_eps),
            max_position=int(config.max_position_embeddings),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            attention_bias=model_type == "qwen2" or biased,
            attention_output_bias=model_type == "llama" and biased,
            mlp_bias=model_type == "llama" and bool(getattr(config, "mlp_bias", False)),
            rope_scaling=scaling, sliding_window=int(window) if window else None)
        values.update(overrides)
        return hf.make_config(cls, **values)


def layer_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Stacked per-layer parameter shapes, [num_layers, ...] each."""
    n, d, f = config.num_layers, config.hidden_size, config.intermediate_size
    q, kv = config.num_heads * config.head_dim, config.num_kv_heads * config.head_dim
    shapes = {"q_proj": (n, d, q), "k_proj": (n, d, kv), "v_proj": (n, d, kv), "o_proj": (n, q, d),
              "gate_proj": (n, d, f), "up_proj": (n, d, f), "down_proj": (n, f, d),
              "input_norm": (n, d), "post_norm": (n, d)}
    if config.attention_bias:
        shapes.update({"q_bias": (n, q), "k_bias": (n, kv), "v_bias": (n, kv)})
    if config.attention_output_bias:
        shapes["o_bias"] = (n, d)
    if config.mlp_bias:
        shapes.update({"gate_bias": (n, f), "up_bias": (n, f), "down_bias": (n, d)})
    return shapes


def inverse_frequencies(config: LlamaConfig) -> np.ndarray:
    """Rotary inverse frequencies [head_dim // 2], with llama3 scaling or GGUF factors applied."""
    dim = config.head_dim
    inverse = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    if config.rope_scaling is not None:
        factor, low_factor, high_factor, original = config.rope_scaling
        wavelength = 2 * math.pi / inverse
        # Long wavelengths are slowed by `factor`, short ones kept, the band between interpolated.
        scaled = np.where(wavelength > original / low_factor, inverse / factor, inverse)
        smooth = (original / wavelength - low_factor) / (high_factor - low_factor)
        interpolated = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelength >= original / high_factor) & (wavelength <= original / low_factor)
        inverse = np.where(medium, interpolated, scaled)
    if config.rope_frequency_factors is not None:
        inverse = inverse / np.asarray(config.rope_frequency_factors, np.float64)
    return inverse.astype(np.float32)


def rotate_half(x: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(positions: jax.Array, inverse: jax.Array) -> tuple[jax.Array, jax.Array]:
    """cos, sin [batch, seq, 1, head_dim] (float32) for integer positions [batch, seq]."""
    angles = positions[..., None].astype(jnp.float32) * inverse
    angles = jnp.concatenate([angles, angles], axis=-1)
    return jnp.cos(angles)[:, :, None, :], jnp.sin(angles)[:, :, None, :]


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """x [batch, seq, heads, head_dim]; the rotation is computed in float32."""
    x32 = x.astype(jnp.float32)
    return (x32 * cos + rotate_half(x32) * sin).astype(x.dtype)


def cached_attention(query, keys, values, allowed):
    """Attention of query [batch, seq, heads, head_dim] over a cache's keys and values [batch, kv_heads,
    slots, head_dim] (grouped-query: each kv head serves its group of query heads); allowed [batch, 1,
    seq, slots]. Softmax in float32; a query with no allowed key gets a uniform softmax (never read)."""
    batch, seq, heads, dim = query.shape
    groups = heads // keys.shape[1]
    query = query.reshape(batch, seq, keys.shape[1], groups, dim)
    scores = jnp.einsum("btngh,bnsh->bngts", query, keys, preferred_element_type=jnp.float32) / np.sqrt(dim)
    scores = jnp.where(allowed[:, :, None], scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1).astype(values.dtype)
    return jnp.einsum("bngts,bnsh->btngh", weights, values)


def decoder_block(x, params, hook, allowed, cos, sin, config: LlamaConfig, cache_keys=None,
                  cache_values=None, cache_index=None, layer=None):
    """One pre-norm block.

    Args:
      x: [batch, seq, hidden] in the compute dtype.
      params: this layer's slice of the stacked parameters.
      allowed: [batch, 1, seq, keys] bool, True where a query may attend to a key (causal, window, padding).
      cos, sin: [batch, seq, 1, head_dim] rotary tables.
      cache_keys, cache_values: the whole cache [layers, batch, kv_heads, slots, head_dim], or None.
      cache_index: the slot the first of these `seq` tokens is written to; layer: this layer's index.
    Returns (x, (cache_keys, cache_values)) with the cache updated (None without a cache).
    """
    batch, seq, _ = x.shape
    dtype = x.dtype
    c = config

    def project(site, name, inputs):
        y = dense(inputs, params[name])
        bias = params.get(name.replace("_proj", "_bias"))
        if bias is not None:
            y = y + bias.astype(dtype)
        return hook(site, inputs, y)

    h = rms_norm(x, params["input_norm"], c.rms_norm_eps)
    q = project("attn.q_proj", "q_proj", h).reshape(batch, seq, c.num_heads, c.head_dim)
    k = project("attn.k_proj", "k_proj", h).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    v = project("attn.v_proj", "v_proj", h).reshape(batch, seq, c.num_kv_heads, c.head_dim)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    if cache_keys is not None:
        # The stacked cache [layers, batch, kv_heads, slots, head_dim]: this layer's new slots written in
        # place; attention reads the layer's [batch, kv_heads, slots, head_dim] without a transpose.
        # A bf16 cache on CPU rides as its uint16 bits (`common.stash`: written in place, not widened).
        start = (layer, 0, 0, cache_index, 0)
        stored = jnp.bfloat16 if cache_keys.dtype == jnp.uint16 else cache_keys.dtype
        write = lambda cache, new: jax.lax.dynamic_update_slice(cache, stash(new.swapaxes(1, 2)[None].astype(stored)),
                                                                start)
        cache_keys, cache_values = write(cache_keys, k), write(cache_values, v)
        layer_of = lambda cache: jax.lax.dynamic_index_in_dim(cache, layer, 0, keepdims=False)
        read = lambda cache: unstash(layer_of(cache), stored).astype(dtype)
        context = cached_attention(q, read(cache_keys), read(cache_values), allowed)
    else:
        # Grouped-query attention: each kv head serves its group of query heads (keys never repeated).
        context = attention(q, k, v, allowed)
    context = context.reshape(batch, seq, c.num_heads * c.head_dim)
    x = x + project("attn.o_proj", "o_proj", context)
    h = rms_norm(x, params["post_norm"], c.rms_norm_eps)
    gate = project("mlp.gate_proj", "gate_proj", h)
    up = project("mlp.up_proj", "up_proj", h)
    x = x + project("mlp.down_proj", "down_proj", silu(gate) * up)
    return x, (cache_keys, cache_values)


class LlamaDecoder(nnx.Module):
    """Llama-family causal LM. Parameters:

    embed [vocab, hidden]; final_norm [hidden]; lm_head [hidden, vocab] (absent when tied);
    layers.<name> [num_layers, ...] (see `layer_shapes`).
    """

    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=None):
        param_dtype = param_dtype or config.param_dtype
        self.config = config
        key = rngs.params()
        d, vocab = config.hidden_size, config.vocab_size
        normal = lambda index, shape: (0.02 * jax.random.normal(jax.random.fold_in(key, index), shape)).astype(
            param_dtype)
        self.embed = nnx.Param(normal(0, (vocab, d)))
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param(normal(1, (d, vocab)))
        self.layers = Stacked(layer_shapes(config), jax.random.fold_in(key, 2), param_dtype,
                              ones=("input_norm", "post_norm"))

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        c = self.config
        d, f = c.hidden_size, c.intermediate_size
        q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"attn.q_proj": Site(d, q), "attn.k_proj": Site(d, kv), "attn.v_proj": Site(d, kv),
                "attn.o_proj": Site(q, d), "mlp.gate_proj": Site(d, f), "mlp.up_proj": Site(d, f),
                "mlp.down_proj": Site(f, d)}

    @staticmethod
    def site_kernel(site: str) -> str:
        """The stacked kernel of a site in `layers`: "attn.q_proj" -> "q_proj"."""
        return site.split(".")[1]

    @staticmethod
    def hf_module_path(site: str, layer: int) -> str:
        """"attn.q_proj", 3 -> "model.layers.3.self_attn.q_proj" (PEFT target names)."""
        group, name = site.split(".")
        if group not in ("attn", "mlp"):
            raise ValueError(f"unknown site {site!r}: sites are attn.* or mlp.*")
        return f"model.layers.{layer}.{'self_attn' if group == 'attn' else 'mlp'}.{name}"

    def init_cache(self, batch: int, length: int, dtype=None) -> dict:
        """An empty KV cache with `length` slots.

        k, v: [num_layers, batch, kv_heads, length, head_dim]; mask: [batch, length] (1 = filled with a
        real token); index: next slot to write; positions: [batch] next rotary position per row.
        """
        c = self.config
        dtype = dtype or c.dtype or self.embed[...].dtype
        shape = (c.num_layers, batch, c.num_kv_heads, length, c.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "mask": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32),
                "positions": jnp.zeros((batch,), jnp.int32)}

    def hidden_states(self, tokens, attention_mask=None, *, adapters=None, delta=None, rng=None, cache=None,
                      compute_dtype=None):
        """Final-normed hidden states [batch, seq, hidden] (and the new cache when `cache` is given)."""
        c = self.config
        dtype = compute_dtype or c.dtype or self.embed[...].dtype
        batch, seq = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        # Position of each token among its row's real tokens (padding gets a harmless 0 or repeat).
        offsets = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if cache is None:
            positions, key_mask, start = offsets, attention_mask, 0
            key_slots = jnp.arange(seq)
        else:
            start = cache["index"]
            positions = cache["positions"][:, None] + offsets
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, start))
            key_slots = jnp.arange(cache["mask"].shape[1])
        query_slots = start + jnp.arange(seq)
        allowed = key_slots[None, :] <= query_slots[:, None]  # [seq, keys]
        if c.sliding_window is not None:
            # Slots of a row's real tokens are contiguous (padding only on the left), so slot
            # distance equals position distance.
            allowed &= query_slots[:, None] - key_slots[None, :] < c.sliding_window
        allowed = (allowed[None] & (key_mask[:, None, :] > 0))[:, None]  # [batch, 1, seq, keys]
        cos, sin = rope_tables(positions, jnp.asarray(inverse_frequencies(c)))
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        layer_params = self.layers.as_dict()
        if cache is None:
            body = lambda carry, params, hook: (decoder_block(carry, params, hook, allowed, cos, sin, c)[0], None)
            x, _ = scan_layers(body, x, layer_params, adapters, delta, rng, c.num_layers, remat=c.remat)
            return rms_norm(x, self.final_norm[...], c.rms_norm_eps)

        # The whole cache rides in the scan's carry and each layer writes its slots in place: as the
        # scan's per-layer input and output it would be copied whole at every call (every decode step).
        def body(carry, params, hook):
            x, keys, values = carry
            x, (keys, values) = decoder_block(x, params, hook, allowed, cos, sin, c, keys, values, start,
                                              params["layer_index"])
            return (x, keys, values), None

        layer_params = {**layer_params, "layer_index": jnp.arange(c.num_layers)}
        (x, keys, values), _ = scan_layers(body, (x, stash(cache["k"]), stash(cache["v"])), layer_params, adapters,
                                           delta, rng, c.num_layers, remat=c.remat)
        keys, values = unstash(keys, cache["k"].dtype), unstash(values, cache["v"].dtype)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        new_cache = {"k": keys, "v": values, "mask": key_mask, "index": start + seq,
                     "positions": cache["positions"] + jnp.sum(attention_mask, axis=1)}
        return x, new_cache

    def logits_from_hidden(self, x):
        """[batch, seq, hidden] -> float32 logits [batch, seq, vocab]."""
        head = self.embed[...].T if self.config.tie_embeddings else self.lm_head[...]
        return dense(x, head, jnp.float32)

    def __call__(self, tokens, attention_mask=None, *, adapters=None, delta=None, rng=None, cache=None,
                 compute_dtype=None, logits_window: Optional[tuple[int, int]] = None):
        """Next-token logits.

        Args:
          tokens: [batch, seq] int32.
          attention_mask: [batch, seq], 1 for real tokens; None means all real.
          adapters, delta: the adapter pytree and delta function (see common.py); rng: dropout key.
          cache: from `init_cache`; the tokens are written at its next slot.
          compute_dtype: e.g. jnp.bfloat16 for bf16 matmuls (norms, softmax and logits stay float32).
          logits_window: static (start, stop): logits only at positions start..stop-1. The LM head is
            the largest matmul of a small decoder ([seq, hidden] x [hidden, vocab]); a loss that reads
            only the answer positions, or a prefill that reads only the last one, skips the rest.
        Returns logits [batch, seq, vocab] float32 ([batch, stop - start, vocab] with a window), or
        (logits, new_cache) when a cache is given.
        """
        out = self.hidden_states(tokens, attention_mask, adapters=adapters, delta=delta, rng=rng, cache=cache,
                                 compute_dtype=compute_dtype)
        hidden, new_cache = (out, None) if cache is None else out
        if logits_window is not None:
            start, stop = logits_window
            hidden = hidden[:, start:stop]
        logits = self.logits_from_hidden(hidden)
        return logits if cache is None else (logits, new_cache)

    def features(self, tokens, attention_mask=None, *, adapters=None, delta=None, rng=None, compute_dtype=None):
        """The last real token's final hidden state [batch, hidden] (left or right padding)."""
        hidden = self.hidden_states(tokens, attention_mask, adapters=adapters, delta=delta, rng=rng,
                                    compute_dtype=compute_dtype)
        if attention_mask is None:
            return hidden[:, -1]
        slots = jnp.arange(tokens.shape[1])
        last = jnp.max(jnp.where(attention_mask > 0, slots[None, :], 0), axis=1)
        return jnp.take_along_axis(hidden, last[:, None, None], axis=1)[:, 0]


def apply(graphdef, params, tokens, attention_mask=None, **kwargs):
    """The decoder as a pure function of its parameter pytree: `nnx.merge(graphdef, params)(...)`."""
    return nnx.merge(graphdef, params)(tokens, attention_mask, **kwargs)


# ------------------------------------------------------------------------------------------ loading
def _linear(weight: np.ndarray) -> np.ndarray:
    """nn.Linear [out, in] -> kernel [in, out]."""
    return np.ascontiguousarray(np.asarray(weight).T)


def rules(config: LlamaConfig) -> list[hf.KeyRule]:
    """Hugging Face tensor names -> this decoder's parameters."""
    layer = r"model\.layers\.(?P<layer>\d+)\."
    out = [hf.KeyRule(r"model\.embed_tokens\.weight", ("embed",)),
           hf.KeyRule(r"model\.norm\.weight", ("final_norm",)),
           hf.KeyRule(r"lm_head\.weight", ("lm_head",), _linear),
           hf.KeyRule(layer + r"input_layernorm\.weight", ("layers", "input_norm")),
           hf.KeyRule(layer + r"post_attention_layernorm\.weight", ("layers", "post_norm"))]
    for group, names in (("self_attn", ("q", "k", "v", "o")), ("mlp", ("gate", "up", "down"))):
        for name in names:
            out.append(hf.KeyRule(layer + rf"{group}\.{name}_proj\.weight", ("layers", f"{name}_proj"), _linear))
            out.append(hf.KeyRule(layer + rf"{group}\.{name}_proj\.bias", ("layers", f"{name}_bias")))
    return out


def expected_shapes(config: LlamaConfig) -> dict[tuple[str, ...], tuple[int, ...]]:
    shapes = {("embed",): (config.vocab_size, config.hidden_size), ("final_norm",): (config.hidden_size,)}
    if not config.tie_embeddings:
        shapes[("lm_head",)] = (config.hidden_size, config.vocab_size)
    shapes.update({("layers", name): shape for name, shape in layer_shapes(config).items()})
    return shapes


def from_arrays(config: LlamaConfig, mapped: dict, dtype=jnp.float32) -> LlamaDecoder:
    """A decoder whose parameters are `{target path: array}` (shapes already checked).

    Built abstractly first (nnx.eval_shape), so no random weights are materialised and thrown away.
    """
    config = dataclasses.replace(config, param_dtype=dtype)
    model = nnx.eval_shape(lambda: LlamaDecoder(config, rngs=nnx.Rngs(0)))
    expected = expected_shapes(config)
    missing = [".".join(path) for path in expected if path not in mapped]
    if missing:
        raise hf.CheckpointError(f"no weights for {', '.join(missing)}")
    for path, value in mapped.items():
        if path not in expected:
            raise hf.CheckpointError(f"{'.'.join(path)} is not a parameter of this decoder")
    hf.assign(model, mapped, dtype)
    return model


def load_hf(directory: str, dtype=jnp.float32):
    """(LlamaDecoder, tokenizer) from a Hugging Face checkpoint directory (single or sharded safetensors).

    Tied embeddings: when the config ties them, an `lm_head.weight` in the file is dropped (it is a copy).
    A bare decoder (LlamaModel's names, without "model.") loads when its embeddings are tied.
    """
    from transformers import AutoTokenizer

    hf_config = hf.read_config(directory)
    config = LlamaConfig.from_hf(hf_config)
    tensors = hf.read_tensors(directory)
    if "model.embed_tokens.weight" not in tensors and "embed_tokens.weight" in tensors:
        # A bare LlamaModel / MistralModel / Qwen2Model saved without its LM head: names lack "model.".
        tensors = {name if name.startswith("lm_head.") else f"model.{name}": value for name, value in tensors.items()}
        if not config.tie_embeddings and "lm_head.weight" not in tensors:
            raise hf.CheckpointError(f"{directory} holds a decoder without its LM head (a bare {hf_config.model_type} "
                                     "model, untied embeddings): save the ...ForCausalLM model, or set "
                                     "tie_word_embeddings true in config.json if its head is the embedding")
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    mapped = hf.map_checkpoint(tensors, rules(config), expected_shapes(config), config.num_layers,
                               ignore=[r".*rotary_emb\.inv_freq"])
    model = from_arrays(config, mapped, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers raises many types for missing or broken tokenizer files
        raise hf.CheckpointError(f"cannot load the tokenizer in {directory} ({error}): add tokenizer.json "
                                 f"(and tokenizer_config.json) from the model's repository") from error
    return model, tokenizer
