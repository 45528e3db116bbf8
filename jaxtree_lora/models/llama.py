"""A Llama-family decoder in Flax NNX: Llama 2/3.x, Mistral, SmolLM2, Qwen2 (q/k/v biases).

Per-layer weights are stacked [num_layers, ...] and the blocks run under `jax.lax.scan`. Kernels are
stored [d_in, d_out]. Grouped-query attention with rotary embeddings in Hugging Face's rotate-half
convention, RMSNorm, SwiGLU MLP, causal and padding masks (left padding: positions come from the
attention mask). An optional KV cache makes generation incremental (see `generate.py`).

LoRA sites: "attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
"mlp.up_proj", "mlp.down_proj".
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import Site, rms_norm, scan_layers
from jaxtree_lora.models.stacked import Stacked

NEG = -1e30


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
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
    # Llama 3.x "llama3" rope scaling: (factor, low_freq_factor, high_freq_factor, original_max_position).
    rope_scaling: Optional[tuple] = None
    remat: bool = False

    @classmethod
    def from_hf(cls, config) -> "LlamaConfig":
        model_type = getattr(config, "model_type", "")
        if model_type not in ("llama", "mistral", "qwen2"):
            raise hf.CheckpointError(f"model_type {model_type!r} is not a Llama-family decoder "
                                     f"(llama, mistral, qwen2 are supported)")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise hf.CheckpointError(f"hidden_act {config.hidden_act!r} is not supported (silu only)")
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        scaling = None
        rope = getattr(config, "rope_scaling", None) or getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) if isinstance(rope, dict) else None
        theta = getattr(config, "rope_theta", None) or (rope.get("rope_theta") if isinstance(rope, dict) else None) \
            or 10000.0
        if rope_type == "llama3":
            scaling = (float(rope["factor"]), float(rope["low_freq_factor"]), float(rope["high_freq_factor"]),
                       int(rope["original_max_position_embeddings"]))
        elif rope_type not in (None, "default"):
            raise hf.CheckpointError(f"rope scaling {rope_type!r} is not supported (default or llama3)")
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=heads, num_kv_heads=getattr(config, "num_key_value_heads", None) or heads,
                   head_dim=head_dim, rope_theta=float(theta), rms_norm_eps=config.rms_norm_eps,
                   max_position=config.max_position_embeddings,
                   tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
                   attention_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
                   rope_scaling=scaling)


def layer_shapes(c: LlamaConfig) -> dict:
    n, d, f = c.num_layers, c.hidden_size, c.intermediate_size
    q, kv = c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
    shapes = {"q_proj": (n, d, q), "k_proj": (n, d, kv), "v_proj": (n, d, kv), "o_proj": (n, q, d),
              "gate_proj": (n, d, f), "up_proj": (n, d, f), "down_proj": (n, f, d),
              "input_norm": (n, d), "post_norm": (n, d)}
    if c.attention_bias:
        shapes.update({"q_bias": (n, q), "k_bias": (n, kv), "v_bias": (n, kv)})
    return shapes


def inverse_frequencies(c: LlamaConfig) -> np.ndarray:
    inv = 1.0 / (c.rope_theta ** (np.arange(0, c.head_dim, 2, dtype=np.float64) / c.head_dim))
    if c.rope_scaling:
        factor, low, high, original = c.rope_scaling
        low_wavelen, high_wavelen = original / low, original / high
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv = np.where(medium, smoothed, scaled)
    return inv.astype(np.float32)


def rotate_half(x):
    half = x.shape[-1] // 2
    return jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)


def rope_tables(positions, inverse):
    """cos, sin [B, T, 1, head_dim] for integer positions [B, T]."""
    freqs = positions[..., None].astype(jnp.float32) * inverse[None, None, :]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb)[:, :, None, :], jnp.sin(emb)[:, :, None, :]


def decoder_block(x, p, hook, bias, cos, sin, c: LlamaConfig, cache_k=None, cache_v=None, index=None):
    """One pre-norm Llama block. x [B,T,d]; bias [B,1,T,S] additive; returns (x, (k_cache, v_cache))."""
    batch, seq, _ = x.shape
    dtype = x.dtype

    def project(site, name, inputs, bias_name=None):
        y = inputs @ p[name].astype(dtype)
        if bias_name is not None and bias_name in p:
            y = y + p[bias_name].astype(dtype)
        return hook(site, inputs, y)

    h = rms_norm(x, p["input_norm"], c.rms_norm_eps)
    q = project("attn.q_proj", "q_proj", h, "q_bias").reshape(batch, seq, c.num_heads, c.head_dim)
    k = project("attn.k_proj", "k_proj", h, "k_bias").reshape(batch, seq, c.num_kv_heads, c.head_dim)
    v = project("attn.v_proj", "v_proj", h, "v_bias").reshape(batch, seq, c.num_kv_heads, c.head_dim)
    q = (q.astype(jnp.float32) * cos + rotate_half(q.astype(jnp.float32)) * sin).astype(dtype)
    k = (k.astype(jnp.float32) * cos + rotate_half(k.astype(jnp.float32)) * sin).astype(dtype)
    if cache_k is not None:
        cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, index, 0, 0))
        cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, index, 0, 0))
        k, v = cache_k.astype(dtype), cache_v.astype(dtype)
    groups = c.num_heads // c.num_kv_heads
    q = q.reshape(batch, seq, c.num_kv_heads, groups, c.head_dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k).astype(jnp.float32) / math.sqrt(c.head_dim)
    scores = scores + bias[:, :, None]  # bias [B,1,T,S] -> [B,1,1,T,S]
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    context = jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, seq, c.num_heads * c.head_dim)
    x = x + project("attn.o_proj", "o_proj", context)
    h = rms_norm(x, p["post_norm"], c.rms_norm_eps)
    gate = project("mlp.gate_proj", "gate_proj", h)
    up = project("mlp.up_proj", "up_proj", h)
    x = x + project("mlp.down_proj", "down_proj", jax.nn.silu(gate) * up)
    return x, (cache_k, cache_v)


class LlamaDecoder(nnx.Module):
    def __init__(self, config: LlamaConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        key = rngs.params()
        d = config.hidden_size
        self.embed = nnx.Param((0.02 * jax.random.normal(jax.random.fold_in(key, 0), (config.vocab_size, d)))
                               .astype(param_dtype))
        self.final_norm = nnx.Param(jnp.ones((d,), param_dtype))
        if not config.tie_embeddings:
            self.lm_head = nnx.Param((0.02 * jax.random.normal(jax.random.fold_in(key, 1), (d, config.vocab_size)))
                                     .astype(param_dtype))
        self.layers = Stacked(layer_shapes(config), jax.random.fold_in(key, 2), param_dtype,
                              ones=("input_norm", "post_norm"))

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        c = self.config
        d, f, q, kv = c.hidden_size, c.intermediate_size, c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
        return {"attn.q_proj": Site(d, q), "attn.k_proj": Site(d, kv), "attn.v_proj": Site(d, kv),
                "attn.o_proj": Site(q, d), "mlp.gate_proj": Site(d, f), "mlp.up_proj": Site(d, f),
                "mlp.down_proj": Site(f, d)}

    @staticmethod
    def hf_module_path(site: str, layer: int) -> str:
        group, name = site.split(".")
        return f"model.layers.{layer}.{'self_attn' if group == 'attn' else 'mlp'}.{name}"

    def init_cache(self, batch: int, length: int, dtype=jnp.float32) -> dict:
        c = self.config
        shape = (c.num_layers, batch, length, c.num_kv_heads, c.head_dim)
        return {"k": jnp.zeros(shape, dtype), "v": jnp.zeros(shape, dtype),
                "mask": jnp.zeros((batch, length), jnp.int32), "index": jnp.zeros((), jnp.int32),
                "positions": jnp.zeros((batch,), jnp.int32)}

    def __call__(self, tokens, attention_mask=None, *, adapters=None, delta=None, rng=None, cache=None,
                 compute_dtype=None):
        """Logits [B, T, vocab] (float32) for tokens [B, T]; with a cache also returns the new cache."""
        c = self.config
        dtype = compute_dtype or self.embed[...].dtype
        batch, seq = tokens.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        attention_mask = attention_mask.astype(jnp.int32)
        offsets = jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)
        if cache is None:
            positions = offsets
            key_mask = attention_mask
            query_slots = jnp.arange(seq)
            key_slots = jnp.arange(seq)
            index = None
        else:
            index = cache["index"]
            positions = cache["positions"][:, None] + offsets
            key_mask = jax.lax.dynamic_update_slice(cache["mask"], attention_mask, (0, index))
            query_slots = index + jnp.arange(seq)
            key_slots = jnp.arange(cache["mask"].shape[1])
        causal = key_slots[None, :] <= query_slots[:, None]  # [T, S]
        allowed = causal[None] & (key_mask[:, None, :] > 0)
        bias = jnp.where(allowed, 0.0, NEG)[:, None].astype(jnp.float32)  # [B,1,T,S]
        cos, sin = rope_tables(positions, jnp.asarray(inverse_frequencies(c)))
        x = self.embed[...][tokens].astype(dtype)
        layer_params = self.layers.as_dict()
        if cache is not None:
            layer_params = {**layer_params, "_cache_k": cache["k"], "_cache_v": cache["v"]}

        def body(carry, p, hook):
            cache_k, cache_v = p.get("_cache_k"), p.get("_cache_v")
            out, caches = decoder_block(carry, p, hook, bias, cos, sin, c, cache_k, cache_v, index)
            return out, (caches if cache is not None else None)

        x, new_caches = scan_layers(body, x, layer_params, adapters, delta, rng, c.num_layers, remat=c.remat)
        x = rms_norm(x, self.final_norm[...], c.rms_norm_eps)
        head = self.embed[...].T if c.tie_embeddings else self.lm_head[...]
        logits = (x @ head.astype(dtype)).astype(jnp.float32)
        if cache is None:
            return logits
        new_cache = {"k": new_caches[0], "v": new_caches[1], "mask": key_mask, "index": index + seq,
                     "positions": cache["positions"] + jnp.sum(attention_mask, axis=1)}
        return logits, new_cache


def _linear(w):
    return np.asarray(w).T


def rules(config: LlamaConfig) -> list:
    layer = r"model\.layers\.(?P<layer>\d+)\."
    out = [hf.KeyRule(r"model\.embed_tokens\.weight", ("embed",)),
           hf.KeyRule(r"model\.norm\.weight", ("final_norm",)),
           hf.KeyRule(r"lm_head\.weight", ("lm_head",), _linear)]
    for group, names in (("self_attn", ("q_proj", "k_proj", "v_proj", "o_proj")),
                         ("mlp", ("gate_proj", "up_proj", "down_proj"))):
        for name in names:
            out.append(hf.KeyRule(layer + rf"{group}\.{name}\.weight", ("layers", name), _linear))
    for name in ("q", "k", "v"):
        out.append(hf.KeyRule(layer + rf"self_attn\.{name}_proj\.bias", ("layers", f"{name}_bias")))
    out.append(hf.KeyRule(layer + r"input_layernorm\.weight", ("layers", "input_norm")))
    out.append(hf.KeyRule(layer + r"post_attention_layernorm\.weight", ("layers", "post_norm")))
    return out


def expected_shapes(c: LlamaConfig) -> dict:
    shapes = {("embed",): (c.vocab_size, c.hidden_size), ("final_norm",): (c.hidden_size,)}
    if not c.tie_embeddings:
        shapes[("lm_head",)] = (c.hidden_size, c.vocab_size)
    shapes.update({("layers", name): shape for name, shape in layer_shapes(c).items()})
    return shapes


def from_arrays(config: LlamaConfig, mapped: dict, dtype=jnp.float32) -> LlamaDecoder:
    """A decoder whose Params are the given {target path: array} (shapes already checked)."""
    model = nnx.eval_shape(lambda: LlamaDecoder(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    for path, value in mapped.items():
        node = model
        for key in path[:-1]:
            node = getattr(node, key)
        getattr(node, path[-1]).set_value(jnp.asarray(hf.to_dtype(value, dtype)))
    return model


def load_hf(directory: str, dtype=jnp.float32):
    """(LlamaDecoder, tokenizer) from a Hugging Face checkpoint directory."""
    from transformers import AutoTokenizer

    config = LlamaConfig.from_hf(hf.read_config(directory))
    tensors = hf.read_tensors(directory)
    if config.tie_embeddings:
        tensors.pop("lm_head.weight", None)
    mapped = hf.map_checkpoint(tensors, rules(config), expected_shapes(config), config.num_layers,
                               ignore=[r".*rotary_emb\.inv_freq"])
    model = from_arrays(config, mapped, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer
