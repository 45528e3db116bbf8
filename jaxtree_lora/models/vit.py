"""A Vision Transformer in Flax NNX (pre-LayerNorm blocks), loadable from the layout of
`google/vit-base-patch16-224-in21k` (Hugging Face ViTModel).

Images come in as uint8 or float [B, H, W, C]; `features` scales uint8 to [0, 1], resizes to the
model's image size, normalises with mean = std = 0.5 (the in21k checkpoints' preprocessing), embeds
16x16 patches, prepends [CLS], adds learned position embeddings, runs the stacked blocks under scan
and returns the final-LayerNorm [CLS] feature. LoRA sites: "attn.query", "attn.key", "attn.value",
"attn.output", "mlp.fc1", "mlp.fc2".
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import Site, layer_norm, scan_layers
from jaxtree_lora.models.stacked import Stacked


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-12
    mean: float = 0.5
    std: float = 0.5
    remat: bool = False

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @classmethod
    def from_hf(cls, config) -> "ViTConfig":
        if getattr(config, "model_type", "") != "vit":
            raise hf.CheckpointError(f"model_type {getattr(config, 'model_type', None)!r} is not a ViT")
        return cls(image_size=config.image_size, patch_size=config.patch_size, num_channels=config.num_channels,
                   hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                   num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                   layer_norm_eps=config.layer_norm_eps)


def layer_shapes(c: ViTConfig) -> dict:
    n, d, f = c.num_layers, c.hidden_size, c.intermediate_size
    return {"norm1": (n, d), "norm1_bias": (n, d), "query": (n, d, d), "query_bias": (n, d), "key": (n, d, d),
            "key_bias": (n, d), "value": (n, d, d), "value_bias": (n, d), "attn_out": (n, d, d),
            "attn_out_bias": (n, d), "norm2": (n, d), "norm2_bias": (n, d), "fc1": (n, d, f), "fc1_bias": (n, f),
            "fc2": (n, f, d), "fc2_bias": (n, d)}


def vit_block(x, p, hook, c: ViTConfig):
    batch, seq, d = x.shape
    hd = d // c.num_heads
    dtype = x.dtype

    def project(site, name, inputs):
        return hook(site, inputs, inputs @ p[name].astype(dtype) + p[name + "_bias"].astype(dtype))

    h = layer_norm(x, p["norm1"], p["norm1_bias"], c.layer_norm_eps)
    q = project("attn.query", "query", h).reshape(batch, seq, c.num_heads, hd)
    k = project("attn.key", "key", h).reshape(batch, seq, c.num_heads, hd)
    v = project("attn.value", "value", h).reshape(batch, seq, c.num_heads, hd)
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k).astype(jnp.float32) / np.sqrt(hd)
    weights = jax.nn.softmax(scores, axis=-1).astype(dtype)
    context = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(batch, seq, d)
    x = x + project("attn.output", "attn_out", context)
    h = layer_norm(x, p["norm2"], p["norm2_bias"], c.layer_norm_eps)
    return x + project("mlp.fc2", "fc2", jax.nn.gelu(project("mlp.fc1", "fc1", h), approximate=False))


class ViT(nnx.Module):
    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        key = rngs.params()
        c = config
        patch_dim = c.patch_size * c.patch_size * c.num_channels
        self.patch_kernel = nnx.Param((0.02 * jax.random.normal(jax.random.fold_in(key, 0), (patch_dim, c.hidden_size)))
                                      .astype(param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.cls_token = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.position_embeddings = nnx.Param(
            (0.02 * jax.random.normal(jax.random.fold_in(key, 1), (c.num_patches + 1, c.hidden_size))).astype(param_dtype))
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), param_dtype))
        self.final_norm_bias = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.layers = Stacked(layer_shapes(c), jax.random.fold_in(key, 2), param_dtype, ones=("norm1", "norm2"))

    @property
    def feature_dim(self) -> int:
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        d, f = self.config.hidden_size, self.config.intermediate_size
        return {"attn.query": Site(d, d), "attn.key": Site(d, d), "attn.value": Site(d, d), "attn.output": Site(d, d),
                "mlp.fc1": Site(d, f), "mlp.fc2": Site(f, d)}

    @staticmethod
    def hf_module_path(site: str, layer: int) -> str:
        names = {"attn.query": "attention.attention.query", "attn.key": "attention.attention.key",
                 "attn.value": "attention.attention.value", "attn.output": "attention.output.dense",
                 "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
        return f"vit.encoder.layer.{layer}.{names[site]}"

    def preprocess(self, images):
        """uint8 or float images [B, H, W, C] -> normalised float32 at the model's size."""
        c = self.config
        if images.shape[-1] != c.num_channels:
            raise ValueError(f"images have {images.shape[-1]} channels, the model expects {c.num_channels}")
        # uint8 pixels are scaled to [0, 1]; float images are taken to be in [0, 1] already.
        scale = 255.0 if jnp.issubdtype(images.dtype, jnp.integer) else 1.0
        images = images.astype(jnp.float32) / scale
        if images.shape[1:3] != (c.image_size, c.image_size):
            images = jax.image.resize(images, (images.shape[0], c.image_size, c.image_size, c.num_channels), "bilinear")
        return (images - c.mean) / c.std

    def __call__(self, images, *, adapters=None, delta=None, rng=None, compute_dtype=None, preprocessed=False):
        """Hidden states [B, patches + 1, hidden]. `images` are uint8-range pixels unless `preprocessed`."""
        c = self.config
        dtype = compute_dtype or self.patch_kernel[...].dtype
        x = images if preprocessed else self.preprocess(images)
        batch = x.shape[0]
        grid = c.image_size // c.patch_size
        patches = x.reshape(batch, grid, c.patch_size, grid, c.patch_size, c.num_channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
        tokens = patches.astype(dtype) @ self.patch_kernel[...].astype(dtype) + self.patch_bias[...].astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([cls, tokens], axis=1) + self.position_embeddings[...].astype(dtype)[None]
        x, _ = scan_layers(lambda carry, p, hook: (vit_block(carry, p, hook, c), None), x, self.layers.as_dict(),
                           adapters, delta, rng, c.num_layers, remat=c.remat)
        return layer_norm(x, self.final_norm[...], self.final_norm_bias[...], c.layer_norm_eps)

    def features(self, images, **kwargs):
        """The [CLS] feature after the final LayerNorm: [B, hidden]."""
        return self(images, **kwargs)[:, 0].astype(jnp.float32)


def _linear(w):
    return np.asarray(w).T


def rules(c: ViTConfig) -> list:
    layer = r"encoder\.layer\.(?P<layer>\d+)\."

    def patch(w):  # conv [D, C, P, P] -> [(P, P, C), D] matching the row-major patch flattening above
        return np.asarray(w).transpose(2, 3, 1, 0).reshape(-1, w.shape[0])

    out = [hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.weight", ("patch_kernel",), patch),
           hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.bias", ("patch_bias",)),
           hf.KeyRule(r"embeddings\.cls_token", ("cls_token",), lambda w: np.asarray(w).reshape(-1)),
           hf.KeyRule(r"embeddings\.position_embeddings", ("position_embeddings",), lambda w: np.asarray(w)[0]),
           hf.KeyRule(r"layernorm\.weight", ("final_norm",)), hf.KeyRule(r"layernorm\.bias", ("final_norm_bias",))]
    for hf_name, ours in (("attention.attention.query", "query"), ("attention.attention.key", "key"),
                          ("attention.attention.value", "value"), ("attention.output.dense", "attn_out"),
                          ("intermediate.dense", "fc1"), ("output.dense", "fc2")):
        escaped = hf_name.replace(".", r"\.")
        out.append(hf.KeyRule(layer + escaped + r"\.weight", ("layers", ours), _linear))
        out.append(hf.KeyRule(layer + escaped + r"\.bias", ("layers", ours + "_bias")))
    for hf_name, ours in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
        out.append(hf.KeyRule(layer + hf_name + r"\.weight", ("layers", ours)))
        out.append(hf.KeyRule(layer + hf_name + r"\.bias", ("layers", ours + "_bias")))
    return out


def expected_shapes(c: ViTConfig) -> dict:
    d = c.hidden_size
    shapes = {("patch_kernel",): (c.patch_size * c.patch_size * c.num_channels, d), ("patch_bias",): (d,),
              ("cls_token",): (d,), ("position_embeddings",): (c.num_patches + 1, d), ("final_norm",): (d,),
              ("final_norm_bias",): (d,)}
    shapes.update({("layers", name): shape for name, shape in layer_shapes(c).items()})
    return shapes


def load_hf(directory: str, dtype=jnp.float32) -> ViT:
    """A ViT from a `google/vit-base-patch16-224-in21k`-layout directory (names with or without 'vit.')."""
    config = ViTConfig.from_hf(hf.read_config(directory))
    tensors = {(k[4:] if k.startswith("vit.") else k): v for k, v in hf.read_tensors(directory).items()}
    mapped = hf.map_checkpoint(tensors, rules(config), expected_shapes(config), config.num_layers,
                               ignore=[r"pooler\..*", r"classifier\..*"])
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    for path, value in mapped.items():
        node = model
        for key in path[:-1]:
            node = getattr(node, key)
        getattr(node, path[-1]).set_value(jnp.asarray(hf.to_dtype(value, dtype)))
    return model
