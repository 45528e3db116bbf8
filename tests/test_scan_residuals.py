"""What the layer scan keeps for the backward on CPU (models/common.py: CPU_SCAN_POLICY).

Under `lax.scan` every value autodiff keeps for the backward becomes a stacked [layers, ...] buffer,
which XLA CPU zero-fills, writes layer by layer and copies. On CPU the scan keeps only the outputs of
the matmuls and recomputes the elementwise operations between them (norms, activations, softmax) in
the backward; in bf16 it recomputes whole blocks (`blocks_recomputed`). These tests check that the
gradients are the same values, and that what the forward stores is really only that.
"""
import contextlib
import io
import re

import jax
import jax.ad_checkpoint
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models import common
from jaxtree_lora.train import backbone as backbone_lib

NAMES = ("tiny-bert", "tiny-llama", "tiny-vit")


def lora_gradient_program(name: str, compute_dtype=None):
    """(loss(adapters), adapters, sites) of a rank-2 LoRA on every site of a 3-layer tiny backbone. The
    scan reads `CPU_SCAN_POLICY` when the loss is traced: each new trace sees its current value."""
    backbone = backbone_lib.build_tiny(name, {"num_layers": 3}, seed=0, compute_dtype=compute_dtype)
    sites = backbone.module().lora_sites()
    spec = lora_lib.LoraSpec(targets=tuple(sites), rank=2, alpha=4.0)
    adapters = lora_lib.init(jax.random.PRNGKey(1), spec, sites, 3)
    # B starts at zero in LoRA: give it values so every product carries a gradient.
    adapters = jax.tree.map(lambda leaf: leaf + 0.05, adapters)
    rng = np.random.default_rng(2)
    if backbone.kind == "vit":
        inputs = {"images": jnp.asarray(rng.integers(0, 256, (2, 16, 16, 3)), jnp.uint8)}
    else:
        inputs = {"input_ids": jnp.asarray(rng.integers(1, 100, (2, 12)), jnp.int32),
                  "attention_mask": jnp.ones((2, 12), jnp.int32)}
    delta = lambda site, adapter, x, key: lora_lib.apply(adapter, x, spec.scale)

    readout = jnp.asarray(rng.normal(size=(backbone.info.feature_dim, 5)), jnp.float32)

    def loss(adapters):
        features = backbone.features(backbone.params, inputs, adapters=adapters, delta=delta)
        return jnp.sum(jnp.sin(features @ readout))

    return loss, adapters, sites


def stacked_residuals(loss, adapters) -> list[tuple[int, ...]]:
    """Shapes of the [layers, ...] buffers the layer scan keeps for the backward (3 layers)."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        jax.ad_checkpoint.print_saved_residuals(loss, adapters)
    shapes = [tuple(int(n) for n in re.match(r"\w+\[([\d,]*)\]", line).group(1).split(","))
              for line in printed.getvalue().splitlines() if "output of scan" in line]
    return [shape for shape in shapes if len(shape) >= 3 and shape[0] == 3]  # (not the final carry)


@pytest.mark.parametrize("name", NAMES)
def test_lora_gradients_equal_with_and_without_the_cpu_scan_policy(name, monkeypatch):
    """Recomputing the elementwise operations in the backward repeats the same operations on the same
    inputs: the LoRA gradients may move only by float32 rounding (XLA fuses the recomputed operations
    differently: a relative 3e-6 seen on the tiny Llama); more means the policy changed the math."""
    assert jax.default_backend() == "cpu"
    loss, adapters, _ = lora_gradient_program(name)
    with_policy = jax.jit(jax.grad(loss))(adapters)
    monkeypatch.setattr(common, "CPU_SCAN_POLICY", None)
    without = jax.jit(jax.grad(loss))(adapters)
    largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(without))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(with_policy), jax.tree.leaves(without)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5 * largest,
                                   err_msg=f"{name}: gradient {jax.tree_util.keystr(path)} moved")


@pytest.mark.parametrize("name", NAMES)
def test_cpu_layer_scan_keeps_only_matmul_outputs(name, monkeypatch):
    """With the policy, every stacked residual is a product's output (or the layer's input carry);
    without it autodiff also stacks the elementwise intermediates (activation terms, norm statistics,
    softmax), the buffers that cost XLA CPU a zero fill and a write per layer."""
    loss, adapters, sites = lora_gradient_program(name)
    kept = stacked_residuals(loss, adapters)
    monkeypatch.setattr(common, "CPU_SCAN_POLICY", None)
    plain = stacked_residuals(loss, adapters)
    assert len(kept) < len(plain), f"{name}: the policy kept {len(kept)} stacked residuals, autodiff {len(plain)}"
    # A product's output is [layers, batch, tokens, width]: a projection's width (a site's, or the
    # attention's heads x head_dim, 4 x 8) or LoRA's rank (2). Attention weights [.., tokens, tokens]
    # and per-token norm statistics [.., 1] are elementwise results, recomputed now.
    widths = {site.d_out for site in sites.values()} | {site.d_in for site in sites.values()} | {2}
    elementwise = [shape for shape in kept if shape[-1] not in widths and shape[-2:] != (4, 8)]
    assert not elementwise, f"{name}: elementwise intermediates still stacked for the backward: {elementwise}"
    assert any(shape[-1] == 1 or shape[-1] == shape[-2] for shape in plain), "autodiff kept no statistics: vacuous"


@pytest.mark.parametrize("name", NAMES)
def test_bf16_layer_scan_keeps_only_each_blocks_input_with_the_same_gradients(name, monkeypatch):
    """bf16 on CPU recomputes whole blocks: the only stacked residual is the layer carry (float32 between
    layers, [layers, batch, tokens, hidden]), and the recomputed forward is the same bf16 arithmetic, so
    the gradients equal, to the bit here, those of the float32 policy's kept products in bf16."""
    loss, adapters, _ = lora_gradient_program(name, "bfloat16")
    kept = stacked_residuals(loss, adapters)
    assert len(kept) == 1, f"{name}: bf16 kept {kept} for the backward, not only the blocks' inputs"
    recomputed = jax.jit(jax.grad(loss))(adapters)
    monkeypatch.setattr(common, "blocks_recomputed", lambda remat, dtype: bool(remat))
    assert len(stacked_residuals(loss, adapters)) > 1, "the products' outputs were not kept: vacuous"
    kept_products = jax.jit(jax.grad(loss))(adapters)
    largest = max(float(np.abs(leaf).max()) for leaf in jax.tree.leaves(kept_products))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(recomputed), jax.tree.leaves(kept_products)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), rtol=1e-2,
                                   atol=1e-2 * largest, err_msg=f"{name}: bf16 gradient {jax.tree_util.keystr(path)} moved")
