"""A BERT-style encoder in Flax NNX (post-LayerNorm blocks), e.g. all-MiniLM-L6-v2.

Per-layer weights are stacked with a leading `num_layers` axis and the blocks run under
`jax.lax.scan` (common.scan_layers). Kernels are stored [d_in, d_out]. LoRA sites:
"attn.query", "attn.key", "attn.value", "attn.output", "mlp.intermediate", "mlp.output".

    model = BertEncoder(BertConfig(...), rngs=nnx.Rngs(0))
    hidden = model(input_ids [B,T], attention_mask [B,T])          # [B, T, hidden]
    pooled = model.features(input_ids, attention_mask)             # [B, hidden], mean pooling
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import Site, layer_norm, scan_layers
from jaxtree_lora.models.stacked import Stacked

SITES = ("attn.query", "attn.key", "attn.value", "attn.output", "mlp.intermediate", "mlp.output")


@dataclasses.dataclass(frozen=True)
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 12
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"  # exact (erf) GELU as in HF BERT; "gelu_new" is the tanh form
    pooling: str = "mean"  # "mean" (sentence-transformers) or "cls"
    remat: bool = False

    @classmethod
    def from_hf(cls, config) -> "BertConfig":
        if getattr(config, "model_type", "bert") not in ("bert", "roberta", "xlm-roberta"):
            raise hf.CheckpointError(f"model_type {config.model_type!r} is not a BERT-style encoder")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise hf.CheckpointError(
                f"position_embedding_type {config.position_embedding_type!r} is not supported (absolute only)")
        if config.hidden_act not in ("gelu", "gelu_new", "gelu_pytorch_tanh"):
            raise hf.CheckpointError(f"hidden_act {config.hidden_act!r} is not supported (gelu, gelu_new)")
        return cls(vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                   intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                   num_heads=config.num_attention_heads, max_position=config.max_position_embeddings,
                   type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
                   hidden_act="gelu" if config.hidden_act == "gelu" else "gelu_new")


def gelu(x, kind: str):
    return jax.nn.gelu(x, approximate=kind != "gelu")


def layer_shapes(config: BertConfig) -> dict:
    h, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    return {
        "query": (n, h, h), "query_bias": (n, h), "key": (n, h, h), "key_bias": (n, h),
        "value": (n, h, h), "value_bias": (n, h), "attn_out": (n, h, h), "attn_out_bias": (n, h),
        "attn_norm": (n, h), "attn_norm_bias": (n, h),
        "intermediate": (n, h, f), "intermediate_bias": (n, f), "output": (n, f, h), "output_bias": (n, h),
        "out_norm": (n, h), "out_norm_bias": (n, h),
    }


def encoder_block(x, p, hook, mask_bias, num_heads: int, eps: float, act: str):
    """One post-LN BERT block. x [B,T,H]; mask_bias [B,1,1,T] additive; p: this layer's weights."""
    batch, seq, hidden = x.shape
    head_dim = hidden // num_heads
    dtype = x.dtype

    def project(site, name, inputs):
        y = inputs @ p[name].astype(dtype) + p[name + "_bias"].astype(dtype)
        return hook(site, inputs, y)

    q = project("attn.query", "query", x).reshape(batch, seq, num_heads, head_dim)
    k = project("attn.key", "key", x).reshape(batch, seq, num_heads, head_dim)
    v = project("attn.value", "value", x).reshape(batch, seq, num_heads, head_dim)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(head_dim) + mask_bias
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, hidden)
    attended = project("attn.output", "attn_out", context)
    x = layer_norm(attended + x, p["attn_norm"], p["attn_norm_bias"], eps)
    inner = gelu(project("mlp.intermediate", "intermediate", x), act)
    out = project("mlp.output", "output", inner)
    return layer_norm(out + x, p["out_norm"], p["out_norm_bias"], eps)


class BertEncoder(nnx.Module):
    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        h = config.hidden_size
        normal = nnx.initializers.normal(0.02)
        key = rngs.params()
        self.word_embeddings = nnx.Param(normal(jax.random.fold_in(key, 0), (config.vocab_size, h), param_dtype))
        self.position_embeddings = nnx.Param(normal(jax.random.fold_in(key, 1), (config.max_position, h), param_dtype))
        self.type_embeddings = nnx.Param(normal(jax.random.fold_in(key, 2), (config.type_vocab_size, h), param_dtype))
        self.embed_norm = nnx.Param(jnp.ones((h,), param_dtype))
        self.embed_norm_bias = nnx.Param(jnp.zeros((h,), param_dtype))
        self.layers = Stacked(layer_shapes(config), jax.random.fold_in(key, 3), param_dtype,
                              ones=("attn_norm", "out_norm"))

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        h, f = self.config.hidden_size, self.config.intermediate_size
        return {"attn.query": Site(h, h), "attn.key": Site(h, h), "attn.value": Site(h, h),
                "attn.output": Site(h, h), "mlp.intermediate": Site(h, f), "mlp.output": Site(f, h)}

    @staticmethod
    def hf_module_path(site: str, layer: int) -> str:
        names = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
                 "attn.value": "attention.self.value", "attn.output": "attention.output.dense",
                 "mlp.intermediate": "intermediate.dense", "mlp.output": "output.dense"}
        return f"encoder.layer.{layer}.{names[site]}"

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, adapters=None, delta=None,
                 rng=None, compute_dtype=None):
        """Hidden states [batch, seq, hidden] for input_ids [batch, seq] (attention_mask 1 = real token)."""
        config = self.config
        dtype = compute_dtype or self.word_embeddings[...].dtype
        batch, seq = input_ids.shape
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, seq), jnp.int32)
        x = (self.word_embeddings[...][input_ids] + self.position_embeddings[...][jnp.arange(seq)][None]
             + self.type_embeddings[...][token_type_ids])
        x = layer_norm(x, self.embed_norm[...], self.embed_norm_bias[...], config.layer_norm_eps).astype(dtype)
        mask_bias = jnp.where(attention_mask[:, None, None, :] > 0, 0.0, -1e9).astype(jnp.float32)

        def body(carry, params_l, hook):
            return encoder_block(carry, params_l, hook, mask_bias, config.num_heads, config.layer_norm_eps,
                                 config.hidden_act), None

        x, _ = scan_layers(body, x, self.layers.as_dict(), adapters, delta, rng, config.num_layers,
                           remat=config.remat)
        return x

    def features(self, input_ids, attention_mask=None, token_type_ids=None, **kwargs):
        """Sentence features [batch, hidden]: mean over real tokens (sentence-transformers) or [CLS]."""
        hidden = self(input_ids, attention_mask, token_type_ids, **kwargs).astype(jnp.float32)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return jnp.mean(hidden, axis=1)
        mask = attention_mask[..., None].astype(jnp.float32)
        return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def _linear(w):
    return np.asarray(w).T  # torch nn.Linear [out, in] -> kernel [in, out]


RULES = [
    hf.KeyRule(r"embeddings\.word_embeddings\.weight", ("word_embeddings",)),
    hf.KeyRule(r"embeddings\.position_embeddings\.weight", ("position_embeddings",)),
    hf.KeyRule(r"embeddings\.token_type_embeddings\.weight", ("type_embeddings",)),
    hf.KeyRule(r"embeddings\.LayerNorm\.(weight|gamma)", ("embed_norm",)),
    hf.KeyRule(r"embeddings\.LayerNorm\.(bias|beta)", ("embed_norm_bias",)),
]
_LAYER = r"encoder\.layer\.(?P<layer>\d+)\."
for _hf, _ours in [("attention.self.query", "query"), ("attention.self.key", "key"),
                   ("attention.self.value", "value"), ("attention.output.dense", "attn_out"),
                   ("intermediate.dense", "intermediate"), ("output.dense", "output")]:
    RULES.append(hf.KeyRule(_LAYER + _hf.replace(".", r"\.") + r"\.weight", ("layers", _ours), _linear))
    RULES.append(hf.KeyRule(_LAYER + _hf.replace(".", r"\.") + r"\.bias", ("layers", _ours + "_bias")))
for _hf, _ours in [("attention.output.LayerNorm", "attn_norm"), ("output.LayerNorm", "out_norm")]:
    RULES.append(hf.KeyRule(_LAYER + _hf.replace(".", r"\.") + r"\.(weight|gamma)", ("layers", _ours)))
    RULES.append(hf.KeyRule(_LAYER + _hf.replace(".", r"\.") + r"\.(bias|beta)", ("layers", _ours + "_bias")))


def expected_shapes(config: BertConfig) -> dict:
    h = config.hidden_size
    shapes = {("word_embeddings",): (config.vocab_size, h), ("position_embeddings",): (config.max_position, h),
              ("type_embeddings",): (config.type_vocab_size, h), ("embed_norm",): (h,), ("embed_norm_bias",): (h,)}
    shapes.update({("layers", name): shape for name, shape in layer_shapes(config).items()})
    return shapes


def strip_prefix(tensors: dict) -> dict:
    """Accepts BertModel names and BertFor*/sentence-transformers names with a 'bert.' prefix."""
    out = {}
    for name, value in tensors.items():
        for prefix in ("bert.", "model.", "roberta."):
            if name.startswith(prefix) and not name.startswith(prefix + "pooler"):
                name = name[len(prefix):]
                break
        out[name] = value
    return out


def load_hf(directory: str, dtype=jnp.float32, pooling: str = "mean"):
    """(BertEncoder, tokenizer) from a Hugging Face checkpoint directory (config.json + safetensors)."""
    from transformers import AutoTokenizer

    config = dataclasses.replace(BertConfig.from_hf(hf.read_config(directory)), pooling=pooling)
    tensors = strip_prefix(hf.read_tensors(directory))
    mapped = hf.map_checkpoint(tensors, RULES, expected_shapes(config), config.num_layers,
                               ignore=[r"embeddings\.position_ids", r".*pooler\..*", r"cls\..*", r"lm_head\..*"])
    model = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    assign(model, mapped, dtype)
    tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    return model, tokenizer


def assign(model: nnx.Module, mapped: dict, dtype) -> None:
    """Writes mapped arrays into the (abstract) module's Params."""
    for path, value in mapped.items():
        node = model
        for key in path[:-1]:
            node = getattr(node, key)
        getattr(node, path[-1]).set_value(jnp.asarray(hf.to_dtype(value, dtype)))
