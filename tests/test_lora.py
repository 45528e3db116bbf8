"""LoRA as pytrees: the algebra against numpy, masks, and the PEFT export format."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models.common import Site

SITES = {"attn.q_proj": Site(6, 4), "attn.v_proj": Site(6, 2), "mlp.up_proj": Site(6, 8)}


def test_spec_validation_names_the_fix():
    with pytest.raises(lora_lib.LoraSpecError, match="positive integer"):
        lora_lib.LoraSpec(rank=0)
    with pytest.raises(lora_lib.LoraSpecError, match="attn.q_proj, attn.v_proj, mlp.up_proj"):
        lora_lib.LoraSpec(targets=("attn.query",)).select(SITES)
    assert list(lora_lib.LoraSpec(targets=("attn.*",)).select(SITES)) == ["attn.q_proj", "attn.v_proj"]


def test_init_apply_merge_unmerge():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj",), rank=3, alpha=6.0)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    a, b = adapters["attn.q_proj"]["a"], adapters["attn.q_proj"]["b"]
    assert a.shape == (2, 3, 6) and b.shape == (2, 4, 3) and not np.any(np.asarray(b))
    assert np.all(np.abs(np.asarray(a)) <= 1 / np.sqrt(6)), "kaiming_uniform(a=sqrt 5) bound is 1/sqrt(d_in)"
    b = jax.random.normal(jax.random.PRNGKey(1), b.shape)
    x = np.asarray(jax.random.normal(jax.random.PRNGKey(2), (5, 6)))
    layer0 = {"a": a[0], "b": b[0]}
    expected = 2.0 * (x @ np.asarray(a[0]).T) @ np.asarray(b[0]).T
    np.testing.assert_allclose(np.asarray(lora_lib.apply(layer0, x, spec.scale)), expected, rtol=1e-5, atol=1e-6)
    kernel = jax.random.normal(jax.random.PRNGKey(3), (2, 6, 4))
    merged = lora_lib.merge(kernel, {"a": a, "b": b}, spec.scale)
    np.testing.assert_allclose(np.asarray(x @ merged[0]), np.asarray(x @ kernel[0]) + expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(lora_lib.unmerge(merged, {"a": a, "b": b}, spec.scale)),
                               np.asarray(kernel), atol=1e-5)
    assert lora_lib.count(adapters) == 2 * (3 * 6 + 4 * 3)


def test_max_modules_keeps_the_first_modules_in_layer_major_order():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, max_modules=3)
    masks = spec.layer_mask(SITES, num_layers=2)
    # order: layer0.q, layer0.v, layer1.q, layer1.v -> the first three are kept
    assert masks["attn.q_proj"].tolist() == [1, 1] and masks["attn.v_proj"].tolist() == [1, 0]
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    assert not np.any(np.asarray(adapters["attn.v_proj"]["a"][1]))


def test_inits_have_the_stated_statistics():
    ortho = lora_lib.init_a(jax.random.PRNGKey(0), (4, 32), "orthogonal")
    np.testing.assert_allclose(np.asarray(ortho @ ortho.T), np.eye(4), atol=1e-5)
    gauss = lora_lib.init_a(jax.random.PRNGKey(0), (4, 20000), "gaussian")
    assert abs(float(jnp.std(gauss)) - 1 / 4) < 0.01


def test_export_peft_writes_peft_names_and_config(tmp_path):
    from safetensors.numpy import load_file

    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=4.0, dropout=0.1)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    path = lambda site, layer: f"model.layers.{layer}.self_attn.{site.split('.')[1]}"
    names = lora_lib.export_peft(str(tmp_path), adapters, spec, path, base_model="tiny")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight" in tensors
    assert tensors["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"].shape == (4, 2)
    assert len(names) == 8
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 2 and config["lora_alpha"] == 4.0
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
