"""Attention through jax.nn.dot_product_attention equals the materialised einsum + softmax it replaced
(kept here as the reference), for padded encoder batches, grouped-query decoder batches with left
and right padding, a sliding window, and the KV-cache path."""
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import bert, llama, vit
from jaxtree_lora.models.common import attention


def reference_attention(q, k, v, mask=None):
    """The former formula: q [b, t, heads, d], k/v [b, s, kv_heads, d], mask bool [b, 1, t, s]; masked
    scores -1e30 (a fully masked row becomes uniform), softmax in float32, keys grouped per kv head."""
    batch, seq, heads, dim = q.shape
    kv_heads = k.shape[2]
    grouped = q.reshape(batch, seq, kv_heads, heads // kv_heads, dim)
    scores = jnp.einsum("btkgd,bskd->bkgts", grouped, k, preferred_element_type=jnp.float32) / np.sqrt(dim)
    if mask is not None:
        scores = scores + jnp.where(mask, 0.0, -1e30)[:, :, None]
    weights = jax.nn.softmax(scores, axis=-1).astype(q.dtype)
    return jnp.einsum("bkgts,bskd->btkgd", weights, v).reshape(batch, seq, heads, dim)


def test_attention_equals_the_einsum_softmax_with_padding_causality_and_groups():
    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    q = jax.random.normal(keys[0], (3, 7, 6, 4))
    k = jax.random.normal(keys[1], (3, 7, 2, 4))
    v = jax.random.normal(keys[2], (3, 7, 2, 4))
    lengths = np.asarray([7, 4, 1])
    real = np.arange(7)[None, :] >= 7 - lengths[:, None]  # left padding, one row of a single token
    causal = np.tril(np.ones((7, 7), bool))
    mask = jnp.asarray((causal[None] & real[:, None, :])[:, None])
    np.testing.assert_allclose(np.asarray(attention(q, k, v, mask)), np.asarray(reference_attention(q, k, v, mask)),
                               rtol=1e-5, atol=1e-5, err_msg="grouped, causal, padded attention differs")
    assert np.isfinite(np.asarray(attention(q, k, v, mask))).all(), "fully masked padding queries must not be NaN"


def test_bert_padded_batch_equals_the_reference_encoder(monkeypatch):
    config = bert.BertConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4,
                             max_position=16, type_vocab_size=2)
    model = bert.BertEncoder(config, rngs=nnx.Rngs(1))
    ids = jnp.asarray([[3, 9, 4, 7, 0, 0], [5, 1, 0, 0, 0, 0], [8, 2, 6, 9, 11, 12]])
    mask = (ids > 0).astype(jnp.int32)
    new = np.asarray(model(ids, mask))
    monkeypatch.setattr(bert, "attention", reference_attention)
    old = np.asarray(model(ids, mask))
    real = np.asarray(mask) > 0
    np.testing.assert_allclose(new[real], old[real], rtol=1e-5, atol=1e-5, err_msg="BERT encoder changed")


def test_vit_equals_the_reference(monkeypatch):
    config = vit.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, intermediate_size=32,
                           num_layers=2, num_heads=4)
    model = vit.ViT(config, rngs=nnx.Rngs(2))
    images = jax.random.normal(jax.random.PRNGKey(3), (2, 8, 8, 3))
    new = np.asarray(model.features(images))
    monkeypatch.setattr(vit, "attention", reference_attention)
    old = np.asarray(model.features(images))
    np.testing.assert_allclose(new, old, rtol=1e-5, atol=1e-5, err_msg="ViT changed")


def test_llama_padded_windowed_and_cached_equal_the_reference(monkeypatch):
    config = llama.LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64, sliding_window=4)
    model = llama.LlamaDecoder(config, rngs=nnx.Rngs(0))
    tokens = jnp.asarray([[0, 0, 4, 8, 15, 16, 23, 42], [3, 1, 4, 1, 5, 9, 0, 0]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 0, 0]])
    real = np.asarray(mask) > 0

    def forward_and_decode():
        full = np.asarray(model(tokens, mask))
        cache = model.init_cache(2, 10)
        _, cache = model(tokens, mask, cache=cache)
        step, _ = model(jnp.asarray([[7], [9]]), jnp.ones((2, 1), jnp.int32), cache=cache)
        return full, np.asarray(step)

    new_full, new_step = forward_and_decode()
    monkeypatch.setattr(llama, "attention", reference_attention)
    old_full, old_step = forward_and_decode()
    np.testing.assert_allclose(new_full[real], old_full[real], rtol=1e-5, atol=1e-5,
                               err_msg="decoder logits over a padded, windowed batch changed")
    np.testing.assert_allclose(new_step, old_step, rtol=1e-5, atol=1e-5, err_msg="KV-cache decoding step changed")
