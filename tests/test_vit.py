"""ViT: an in21k-layout checkpoint (HF ViTModel names) loaded back and checked against numpy."""
import os

import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxtree_lora.models import hf, vit


def checkpoint(directory, rng, prefix="vit."):
    from transformers import ViTConfig

    d, f, layers, heads, size, patch = 8, 16, 2, 2, 8, 4
    config = ViTConfig(image_size=size, patch_size=patch, num_channels=3, hidden_size=d, intermediate_size=f,
                       num_hidden_layers=layers, num_attention_heads=heads)
    t = {"embeddings.patch_embeddings.projection.weight": rng.normal(size=(d, 3, patch, patch)) * 0.2,
         "embeddings.patch_embeddings.projection.bias": rng.normal(size=d) * 0.1,
         "embeddings.cls_token": rng.normal(size=(1, 1, d)), "embeddings.position_embeddings": rng.normal(size=(1, 5, d)),
         "layernorm.weight": 1 + 0.1 * rng.normal(size=d), "layernorm.bias": 0.1 * rng.normal(size=d)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
                            ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
            t[p + name + ".weight"] = rng.normal(size=shape) * 0.3
            t[p + name + ".bias"] = rng.normal(size=shape[0]) * 0.1
        for name in ("layernorm_before", "layernorm_after"):
            t[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=d)
    t = {prefix + k: np.asarray(v, np.float32) for k, v in t.items()}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    save_file(t, os.path.join(directory, "model.safetensors"))
    return config, {k[len(prefix):]: v for k, v in t.items()}


def numpy_vit(t, config, image):
    from math import erf, sqrt

    d, heads, patch = config.hidden_size, config.num_attention_heads, config.patch_size
    x = (image / 255.0 - 0.5) / 0.5  # [H, W, C]
    w = t["embeddings.patch_embeddings.projection.weight"]  # conv [D, C, P, P], stride P
    grid = config.image_size // patch
    tokens = []
    for r in range(grid):
        for c in range(grid):
            block = x[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].transpose(2, 0, 1)  # [C, P, P]
            tokens.append((w * block[None]).sum((1, 2, 3)) + t["embeddings.patch_embeddings.projection.bias"])
    h = np.concatenate([t["embeddings.cls_token"][0], np.stack(tokens)]) + t["embeddings.position_embeddings"][0]
    ln = lambda v, g, b: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * g + b
    lin = lambda v, name: v @ t[name + ".weight"].T + t[name + ".bias"]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    hd = d // heads
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        a = ln(h, t[p + "layernorm_before.weight"], t[p + "layernorm_before.bias"])
        q, k, v = (lin(a, p + f"attention.attention.{n}").reshape(-1, heads, hd) for n in ("query", "key", "value"))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        h = h + lin(np.einsum("hqk,khd->qhd", s, v).reshape(-1, d), p + "attention.output.dense")
        a = ln(h, t[p + "layernorm_after.weight"], t[p + "layernorm_after.bias"])
        h = h + lin(gelu(lin(a, p + "intermediate.dense")), p + "output.dense")
    return ln(h, t["layernorm.weight"], t["layernorm.bias"])


@pytest.mark.parametrize("prefix", ["vit.", ""])
def test_in21k_layout_round_trip_matches_numpy(tmp_path, prefix):
    rng = np.random.default_rng(0)
    config, tensors = checkpoint(str(tmp_path), rng, prefix)
    model = vit.load_hf(str(tmp_path))
    image = rng.integers(0, 256, size=(8, 8, 3)).astype(np.uint8)
    got = np.asarray(model(jnp.asarray(image[None])))[0]
    np.testing.assert_allclose(got, numpy_vit(tensors, config, image.astype(np.float64)), rtol=2e-4, atol=2e-4)
    assert model.features(jnp.asarray(image[None])).shape == (1, 8)


def test_vit_loader_names_unknown_tensors(tmp_path):
    rng = np.random.default_rng(1)
    checkpoint(str(tmp_path), rng)
    from safetensors.numpy import load_file

    tensors = load_file(os.path.join(tmp_path, "model.safetensors"))
    tensors["vit.encoder.layer.0.attention.attention.gate.weight"] = np.zeros((8, 8), np.float32)
    save_file(tensors, os.path.join(tmp_path, "model.safetensors"))
    with pytest.raises(hf.CheckpointError, match="gate"):
        vit.load_hf(str(tmp_path))
