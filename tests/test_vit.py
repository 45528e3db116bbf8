"""ViT: in21k-layout checkpoints (HF ViTModel names) loaded back and checked against a plain-numpy forward
pass and against transformers' PyTorch ViTModel (tests/fixtures/vit_reference), position-embedding
interpolation, loader errors and the LoRA delta hook."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file, save_file

from jaxtree_lora import lora
from jaxtree_lora.models import hf, vit

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, SIZE, PATCH = 8, 16, 2, 2, 8, 4


def make_checkpoint(directory, seed=0, prefix="vit.", shards=1):
    """A random checkpoint with google/vit-base-patch16-224-in21k's tensor names (and its pooler)."""
    from transformers import ViTConfig

    rng = np.random.default_rng(seed)
    d, f = HIDDEN, INTERMEDIATE
    config = ViTConfig(image_size=SIZE, patch_size=PATCH, num_channels=3, hidden_size=d, intermediate_size=f,
                       num_hidden_layers=LAYERS, num_attention_heads=HEADS)
    positions = (SIZE // PATCH) ** 2 + 1
    t = {"embeddings.patch_embeddings.projection.weight": 0.2 * rng.normal(size=(d, 3, PATCH, PATCH)),
         "embeddings.patch_embeddings.projection.bias": 0.1 * rng.normal(size=d),
         "embeddings.cls_token": rng.normal(size=(1, 1, d)),
         "embeddings.position_embeddings": rng.normal(size=(1, positions, d)),
         "layernorm.weight": 1 + 0.1 * rng.normal(size=d), "layernorm.bias": 0.1 * rng.normal(size=d),
         "pooler.dense.weight": rng.normal(size=(d, d)), "pooler.dense.bias": rng.normal(size=d)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
                            ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
            t[p + name + ".weight"] = 0.3 * rng.normal(size=shape)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=shape[0])
        for name in ("layernorm_before", "layernorm_after"):
            t[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=d)
    t = {name: np.asarray(value, np.float32) for name, value in t.items()}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    stored = {prefix + name: value for name, value in t.items()}
    if shards == 1:
        save_file(stored, os.path.join(directory, "model.safetensors"))
    else:
        weight_map = {}
        for index, part in enumerate(np.array_split(np.asarray(sorted(stored)), shards)):
            filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file({name: stored[name] for name in part}, os.path.join(directory, filename))
            weight_map.update({name: filename for name in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"weight_map": weight_map}, f)
    return config, t


def numpy_vit(t, config, image):
    """Independent float64 ViTModel forward for one uint8 image [H, W, C] -> last_hidden_state [N+1, D]."""
    t = {name: np.asarray(value, np.float64) for name, value in t.items()}
    d, heads, patch = config.hidden_size, config.num_attention_heads, config.patch_size
    x = (image / 255.0 - 0.5) / 0.5
    weight = t["embeddings.patch_embeddings.projection.weight"]  # conv [D, C, P, P], stride P
    grid = config.image_size // patch
    tokens = []
    for r in range(grid):
        for c in range(grid):
            block = x[r * patch:(r + 1) * patch, c * patch:(c + 1) * patch].transpose(2, 0, 1)  # [C, P, P]
            tokens.append((weight * block[None]).sum((1, 2, 3)) + t["embeddings.patch_embeddings.projection.bias"])
    h = np.concatenate([t["embeddings.cls_token"][0], np.stack(tokens)]) + t["embeddings.position_embeddings"][0]
    norm = lambda v, g, b: (v - v.mean(-1, keepdims=True)) / np.sqrt(v.var(-1, keepdims=True) + 1e-12) * g + b
    linear = lambda v, name: v @ t[name + ".weight"].T + t[name + ".bias"]
    gelu = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    head_dim = d // heads
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        a = norm(h, t[p + "layernorm_before.weight"], t[p + "layernorm_before.bias"])
        q, k, v = (linear(a, p + f"attention.attention.{n}").reshape(-1, heads, head_dim)
                   for n in ("query", "key", "value"))
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        h = h + linear(np.einsum("hqk,khd->qhd", s, v).reshape(-1, d), p + "attention.output.dense")
        a = norm(h, t[p + "layernorm_after.weight"], t[p + "layernorm_after.bias"])
        h = h + linear(gelu(linear(a, p + "intermediate.dense")), p + "output.dense")
    return norm(h, t["layernorm.weight"], t["layernorm.bias"])


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("vit"))
    config, tensors = make_checkpoint(directory)
    return config, tensors, vit.load_hf(directory)


@pytest.mark.parametrize("prefix,shards", [("vit.", 1), ("", 2)])
def test_in21k_layout_round_trip_matches_numpy(tmp_path, prefix, shards):
    """Names with and without "vit.", single and sharded files: the hidden states equal numpy's
    (wrong conv -> patch-kernel layout, transposes or block order otherwise)."""
    config, tensors = make_checkpoint(str(tmp_path), seed=shards, prefix=prefix, shards=shards)
    model = vit.load_hf(str(tmp_path))
    images = np.random.default_rng(5).integers(0, 256, size=(2, SIZE, SIZE, 3)).astype(np.uint8)
    hidden = np.asarray(model(jnp.asarray(images)))
    for row in range(2):
        np.testing.assert_allclose(hidden[row], numpy_vit(tensors, config, images[row].astype(np.float64)),
                                   atol=1e-4, err_msg=f"image {row} differs from numpy")
    features = np.asarray(model.features(jnp.asarray(images)))
    np.testing.assert_allclose(features, hidden[:, 0], atol=1e-6, err_msg="features must be the final-norm [CLS]")


def test_float_images_in_unit_range_equal_uint8_pixels(tiny):
    """uint8 pixels are divided by 255; float images are taken as already in [0, 1]; preprocessed
    input skips both and the (x - 0.5) / 0.5 normalisation."""
    _, _, model = tiny
    images = np.random.default_rng(6).integers(0, 256, size=(1, SIZE, SIZE, 3)).astype(np.uint8)
    from_uint8 = np.asarray(model(jnp.asarray(images)))
    from_float = np.asarray(model(jnp.asarray(images / 255.0, jnp.float32)))
    from_normalised = np.asarray(model(jnp.asarray((images / 255.0 - 0.5) / 0.5, jnp.float32), preprocessed=True))
    np.testing.assert_allclose(from_float, from_uint8, atol=1e-5)
    np.testing.assert_allclose(from_normalised, from_uint8, atol=1e-5)


def test_mean_and_std_come_from_the_preprocessor_config(tiny, tmp_path):
    """A ViTModel trained with ImageNet's mean and std (facebook/dino-vit*) says so in its
    preprocessor_config.json: pixels are normalised with those, not the in21k 0.5 and 0.5."""
    _, _, in21k = tiny
    make_checkpoint(str(tmp_path))  # the same weights as `tiny`
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    with open(os.path.join(tmp_path, "preprocessor_config.json"), "w") as f:
        json.dump({"do_normalize": True, "image_mean": mean, "image_std": std}, f)
    model = vit.load_hf(str(tmp_path))
    assert (model.config.mean, model.config.std) == (tuple(mean), tuple(std))
    images = np.random.default_rng(8).integers(0, 256, size=(1, SIZE, SIZE, 3)).astype(np.uint8)
    expected = in21k(jnp.asarray((images / 255.0 - np.asarray(mean)) / np.asarray(std), jnp.float32), preprocessed=True)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(images))), np.asarray(expected), atol=1e-5)
    with open(os.path.join(tmp_path, "preprocessor_config.json"), "w") as f:
        json.dump({"image_mean": mean, "image_std": [0.2, 0.0, 0.2]}, f)
    with pytest.raises(hf.CheckpointError, match="image_std .* must be positive"):
        vit.load_hf(str(tmp_path))


def test_images_of_another_size_are_resized_and_bad_shapes_refused(tiny):
    _, _, model = tiny
    assert model(jnp.zeros((1, 2 * SIZE, 2 * SIZE, 3), jnp.uint8)).shape == (1, (SIZE // PATCH) ** 2 + 1, HIDDEN)
    with pytest.raises(ValueError, match="channels last"):
        model(jnp.zeros((1, 3, SIZE, SIZE), jnp.uint8))
    with pytest.raises(ValueError, match="resize them first"):
        model(jnp.zeros((1, 2 * SIZE, 2 * SIZE, 3)), preprocessed=True)


def reference_cases():
    with open(os.path.join(FIXTURES, "vit_reference", "reference.json")) as f:
        return json.load(f)["cases"]


@pytest.mark.parametrize("case", range(3))
def test_matches_pytorch_vit_model_with_and_without_interpolation(case):
    """A tiny random ViTModel saved by transformers (in21k names) and its PyTorch last_hidden_state for
    uint8 images at the checkpoint's 16 px, and at 24 px / 8 px with interpolate_pos_encoding=True
    (make_minilm_reference.py): equal within 1e-5, so the key map, the normalisation and the bicubic
    position-embedding interpolation all match transformers'."""
    reference = reference_cases()[case]
    model = vit.load_hf(os.path.join(FIXTURES, "vit_reference"), image_size=reference["image_size"])
    assert model.config.image_size == reference["image_size"]
    images = jnp.asarray(np.asarray(reference["images"], np.uint8))
    got = np.asarray(model(images))
    np.testing.assert_allclose(got, np.asarray(reference["last_hidden_state"]), atol=1e-5, rtol=0)


def test_interpolation_keeps_cls_and_is_identity_at_the_same_grid():
    rng = np.random.default_rng(7)
    table = rng.normal(size=(1 + 4 * 4, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(vit.interpolate_position_embeddings(table, 4)), table)
    larger = np.asarray(vit.interpolate_position_embeddings(table, 6))
    assert larger.shape == (1 + 36, 3)
    np.testing.assert_array_equal(larger[0], table[0])
    constant = np.tile(table[:1], (17, 1))
    np.testing.assert_allclose(np.asarray(vit.interpolate_position_embeddings(constant, 7))[1:],
                               np.tile(table[:1], (49, 1)), atol=1e-6,
                               err_msg="a constant grid must stay constant (interpolation weights sum to 1)")
    with pytest.raises(ValueError, match="square grid"):
        vit.interpolate_position_embeddings(table[:-1], 4)


def test_image_size_must_be_a_multiple_of_the_patch(tmp_path):
    """Loading (run) and planning (plan reads only config.json) refuse it alike, in one line naming a size."""
    import ml_collections

    from jaxtree_lora.train import backbone

    make_checkpoint(str(tmp_path))
    with pytest.raises(hf.CheckpointError, match="choose e.g. 12"):
        vit.load_hf(str(tmp_path), image_size=13)
    config = ml_collections.ConfigDict({"model": {"name": "hf", "kind": "vit", "path": str(tmp_path)},
                                        "data": {"image_size": 13}})
    with pytest.raises(hf.CheckpointError, match="choose e.g. 12"):
        backbone.abstract_module(config)


def test_pure_function_under_jit(tiny):
    _, _, model = tiny
    graphdef, params = nnx.split(model)
    images = jnp.asarray(np.random.default_rng(8).integers(0, 256, size=(2, SIZE, SIZE, 3)).astype(np.uint8))
    jitted = jax.jit(lambda p, x: nnx.merge(graphdef, p).features(x))(params, images)
    np.testing.assert_allclose(np.asarray(jitted), np.asarray(model.features(images)), atol=1e-5)


def test_sites_and_peft_module_names(tiny):
    _, _, model = tiny
    sites = model.lora_sites()
    assert list(sites) == list(vit.SITES)
    assert (sites["mlp.fc1"].d_in, sites["mlp.fc1"].d_out) == (HIDDEN, INTERMEDIATE)
    assert (sites["mlp.fc2"].d_in, sites["mlp.fc2"].d_out) == (INTERMEDIATE, HIDDEN)
    assert model.hf_module_path("attn.query", 2) == "vit.encoder.layer.2.attention.attention.query"
    assert model.hf_module_path("attn.output", 0) == "vit.encoder.layer.0.attention.output.dense"
    assert model.hf_module_path("mlp.fc1", 1) == "vit.encoder.layer.1.intermediate.dense"
    assert model.hf_module_path("mlp.fc2", 1) == "vit.encoder.layer.1.output.dense"


def test_lora_delta_equals_merging_into_the_kernels(tmp_path):
    """At all six sites: zero B changes nothing; random B through the hook equals lora.merge into the
    kernels (a site wired to the wrong projection breaks the equality)."""
    make_checkpoint(str(tmp_path), seed=9)
    model = vit.load_hf(str(tmp_path))
    spec = lora.LoraSpec(targets=("attn.*", "mlp.*"), rank=2, alpha=4.0, init="gaussian")
    fresh = lora.init(jax.random.key(0), spec, model.lora_sites(), LAYERS)
    delta = lambda site, adapter, x, key: lora.apply(adapter, x, spec.scale)
    graphdef, _ = nnx.split(model)
    # One compiled forward; the weights and adapters are arguments.
    forward = jax.jit(lambda params, x, adapters: nnx.merge(graphdef, params)(x, adapters=adapters, delta=delta))
    images = jnp.asarray(np.random.default_rng(10).integers(0, 256, size=(2, SIZE, SIZE, 3)).astype(np.uint8))
    no_adapters = {site: jax.tree.map(jnp.zeros_like, value) for site, value in fresh.items()}
    base = np.asarray(forward(nnx.state(model), images, no_adapters))
    np.testing.assert_allclose(np.asarray(forward(nnx.state(model), images, fresh)), base, atol=2e-6, rtol=0)
    adapters = {site: {"a": value["a"], "b": 0.3 * jax.random.normal(jax.random.key(index), value["b"].shape)}
                for index, (site, value) in enumerate(fresh.items())}
    with_lora = np.asarray(forward(nnx.state(model), images, adapters))
    for site, adapter in adapters.items():
        param = getattr(model.layers, vit.SITE_KERNELS[site])
        param.set_value(lora.merge(param[...], adapter, spec.scale))
    np.testing.assert_allclose(with_lora, np.asarray(forward(nnx.state(model), images, no_adapters)), atol=2e-5)
    assert np.abs(with_lora - base).max() > 1e-3, "the adapter had no effect: the test would prove nothing"


def test_unknown_tensor_is_named(tmp_path):
    make_checkpoint(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["vit.encoder.layer.0.attention.attention.gate.weight"] = np.zeros((HIDDEN, HIDDEN), np.float32)
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError, match=r"unknown tensors: encoder\.layer\.0\.attention\.attention\.gate"):
        vit.load_hf(str(tmp_path))


def test_shape_mismatch_is_named(tmp_path):
    make_checkpoint(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["vit.embeddings.position_embeddings"] = np.zeros((1, 10, HIDDEN), np.float32)
    tensors["vit.encoder.layer.0.output.dense.weight"] = np.zeros((HIDDEN, INTERMEDIATE + 2), np.float32)
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError) as error:
        vit.load_hf(str(tmp_path))
    message = str(error.value)
    assert f"position_embeddings has shape (10, {HIDDEN}), expected (5, {HIDDEN})" in message, message
    assert "layers.fc2 of layers [0]" in message, message


def test_impossible_config_json_is_a_checkpoint_error():
    from transformers import ViTConfig

    with pytest.raises(hf.CheckpointError, match="config.json .* not a multiple of patch_size 8"):
        vit.ViTConfig.from_hf(ViTConfig(image_size=30, patch_size=8))
    with pytest.raises(hf.CheckpointError, match="config.json .* not divisible by num_heads"):
        vit.ViTConfig.from_hf(ViTConfig(hidden_size=32, num_attention_heads=5))


def test_other_model_types_are_refused(tmp_path):
    from transformers import BertConfig

    BertConfig(hidden_size=HIDDEN, num_attention_heads=HEADS).save_pretrained(str(tmp_path))
    with pytest.raises(hf.CheckpointError, match="'bert' is not a ViT"):
        vit.load_hf(str(tmp_path))
