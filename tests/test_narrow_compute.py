"""bfloat16 compute on CPU (models/common.py: dense, the float32 layer carry, stashed residuals).

XLA CPU widens a bf16 x bf16 -> bf16 dot to float32 (no bf16 matrix units used) and widens a bf16
dynamic-update-slice over the whole stacked buffer; the models work around both. These tests check
the products against a hand-rounded reference, that float32 is untouched, and that every frozen
projection of a bf16 step (forward and backward) is a bf16 x bf16 product with float32 sums.
"""
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jaxpr_walk import equations

from jaxtree_lora.models import common, llama

BF16 = ml_dtypes.bfloat16


def bf16(values) -> np.ndarray:
    """float64 values rounded to bfloat16 (round to nearest even), as float64."""
    return np.asarray(values, np.float32).astype(BF16).astype(np.float64)


def operands(shape_x=(3, 5, 48), d_out=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 1.0, shape_x).astype(BF16)
    kernel = rng.normal(0.0, 0.2, (shape_x[-1], d_out)).astype(np.float32)
    return x, kernel


def within_one_ulp(ours: np.ndarray, reference: np.ndarray, what: str):
    """Equal to the float64 reference rounded once to bf16, up to one bf16 step where float32's own
    sum rounding lands on the other side of a bf16 midpoint."""
    ours = np.asarray(ours, np.float64)
    rounded = bf16(reference)
    step = np.abs(rounded) * 2.0 ** -7 + 1e-30
    assert np.all(np.abs(ours - rounded) <= step), f"{what}: more than one bf16 step from the reference"
    assert np.mean(ours == rounded) > 0.97, f"{what}: not rounded once from float32 sums"


def test_bf16_product_is_rounded_once_from_exact_bf16_operands():
    x, kernel = operands()
    ours = jax.jit(common.dense)(jnp.asarray(x), jnp.asarray(kernel))
    assert ours.dtype == jnp.bfloat16
    reference = np.einsum("bti,io->bto", x.astype(np.float64), bf16(kernel))
    within_one_ulp(ours, reference, "dense forward")


def test_bf16_product_gradients_are_bf16_products_with_float32_sums():
    x, kernel = operands(seed=1)
    cotangent = np.random.default_rng(2).normal(0.0, 1.0, (3, 5, 40)).astype(BF16)
    loss = lambda a, w: jnp.sum((common.dense(a, w) * jnp.asarray(cotangent)).astype(jnp.float32))
    dx, dkernel = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(kernel))
    assert dx.dtype == jnp.bfloat16 and dkernel.dtype == jnp.float32
    g = cotangent.astype(np.float64)
    within_one_ulp(dx, np.einsum("bto,io->bti", g, bf16(kernel)), "input gradient")
    # The kernel's gradient is in the kernel's dtype (float32): float32 sums of the bf16 products.
    np.testing.assert_allclose(np.asarray(dkernel), np.einsum("bti,bto->io", x.astype(np.float64), g),
                               rtol=1e-5, atol=1e-5, err_msg="kernel gradient")


def test_float32_cotangent_of_a_float32_result_keeps_about_16_bits():
    """The LM head (`dense(x, head, float32)`): float32 logits, and their float32 cotangent enters the
    backward as two bf16 terms. Rounding it to bf16 alone would be off by up to 2^-9 relative."""
    x, kernel = operands(seed=3)
    cotangent = np.random.default_rng(4).normal(0.0, 1.0, (3, 5, 40)).astype(np.float32)
    logits = jax.jit(lambda a, w: common.dense(a, w, jnp.float32))(jnp.asarray(x), jnp.asarray(kernel))
    assert logits.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(logits), np.einsum("bti,io->bto", x.astype(np.float64), bf16(kernel)),
                               rtol=1e-5, atol=1e-5, err_msg="float32 logits are not float32 sums of bf16 products")
    dx = jax.jit(jax.grad(lambda a: jnp.sum(common.dense(a, jnp.asarray(kernel), jnp.float32) * cotangent)))(
        jnp.asarray(x))
    exact = np.einsum("bto,io->bti", cotangent.astype(np.float64), bf16(kernel))
    within_one_ulp(dx, exact, "input gradient through a float32 result")


def test_float32_is_the_plain_product():
    x, kernel = operands(seed=5)
    x = x.astype(np.float32)
    np.testing.assert_array_equal(np.asarray(jax.jit(common.dense)(x, kernel)),
                                  np.asarray(jax.jit(jnp.matmul)(x, kernel)),
                                  err_msg="float32 projections must stay bit-identical to x @ kernel")


def test_stash_keeps_bits_and_only_for_bf16():
    x = jnp.asarray(np.random.default_rng(6).normal(size=(4, 7)), jnp.bfloat16)
    stored = common.stash(x)
    assert stored.dtype == jnp.uint16, "a bf16 residual is not stored as its bits on CPU"
    np.testing.assert_array_equal(np.asarray(common.unstash(stored, jnp.bfloat16)), np.asarray(x))
    wide = jnp.ones((3,), jnp.float32)
    assert common.stash(wide) is wide and common.unstash(wide, jnp.float32) is wide


@pytest.mark.parametrize("remat", [False, True], ids=["plain", "remat"])
def test_every_frozen_product_of_a_bf16_step_sums_in_float32(remat):
    """A bf16 LoRA gradient through a 2-layer decoder: each dot with a frozen kernel as an operand,
    in the forward, the rematerialised forward and the backward, takes bf16 operands and asks for a
    float32 result (what reaches the CPU's bf16 kernels), and the bf16 loss is close to float32's."""
    config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=8, max_position=32, remat=remat)
    model = llama.LlamaDecoder(config, rngs=nnx.Rngs(0))
    sites = model.lora_sites()
    kernel_shapes = {(site.d_in, site.d_out) for site in sites.values()} | {(32, 64)}
    tokens = jnp.asarray(np.random.default_rng(7).integers(1, 64, (2, 12)), jnp.int32)
    adapters = {site: {"a": jnp.full((2, 2, shape.d_in), 0.05), "b": jnp.full((2, shape.d_out, 2), 0.05)}
                for site, shape in sites.items()}
    delta = lambda site, adapter, x, key: (x @ adapter["a"].T.astype(x.dtype)) @ adapter["b"].T.astype(x.dtype)

    def loss(adapters, dtype):
        logits = model(tokens, adapters=adapters, delta=delta, compute_dtype=dtype)
        return jnp.mean(jax.nn.logsumexp(logits, axis=-1) - logits[..., 0])

    program = jax.make_jaxpr(jax.grad(lambda a: loss(a, jnp.bfloat16)))(adapters).jaxpr
    dots = [eqn for eqn in equations(program) if eqn.primitive.name == "dot_general"]
    frozen = [eqn for eqn in dots if any(tuple(v.aval.shape) in kernel_shapes for v in eqn.invars)]
    # 7 sites x (forward, input gradient) + the LM head's (the unread kernel gradients are dropped).
    assert len(frozen) >= 2 * len(sites) + 1, f"found only {len(frozen)} frozen-kernel products"
    slow = [eqn for eqn in frozen
            if not (all(v.aval.dtype == jnp.bfloat16 for v in eqn.invars)
                    and eqn.params["preferred_element_type"] == jnp.float32)]
    assert not slow, f"{len(slow)} frozen-kernel products XLA CPU would widen to float32: {slow[0]}"
    low, high = loss(adapters, jnp.bfloat16), loss(adapters, jnp.float32)
    grad_low = jax.grad(lambda a: loss(a, jnp.bfloat16))(adapters)
    grad_high = jax.grad(lambda a: loss(a, jnp.float32))(adapters)
    assert abs(float(low) - float(high)) < 0.02 * abs(float(high)), "bf16 loss far from float32's"
    flat = lambda tree: np.concatenate([np.asarray(v, np.float64).ravel() for v in jax.tree.leaves(tree)])
    error = np.linalg.norm(flat(grad_low) - flat(grad_high)) / np.linalg.norm(flat(grad_high))
    assert error < 0.05, f"bf16 LoRA gradients {error:.3f} (relative) from float32's"


def test_bf16_cache_prefill_and_steps_equal_the_full_bf16_forward():
    """A bf16 KV cache rides through the layer scan as its bits on CPU: prefill then one token at a
    time must give the full bf16 forward's logits (to bf16 rounding), and the cache comes back bf16."""
    config = llama.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_layers=3, num_heads=4,
                               num_kv_heads=2, head_dim=8, max_position=32)
    model = llama.LlamaDecoder(config, rngs=nnx.Rngs(1))
    tokens = jnp.asarray([[0, 0, 4, 8, 15, 16, 23, 42], [3, 1, 4, 1, 5, 9, 2, 6]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    full = np.asarray(model(tokens, mask, compute_dtype=jnp.bfloat16))
    cache = model.init_cache(2, 8, jnp.bfloat16)
    logits, cache = model(tokens[:, :5], mask[:, :5], cache=cache, compute_dtype=jnp.bfloat16)
    assert cache["k"].dtype == jnp.bfloat16 and cache["v"].dtype == jnp.bfloat16
    assert np.abs(np.asarray(cache["k"][:, 1, :, :5])).min(axis=(0, 1, 3)).max() > 0, "prefill wrote no keys"
    scale = np.abs(full).max()
    real = np.asarray(mask[:, :5]) > 0
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :5][real], atol=0.02 * scale,
                               err_msg="bf16 cached prefill differs from the full bf16 forward")
    for step in range(5, 8):
        logits, cache = model(tokens[:, step:step + 1], mask[:, step:step + 1], cache=cache,
                              compute_dtype=jnp.bfloat16)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, step], atol=0.02 * scale,
                                   err_msg=f"bf16 cached step {step} differs from the full bf16 forward")
