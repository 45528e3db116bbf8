"""The Llama decoder and its Hugging Face loader against an independent numpy forward pass.

Tiny random checkpoints are written in Hugging Face's layout (safetensors + config.json from
transformers' config classes), loaded back with `llama.load_hf`, and compared with `numpy_forward`
below, a direct transcription of transformers' modeling_llama / modeling_qwen2 / modeling_mistral
that shares no code with the module.
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import save_file

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.models import hf, llama

VOCAB = 48


# ---------------------------------------------------------------------------------- reference
def numpy_forward(tensors, config, ids, mask=None):
    """Logits [seq, vocab] for one sequence; `mask` (1 = real) gives positions cumsum(mask) - 1
    and hides padded keys, as transformers does with position_ids from the attention mask."""
    ids = np.asarray(ids)
    seq = len(ids)
    mask = np.ones(seq, np.int64) if mask is None else np.asarray(mask)
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    positions = np.maximum(np.cumsum(mask) - 1, 0)
    inverse = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    angles = positions[:, None] * inverse[None, :]
    cos = np.cos(np.concatenate([angles, angles], -1))[:, None, :]
    sin = np.sin(np.concatenate([angles, angles], -1))[:, None, :]
    query, key = np.arange(seq)[:, None], np.arange(seq)[None, :]
    visible = (key <= query) & (mask[None, :] > 0)
    window = getattr(config, "sliding_window", None) if config.model_type == "mistral" else None
    if window:
        visible &= query - key < window
    eps = config.rms_norm_eps

    def norm(x, weight):
        return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * weight

    def linear(x, name):
        y = x @ tensors[name + ".weight"].T
        return y + tensors[name + ".bias"] if name + ".bias" in tensors else y

    def rotate(x):
        return np.concatenate([-x[..., head_dim // 2:], x[..., :head_dim // 2]], -1)

    x = tensors["model.embed_tokens.weight"][ids].astype(np.float64)
    for layer in range(config.num_hidden_layers):
        prefix = f"model.layers.{layer}."
        h = norm(x, tensors[prefix + "input_layernorm.weight"])
        q = linear(h, prefix + "self_attn.q_proj").reshape(seq, heads, head_dim)
        k = linear(h, prefix + "self_attn.k_proj").reshape(seq, kv_heads, head_dim)
        v = linear(h, prefix + "self_attn.v_proj").reshape(seq, kv_heads, head_dim)
        q, k = q * cos + rotate(q) * sin, k * cos + rotate(k) * sin
        k, v = np.repeat(k, heads // kv_heads, axis=1), np.repeat(v, heads // kv_heads, axis=1)
        scores = np.einsum("qhd,khd->hqk", q, k) / np.sqrt(head_dim)
        scores = np.where(visible[None], scores, -np.inf)
        scores = np.where(np.isinf(scores).all(-1, keepdims=True), 0.0, scores)  # padded queries
        weights = np.exp(scores - scores.max(-1, keepdims=True))
        weights /= weights.sum(-1, keepdims=True)
        context = np.einsum("hqk,khd->qhd", weights, v).reshape(seq, heads * head_dim)
        x = x + linear(context, prefix + "self_attn.o_proj")
        h = norm(x, tensors[prefix + "post_attention_layernorm.weight"])
        gate = linear(h, prefix + "mlp.gate_proj")
        x = x + linear(gate / (1 + np.exp(-gate)) * linear(h, prefix + "mlp.up_proj"), prefix + "mlp.down_proj")
    x = norm(x, tensors["model.norm.weight"])
    return x @ tensors.get("lm_head.weight", tensors["model.embed_tokens.weight"]).T


# -------------------------------------------------------------------------------- checkpoints
def make_checkpoint(kind="llama", tied=False, bias=False, window=None, seed=0):
    """(transformers config, {HF name: float32 array}) of a 2-layer GQA decoder."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    rng = np.random.default_rng(seed)
    hidden, inner, layers, heads, kv_heads = 16, 24, 2, 4, 2
    common = dict(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
                  num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=64,
                  rms_norm_eps=1e-5, rope_theta=500.0, tie_word_embeddings=tied)
    if kind == "qwen2":
        config = Qwen2Config(**common)
    elif kind == "mistral":
        config = MistralConfig(head_dim=6, sliding_window=window, **common)
    else:
        config = LlamaConfig(head_dim=6, attention_bias=bias, mlp_bias=bias, **common)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    q, kv = heads * head_dim, kv_heads * head_dim
    t = {"model.embed_tokens.weight": rng.normal(size=(VOCAB, hidden)),
         "model.norm.weight": 1 + 0.1 * rng.normal(size=hidden)}
    if not tied:
        t["lm_head.weight"] = 0.3 * rng.normal(size=(VOCAB, hidden))
    for layer in range(layers):
        p = f"model.layers.{layer}."
        shapes = {"self_attn.q_proj": (q, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
                  "self_attn.o_proj": (hidden, q), "mlp.gate_proj": (inner, hidden), "mlp.up_proj": (inner, hidden),
                  "mlp.down_proj": (hidden, inner)}
        for name, shape in shapes.items():
            t[p + name + ".weight"] = 0.4 * rng.normal(size=shape)
        t[p + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=hidden)
        t[p + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=hidden)
        biased = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"] if kind == "qwen2" else (
            list(shapes) if bias else [])
        for name in biased:
            t[p + name + ".bias"] = 0.2 * rng.normal(size=shapes[name][0])
    return config, {name: np.asarray(value, np.float32) for name, value in t.items()}


def write_tokenizer(directory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(VOCAB - 2)}
    words.update({"<unk>": VOCAB - 2, "</s>": VOCAB - 1})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(directory)


def write_checkpoint(directory, config, tensors, shards=1):
    """Hugging Face layout: config.json, tokenizer files, model.safetensors or N shards + index."""
    os.makedirs(directory, exist_ok=True)
    config.save_pretrained(directory)
    write_tokenizer(directory)
    if shards == 1:
        save_file(tensors, os.path.join(directory, "model.safetensors"))
        return directory
    weight_map = {}
    for index, names in enumerate(np.array_split(np.asarray(sorted(tensors)), shards)):
        filename = f"model-{index + 1:05d}-of-{shards:05d}.safetensors"
        save_file({str(name): tensors[str(name)] for name in names}, os.path.join(directory, filename))
        weight_map.update({str(name): filename for name in names})
    with open(os.path.join(directory, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return directory


IDS = np.asarray([3, 17, 5, 9, 30, 2, 41], np.int32)


# ---------------------------------------------------------------------------------------- tests
@pytest.mark.parametrize("kind,tied,bias,window,shards", [
    ("llama", False, False, None, 1),   # GQA, head_dim != hidden / heads
    ("qwen2", True, False, None, 2),    # q/k/v biases, tied embeddings, sharded
    ("llama", False, True, None, 3),    # Llama attention_bias (q/k/v/o) and mlp_bias
    ("mistral", True, False, 3, 1),     # sliding window shorter than the sequence
])
def test_hf_checkpoint_matches_numpy_forward(tmp_path, kind, tied, bias, window, shards):
    config, tensors = make_checkpoint(kind, tied, bias, window)
    model, tokenizer = llama.load_hf(write_checkpoint(str(tmp_path), config, tensors, shards))
    got = np.asarray(model(jnp.asarray(IDS[None])))[0]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, numpy_forward(tensors, config, IDS), rtol=1e-4, atol=1e-4,
                               err_msg=f"{kind} decoder logits differ from the numpy transcription of transformers")
    assert model.config.tie_embeddings == tied and not hasattr(model, "lm_head") == tied
    assert tokenizer.eos_token_id == VOCAB - 1, "tokenizer not loaded from the checkpoint directory"


def test_padding_left_and_right_matches_numpy_and_unpadded(tmp_path):
    config, tensors = make_checkpoint("llama", seed=1)
    model, _ = llama.load_hf(write_checkpoint(str(tmp_path), config, tensors))
    tokens = np.asarray([[0, 0, 0, 3, 17, 5, 9], [0, 11, 4, 22, 7, 1, 6], [8, 12, 13, 0, 0, 0, 0]], np.int32)
    mask = np.asarray([[0, 0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 1, 1, 1], [1, 1, 1, 0, 0, 0, 0]], np.int32)
    got = np.asarray(jax.jit(lambda t, m: model(t, m))(tokens, mask))
    for row in range(3):
        real = mask[row] > 0
        expected = numpy_forward(tensors, config, tokens[row], mask[row])
        np.testing.assert_allclose(got[row][real], expected[real], rtol=1e-4, atol=1e-4,
                                   err_msg=f"row {row}: padded logits differ from the reference")
        alone = np.asarray(model(jnp.asarray(tokens[row][real][None])))[0]
        np.testing.assert_allclose(got[row][real], alone, rtol=1e-4, atol=1e-4,
                                   err_msg=f"row {row}: padding changed the logits of the real tokens")


def test_shape_mismatch_names_the_tensor(tmp_path):
    config, tensors = make_checkpoint("llama")
    tensors["model.layers.1.mlp.up_proj.weight"] = np.zeros((25, 16), np.float32)
    with pytest.raises(hf.CheckpointError, match=r"up_proj of layers \[1\]"):
        llama.load_hf(write_checkpoint(str(tmp_path), config, tensors))


def test_unknown_tensor_is_named(tmp_path):
    config, tensors = make_checkpoint("llama")
    tensors["model.layers.0.self_attn.rotary_scale"] = np.zeros(3, np.float32)
    with pytest.raises(hf.CheckpointError, match=r"unknown tensors: model\.layers\.0\.self_attn\.rotary_scale"):
        llama.load_hf(write_checkpoint(str(tmp_path), config, tensors))


def test_bias_the_config_does_not_declare_is_refused(tmp_path):
    config, tensors = make_checkpoint("llama")
    for layer in range(2):
        tensors[f"model.layers.{layer}.self_attn.q_proj.bias"] = np.zeros(24, np.float32)
    with pytest.raises(hf.CheckpointError, match="q_bias"):
        llama.load_hf(write_checkpoint(str(tmp_path), config, tensors))


def test_missing_tensor_is_named(tmp_path):
    config, tensors = make_checkpoint("llama")
    del tensors["lm_head.weight"]
    with pytest.raises(hf.CheckpointError, match="missing lm_head"):
        llama.load_hf(write_checkpoint(str(tmp_path), config, tensors))


@pytest.mark.parametrize("damage", ["truncated shard", "index not JSON"])
def test_damaged_files_are_refused_in_one_line(tmp_path, damage):
    """An interrupted download: a cut safetensors file or a broken index is a CheckpointError naming the
    file (one line from the CLI, exit status 2), not safetensors' or json's traceback."""
    config, tensors = make_checkpoint("llama")
    directory = write_checkpoint(str(tmp_path), config, tensors, shards=2)
    name = "model-00002-of-00002.safetensors" if damage == "truncated shard" else "model.safetensors.index.json"
    path = os.path.join(directory, name)
    with open(path, "rb") as f:
        data = f.read()
    with open(path, "wb") as f:
        f.write(data[:len(data) // 2])
    with pytest.raises(hf.CheckpointError, match=f"cannot read .*{name}"):
        llama.load_hf(directory)


@pytest.mark.parametrize("tied", [True, False])
def test_a_bare_decoder_without_model_prefix_loads_when_tied(tmp_path, tied):
    """LlamaModel.save_pretrained (no LM head) names its tensors without "model.": they were all refused as
    unknown. Tied, the head is the embedding and the logits are the full model's; untied, no head exists."""
    config, tensors = make_checkpoint("llama", tied=tied)
    bare = {name[len("model."):]: value for name, value in tensors.items() if name.startswith("model.")}
    directory = write_checkpoint(str(tmp_path), config, bare)
    if not tied:
        with pytest.raises(hf.CheckpointError, match="decoder without its LM head"):
            llama.load_hf(directory)
        return
    model, _ = llama.load_hf(directory)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(IDS[None])))[0], numpy_forward(tensors, config, IDS),
                               rtol=1e-4, atol=1e-4)


def test_from_hf_refuses_what_it_cannot_run():
    from transformers import BertConfig, LlamaConfig, Qwen2Config

    with pytest.raises(hf.CheckpointError, match="model_type 'bert'"):
        llama.LlamaConfig.from_hf(BertConfig())
    with pytest.raises(hf.CheckpointError, match="hidden_act 'gelu'"):
        llama.LlamaConfig.from_hf(LlamaConfig(hidden_act="gelu"))
    with pytest.raises(hf.CheckpointError, match="rope_type 'yarn'"):
        llama.LlamaConfig.from_hf(LlamaConfig(rope_scaling={"rope_type": "yarn", "factor": 4.0}))
    with pytest.raises(hf.CheckpointError, match="use_sliding_window"):
        llama.LlamaConfig.from_hf(Qwen2Config(use_sliding_window=True, sliding_window=16))
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        llama.LlamaConfig(num_heads=6, num_kv_heads=4)
    # From a config.json it is bad input: a CheckpointError (one line from the CLI), not a bare ValueError.
    with pytest.raises(hf.CheckpointError, match="config.json .* multiple of num_kv_heads"):
        llama.LlamaConfig.from_hf(LlamaConfig(hidden_size=96, num_attention_heads=6, num_key_value_heads=4))


def test_from_hf_reads_llama3_rope_scaling_and_frequencies_follow_the_rule():
    """Llama 3.x rule (Meta's reference): wavelengths under original/high_factor keep their
    frequency, those over original/low_factor are divided by `factor`, the band between is
    interpolated with smooth = (original / wavelength - low) / (high - low)."""
    from transformers import LlamaConfig

    hf_config = LlamaConfig(hidden_size=128, num_attention_heads=2, max_position_embeddings=65536,
                            rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192},
                            rope_theta=500000.0)
    config = llama.LlamaConfig.from_hf(hf_config)
    assert config.rope_scaling == (8.0, 1.0, 4.0, 8192) and config.rope_theta == 500000.0
    scaled = llama.inverse_frequencies(config).astype(np.float64)
    base = 1.0 / 500000.0 ** (np.arange(0, 64, 2) / 64)
    wavelength = 2 * np.pi / base
    short, long = wavelength < 8192 / 4, wavelength > 8192
    assert short.any() and long.any() and (~short & ~long).any(), "the test should cover all three bands"
    np.testing.assert_allclose(scaled[short], base[short], rtol=1e-6)
    np.testing.assert_allclose(scaled[long], base[long] / 8, rtol=1e-6)
    middle = np.flatnonzero(~short & ~long)[0]
    smooth = (8192 / wavelength[middle] - 1) / 3
    np.testing.assert_allclose(scaled[middle], (1 - smooth) * base[middle] / 8 + smooth * base[middle], rtol=1e-6)


@pytest.fixture(scope="module")
def model():
    """A random 2-layer GQA decoder, built once (tests that change weights work on nnx.clone copies)."""
    config = llama.LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_layers=2, num_heads=4,
                               num_kv_heads=2, head_dim=4, max_position=64)
    return llama.LlamaDecoder(config, rngs=nnx.Rngs(0))


def test_sites_and_peft_module_paths(model):
    sites = model.lora_sites()
    assert list(sites) == ["attn.q_proj", "attn.k_proj", "attn.v_proj", "attn.o_proj", "mlp.gate_proj",
                           "mlp.up_proj", "mlp.down_proj"]
    assert (sites["attn.k_proj"].d_in, sites["attn.k_proj"].d_out) == (16, 8), "GQA k width is kv_heads * head_dim"
    assert sites["mlp.down_proj"].d_in == 24
    assert model.hf_module_path("attn.q_proj", 3) == "model.layers.3.self_attn.q_proj"
    assert model.hf_module_path("mlp.down_proj", 0) == "model.layers.0.mlp.down_proj"


def test_lora_with_zero_b_changes_nothing_and_q_delta_equals_merged_kernel(model):
    spec = lora_lib.LoraSpec(targets=("attn.*", "mlp.*"), rank=3, alpha=6.0)
    adapters = lora_lib.init(jax.random.PRNGKey(1), spec, model.lora_sites(), 2)
    delta = lambda site, adapter, x, key: lora_lib.apply(adapter, x, spec.scale)
    tokens = jnp.asarray([[1, 5, 9, 2, 7]])
    base = np.asarray(model(tokens))
    with_zero_b = np.asarray(model(tokens, adapters=adapters, delta=delta))
    np.testing.assert_array_equal(with_zero_b, base, err_msg="an adapter with B = 0 changed the logits")

    q_adapter = {"a": adapters["attn.q_proj"]["a"],
                 "b": 0.5 * jax.random.normal(jax.random.PRNGKey(2), adapters["attn.q_proj"]["b"].shape)}
    adapted = np.asarray(model(tokens, adapters={"attn.q_proj": q_adapter}, delta=delta))
    assert np.abs(adapted - base).max() > 1e-3, "the q delta had no effect: the hook is not called at attn.q_proj"
    merged = nnx.clone(model)  # nnx.merge outside jit would share (and so alter) the model's variables
    merged.layers.q_proj.set_value(lora_lib.merge(merged.layers.q_proj[...], q_adapter, spec.scale))
    np.testing.assert_allclose(adapted, np.asarray(merged(tokens)), rtol=1e-5, atol=1e-5,
                               err_msg="delta at attn.q_proj differs from merging scale * A^T B^T into q_proj")


def test_hook_sees_every_site_with_its_shapes(model):
    seen = {}

    def delta(site, adapter, x, key):
        seen[site] = (x.shape, adapter["marker"].shape)
        return jnp.zeros(x.shape[:-1] + (model.lora_sites()[site].d_out,), x.dtype)

    adapters = {site: {"marker": jnp.zeros((2, 1))} for site in model.lora_sites()}
    model(jnp.ones((2, 5), jnp.int32), adapters=adapters, delta=delta)
    for site, shape in model.lora_sites().items():
        assert seen[site][0] == (2, 5, shape.d_in), f"{site} received x of shape {seen[site][0]}"
        assert seen[site][1] == (1,), f"{site} was not given its layer's slice of the adapter"


def test_pure_apply_under_jit_remat_and_bfloat16(model):
    tokens = jnp.asarray([[1, 5, 9, 2, 7, 3]])
    eager = np.asarray(model(tokens))
    graphdef, params = nnx.split(model)
    jitted = np.asarray(jax.jit(lambda p, t: llama.apply(graphdef, p, t))(params, tokens))
    np.testing.assert_allclose(jitted, eager, rtol=1e-5, atol=1e-5, err_msg="jit(apply) differs from eager call")

    remat_model = nnx.clone(model)
    remat_model.config = dataclasses.replace(model.config, remat=True)
    loss = lambda p, g: jnp.sum(llama.apply(g, p, tokens) ** 2)
    graphdef_remat, params_remat = nnx.split(remat_model)
    grads = jax.grad(loss)(params, graphdef)
    grads_remat = jax.grad(loss)(params_remat, graphdef_remat)
    for plain, rematerialised in zip(jax.tree.leaves(grads), jax.tree.leaves(grads_remat)):
        np.testing.assert_allclose(plain, rematerialised, rtol=1e-4, atol=1e-5,
                                   err_msg="remat changed the gradients")

    low = model(tokens, compute_dtype=jnp.bfloat16)
    assert low.dtype == jnp.float32, "logits must be float32 under bf16 compute"
    assert np.abs(np.asarray(low) - eager).max() < 0.05 * np.abs(eager).max(), "bf16 compute far from float32"
    # The compute really ran in bfloat16: every projection's input is bfloat16 inside the blocks (an
    # ignored compute_dtype leaves them float32), and the rounding shows in the logits.
    sites = model.lora_sites()
    inputs = {}

    def delta(site, adapter, x, key):
        inputs[site] = x.dtype
        return jnp.zeros(x.shape[:-1] + (sites[site].d_out,), x.dtype)

    model(tokens, adapters={site: {"unused": jnp.zeros((2, 1))} for site in sites}, delta=delta,
          compute_dtype=jnp.bfloat16)
    assert inputs == {site: jnp.bfloat16 for site in sites}, f"site inputs under bfloat16 compute: {inputs}"
    assert np.abs(np.asarray(low) - eager).max() > 1e-4 * np.abs(eager).max(), "bfloat16 compute gave float32's logits"


def test_cached_prefill_and_steps_equal_the_full_forward(model):
    """Writing a left-padded prompt into the cache, then one token at a time, gives the same logits
    as one pass over the whole sequence."""
    tokens = jnp.asarray([[0, 0, 4, 8, 15, 16, 23, 42], [3, 1, 4, 1, 5, 9, 2, 6]])
    mask = jnp.asarray([[0, 0, 1, 1, 1, 1, 1, 1], [1] * 8])
    full = np.asarray(model(tokens, mask))
    cache = model.init_cache(2, 8)
    logits, cache = model(tokens[:, :5], mask[:, :5], cache=cache)
    real = np.asarray(mask[:, :5]) > 0  # a padding query's output is meaningless and never used
    np.testing.assert_allclose(np.asarray(logits)[real], full[:, :5][real], rtol=1e-5, atol=1e-5,
                               err_msg="cached prefill differs from the full forward")
    for step in range(5, 8):
        logits, cache = model(tokens[:, step:step + 1], mask[:, step:step + 1], cache=cache)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, step], rtol=1e-5, atol=1e-5,
                                   err_msg=f"cached step {step} differs from the full forward")
    assert int(cache["index"]) == 8 and cache["positions"].tolist() == [6, 8]


def test_features_are_the_last_real_token_state(model):
    tokens = jnp.asarray([[0, 0, 5, 6, 7], [5, 6, 7, 0, 0]])
    mask = jnp.asarray([[0, 0, 1, 1, 1], [1, 1, 1, 0, 0]])
    features = np.asarray(model.features(tokens, mask))
    alone = np.asarray(model.hidden_states(jnp.asarray([[5, 6, 7]])))[0, -1]
    np.testing.assert_allclose(features[0], alone, rtol=1e-5, atol=1e-5, err_msg="left-padded row")
    np.testing.assert_allclose(features[1], alone, rtol=1e-5, atol=1e-5, err_msg="right-padded row")
