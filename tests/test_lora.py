"""LoRA as pytrees (jaxtree_lora/lora.py): spec checks, init, the delta against numpy, merge/unmerge,
max_modules masks, counting, PEFT export, and the statistics of each A initialisation."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models.common import Site

# d_in, d_out per site; the order is the backbone's.
SITES = {"attn.q_proj": Site(6, 4), "attn.v_proj": Site(6, 2), "mlp.up_proj": Site(6, 8)}


def random_adapter(seed, num_layers, rank, site):
    """An adapter with non-zero A and B (a trained one), so that every algebraic check is non-trivial.

    Drawn with numpy: test data needs no compiled JAX random kernels.
    """
    rng = np.random.default_rng(seed)
    return {"a": rng.standard_normal((num_layers, rank, site.d_in)).astype(np.float32),
            "b": rng.standard_normal((num_layers, site.d_out, rank)).astype(np.float32)}


# -- spec validation ----------------------------------------------------------------------------------
def test_rank_zero_is_rejected_with_the_config_key_to_fix():
    with pytest.raises(lora_lib.LoraSpecError, match=r"--config\.lora\.rank.*positive integer"):
        lora_lib.LoraSpec(rank=0)


def test_a_pattern_that_matches_nothing_lists_the_backbone_sites():
    spec = lora_lib.LoraSpec(targets=("attn.query",))
    with pytest.raises(lora_lib.LoraSpecError) as error:
        spec.select(SITES)
    message = str(error.value)
    assert "'attn.query'" in message, "the error must name the pattern that failed"
    assert "attn.q_proj, attn.v_proj, mlp.up_proj" in message, "the error must list the sites one could target"


def test_other_bad_specs_name_the_fix():
    with pytest.raises(lora_lib.LoraSpecError, match=r"\[0, 1\)"):
        lora_lib.LoraSpec(dropout=1.0)
    with pytest.raises(lora_lib.LoraSpecError, match="kaiming_uniform, gaussian, orthogonal, zeros"):
        lora_lib.LoraSpec(init="xavier")
    with pytest.raises(lora_lib.LoraSpecError, match="at least one site"):
        lora_lib.LoraSpec(targets=())


def test_select_keeps_backbone_order_and_no_duplicates():
    spec = lora_lib.LoraSpec(targets=("mlp.*", "attn.*", "*.q_proj"))
    assert list(spec.select(SITES)) == ["attn.q_proj", "attn.v_proj", "mlp.up_proj"], \
        "sites must come in the backbone's order, each once, whatever the pattern order"


# -- init ---------------------------------------------------------------------------------------------
def test_init_shapes_and_b_is_zero():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "mlp.up_proj"), rank=3)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2, leading=(5,))
    assert sorted(adapters) == ["attn.q_proj", "mlp.up_proj"]
    assert adapters["attn.q_proj"]["a"].shape == (2, 5, 3, 6), "A is [layers, *leading, r, d_in]"
    assert adapters["attn.q_proj"]["b"].shape == (2, 5, 4, 3), "B is [layers, *leading, d_out, r]"
    assert adapters["mlp.up_proj"]["b"].shape == (2, 5, 8, 3)
    for site in adapters.values():
        assert not np.any(np.asarray(site["b"])), "B must start at 0 so that a fresh adapter adds nothing"
        assert np.any(np.asarray(site["a"])), "A must be initialised (kaiming_uniform by default)"
    assert not np.array_equal(np.asarray(adapters["attn.q_proj"]["a"][..., :6]),
                              np.asarray(adapters["mlp.up_proj"]["a"][..., :6])), "each site needs its own key"


def test_init_keeps_the_requested_dtype():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj",), rank=2)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=1, dtype=jnp.bfloat16)
    assert adapters["attn.q_proj"]["a"].dtype == jnp.bfloat16 and adapters["attn.q_proj"]["b"].dtype == jnp.bfloat16


# -- the delta, merge, unmerge ------------------------------------------------------------------------
def test_apply_equals_scale_x_at_bt_in_numpy():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj",), rank=3, alpha=6.0)  # scale = 6 / 3 = 2
    adapter = random_adapter(1, 1, 3, SITES["attn.q_proj"])
    layer = {"a": adapter["a"][0], "b": adapter["b"][0]}
    x = np.random.default_rng(2).standard_normal((2, 5, 6)).astype(np.float32)  # [batch, seq, d_in]
    a, b = np.asarray(layer["a"], np.float64), np.asarray(layer["b"], np.float64)
    expected = 2.0 * (x @ a.T) @ b.T  # [batch, seq, d_out]
    got = lora_lib.apply(layer, jnp.asarray(x), spec.scale)
    assert got.shape == (2, 5, 4)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-5, atol=1e-5,
                               err_msg="delta must be scale * x A^T B^T")
    jitted = jax.jit(lora_lib.apply, static_argnums=2)(layer, jnp.asarray(x), spec.scale)
    np.testing.assert_allclose(np.asarray(jitted), expected, rtol=1e-5, atol=1e-5, err_msg="jit changed the delta")


def test_apply_on_a_hand_computed_case():
    # A = [[1, 2]] (r=1, d_in=2), B = [[3], [-1]] (d_out=2), x = [1, 1], scale 0.5:
    # x A^T = 1 + 2 = 3; (x A^T) B^T = [9, -3]; times 0.5 = [4.5, -1.5]
    layer = {"a": jnp.array([[1.0, 2.0]]), "b": jnp.array([[3.0], [-1.0]])}
    np.testing.assert_allclose(np.asarray(lora_lib.apply(layer, jnp.array([1.0, 1.0]), 0.5)), [4.5, -1.5])


def test_delta_weight_merge_and_unmerge():
    spec = lora_lib.LoraSpec(targets=("attn.v_proj",), rank=2, alpha=8.0)  # scale 4
    site = SITES["attn.v_proj"]
    adapter = random_adapter(3, 3, 2, site)
    kernel = np.random.default_rng(4).standard_normal((3, site.d_in, site.d_out)).astype(np.float32)  # [layers, d_in, d_out]
    a, b = np.asarray(adapter["a"], np.float64), np.asarray(adapter["b"], np.float64)
    expected_delta = 4.0 * np.einsum("lri,lor->lio", a, b)  # scale * A^T B^T per layer
    np.testing.assert_allclose(np.asarray(lora_lib.delta_weight(adapter, spec.scale)), expected_delta,
                               rtol=1e-5, atol=1e-5)
    merged = lora_lib.merge(kernel, adapter, spec.scale)
    x = np.random.default_rng(5).standard_normal((7, site.d_in)).astype(np.float32)
    for layer in range(3):
        layer_adapter = {"a": adapter["a"][layer], "b": adapter["b"][layer]}
        base_plus_delta = x @ kernel[layer] + np.asarray(lora_lib.apply(layer_adapter, x, spec.scale))
        np.testing.assert_allclose(x @ np.asarray(merged[layer]), base_plus_delta, rtol=1e-4,
                                   atol=1e-4, err_msg=f"merged kernel of layer {layer} != base + LoRA delta")
    restored = lora_lib.unmerge(merged, adapter, spec.scale)
    np.testing.assert_allclose(np.asarray(restored), np.asarray(kernel), atol=1e-5,
                               err_msg="unmerge(merge(W)) must give W back")
    assert merged.dtype == kernel.dtype


def test_merge_keeps_a_bfloat16_kernel_bfloat16():
    site = SITES["attn.q_proj"]
    adapter = random_adapter(6, 1, 2, site)
    kernel = jnp.zeros((1, site.d_in, site.d_out), jnp.bfloat16)
    assert lora_lib.merge(kernel, adapter, 1.0).dtype == jnp.bfloat16


# -- max_modules --------------------------------------------------------------------------------------
def test_max_modules_keeps_the_first_modules_in_layer_major_order():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, max_modules=3)
    masks = spec.layer_mask(SITES, num_layers=2)
    # layer-major order: layer0.q, layer0.v, layer1.q, layer1.v -> the first three carry LoRA
    assert masks["attn.q_proj"].tolist() == [1.0, 1.0]
    assert masks["attn.v_proj"].tolist() == [1.0, 0.0]
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    assert not np.any(np.asarray(adapters["attn.v_proj"]["a"][1])), "a masked module must start with A = 0"
    assert np.any(np.asarray(adapters["attn.v_proj"]["a"][0])) and np.any(np.asarray(adapters["attn.q_proj"]["a"][1]))


def test_max_modules_zero_and_minus_one():
    spec_none = lora_lib.LoraSpec(targets=("attn.*",), max_modules=0)
    assert all(not m.any() for m in spec_none.layer_mask(SITES, 3).values()), "max_modules=0 keeps nothing"
    spec_all = lora_lib.LoraSpec(targets=("attn.*",), max_modules=-1)
    assert all(m.all() for m in spec_all.layer_mask(SITES, 3).values()), "max_modules=-1 keeps every module"


# -- count --------------------------------------------------------------------------------------------
def test_count_is_the_number_of_scalars():
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=3)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    # q: 2 layers x (3*6 + 4*3) = 60; v: 2 x (3*6 + 2*3) = 48
    assert lora_lib.count(adapters) == 108
    assert lora_lib.count({"w": np.zeros((2, 3)), "b": np.zeros(()), "nested": [np.zeros(4)]}) == 6 + 1 + 4


# -- PEFT export --------------------------------------------------------------------------------------
def hf_path(site, layer):
    return f"model.layers.{layer}.self_attn.{site.split('.')[1]}"


def test_export_peft_writes_peft_names_values_and_config(tmp_path):
    from safetensors.numpy import load_file

    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, alpha=4.0, dropout=0.1)
    adapters = {name: random_adapter(i, 2, 2, SITES[name])
                for i, name in enumerate(("attn.q_proj", "attn.v_proj"))}
    names = lora_lib.export_peft(str(tmp_path), adapters, spec, hf_path, base_model="tiny-llama")
    tensors = load_file(str(tmp_path / "adapter_model.safetensors"))
    expected_names = sorted(f"base_model.model.model.layers.{layer}.self_attn.{proj}.lora_{ab}.weight"
                            for layer in range(2) for proj in ("q_proj", "v_proj") for ab in "AB")
    assert names == expected_names and sorted(tensors) == expected_names, "PEFT key names"
    for layer in range(2):
        key = f"base_model.model.model.layers.{layer}.self_attn.q_proj"
        # PEFT: lora_A.weight [r, d_in], lora_B.weight [d_out, r] -- the same layout, no transpose
        np.testing.assert_array_equal(tensors[f"{key}.lora_A.weight"], np.asarray(adapters["attn.q_proj"]["a"][layer]))
        np.testing.assert_array_equal(tensors[f"{key}.lora_B.weight"], np.asarray(adapters["attn.q_proj"]["b"][layer]))
    assert tensors["base_model.model.model.layers.0.self_attn.v_proj.lora_B.weight"].shape == (2, 2)
    config = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert config["r"] == 2 and config["lora_alpha"] == 4.0 and config["lora_dropout"] == 0.1
    assert config["target_modules"] == ["q_proj", "v_proj"] and config["base_model_name_or_path"] == "tiny-llama"
    assert config["fan_in_fan_out"] is False, "kernels are exported in PyTorch Linear layout"


def test_export_peft_skips_masked_modules_and_honours_layers(tmp_path):
    from safetensors.numpy import load_file

    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "attn.v_proj"), rank=2, max_modules=3)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2)
    lora_lib.export_peft(str(tmp_path / "auto"), adapters, spec, hf_path)
    auto = load_file(str(tmp_path / "auto" / "adapter_model.safetensors"))
    assert not any("layers.1.self_attn.v_proj" in name for name in auto), "a masked (all-zero) module is not exported"
    assert len(auto) == 6
    lora_lib.export_peft(str(tmp_path / "chosen"), adapters, spec, hf_path, layers=[1])
    chosen = load_file(str(tmp_path / "chosen" / "adapter_model.safetensors"))
    assert sorted({name.split(".self_attn")[0] for name in chosen}) == ["base_model.model.model.layers.1"]


def test_export_peft_rejects_a_task_axis(tmp_path):
    spec = lora_lib.LoraSpec(targets=("attn.q_proj",), rank=2)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, SITES, num_layers=2, leading=(3,))
    with pytest.raises(lora_lib.LoraSpecError, match="one adapter per site"):
        lora_lib.export_peft(str(tmp_path), adapters, spec, hf_path)


# -- initialisation statistics ------------------------------------------------------------------------
def test_kaiming_uniform_matches_torch_kaiming_uniform_a_sqrt5():
    d_in = 64
    a = np.asarray(lora_lib.init_a(jax.random.PRNGKey(0), (50, 8, d_in), "kaiming_uniform"))
    bound = 1.0 / np.sqrt(d_in)  # gain sqrt(2 / (1 + 5)) * sqrt(3 / fan_in) = 1 / sqrt(fan_in)
    assert np.abs(a).max() <= bound, "U(-1/sqrt(d_in), 1/sqrt(d_in)) must stay inside its bound"
    assert np.abs(a).max() > 0.99 * bound, "the whole interval must be used"
    assert abs(a.std() - bound / np.sqrt(3)) < 0.02 * bound / np.sqrt(3), "uniform std is bound / sqrt(3)"
    assert abs(a.mean()) < 0.01 * bound


def test_gaussian_has_std_one_over_rank_like_peft():
    rank = 4
    a = np.asarray(lora_lib.init_a(jax.random.PRNGKey(0), (rank, 20000), "gaussian"))
    assert abs(a.std() - 1.0 / rank) < 0.005, "PEFT's gaussian init draws A ~ N(0, std = 1/r)"
    assert abs(a.mean()) < 0.005


def test_orthogonal_rows_are_orthonormal_per_layer():
    a = np.asarray(lora_lib.init_a(jax.random.PRNGKey(0), (3, 4, 32), "orthogonal"))
    assert a.shape == (3, 4, 32)
    for layer in range(3):
        np.testing.assert_allclose(a[layer] @ a[layer].T, np.eye(4), atol=1e-5,
                                   err_msg="orthogonal init: A A^T = I_r in every layer")
    assert not np.allclose(a[0], a[1]), "layers must get different orthogonal matrices"


def test_orthogonal_with_rank_above_d_in_keeps_the_shape():
    a = lora_lib.init_a(jax.random.PRNGKey(0), (5, 3), "orthogonal")
    assert a.shape == (5, 3), "init_a must return the requested [r, d_in] shape"
    # 5 orthonormal rows cannot exist in R^3; the 3 columns are orthonormal instead.
    np.testing.assert_allclose(np.asarray(a).T @ np.asarray(a), np.eye(3), atol=1e-5)


def test_zeros_init_is_zero():
    assert not np.any(np.asarray(lora_lib.init_a(jax.random.PRNGKey(0), (2, 3), "zeros")))


# -- dropout ------------------------------------------------------------------------------------------
def test_dropout_is_identity_without_key_or_rate_and_inverted_otherwise():
    x = jnp.ones((200, 100))
    assert lora_lib.dropout(x, 0.5, None) is x and lora_lib.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
    dropped = np.asarray(lora_lib.dropout(x, 0.25, jax.random.PRNGKey(0)))
    np.testing.assert_allclose(np.unique(dropped), [0.0, 1.0 / 0.75], rtol=1e-6,
                               err_msg="kept values are scaled by 1 / (1 - rate)")
    assert abs((dropped == 0).mean() - 0.25) < 0.01, "about `rate` of the entries are dropped"
    assert abs(dropped.mean() - 1.0) < 0.02, "inverted dropout keeps the mean"


def test_dropout_bits_are_uniform_16_bit_numbers_alike_for_raw_and_typed_keys():
    raw = jax.random.PRNGKey(7)
    bits = np.asarray(lora_lib.dropout_bits(raw, 200_001))
    assert bits.shape == (200_001,) and bits.max() < 1 << 16, "16-bit numbers, as many as asked"
    counts = np.bincount(bits >> 12, minlength=16)  # 16 equal bins of the 16-bit range
    assert np.all(np.abs(counts / bits.size - 1 / 16) < 0.004), f"not uniform over the 16-bit range: {counts}"
    low, high = bits[:100_000].astype(float), bits[100_000:200_000].astype(float)
    assert abs(np.corrcoef(low, high)[0, 1]) < 0.02, "the two halves of one word are not independent"
    typed = np.asarray(lora_lib.dropout_bits(jax.random.wrap_key_data(raw), 200_001))
    np.testing.assert_array_equal(bits, typed, err_msg="a raw key and its typed form draw different masks")
    other = np.asarray(lora_lib.dropout_bits(jax.random.PRNGKey(8), 200_001))
    assert (bits == other).mean() < 0.01, "another key draws the same numbers"
    rbg = np.asarray(lora_lib.dropout_bits(jax.random.key(7, impl="rbg"), 1001))
    assert rbg.shape == (1001,) and rbg.max() < 1 << 16 and len(np.unique(rbg)) > 900, "non-threefry keys"


def test_dropout_rate_is_rounded_to_16_bits_and_the_expectation_kept_exactly():
    x = jnp.ones((400, 500))
    dropped = np.asarray(lora_lib.dropout(x, 0.1, jax.random.PRNGKey(1)))
    threshold = round(0.1 * 65536)  # 6554: rate 0.100006
    np.testing.assert_allclose(np.unique(dropped), [0.0, 65536 / (65536 - threshold)], rtol=1e-6)
    assert abs((dropped == 0).mean() - threshold / 65536) < 0.003
    keys = jax.random.split(jax.random.PRNGKey(2), 64)
    means = [float(jnp.mean(lora_lib.dropout(jnp.ones((64, 64)), 0.3, k))) for k in keys]
    assert abs(np.mean(means) - 1.0) < 0.003, "inverted dropout is unbiased over many masks"


def test_spec_refuses_a_non_integer_rank_and_max_modules_below_minus_one():
    with pytest.raises(lora_lib.LoraSpecError, match="integer"):
        lora_lib.LoraSpec(rank=2.5)
    with pytest.raises(lora_lib.LoraSpecError, match="max_modules"):
        lora_lib.LoraSpec(max_modules=-2)


def test_apply_selected_runs_each_token_through_its_own_slot():
    """Against a hand loop: token (b, t) through slot slots[b, t] (per token) or slots[b] (per example)."""
    rng = np.random.default_rng(0)
    k, r, d_in, d_out = 3, 2, 5, 4
    adapter = {"a": rng.normal(size=(k, r, d_in)).astype(np.float32), "b": rng.normal(size=(k, d_out, r)).astype(np.float32)}
    x = rng.normal(size=(2, 6, d_in)).astype(np.float32)
    per_token = rng.integers(0, k, (2, 6))
    per_example = np.array([2, 0])
    for slots, slot_of in ((per_token, lambda b, t: per_token[b, t]), (per_example, lambda b, t: per_example[b])):
        expected = np.zeros((2, 6, d_out), np.float32)
        for b in range(2):
            for t in range(6):
                s = slot_of(b, t)
                expected[b, t] = 0.5 * adapter["b"][s] @ (adapter["a"][s] @ x[b, t])
        np.testing.assert_allclose(np.asarray(lora_lib.apply_selected(adapter, x, slots, 0.5)), expected, rtol=1e-5, atol=1e-5)
