"""The activations whose backward recomputes from the input (models/common.py) against autodiff."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jaxpr_walk import equations

from jaxtree_lora.models import common


@pytest.mark.parametrize("ours, reference", [
    (common.gelu_exact, lambda x: jax.nn.gelu(x, approximate=False)),
    (common.silu, jax.nn.silu),
], ids=["gelu_exact", "silu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_values_and_gradients_are_bit_identical_to_autodiff(ours, reference, dtype):
    if common.narrow_on_cpu(dtype):
        # bf16 on CPU is computed in float32 and rounded once, forward and backward.
        reference = (lambda plain: lambda v: plain(v.astype(jnp.float32)).astype(v.dtype))(reference)
    x = jnp.asarray(np.random.default_rng(0).normal(0.0, 3.0, (64, 1000)), dtype)
    cotangent = jnp.asarray(np.random.default_rng(1).normal(0.0, 1.0, x.shape), dtype)
    np.testing.assert_array_equal(np.asarray(jax.jit(ours)(x)), np.asarray(jax.jit(reference)(x)),
                                  err_msg="the forward is not jax.nn's")
    grad = lambda f: jax.jit(jax.grad(lambda v: jnp.sum(f(v) * cotangent)))(x)
    np.testing.assert_array_equal(np.asarray(grad(ours)), np.asarray(grad(reference)),
                                  err_msg="the recomputing backward differs from autodiff's (jax.nn's formula changed?)")


def test_gelu_gradient_matches_the_closed_form_in_float64():
    """Independent of autodiff: d/dx x Phi(x) = Phi(x) + x phi(x), by hand in float64."""
    from math import erf, exp, pi, sqrt

    points = np.linspace(-6.0, 6.0, 49)
    expected = [0.5 * (1 + erf(v / sqrt(2))) + v * exp(-v * v / 2) / sqrt(2 * pi) for v in points]
    ours = jax.vmap(jax.grad(common.gelu_exact))(jnp.asarray(points, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-6, atol=2e-7)


def test_silu_gradient_matches_the_closed_form_in_float64():
    points = np.linspace(-12.0, 12.0, 49)
    sigmoid = 1 / (1 + np.exp(-points))
    expected = sigmoid * (1 + points * (1 - sigmoid))
    ours = jax.vmap(jax.grad(common.silu))(jnp.asarray(points, jnp.float32))
    np.testing.assert_allclose(np.asarray(ours), expected, rtol=2e-6, atol=2e-7)


def _primitives(jaxpr):
    """Every primitive name in a jaxpr and its nested jaxprs (scan bodies, ...), not looking inside
    custom-VJP calls (their forward holds the activation's own terms)."""
    return {eqn.primitive.name for eqn in equations(jaxpr, into_custom_vjp=False)}


@pytest.mark.parametrize("name", ["tiny-bert", "tiny-vit", "tiny-llama"])
def test_every_backbone_mlp_uses_the_recomputing_activation(name):
    """The ViT's MLP called jax.nn.gelu directly, so its train step stacked three [layers, tokens,
    intermediate] residuals per step instead of one (DINOv2 step 6% slower)."""
    from jaxtree_lora.train.backbone import build_tiny

    backbone = build_tiny(name, {})
    if name == "tiny-vit":
        batch = {"images": np.zeros((2, 16, 16, 3), np.float32)}
    else:
        batch = {"input_ids": np.ones((2, 8), np.int32), "attention_mask": np.ones((2, 8), np.int32)}
    jaxpr = jax.make_jaxpr(lambda p: backbone.features(p, batch))(backbone.params)
    primitives = _primitives(jaxpr.jaxpr)
    assert any(p.startswith("custom_vjp") for p in primitives), \
        f"{name}: no custom-VJP activation in the forward: autodiff keeps every activation term"
    assert not {"erfc", "logistic"} & primitives, \
        f"{name}: an activation's terms are traced outside its custom VJP (jax.nn.gelu / silu called directly)"
