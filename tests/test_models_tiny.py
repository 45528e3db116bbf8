"""Tiny random checkpoints written in Hugging Face layout, loaded back, and checked against plain
numpy forward passes written here (independent of the model code)."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models import bert, hf, llama
from jaxtree_lora.models.generate import generate


def write(directory, tensors, config, shards=1):
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    names = sorted(tensors)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return
    weight_map = {}
    for index, part in enumerate(np.array_split(np.asarray(names), shards)):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({name: tensors[name] for name in part}, os.path.join(directory, filename))
        weight_map.update({name: filename for name in part})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)


# ------------------------------------------------------------------------------------------- llama
def llama_checkpoint(rng, bias=False, tied=False):
    from transformers import LlamaConfig, Qwen2Config

    d, f, layers, heads, kv, hd, vocab = 16, 24, 2, 4, 2, 4, 40
    cls = Qwen2Config if bias else LlamaConfig
    config = cls(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                 num_attention_heads=heads, num_key_value_heads=kv, head_dim=hd, max_position_embeddings=64,
                 rms_norm_eps=1e-5, rope_theta=10000.0, tie_word_embeddings=tied)
    t = {"model.embed_tokens.weight": rng.normal(size=(vocab, d)), "model.norm.weight": 1 + 0.1 * rng.normal(size=d)}
    if not tied:
        t["lm_head.weight"] = rng.normal(size=(vocab, d)) * 0.3
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "self_attn.q_proj.weight"] = rng.normal(size=(heads * hd, d)) * 0.3
        t[p + "self_attn.k_proj.weight"] = rng.normal(size=(kv * hd, d)) * 0.3
        t[p + "self_attn.v_proj.weight"] = rng.normal(size=(kv * hd, d)) * 0.3
        t[p + "self_attn.o_proj.weight"] = rng.normal(size=(d, heads * hd)) * 0.3
        t[p + "mlp.gate_proj.weight"] = rng.normal(size=(f, d)) * 0.3
        t[p + "mlp.up_proj.weight"] = rng.normal(size=(f, d)) * 0.3
        t[p + "mlp.down_proj.weight"] = rng.normal(size=(d, f)) * 0.3
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=d)
        if bias:
            for name, width in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
                t[p + f"self_attn.{name}_proj.bias"] = rng.normal(size=width) * 0.1
    return config, {k: np.asarray(v, np.float32) for k, v in t.items()}


def numpy_llama(t, config, ids):
    """Reference Llama forward in numpy (no padding), following HF's modeling_llama."""
    d, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    hd = config.head_dim
    x = t["model.embed_tokens.weight"][ids]
    seq = len(ids)
    theta = getattr(config, "rope_theta", None) or config.rope_parameters["rope_theta"]
    inv = 1.0 / (theta ** (np.arange(0, hd, 2) / hd))
    ang = np.arange(seq)[:, None] * inv[None]
    cos, sin = np.cos(np.concatenate([ang, ang], -1)), np.sin(np.concatenate([ang, ang], -1))

    def rms(v, w):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + config.rms_norm_eps) * w

    def rot(v):
        return np.concatenate([-v[..., hd // 2:], v[..., :hd // 2]], -1)

    for i in range(config.num_hidden_layers):
        p = f"model.layers.{i}."
        h = rms(x, t[p + "input_layernorm.weight"])
        q = h @ t[p + "self_attn.q_proj.weight"].T + t.get(p + "self_attn.q_proj.bias", 0)
        k = h @ t[p + "self_attn.k_proj.weight"].T + t.get(p + "self_attn.k_proj.bias", 0)
        v = h @ t[p + "self_attn.v_proj.weight"].T + t.get(p + "self_attn.v_proj.bias", 0)
        q, k, v = q.reshape(seq, heads, hd), k.reshape(seq, kv, hd), v.reshape(seq, kv, hd)
        q = q * cos[:, None] + rot(q) * sin[:, None]
        k = k * cos[:, None] + rot(k) * sin[:, None]
        k, v = np.repeat(k, heads // kv, axis=1), np.repeat(v, heads // kv, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + np.triu(np.full((seq, seq), -1e30), 1)
        w = np.exp(scores - scores.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", w, v).reshape(seq, heads * hd)
        x = x + context @ t[p + "self_attn.o_proj.weight"].T
        h = rms(x, t[p + "post_attention_layernorm.weight"])
        gate = h @ t[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ t[p + "mlp.up_proj.weight"].T)) @ t[p + "mlp.down_proj.weight"].T
    x = rms(x, t["model.norm.weight"])
    head = t.get("lm_head.weight", t["model.embed_tokens.weight"])
    return x @ head.T


def tokenizer_files(directory, vocab=40):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(vocab - 2)}
    words.update({"<unk>": vocab - 2, "</s>": vocab - 1})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(directory)


@pytest.mark.parametrize("bias,tied,shards", [(False, False, 1), (True, True, 2), (False, True, 3)])
def test_llama_checkpoint_round_trip_matches_numpy(tmp_path, bias, tied, shards):
    rng = np.random.default_rng(0)
    config, tensors = llama_checkpoint(rng, bias, tied)
    write(str(tmp_path), tensors, config, shards)
    tokenizer_files(str(tmp_path))
    model, tokenizer = llama.load_hf(str(tmp_path))
    ids = np.asarray([3, 17, 5, 9, 30, 2], np.int32)
    got = np.asarray(model(jnp.asarray(ids[None])))[0]
    np.testing.assert_allclose(got, numpy_llama(tensors, config, ids), rtol=2e-4, atol=2e-4)
    assert tokenizer.eos_token_id == 39


def test_left_padding_and_kv_cache_generation(tmp_path):
    rng = np.random.default_rng(1)
    config, tensors = llama_checkpoint(rng)
    write(str(tmp_path), tensors, config)
    tokenizer_files(str(tmp_path))
    model, _ = llama.load_hf(str(tmp_path))
    ids = jnp.asarray([[3, 17, 5, 9]])
    padded = jnp.asarray([[0, 0, 3, 17, 5, 9]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1]])
    np.testing.assert_allclose(np.asarray(model(padded, mask))[0, -1], np.asarray(model(ids))[0, -1], atol=1e-4,
                               err_msg="left padding changed the last position's logits")
    tokens = np.asarray(generate(model, padded, mask, max_new_tokens=5, eos_id=-1, pad_id=0))[0]
    sequence = [3, 17, 5, 9]
    for _ in range(5):  # greedy by full recomputation
        sequence.append(int(np.argmax(numpy_llama(tensors, config, np.asarray(sequence))[-1])))
    assert tokens.tolist() == sequence[4:], "KV-cached greedy decoding differs from full recomputation"


def test_unknown_tensor_and_shape_mismatch_are_named(tmp_path):
    rng = np.random.default_rng(2)
    config, tensors = llama_checkpoint(rng)
    tensors["model.layers.0.self_attn.rotary_extra.weight"] = np.zeros((2, 2), np.float32)
    write(str(tmp_path / "a"), tensors, config)
    tokenizer_files(str(tmp_path / "a"))
    with pytest.raises(hf.CheckpointError, match="rotary_extra"):
        llama.load_hf(str(tmp_path / "a"))
    config, tensors = llama_checkpoint(rng)
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((25, 16), np.float32)
    write(str(tmp_path / "b"), tensors, config)
    tokenizer_files(str(tmp_path / "b"))
    with pytest.raises(hf.CheckpointError, match="up_proj"):
        llama.load_hf(str(tmp_path / "b"))


def test_lora_delta_equals_merged_kernel_and_zero_b_changes_nothing(tmp_path):
    rng = np.random.default_rng(3)
    config, tensors = llama_checkpoint(rng)
    write(str(tmp_path), tensors, config)
    tokenizer_files(str(tmp_path))
    model, _ = llama.load_hf(str(tmp_path))
    spec = lora_lib.LoraSpec(targets=("attn.q_proj",), rank=2, alpha=4.0)
    adapters = lora_lib.init(jax.random.PRNGKey(0), spec, model.lora_sites(), config.num_hidden_layers)
    delta = lambda site, adapter, x, key: lora_lib.apply(adapter, x, spec.scale)
    ids = jnp.asarray([[3, 17, 5, 9]])
    base = np.asarray(model(ids))
    np.testing.assert_array_equal(np.asarray(model(ids, adapters=adapters, delta=delta)), base)
    adapters["attn.q_proj"]["b"] = jax.random.normal(jax.random.PRNGKey(1), adapters["attn.q_proj"]["b"].shape)
    with_lora = np.asarray(model(ids, adapters=adapters, delta=delta))
    model.layers.q_proj.set_value(lora_lib.merge(model.layers.q_proj[...], adapters["attn.q_proj"], spec.scale))
    np.testing.assert_allclose(np.asarray(model(ids)), with_lora, atol=1e-4)
    assert np.abs(with_lora - base).max() > 1e-3


# -------------------------------------------------------------------------------------------- bert
def bert_checkpoint(rng, prefix=""):
    from transformers import BertConfig

    d, f, layers, heads, vocab = 12, 20, 2, 3, 30
    config = BertConfig(vocab_size=vocab, hidden_size=d, intermediate_size=f, num_hidden_layers=layers,
                        num_attention_heads=heads, max_position_embeddings=16, type_vocab_size=2)
    t = {"embeddings.word_embeddings.weight": rng.normal(size=(vocab, d)),
         "embeddings.position_embeddings.weight": rng.normal(size=(16, d)),
         "embeddings.token_type_embeddings.weight": rng.normal(size=(2, d)),
         "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=d), "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=d),
         "pooler.dense.weight": rng.normal(size=(d, d)), "pooler.dense.bias": rng.normal(size=d)}
    for i in range(layers):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                            ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
            t[p + name + ".weight"] = rng.normal(size=shape) * 0.3
            t[p + name + ".bias"] = rng.normal(size=shape[0]) * 0.1
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            t[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            t[p + name + ".bias"] = 0.1 * rng.normal(size=d)
    return config, {prefix + k: np.asarray(v, np.float32) for k, v in t.items()}


def numpy_bert(t, config, ids, mask):
    from math import erf, sqrt

    d, heads = config.hidden_size, config.num_attention_heads
    hd = d // heads

    def ln(v, w, b):
        mu = v.mean(-1, keepdims=True)
        return (v - mu) / np.sqrt(((v - mu) ** 2).mean(-1, keepdims=True) + config.layer_norm_eps) * w + b

    gelu = np.vectorize(lambda v: 0.5 * v * (1 + erf(v / sqrt(2))))
    lin = lambda v, name: v @ t[name + ".weight"].T + t[name + ".bias"]
    seq = len(ids)
    x = t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:seq] \
        + t["embeddings.token_type_embeddings.weight"][0]
    x = ln(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q = lin(x, p + "attention.self.query").reshape(seq, heads, hd)
        k = lin(x, p + "attention.self.key").reshape(seq, heads, hd)
        v = lin(x, p + "attention.self.value").reshape(seq, heads, hd)
        s = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(hd) + np.where(mask > 0, 0, -1e9)[None, None]
        w = np.exp(s - s.max(-1, keepdims=True))
        w /= w.sum(-1, keepdims=True)
        a = lin(np.einsum("hqk,khd->qhd", w, v).reshape(seq, d), p + "attention.output.dense")
        x = ln(a + x, t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"])
        h = lin(gelu(lin(x, p + "intermediate.dense")), p + "output.dense")
        x = ln(h + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"])
    return x


@pytest.mark.parametrize("prefix,shards", [("", 1), ("bert.", 2)])
def test_bert_checkpoint_round_trip_matches_numpy(tmp_path, prefix, shards):
    rng = np.random.default_rng(4)
    config, tensors = bert_checkpoint(rng, prefix)
    write(str(tmp_path), tensors, config, shards)
    tokenizer_files(str(tmp_path), vocab=30)
    model, _ = bert.load_hf(str(tmp_path))
    ids = np.asarray([2, 7, 11, 5, 0, 0], np.int32)
    mask = np.asarray([1, 1, 1, 1, 0, 0], np.int32)
    got = np.asarray(model(jnp.asarray(ids[None]), jnp.asarray(mask[None])))[0]
    plain = {k[len(prefix):]: v for k, v in tensors.items()}
    expected = numpy_bert(plain, config, ids, mask)
    np.testing.assert_allclose(got[:4], expected[:4], rtol=2e-4, atol=2e-4)
    pooled = np.asarray(model.features(jnp.asarray(ids[None]), jnp.asarray(mask[None])))[0]
    np.testing.assert_allclose(pooled, expected[:4].mean(0), rtol=2e-4, atol=2e-4)


def test_bert_rejects_a_llama_checkpoint(tmp_path):
    config, tensors = llama_checkpoint(np.random.default_rng(5))
    write(str(tmp_path), tensors, config)
    with pytest.raises(hf.CheckpointError, match="not a BERT-style encoder"):
        bert.load_hf(str(tmp_path))
