"""input_moment recorded through a SiteRecorder (what the site-statistics pass of train/passes.py runs):
the input statistics InfLoRA and LoDA build subspaces from.

Checked against a direct numpy computation of the inputs of the first layer's q projection (which is
the layer-normed embedding, computable by hand), and on padding: padded tokens must not count."""
import jax
import jax.numpy as jnp
import numpy as np

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models.common import SiteRecorder, input_moment
from jaxtree_lora.train import backbone as backbone_lib


def test_moments_of_every_layer_and_site_exclude_padding():
    backbone = backbone_lib.build_tiny("tiny-llama", {}, seed=0)
    info = backbone.info
    spec = lora_lib.LoraSpec(targets=("attn.q_proj", "mlp.down_proj"), rank=2)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, info.sites, info.num_layers)
    tokens = jnp.asarray([[5, 6, 7, 8], [0, 0, 9, 10]], jnp.int32)
    mask = jnp.asarray([[1, 1, 1, 1], [0, 0, 1, 1]], jnp.int32)
    weight = mask * jnp.asarray([1, 1])[:, None]

    def run(weight):
        collector = SiteRecorder(lambda site, a, x, k: lora_lib.apply(a, x, spec.scale), input_moment, weight)
        out = backbone.features(backbone.params, {"input_ids": tokens, "attention_mask": mask},
                                adapters=adapters, delta=collector)
        return out, collector.records

    (features, moments) = jax.jit(run)(weight)
    plain = backbone.features(backbone.params, {"input_ids": tokens, "attention_mask": mask}, adapters=adapters,
                              delta=lambda site, a, x, k: lora_lib.apply(a, x, spec.scale))
    np.testing.assert_allclose(np.asarray(features), np.asarray(plain), rtol=1e-6, atol=1e-6,
                               err_msg="recording statistics must not change the model's output")
    assert set(moments) == {"attn.q_proj", "mlp.down_proj"}
    assert moments["attn.q_proj"].shape == (info.num_layers, info.sites["attn.q_proj"].d_in,
                                            info.sites["attn.q_proj"].d_in)
    assert moments["mlp.down_proj"].shape[1:] == (info.sites["mlp.down_proj"].d_in,) * 2

    # Layer 0's q input is RMSNorm(embedding) of each real token: compute it by hand.
    config = backbone.module().config
    embed = np.asarray(backbone.params["embed"][...], np.float64)
    norm_w = np.asarray(backbone.params["layers"]["input_norm"][...][0], np.float64)
    x = embed[np.asarray(tokens)]
    x = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + config.rms_norm_eps) * norm_w
    expected = np.einsum("bti,btj,bt->ij", x, x, np.asarray(weight, np.float64))
    np.testing.assert_allclose(np.asarray(moments["attn.q_proj"][0]), expected, rtol=1e-4, atol=1e-5)
    # Padding: zeroing the weight of the two padded tokens equals dropping them, so the moment with all
    # tokens weighted differs exactly by their outer products in layer 0.
    _, all_tokens = jax.jit(run)(jnp.ones_like(weight))
    assert not np.allclose(np.asarray(all_tokens["attn.q_proj"][0]), np.asarray(moments["attn.q_proj"][0])), \
        "padded tokens were counted in the moments"
