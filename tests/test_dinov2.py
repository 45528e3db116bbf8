"""DINOv2 as the project's ViT: a tiny Dinov2 checkpoint (HF safetensors names, and the same tensors in
an ONNX file laid out as the `dinov2_small` asset's exporter lays it out) checked against a plain-numpy
forward pass (LayerScale, bicubic position-embedding resizing with edge clamping, erf GELU); misfit
tensors refused by name; the backbone wiring; and, with the asset installed, the real ViT-S/14 against
onnxruntime running the asset's own graph up to its backbone output."""
import json
import math
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxtree_lora import lora
from jaxtree_lora.models import dinov2, hf, vit
from jaxtree_lora.train import backbone as backbone_lib

onnx = pytest.importorskip("onnx")

HIDDEN, INTERMEDIATE, LAYERS, HEADS, PATCH, STORED_GRID = 64, 128, 2, 4, 2, 3


def dinov2_tensors(seed=0, hidden=HIDDEN):
    """Random HF Dinov2Model tensors (torch layout) for a tiny model whose positions are stored for a 3 x 3 grid."""
    rng = np.random.default_rng(seed)
    d, f = hidden, INTERMEDIATE
    t = {"embeddings.patch_embeddings.projection.weight": 0.2 * rng.normal(size=(d, 3, PATCH, PATCH)),
         "embeddings.patch_embeddings.projection.bias": 0.1 * rng.normal(size=d),
         "embeddings.cls_token": rng.normal(size=(1, 1, d)), "embeddings.mask_token": np.zeros((1, d)),
         "embeddings.position_embeddings": rng.normal(size=(1, STORED_GRID ** 2 + 1, d)),
         "layernorm.weight": 1 + 0.1 * rng.normal(size=d), "layernorm.bias": 0.1 * rng.normal(size=d)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.attention.query", (d, d)), ("attention.attention.key", (d, d)),
                            ("attention.attention.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("mlp.fc1", (f, d)), ("mlp.fc2", (d, f))):
            t[p + name + ".weight"] = 0.15 * rng.normal(size=shape)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=shape[0])
        for name in ("norm1", "norm2"):
            t[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=d)
        # Far from 1 and different per channel, so a LayerScale dropped or applied twice shows.
        t[p + "layer_scale1.lambda1"] = rng.uniform(0.1, 2.0, size=d)
        t[p + "layer_scale2.lambda1"] = rng.uniform(0.1, 2.0, size=d)
    return {name: np.asarray(value, np.float32) for name, value in t.items()}


def write_hf(directory, tensors, prefix=""):
    os.makedirs(directory, exist_ok=True)
    d = tensors["embeddings.cls_token"].shape[-1]
    config = {"model_type": "dinov2", "hidden_size": d, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "mlp_ratio": INTERMEDIATE // d, "patch_size": PATCH, "image_size": STORED_GRID * PATCH,
              "num_channels": 3, "hidden_act": "gelu", "layer_norm_eps": 1e-6, "layerscale_value": 1.0,
              "use_swiglu_ffn": False, "qkv_bias": True}
    with open(os.path.join(directory, "config.json"), "w") as file:
        json.dump(config, file)
    save_file({prefix + name: value for name, value in tensors.items()}, os.path.join(directory, "model.safetensors"))
    return directory


def write_onnx(path, tensors, replace=None):
    """The tensors as the asset's exporter stores them: "backbone." initializers, Linear weights [in, out]
    under anonymous names read by MatMul nodes named after their module, LayerScale factors as Constant
    nodes, position embeddings split into a [CLS] part (read by a Concat) and a patch part (a Reshape).
    `replace` maps an ONNX name to another value (a tampered file). Not runnable: only the loader reads it."""
    from onnx import helper, numpy_helper

    replace = replace or {}
    initializers, nodes = [], []

    def value(name, array):
        return numpy_helper.from_array(np.asarray(replace.get(name, array), np.float32), name)

    positions = tensors["embeddings.position_embeddings"]
    initializers.append(value("onnx::Concat_1", positions[:, :1]))
    initializers.append(value("onnx::Reshape_2", positions[:, 1:]))
    nodes.append(helper.make_node("Concat", ["onnx::Concat_1", "patches"], ["cat"],
                                  name="/backbone/embeddings/Concat_6", axis=1))
    nodes.append(helper.make_node("Reshape", ["onnx::Reshape_2", "shape"], ["grid"],
                                  name="/backbone/embeddings/Reshape_1"))
    for index, (name, array) in enumerate(sorted(tensors.items())):
        if name == "embeddings.position_embeddings":
            continue
        scope = "/backbone/" + name.rsplit(".", 1)[0].replace(".", "/")
        if name.startswith("encoder.") and name.endswith(".weight") and array.ndim == 2:
            anonymous = f"onnx::MatMul_{100 + index}"
            initializers.append(value(anonymous, array.T))
            nodes.append(helper.make_node("MatMul", [scope + "_in", anonymous], [scope + "_out"],
                                          name=scope + "/MatMul"))
        elif "layer_scale" in name:
            nodes.append(helper.make_node("Constant", [], ["backbone." + name], name=scope + "/Constant",
                                          value=value("backbone." + name, array)))
        else:
            initializers.append(value("backbone." + name, array))
    initializers.append(value("decoder.final_conv.weight", np.ones((1, 4, 1, 1))))  # the unused saliency head
    graph = helper.make_graph(nodes, "tiny_dinov2", [helper.make_tensor_value_info("input_image", 1, None)],
                              [helper.make_tensor_value_info("output_importance", 1, None)], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return str(path)


def keys_cubic(t, a=-0.75):
    """The four Keys cubic weights for sample offsets -1, 0, 1, 2 at fractional position t."""
    def w(x):
        x = abs(x)
        return ((a + 2) * x - (a + 3)) * x * x + 1 if x <= 1 else (((x - 5) * x + 8) * x - 4) * a if x < 2 else 0.0
    return [w(t + 1), w(t), w(1 - t), w(2 - t)]


def resize_matrix(old, new):
    """[new, old] bicubic resampling, half-pixel centres, out-of-range samples clamped to the edge."""
    matrix = np.zeros((new, old))
    for i in range(new):
        x = (i + 0.5) * old / new - 0.5
        base = math.floor(x)
        for offset, weight in zip(range(-1, 3), keys_cubic(x - base)):
            matrix[i, min(max(base + offset, 0), old - 1)] += weight
    return matrix


def numpy_dinov2(t, images, heads=HEADS, eps=1e-6):
    """HF Dinov2Model's forward in float64 numpy: images [B, S, S, 3] normalised -> hidden states [B, 1 + n, d]."""
    from scipy.special import erf

    batch, size = images.shape[0], images.shape[1]
    grid = size // PATCH
    weight = t["embeddings.patch_embeddings.projection.weight"].astype(np.float64)
    d = weight.shape[0]
    patches = images.reshape(batch, grid, PATCH, grid, PATCH, 3)
    tokens = np.einsum("bipjqc,dcpq->bijd", patches, weight).reshape(batch, grid * grid, d)
    tokens = tokens + t["embeddings.patch_embeddings.projection.bias"]
    positions = t["embeddings.position_embeddings"][0].astype(np.float64)
    stored = positions[1:].reshape(STORED_GRID, STORED_GRID, d)
    if grid != STORED_GRID:
        m = resize_matrix(STORED_GRID, grid)
        stored = np.einsum("ik,jl,kld->ijd", m, m, stored)
    positions = np.concatenate([positions[:1], stored.reshape(grid * grid, d)])
    x = np.concatenate([np.broadcast_to(t["embeddings.cls_token"][0], (batch, 1, d)), tokens], axis=1) + positions

    def norm(x, prefix):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + eps) * t[prefix + ".weight"] + t[prefix + ".bias"]

    def linear(x, prefix):
        return x @ t[prefix + ".weight"].T.astype(np.float64) + t[prefix + ".bias"]

    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        h = norm(x, p + "norm1")
        split = lambda y: y.reshape(batch, -1, heads, d // heads).transpose(0, 2, 1, 3)  # noqa: E731
        q, k, v = (split(linear(h, p + "attention.attention." + n)) for n in ("query", "key", "value"))
        scores = q @ k.transpose(0, 1, 3, 2) / math.sqrt(d // heads)
        probs = np.exp(scores - scores.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        context = (probs @ v).transpose(0, 2, 1, 3).reshape(batch, -1, d)
        x = x + linear(context, p + "attention.output.dense") * t[p + "layer_scale1.lambda1"]
        h = linear(norm(x, p + "norm2"), p + "mlp.fc1")
        h = 0.5 * h * (1 + erf(h / math.sqrt(2)))
        x = x + linear(h, p + "mlp.fc2") * t[p + "layer_scale2.lambda1"]
    return norm(x, "layernorm")


def normalised_images(size, seed):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(2, size, size, 3)).astype(np.float32)


@pytest.mark.parametrize("grid", [STORED_GRID, 5, 2])
def test_hf_directory_matches_numpy_forward(tmp_path, grid):
    """Stored grid kept as it is, enlarged (3 -> 5) and shrunk (3 -> 2, where the bicubic taps fall off
    the edge and are clamped): a wrong LayerScale, GELU, eps or resize rule would show."""
    tensors = dinov2_tensors()
    model = dinov2.load_hf(write_hf(str(tmp_path), tensors, prefix="dinov2."), image_size=grid * PATCH)
    assert model.config.family == "dinov2" and model.config.num_heads == HEADS
    images = normalised_images(grid * PATCH, seed=grid)
    ours = np.asarray(model(jnp.asarray(images), preprocessed=True))
    np.testing.assert_allclose(ours, numpy_dinov2(tensors, images.astype(np.float64)), atol=2e-4, rtol=0)


def test_position_interpolation_matches_hand_computed_bicubic():
    """3 x 3 -> 2 x 2 resizing equals the hand-computed weights: output pixel 0 sits at input 0.25, so
    its taps are input -1 (clamped to 0), 0, 1, 2 with the Keys weights at t = 0.25; [CLS] kept."""
    rng = np.random.default_rng(3)
    table = rng.normal(size=(1 + 9, 5)).astype(np.float32)
    w = keys_cubic(0.25)
    row0 = np.array([w[0] + w[1], w[2], w[3]])  # the clamped tap -1 adds to tap 0
    assert abs(row0.sum() - 1) < 1e-12
    expected = np.einsum("i,j,ijd->d", row0, row0, table[1:].reshape(3, 3, 5))
    resized = np.asarray(vit.interpolate_position_embeddings(table, 2))
    np.testing.assert_allclose(resized[0], table[0], atol=0)
    np.testing.assert_allclose(resized[1], expected, atol=1e-5)


def test_onnx_layout_loads_the_same_model(tmp_path):
    """The ONNX layout (anonymous MatMul weights, Constant nodes, split positions, a decoder to ignore)
    gives the parameters the HF directory gives."""
    tensors = dinov2_tensors(seed=1, hidden=HIDDEN)
    from_onnx = dinov2.load_onnx(write_onnx(tmp_path / "tiny.onnx", tensors), image_size=4 * PATCH)
    from_hf = dinov2.load_hf(write_hf(str(tmp_path / "hf"), tensors), image_size=4 * PATCH)
    assert from_onnx.config.num_heads == HIDDEN // dinov2.HEAD_DIM
    flat_onnx = dict(jax.tree_util.tree_leaves_with_path(nnx.state(from_onnx)))
    flat_hf = dict(jax.tree_util.tree_leaves_with_path(nnx.state(from_hf)))
    assert sorted(map(str, flat_onnx)) == sorted(map(str, flat_hf)) and len(flat_onnx) == 6 + 18
    for path, leaf in flat_onnx.items():
        np.testing.assert_array_equal(np.asarray(leaf), np.asarray(flat_hf[path]), err_msg=str(path))
    scale = np.asarray(from_onnx.layers.scale2[...])
    np.testing.assert_array_equal(scale[1], tensors["encoder.layer.1.layer_scale2.lambda1"])


@pytest.mark.parametrize("onnx_name,named", [
    ("backbone.encoder.layer.1.attention.attention.key.bias", r"encoder\.layer\.1\.attention\.attention\.key\.bias"),
    ("backbone.encoder.layer.0.layer_scale2.lambda1", r"encoder\.layer\.0\.layer_scale2\.lambda1"),
    ("MATMUL", r"encoder\.layer\.1\.mlp\.fc2\.weight \(stored as onnx::MatMul_\d+\)")])
def test_tampered_onnx_is_refused_naming_the_tensor(tmp_path, onnx_name, named):
    tensors = dinov2_tensors(seed=2)
    if onnx_name == "MATMUL":  # an anonymous Linear weight: the message names its module and its ONNX name
        index = sorted(tensors).index("encoder.layer.1.mlp.fc2.weight")
        onnx_name = f"onnx::MatMul_{100 + index}"
        wrong = np.zeros((INTERMEDIATE, HIDDEN - 1))
    else:
        wrong = np.zeros(HIDDEN - 1)
    path = write_onnx(tmp_path / "tampered.onnx", tensors, replace={onnx_name: wrong})
    with pytest.raises(hf.CheckpointError, match=named):
        dinov2.load_onnx(path)


def test_not_onnx_and_not_dinov2_are_refused(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"\x00\x01 not a protobuf \xff" * 10)
    with pytest.raises(hf.CheckpointError, match="junk.onnx"):
        dinov2.load_onnx(str(junk))
    with pytest.raises(hf.CheckpointError, match="choose e.g. 28"):
        dinov2.load_onnx(write_onnx(tmp_path / "ok.onnx", dinov2_tensors()), image_size=27)


def test_backbone_from_hf_directory_and_its_plan(tmp_path):
    """model.name=hf with kind vit finds DINOv2 from config.json; abstract_module plans the same shapes;
    a data.image_size that is not a multiple of the patch is one line naming a valid size."""
    directory = write_hf(str(tmp_path), dinov2_tensors())
    config = ml_collections.ConfigDict({"model": {"name": "hf", "path": directory, "kind": "vit"},
                                        "data": {"image_size": 4 * PATCH}, "seed": 0})
    built = backbone_lib.build(config)
    assert built.kind == "vit" and built.info.feature_dim == HIDDEN and built.info.num_layers == LAYERS
    assert built.hf_module_path("mlp.fc1", 1) == "dinov2.encoder.layer.1.mlp.fc1"
    images = jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 20, 20, 3)).astype(np.uint8))
    assert built.features(built.params, {"images": images}).shape == (2, HIDDEN)
    planned, kind = backbone_lib.abstract_module(config)
    planned_shapes = jax.tree.map(lambda leaf: leaf.shape, nnx.state(planned))
    assert kind == "vit" and planned_shapes == jax.tree.map(lambda leaf: leaf.shape, built.params)
    bad = ml_collections.ConfigDict({"model": {"name": "dinov2_small"}, "data": {"image_size": 100}})
    with pytest.raises(backbone_lib.BackboneError, match=r"data.image_size 100 .* choose e.g. 98"):
        backbone_lib.build(bad)
    with pytest.raises(backbone_lib.BackboneError, match="choose e.g. 98"):
        backbone_lib.abstract_module(bad)


def test_lora_through_layer_scale_equals_merging(tmp_path):
    """Every LoRA site of the DINOv2 block: the adapter through the hook equals merging it into the
    kernel, so LayerScale multiplies the adapted projection's whole output (as PEFT on HF Dinov2 does)."""
    model = dinov2.load_hf(write_hf(str(tmp_path), dinov2_tensors(seed=4)), image_size=3 * PATCH)
    spec = lora.LoraSpec(targets=("attn.*", "mlp.*"), rank=2, alpha=4.0, init="gaussian")
    fresh = lora.init(jax.random.key(0), spec, model.lora_sites(), LAYERS)
    adapters = {site: {"a": value["a"], "b": 0.3 * jax.random.normal(jax.random.key(index), value["b"].shape)}
                for index, (site, value) in enumerate(fresh.items())}
    delta = lambda site, adapter, x, key: lora.apply(adapter, x, spec.scale)  # noqa: E731
    images = jnp.asarray(normalised_images(3 * PATCH, seed=5))
    graphdef, _ = nnx.split(model)
    no_adapters = {site: jax.tree.map(jnp.zeros_like, value) for site, value in adapters.items()}
    forward = jax.jit(lambda params, chosen: nnx.merge(graphdef, params)(images, adapters=chosen, delta=delta,
                                                                            preprocessed=True))
    base = np.asarray(forward(nnx.state(model), no_adapters))
    with_lora = np.asarray(forward(nnx.state(model), adapters))
    for site, adapter in adapters.items():
        param = getattr(model.layers, vit.SITE_KERNELS[site])
        param.set_value(lora.merge(param[...], adapter, spec.scale))
    np.testing.assert_allclose(with_lora, np.asarray(forward(nnx.state(model), no_adapters)), atol=1e-4)
    assert np.abs(with_lora - base).max() > 1e-2, "the adapter had no effect: the test would prove nothing"


def _asset_path():
    from jaxtree_lora import assets

    try:
        return str(assets.path("dinov2_small"))
    except assets.AssetMissing:
        pytest.skip("asset dinov2_small not installed (jaxtree-lora assets dinov2_small)")


def _onnxruntime_backbone(path, image_size):
    """An onnxruntime session of the asset's graph with the backbone's output exposed and, for another
    image size, the input's fixed 224 x 224 made free (the graph resizes positions to H/14 itself)."""
    ort = pytest.importorskip("onnxruntime")
    graph_model = onnx.load(path)
    graph_model.graph.output.append(onnx.helper.make_tensor_value_info("/backbone/layernorm/Add_1_output_0",
                                                                       onnx.TensorProto.FLOAT, None))
    if image_size != 224:
        for dim in graph_model.graph.input[0].type.tensor_type.shape.dim[2:]:
            dim.dim_param = "side"
    session = ort.InferenceSession(graph_model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda x: session.run(["/backbone/layernorm/Add_1_output_0"], {"input_image": x})[0]


@pytest.mark.assets
@pytest.mark.parametrize("image_size", [224, 112])
def test_real_dinov2_small_matches_onnxruntime(image_size):
    """Our ViT-S/14 (read with `onnx` only) against onnxruntime on the same file, full hidden states
    [2, 1 + (S/14)^2, 384]: a random-pixel image and a gradient, preprocessed by our own `preprocess`
    (uint8 -> [0, 1] -> ImageNet mean/std). At 112 px both resize the stored 37 x 37 positions to 8 x 8."""
    path = _asset_path()
    model = dinov2.load_onnx(path, image_size=image_size)
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (image_size, image_size, 3))
    ramp = np.linspace(0, 255, image_size)
    gradient = np.stack([ramp[:, None] + 0 * ramp[None], ramp[None] + 0 * ramp[:, None],
                         255 - ramp[:, None] / 2 - ramp[None] / 2], -1)
    pixels = np.stack([noise, gradient]).astype(np.uint8)
    normalised = np.asarray(model.preprocess(jnp.asarray(pixels)))
    expected = (pixels / 255.0 - np.array(dinov2.IMAGENET_MEAN)) / np.array(dinov2.IMAGENET_STD)
    np.testing.assert_allclose(normalised, expected, atol=1e-5)
    reference = _onnxruntime_backbone(path, image_size)(normalised.transpose(0, 3, 1, 2))
    ours = np.asarray(model(jnp.asarray(pixels)))
    assert ours.shape == reference.shape == (2, 1 + (image_size // 14) ** 2, 384)
    assert np.abs(ours - reference).max() <= 1e-4, np.abs(ours - reference).max()


@pytest.mark.assets
def test_dinov2_small_backbone_and_plan_agree():
    _asset_path()
    config = ml_collections.ConfigDict({"model": {"name": "dinov2_small"}, "data": {"image_size": 112}, "seed": 0})
    built = backbone_lib.build(config)
    assert built.kind == "vit" and built.info.feature_dim == 384 and built.info.num_layers == 12
    planned, kind = backbone_lib.abstract_module(config)
    assert kind == "vit" and jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), nnx.state(planned)) == \
        jax.tree.map(lambda leaf: (leaf.shape, leaf.dtype), built.params)
