"""A Vision Transformer in Flax NNX (pre-LayerNorm blocks), loadable from the layout of
`google/vit-base-patch16-224-in21k` (Hugging Face ViTModel).

Stacked blocks under `jax.lax.scan`; kernels [d_in, d_out]. LoRA sites: "attn.query", "attn.key",
"attn.value", "attn.output", "mlp.fc1", "mlp.fc2". `ViT.__call__` takes channels-last images:
uint8 is scaled to [0, 1], another size is resized bilinearly, pixels are normalised with the
checkpoint's mean and std (`preprocessed=True` skips all this); `features` returns the [CLS] row.
`load_hf(directory, image_size=S)` resizes the patch-position embeddings once at load time, as
transformers' `interpolate_pos_encoding=True` does at every call. `ViTConfig(family="dinov2")` adds
DINOv2's LayerScale (models/dinov2.py). Normalisation and resizing rules: docs/MODELS.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional, Union

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import DeltaFn, Site, attention, dense, gelu_exact, layer_norm, scan_layers
from jaxtree_lora.models.stacked import Stacked

SITES = ("attn.query", "attn.key", "attn.value", "attn.output", "mlp.fc1", "mlp.fc2")

# Our site -> the Hugging Face / PEFT module name inside "vit.encoder.layer.{i}.".
HF_MODULES = {"attn.query": "attention.attention.query", "attn.key": "attention.attention.key",
              "attn.value": "attention.attention.value", "attn.output": "attention.output.dense",
              "mlp.fc1": "intermediate.dense", "mlp.fc2": "output.dense"}
# DINOv2 (HF Dinov2Model) names its MLP "mlp.fc1" / "mlp.fc2"; the attention modules are named as in ViT.
DINOV2_MODULES = dict(HF_MODULES, **{"mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"})
SITE_KERNELS = {"attn.query": "query", "attn.key": "key", "attn.value": "value", "attn.output": "attn_out",
                "mlp.fc1": "fc1", "mlp.fc2": "fc2"}


FAMILIES = ("vit", "dinov2")


@dataclasses.dataclass(frozen=True)
class ViTConfig:
    """Shape of a ViT (defaults: ViT-B/16 at 224 px) and its input normalisation (mean, std).

    family "vit" is the original ViT; "dinov2" adds DINOv2's LayerScale (a learned per-channel factor
    on each residual branch, `scale1` after attention and `scale2` after the MLP) and names its PEFT
    modules as HF Dinov2 does. mean / std: one value for all channels or one per channel.
    """

    image_size: int = 224
    patch_size: int = 16
    num_channels: int = 3
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_layers: int = 12
    num_heads: int = 12
    layer_norm_eps: float = 1e-12
    mean: Union[float, tuple] = 0.5
    std: Union[float, tuple] = 0.5
    remat: bool = False
    family: str = "vit"

    def __post_init__(self):
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size {self.image_size} is not a multiple of patch_size {self.patch_size}: "
                             "choose an image size divisible by the patch size")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                             "choose num_heads that divides hidden_size")
        if self.family not in FAMILIES:
            raise ValueError(f"unknown ViT family {self.family!r}: choose one of {', '.join(FAMILIES)}")

    @property
    def layer_scale(self) -> bool:
        """Whether the blocks carry DINOv2's LayerScale factors."""
        return self.family == "dinov2"

    @property
    def grid(self) -> int:
        """Patches per side."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        return self.grid ** 2

    @classmethod
    def from_hf(cls, config) -> "ViTConfig":
        """From a transformers ViTConfig (as `hf.read_config` returns it)."""
        model_type = getattr(config, "model_type", None)
        if model_type != "vit":
            raise hf.CheckpointError(f"model_type {model_type!r} is not a ViT: point model.path to a ViTModel "
                                     "checkpoint (google/vit-base-patch16-224-in21k layout) or choose another model.kind")
        if config.hidden_act != "gelu":
            raise hf.CheckpointError(f"hidden_act {config.hidden_act!r} is not supported: this ViT uses exact GELU")
        if not getattr(config, "qkv_bias", True):
            raise hf.CheckpointError("qkv_bias=False checkpoints are not supported: query/key/value need biases")
        sizes = {"image_size": config.image_size, "patch_size": config.patch_size}
        for name, value in sizes.items():
            if isinstance(value, (list, tuple)):
                if len(set(value)) != 1:
                    raise hf.CheckpointError(f"{name} {value} is not square: only square images and patches are supported")
                sizes[name] = value[0]
        return hf.make_config(cls, image_size=sizes["image_size"], patch_size=sizes["patch_size"],
                              num_channels=config.num_channels, hidden_size=config.hidden_size,
                              intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                              num_heads=config.num_attention_heads, layer_norm_eps=config.layer_norm_eps)


def layer_shapes(c: ViTConfig) -> dict:
    """Stacked per-layer parameter shapes, each with the leading num_layers axis."""
    n, d, f = c.num_layers, c.hidden_size, c.intermediate_size
    shapes = {"norm1": (n, d), "norm1_bias": (n, d), "query": (n, d, d), "query_bias": (n, d), "key": (n, d, d),
              "key_bias": (n, d), "value": (n, d, d), "value_bias": (n, d), "attn_out": (n, d, d),
              "attn_out_bias": (n, d), "norm2": (n, d), "norm2_bias": (n, d), "fc1": (n, d, f), "fc1_bias": (n, f),
              "fc2": (n, f, d), "fc2_bias": (n, d)}
    if c.layer_scale:
        shapes.update(scale1=(n, d), scale2=(n, d))
    return shapes


def vit_block(x, p, hook, c: ViTConfig):
    """One pre-LN block. x: [batch, tokens, hidden]; p: this layer's weights; hook: its SiteHook."""
    batch, seq, d = x.shape
    head_dim = d // c.num_heads
    dtype = x.dtype

    def project(site, inputs):
        name = SITE_KERNELS[site]
        return hook(site, inputs, dense(inputs, p[name]) + p[name + "_bias"].astype(dtype))

    h = layer_norm(x, p["norm1"], p["norm1_bias"], c.layer_norm_eps)
    q = project("attn.query", h).reshape(batch, seq, c.num_heads, head_dim)
    k = project("attn.key", h).reshape(batch, seq, c.num_heads, head_dim)
    v = project("attn.value", h).reshape(batch, seq, c.num_heads, head_dim)
    context = attention(q, k, v).reshape(batch, seq, d)  # softmax in float32 whatever the activation dtype
    attended = project("attn.output", context)
    if c.layer_scale:  # DINOv2: the adapted projection's output, scaled per channel, joins the residual
        attended = attended * p["scale1"].astype(dtype)
    x = x + attended
    h = layer_norm(x, p["norm2"], p["norm2_bias"], c.layer_norm_eps)
    mlp = project("mlp.fc2", gelu_exact(project("mlp.fc1", h)))  # its backward keeps only its input
    if c.layer_scale:
        mlp = mlp * p["scale2"].astype(dtype)
    return x + mlp


class ViT(nnx.Module):
    """Patch embedding, [CLS], learned positions, `num_layers` stacked pre-LN blocks, final LayerNorm."""

    def __init__(self, config: ViTConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        key = rngs.params()
        c = config
        patch_dim = c.patch_size * c.patch_size * c.num_channels
        self.patch_kernel = nnx.Param(
            (0.02 * jax.random.normal(jax.random.fold_in(key, 0), (patch_dim, c.hidden_size))).astype(param_dtype))
        self.patch_bias = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.cls_token = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.position_embeddings = nnx.Param(
            (0.02 * jax.random.normal(jax.random.fold_in(key, 1), (c.num_patches + 1, c.hidden_size)))
            .astype(param_dtype))
        self.final_norm = nnx.Param(jnp.ones((c.hidden_size,), param_dtype))
        self.final_norm_bias = nnx.Param(jnp.zeros((c.hidden_size,), param_dtype))
        self.layers = Stacked(layer_shapes(c), jax.random.fold_in(key, 2), param_dtype,
                              ones=("norm1", "norm2", "scale1", "scale2"))

    @property
    def feature_dim(self) -> int:
        """Width of `features`: hidden_size."""
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        d, f = self.config.hidden_size, self.config.intermediate_size
        return {"attn.query": Site(d, d), "attn.key": Site(d, d), "attn.value": Site(d, d), "attn.output": Site(d, d),
                "mlp.fc1": Site(d, f), "mlp.fc2": Site(f, d)}

    @staticmethod
    def site_kernel(site: str) -> str:
        """The stacked kernel of a site in `layers`, e.g. "attn.output" -> "attn_out"."""
        return SITE_KERNELS[site]

    def hf_module_path(self, site: str, layer: int) -> str:
        """PEFT/HF module name, e.g. "vit.encoder.layer.3.attention.attention.query" (DINOv2:
        "dinov2.encoder.layer.3.mlp.fc1", the names of HF Dinov2ForImageClassification)."""
        modules = DINOV2_MODULES if self.config.family == "dinov2" else HF_MODULES
        if site not in modules:
            raise ValueError(f"unknown ViT site {site!r}: choose one of {', '.join(modules)}")
        return f"{self.config.family}.encoder.layer.{layer}.{modules[site]}"

    def preprocess(self, images):
        """uint8 [0, 255] or float [0, 1] images [B, H, W, C] -> normalised float32 [B, S, S, C], S = image_size."""
        c = self.config
        if images.ndim != 4 or images.shape[-1] != c.num_channels:
            raise ValueError(f"images have shape {tuple(images.shape)}; the model expects "
                             f"[batch, height, width, {c.num_channels}] (channels last)")
        scale = 255.0 if jnp.issubdtype(images.dtype, jnp.integer) else 1.0
        images = images.astype(jnp.float32) / scale
        if images.shape[1:3] != (c.image_size, c.image_size):
            images = jax.image.resize(images, (images.shape[0], c.image_size, c.image_size, c.num_channels), "bilinear")
        return (images - jnp.asarray(c.mean, jnp.float32)) / jnp.asarray(c.std, jnp.float32)

    def __call__(self, images, *, adapters=None, delta: Optional[DeltaFn] = None, rng=None, compute_dtype=None,
                 preprocessed: bool = False):
        """Hidden states [batch, num_patches + 1, hidden] after the final LayerNorm ([CLS] first).

        images: [batch, height, width, channels], uint8 pixels or float in [0, 1] (see the module
        docstring), or normalised [batch, image_size, image_size, channels] when `preprocessed`.
        adapters / delta / rng / compute_dtype: as in every backbone (common.py).
        """
        c = self.config
        dtype = compute_dtype or self.patch_kernel[...].dtype
        if preprocessed:
            if images.shape[1:] != (c.image_size, c.image_size, c.num_channels):
                raise ValueError(f"preprocessed images have shape {tuple(images.shape)}, expected "
                                 f"[batch, {c.image_size}, {c.image_size}, {c.num_channels}]: resize them first "
                                 "or pass raw images")
            x = images
        else:
            x = self.preprocess(images)
        batch = x.shape[0]
        grid = c.grid
        patches = x.reshape(batch, grid, c.patch_size, grid, c.patch_size, c.num_channels)
        patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(batch, grid * grid, -1)
        tokens = dense(patches.astype(dtype), self.patch_kernel[...]) + self.patch_bias[...].astype(dtype)
        cls = jnp.broadcast_to(self.cls_token[...].astype(dtype), (batch, 1, c.hidden_size))
        x = jnp.concatenate([cls, tokens], axis=1) + self.position_embeddings[...].astype(dtype)[None]
        x, _ = scan_layers(lambda carry, p, hook: (vit_block(carry, p, hook, c), None), x, self.layers.as_dict(),
                           adapters, delta, rng, c.num_layers, remat=c.remat)
        return layer_norm(x, self.final_norm[...], self.final_norm_bias[...], c.layer_norm_eps)

    def features(self, images, **kwargs):
        """The [CLS] hidden state after the final LayerNorm: [batch, hidden], float32."""
        return self(images, **kwargs)[:, 0].astype(jnp.float32)


def interpolate_position_embeddings(position_embeddings, grid: int):
    """Resizes learned position embeddings to a new patch grid.

    position_embeddings: [1 + old_grid**2, hidden] ([CLS] row first) -> [1 + grid**2, hidden].
    The [CLS] row is kept; the patch rows, seen as an [old_grid, old_grid, hidden] image, are resized
    bicubically with PyTorch's kernel (A = -0.75, half-pixel centres, no antialiasing), matching
    transformers' ViTEmbeddings.interpolate_pos_encoding.
    """
    position_embeddings = jnp.asarray(position_embeddings)
    count, hidden = position_embeddings.shape
    old_grid = int(round(np.sqrt(count - 1)))
    if old_grid * old_grid != count - 1:
        raise ValueError(f"{count - 1} patch positions do not form a square grid")
    if old_grid == grid:
        return position_embeddings
    patch = position_embeddings[1:].reshape(old_grid, old_grid, hidden).astype(jnp.float32)
    resized = jax.image.resize(patch, (grid, grid, hidden), method="bicubic-pytorch", antialias=False)
    return jnp.concatenate([position_embeddings[:1].astype(jnp.float32),
                            resized.reshape(grid * grid, hidden)]).astype(position_embeddings.dtype)


def _linear(weight):
    return np.asarray(weight).T  # torch nn.Linear [out, in] -> kernel [in, out]


def _patch_kernel(weight):
    # Conv [hidden, C, P, P] -> [(P, P, C), hidden], the row-major order in which patches are flattened.
    weight = np.asarray(weight)
    return weight.transpose(2, 3, 1, 0).reshape(-1, weight.shape[0])


def rules(c: ViTConfig) -> list:
    """Key rules for HF ViTModel tensor names (without the "vit." prefix)."""
    layer = r"encoder\.layer\.(?P<layer>\d+)\."
    out = [hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.weight", ("patch_kernel",), _patch_kernel),
           hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.bias", ("patch_bias",)),
           hf.KeyRule(r"embeddings\.cls_token", ("cls_token",), lambda w: np.asarray(w).reshape(-1)),
           hf.KeyRule(r"embeddings\.position_embeddings", ("position_embeddings",),
                      lambda w: np.asarray(w)[0] if np.ndim(w) == 3 else np.asarray(w)),
           hf.KeyRule(r"layernorm\.weight", ("final_norm",)), hf.KeyRule(r"layernorm\.bias", ("final_norm_bias",))]
    for site, module in HF_MODULES.items():
        escaped = module.replace(".", r"\.")
        out.append(hf.KeyRule(layer + escaped + r"\.weight", ("layers", SITE_KERNELS[site]), _linear))
        out.append(hf.KeyRule(layer + escaped + r"\.bias", ("layers", SITE_KERNELS[site] + "_bias")))
    for module, ours in (("layernorm_before", "norm1"), ("layernorm_after", "norm2")):
        out.append(hf.KeyRule(layer + module + r"\.weight", ("layers", ours)))
        out.append(hf.KeyRule(layer + module + r"\.bias", ("layers", ours + "_bias")))
    return out


# Known tensors this backbone does not use: the pooler, classification heads, the masked-image token.
IGNORED = (r"pooler\..*", r"classifier\..*", r"embeddings\.mask_token")


def expected_shapes(c: ViTConfig) -> dict:
    d = c.hidden_size
    shapes = {("patch_kernel",): (c.patch_size * c.patch_size * c.num_channels, d), ("patch_bias",): (d,),
              ("cls_token",): (d,), ("position_embeddings",): (c.num_patches + 1, d), ("final_norm",): (d,),
              ("final_norm_bias",): (d,)}
    shapes.update({("layers", name): shape for name, shape in layer_shapes(c).items()})
    return shapes


def image_size_error(image_size, patch_size: int, label: str = "image_size", whose: str = "the checkpoint's",
                     default: Optional[int] = None) -> Optional[str]:
    """One line naming a valid size if `image_size` is not a positive multiple of the patch size, else None
    (`default` is offered for a value that is not a number)."""
    if isinstance(image_size, (int, np.integer)) and image_size > 0 and image_size % patch_size == 0:
        return None
    try:
        near = max(1, round(float(image_size) / patch_size)) * patch_size
    except (TypeError, ValueError):
        near = default or patch_size
    return f"{label} {image_size!r} is not a positive multiple of {whose} patch size {patch_size}: choose e.g. {near}"


def with_image_size(config: ViTConfig, image_size: int) -> ViTConfig:
    """`config` for `image_size`-pixel inputs; CheckpointError unless a positive multiple of its patch size."""
    problem = image_size_error(image_size, config.patch_size)
    if problem:
        raise hf.CheckpointError(problem)
    return dataclasses.replace(config, image_size=image_size)


def normalisation(directory: str, num_channels: int) -> dict:
    """{"mean", "std"} of the directory's `preprocessor_config.json` (its image_mean / image_std; 0 and 1
    with do_normalize false), or {} without one (the in21k default, 0.5 and 0.5)."""
    path = hf.optional_file(directory, "preprocessor_config.json")
    if path is None:
        return {}
    try:
        with open(path) as f:
            processor = json.load(f)
        if not processor.get("do_normalize", True):
            return {"mean": 0.0, "std": 1.0}
        values = {}
        for key, name in (("mean", "image_mean"), ("std", "image_std")):
            value = processor.get(name, 0.5)
            value = tuple(float(v) for v in value) if isinstance(value, (list, tuple)) else float(value)
            if np.size(value) not in (1, num_channels) or not np.all(np.isfinite(value)):
                raise ValueError(f"{name} {value!r} is not 1 or {num_channels} finite numbers")
            values[key] = value
        if np.any(np.asarray(values["std"]) <= 0):
            raise ValueError(f"image_std {values['std']!r} must be positive")
    except (ValueError, TypeError, AttributeError) as error:  # not JSON, or values that are not numbers
        raise hf.CheckpointError(f"cannot read the image mean and std of {path} ({error}): fix image_mean and "
                                 "image_std there, or remove the file to use 0.5 and 0.5") from error
    return values


def load_hf(directory: str, dtype=jnp.float32, image_size: Optional[int] = None) -> ViT:
    """A ViT from a `google/vit-base-patch16-224-in21k`-layout directory.

    Tensor names as HF ViTModel writes them, with or without the "vit." prefix (ViTForImageClassification);
    the pooler and classifier are ignored; every shape is checked and a tensor that does not fit raises
    CheckpointError naming it. `image_size` (a multiple of the patch size) builds the model for another
    input size by interpolating the position embeddings (module docstring); None keeps the checkpoint's.
    Pixels are normalised with the mean and std of `preprocessor_config.json` when there is one (e.g.
    ImageNet's for facebook/dino-vit*), else 0.5 and 0.5.
    """
    config = ViTConfig.from_hf(hf.read_config(directory))
    config = dataclasses.replace(config, **normalisation(directory, config.num_channels))
    tensors = {(name[len("vit."):] if name.startswith("vit.") else name): value
               for name, value in hf.read_tensors(directory).items()}
    mapped = hf.map_checkpoint(tensors, rules(config), expected_shapes(config), config.num_layers, ignore=IGNORED)
    if image_size is not None and image_size != config.image_size:
        config = with_image_size(config, image_size)
        mapped[("position_embeddings",)] = np.asarray(
            interpolate_position_embeddings(mapped[("position_embeddings",)].astype(np.float32), config.grid))
    model = nnx.eval_shape(lambda: ViT(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    hf.assign(model, mapped, dtype)
    return model
