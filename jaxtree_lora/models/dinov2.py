"""DINOv2 backbones (ViT-S/14 and kin) as the project's ViT (family "dinov2"), from ONNX or an HF directory.

DINOv2 is the ViT plus LayerScale on both residual branches, with patch 14, LayerNorm eps 1e-6,
exact GELU, ImageNet mean/std and 64-wide heads.
- `load_onnx`: an ONNX export whose backbone keeps HF Dinov2Model names under "backbone." (the
  `dinov2_small` asset; its saliency decoder is ignored), read with the `onnx` package only:
  initializers and Constant nodes give the values, an anonymous MatMul weight is named by its
  MatMul node, the split position embeddings are joined again.
- `load_hf`: a safetensors directory of HF Dinov2Model / Dinov2ForImageClassification.
The stored 37 x 37 position table is resized once at load time to the input grid, as HF
Dinov2Embeddings.interpolate_pos_encoding does (vit.interpolate_position_embeddings). docs/DINOV2.md.
"""
from __future__ import annotations

import json
import os
import re
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf, vit

PATCH_SIZE = 14
HEAD_DIM = 64  # every DINOv2 size (S/B/L/g) has 64-dimensional heads
LAYER_NORM_EPS = 1e-6
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEFAULT_IMAGE_SIZE = 224  # the size the asset's ONNX graph was exported for

# ViT-S/14, the `dinov2_small` asset, at 224 px (what planning uses without reading the file).
SMALL = vit.ViTConfig(image_size=DEFAULT_IMAGE_SIZE, patch_size=PATCH_SIZE, hidden_size=384, intermediate_size=1536,
                      num_layers=12, num_heads=6, layer_norm_eps=LAYER_NORM_EPS, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                      family="dinov2")

# Known tensors the backbone does not use: the masked-image token, classification heads.
IGNORED = (r"embeddings\.mask_token", r"classifier\..*")


def image_size_error(image_size, patch_size: int = PATCH_SIZE, label: str = "image size") -> Optional[str]:
    """One line naming a valid size if `image_size` is not a positive multiple of the patch size, else None."""
    problem = vit.image_size_error(image_size, patch_size, label, "DINOv2's", default=DEFAULT_IMAGE_SIZE)
    common = " (112 and 224 are common)" if patch_size == PATCH_SIZE else ""
    return problem and problem + common


def _layer_scale(weight):
    return np.asarray(weight).reshape(-1)


def rules() -> list:
    """Key rules for HF Dinov2Model tensor names (no "backbone." / "dinov2." prefix)."""
    layer = r"encoder\.layer\.(?P<layer>\d+)\."
    out = [hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.weight", ("patch_kernel",), vit._patch_kernel),
           hf.KeyRule(r"embeddings\.patch_embeddings\.projection\.bias", ("patch_bias",)),
           hf.KeyRule(r"embeddings\.cls_token", ("cls_token",), lambda w: np.asarray(w).reshape(-1)),
           hf.KeyRule(r"embeddings\.position_embeddings", ("position_embeddings",),
                      lambda w: np.asarray(w)[0] if np.ndim(w) == 3 else np.asarray(w)),
           hf.KeyRule(r"layernorm\.weight", ("final_norm",)), hf.KeyRule(r"layernorm\.bias", ("final_norm_bias",))]
    for site, module in vit.DINOV2_MODULES.items():
        escaped = module.replace(".", r"\.")
        out.append(hf.KeyRule(layer + escaped + r"\.weight", ("layers", vit.SITE_KERNELS[site]), vit._linear))
        out.append(hf.KeyRule(layer + escaped + r"\.bias", ("layers", vit.SITE_KERNELS[site] + "_bias")))
    for module in ("norm1", "norm2"):
        out.append(hf.KeyRule(layer + module + r"\.weight", ("layers", module)))
        out.append(hf.KeyRule(layer + module + r"\.bias", ("layers", module + "_bias")))
    for index in (1, 2):
        out.append(hf.KeyRule(layer + rf"layer_scale{index}\.lambda1", ("layers", f"scale{index}"), _layer_scale))
    return out


def source_shapes(c: vit.ViTConfig, grid: int) -> dict:
    """HF name pattern -> the shape a Dinov2 checkpoint stores (torch layout), for naming a misfit tensor."""
    d, f, p = c.hidden_size, c.intermediate_size, c.patch_size
    layer = r"encoder\.layer\.\d+\."
    shapes = {r"embeddings\.patch_embeddings\.projection\.weight": (d, c.num_channels, p, p),
              r"embeddings\.patch_embeddings\.projection\.bias": (d,), r"embeddings\.cls_token": (1, 1, d),
              r"embeddings\.mask_token": (1, d), r"embeddings\.position_embeddings": (1, grid * grid + 1, d),
              r"layernorm\.(weight|bias)": (d,), layer + r"(norm1|norm2)\.(weight|bias)": (d,),
              layer + r"layer_scale[12]\.lambda1": (d,), layer + r"mlp\.fc1\.weight": (f, d),
              layer + r"mlp\.fc1\.bias": (f,), layer + r"mlp\.fc2\.weight": (d, f), layer + r"mlp\.fc2\.bias": (d,),
              layer + r"attention\.(attention\.(query|key|value)|output\.dense)\.weight": (d, d),
              layer + r"attention\.(attention\.(query|key|value)|output\.dense)\.bias": (d,)}
    return {re.compile(pattern): shape for pattern, shape in shapes.items()}


def _check_shapes(tensors: dict, c: vit.ViTConfig, grid: int, origin: dict, source: str) -> None:
    """Raises CheckpointError naming every tensor whose shape is not DINOv2's for this config."""
    problems = []
    for name, value in tensors.items():
        for pattern, shape in source_shapes(c, grid).items():
            if pattern.fullmatch(name):
                if tuple(np.shape(value)) != shape:
                    where = f" (stored as {origin[name]})" if origin.get(name, name) != name else ""
                    problems.append(f"{name}{where} has shape {tuple(np.shape(value))}, expected {shape}")
                break
    if problems:
        raise hf.CheckpointError(f"{source} does not fit a DINOv2 ViT (hidden {c.hidden_size}, "
                                 f"{c.num_layers} layers, patch {c.patch_size}): " + "; ".join(problems))


def _config(tensors: dict, source: str, image_size: int, num_heads: Optional[int] = None,
            layer_norm_eps: float = LAYER_NORM_EPS) -> tuple[vit.ViTConfig, int]:
    """(config, stored position grid) inferred from the tensors themselves; heads: hidden / 64 unless given."""
    needed = ("embeddings.patch_embeddings.projection.weight", "embeddings.position_embeddings",
              "encoder.layer.0.mlp.fc1.bias")
    missing = [name for name in needed if name not in tensors]
    if missing:
        raise hf.CheckpointError(f"{source} is not a DINOv2 backbone: it lacks {', '.join(missing)}")
    projection = np.shape(tensors[needed[0]])
    if len(projection) != 4 or projection[2] != projection[3]:
        raise hf.CheckpointError(f"{needed[0]} in {source} has shape {projection}, expected "
                                 "[hidden, channels, patch, patch]")
    hidden, channels, patch = projection[0], projection[1], projection[2]
    positions = int(np.prod(np.shape(tensors[needed[1]]))) // max(hidden, 1) - 1
    grid = int(round(np.sqrt(max(positions, 0))))
    if grid * grid != positions:
        raise hf.CheckpointError(f"{needed[1]} in {source} has shape {np.shape(tensors[needed[1]])}: "
                                 "expected [1, 1 + grid * grid, hidden]")
    if num_heads is None and hidden % HEAD_DIM:
        raise hf.CheckpointError(f"hidden size {hidden} of {source} is not a multiple of DINOv2's head width "
                                 f"{HEAD_DIM}")
    layers = {int(m.group(1)) for name in tensors for m in [re.match(r"encoder\.layer\.(\d+)\.", name)] if m}
    problem = image_size_error(image_size, patch)
    if problem:
        raise hf.CheckpointError(problem)
    config = hf.make_config(vit.ViTConfig, image_size=image_size, patch_size=patch, num_channels=channels,
                            hidden_size=hidden, intermediate_size=int(np.shape(tensors[needed[2]])[0]),
                            num_layers=max(layers) + 1, num_heads=num_heads or hidden // HEAD_DIM,
                            layer_norm_eps=layer_norm_eps, mean=IMAGENET_MEAN, std=IMAGENET_STD, family="dinov2")
    return config, grid


def build(tensors: dict, source: str, image_size: int = DEFAULT_IMAGE_SIZE, dtype=jnp.float32,
          origin: Optional[dict] = None, num_heads: Optional[int] = None,
          layer_norm_eps: float = LAYER_NORM_EPS) -> vit.ViT:
    """A ViT (family "dinov2") from HF Dinov2 tensors (names without prefix, torch layout); `origin`
    maps a name to where it was read from, for the error messages."""
    config, grid = _config(tensors, source, image_size, num_heads, layer_norm_eps)
    _check_shapes(tensors, config, grid, origin or {}, source)
    shapes = vit.expected_shapes(config)
    shapes[("position_embeddings",)] = (grid * grid + 1, config.hidden_size)
    mapped = hf.map_checkpoint(tensors, rules(), shapes, config.num_layers, ignore=IGNORED)
    mapped[("position_embeddings",)] = np.asarray(
        vit.interpolate_position_embeddings(mapped[("position_embeddings",)].astype(np.float32), config.grid))
    model = nnx.eval_shape(lambda: vit.ViT(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    hf.assign(model, mapped, dtype)
    return model


def onnx_tensors(path: str) -> tuple[dict, dict]:
    """({HF name: array in torch layout}, {HF name: the ONNX name it was read from}) of an ONNX file's
    "backbone." part. Values come from initializers and Constant nodes alike."""
    import onnx
    from onnx import numpy_helper

    try:
        model = onnx.load(path)
    except Exception as error:  # onnx raises DecodeError and others for a damaged file
        raise hf.CheckpointError(f"cannot read {path} as ONNX ({type(error).__name__}: {error}): "
                                 "point to an ONNX export of a DINOv2 backbone") from error
    graph = model.graph
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            values[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    tensors, origin = {}, {}

    def put(name, value, source):
        tensors[name], origin[name] = np.asarray(value), source

    for name, value in values.items():
        if name.startswith("backbone."):
            put(name[len("backbone."):], value, name)
    cls_position = patch_positions = None
    for node in graph.node:
        constant = [name for name in node.input if name in values and not name.startswith("backbone.")]
        scope = node.name.rsplit("/", 1)[0]
        if node.op_type == "MatMul" and scope.startswith("/backbone/") and len(constant) == 1 \
                and node.input[1] == constant[0]:
            # A Linear's weight, stored [in, out] under an anonymous name: the node's scope names it.
            put(scope[len("/backbone/"):].replace("/", ".") + ".weight", values[constant[0]].T, constant[0])
        elif scope == "/backbone/embeddings" and constant:
            # The exporter split the position embeddings: [1, 1, d] joins by Concat, [1, grid^2, d] is reshaped.
            value = values[constant[0]]
            if node.op_type == "Concat" and value.ndim == 3 and value.shape[1] == 1:
                cls_position = (value, constant[0])
            elif node.op_type == "Reshape" and value.ndim == 3 and value.shape[1] > 1:
                patch_positions = (value, constant[0])
    if "embeddings.position_embeddings" not in tensors and cls_position and patch_positions:
        put("embeddings.position_embeddings", np.concatenate([cls_position[0], patch_positions[0]], axis=1),
            f"{cls_position[1]} + {patch_positions[1]}")
    if not tensors:
        raise hf.CheckpointError(f"{path} has no tensors named backbone.*: it is not an ONNX export of a "
                                 "DINOv2 backbone with Hugging Face names")
    return tensors, origin


def load_onnx(path: str, image_size: int = DEFAULT_IMAGE_SIZE, dtype=jnp.float32) -> vit.ViT:
    """The DINOv2 backbone of an ONNX file (e.g. the `dinov2_small` asset) for `image_size`-pixel images."""
    tensors, origin = onnx_tensors(path)
    return build(tensors, os.path.basename(path), image_size, dtype, origin)


def _directory_config(directory: str) -> dict:
    try:
        with open(os.path.join(directory, "config.json")) as file:
            config = json.load(file)
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def is_dinov2_directory(directory: str) -> bool:
    """Whether a checkpoint directory's config.json says model_type "dinov2"."""
    return _directory_config(directory).get("model_type") == "dinov2"


def directory_patch_size(directory: str) -> int:
    """The patch size a DINOv2 directory's config.json declares (14 when it says nothing usable)."""
    patch = _directory_config(directory).get("patch_size", PATCH_SIZE)
    return patch if isinstance(patch, int) and patch > 0 else PATCH_SIZE


def load_hf(directory: str, image_size: Optional[int] = None, dtype=jnp.float32) -> vit.ViT:
    """A DINOv2 backbone from an HF Dinov2Model (or Dinov2ForImageClassification) safetensors directory.
    image_size None: 224 px."""
    config = hf.read_config(directory)
    if getattr(config, "model_type", None) != "dinov2":
        raise hf.CheckpointError(f"model_type {getattr(config, 'model_type', None)!r} in {directory} is not dinov2: "
                                 "set model.kind to the checkpoint's family")
    if getattr(config, "use_swiglu_ffn", False) or getattr(config, "hidden_act", "gelu") != "gelu":
        raise hf.CheckpointError("only DINOv2 checkpoints with an exact-GELU MLP are supported (not SwiGLU: ViT-g)")
    if getattr(config, "qkv_bias", True) is False:
        raise hf.CheckpointError("qkv_bias=False checkpoints are not supported: query/key/value need biases")
    tensors = {(name[len("dinov2."):] if name.startswith("dinov2.") else name): value
               for name, value in hf.read_tensors(directory).items()}
    source = os.path.basename(os.path.normpath(directory))
    model = build(tensors, source, image_size or DEFAULT_IMAGE_SIZE, dtype, num_heads=config.num_attention_heads, layer_norm_eps=config.layer_norm_eps)
    c = model.config
    if (c.hidden_size, c.num_layers) != (config.hidden_size, config.num_hidden_layers):
        raise hf.CheckpointError(f"config.json of {directory} (hidden {config.hidden_size}, {config.num_hidden_layers} "
                                 f"layers) differs from its tensors (hidden {c.hidden_size}, {c.num_layers} layers)")
    return model
