"""GGUF loading: tiny files written with gguf.GGUFWriter in llama.cpp's conventions, and the real
SmolLM2-135M-Instruct Q4_1 file against reference outputs of PyTorch + transformers reading the same
file (tests/fixtures/make_smollm2_reference.py)."""
import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as Q  # noqa: E402

from jaxtree_lora.models import hf  # noqa: E402
from jaxtree_lora.models import gguf as gguf_loader  # noqa: E402
from jaxtree_lora.models.generate import generate  # noqa: E402

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "smollm2_reference.json")
HIDDEN, INNER, LAYERS, HEADS, KV_HEADS, HEAD_DIM = 32, 64, 2, 4, 2, 8
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Byte-level symbols: "Ġ" is the space byte.
PIECES = ["a", "b", "c", "Ġ", "1", "2", "3", "ab", "Ġa", "Ġab"]
MERGES = ["Ġ a", "a b", "Ġa b"]  # rank order matters: " ab" is Ġa + b, not Ġ + ab
USER_DEFINED = ["<tool>"]
TOKENS = SPECIAL + PIECES + USER_DEFINED + [f"x{i}" for i in range(50 - len(SPECIAL) - len(PIECES) - 1)]
VOCAB = len(TOKENS)


def llama_cpp_permute(weight, heads):
    """The row order llama.cpp's convert_hf_to_gguf.py writes for q and k: within each head, rows
    (i, i + head_dim/2) become neighbours (2i, 2i+1)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def hf_tensors(seed=0, tied=False):
    """Hugging Face-layout weights [out, in] of a tiny Llama."""
    rng = np.random.default_rng(seed)
    t = {"embed": rng.normal(size=(VOCAB, HIDDEN)), "norm": 1 + 0.1 * rng.normal(size=HIDDEN)}
    if not tied:
        t["lm_head"] = 0.3 * rng.normal(size=(VOCAB, HIDDEN))
    for layer in range(LAYERS):
        shapes = {"q": (HEADS * HEAD_DIM, HIDDEN), "k": (KV_HEADS * HEAD_DIM, HIDDEN), "v": (KV_HEADS * HEAD_DIM, HIDDEN),
                  "o": (HIDDEN, HEADS * HEAD_DIM), "gate": (INNER, HIDDEN), "up": (INNER, HIDDEN),
                  "down": (HIDDEN, INNER)}
        for name, shape in shapes.items():
            t[f"{layer}.{name}"] = 0.3 * rng.normal(size=shape)
        t[f"{layer}.input_norm"] = 1 + 0.1 * rng.normal(size=HIDDEN)
        t[f"{layer}.post_norm"] = 1 + 0.1 * rng.normal(size=HIDDEN)
    return {name: np.asarray(value, np.float32) for name, value in t.items()}


def write_gguf(path, tensors, architecture="llama", tokenizer_model="gpt2", pre="smollm", extra=None, add_bos=False,
               gate_type=Q.F32):
    """A llama.cpp-style GGUF: metadata, permuted q/k, a Q8_0 embedding, Q4_1 up and F16 down projections.

    Returns the weights as the loader should see them (quantised ones after the round trip)."""
    writer = gguf.GGUFWriter(str(path), architecture)
    writer.add_block_count(LAYERS)
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(INNER)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(5000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(HEAD_DIM)
    writer.add_vocab_size(VOCAB)
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(TOKENS)
    writer.add_token_merges(MERGES)
    writer.add_token_types([3 if t in SPECIAL else 4 if t in USER_DEFINED else 1 for t in TOKENS])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    writer.add_add_bos_token(add_bos)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}")
    seen = {}

    def add(name, array, kind=Q.F32):
        if kind == Q.F32:
            writer.add_tensor(name, array)
            seen[name] = array
        elif kind == Q.Q8_1:  # the gguf package has no Q8_1 codec: write zero blocks of 40 bytes per 32 values
            writer.add_tensor(name, np.zeros((array.shape[0], array.shape[1] // 32 * 40), np.uint8), raw_dtype=kind)
        elif kind == Q.F16:
            writer.add_tensor(name, array.astype(np.float16))
            seen[name] = array.astype(np.float16).astype(np.float32)
        else:
            data = gguf.quants.quantize(array, kind)
            writer.add_tensor(name, data, raw_dtype=kind)
            seen[name] = gguf.quants.dequantize(data, kind).reshape(array.shape)

    add("token_embd.weight", tensors["embed"], Q.Q8_0)
    add("output_norm.weight", tensors["norm"])
    if "lm_head" in tensors:
        add("output.weight", tensors["lm_head"])
    for layer in range(LAYERS):
        add(f"blk.{layer}.attn_q.weight", llama_cpp_permute(tensors[f"{layer}.q"], HEADS))
        add(f"blk.{layer}.attn_k.weight", llama_cpp_permute(tensors[f"{layer}.k"], KV_HEADS))
        add(f"blk.{layer}.attn_v.weight", tensors[f"{layer}.v"])
        add(f"blk.{layer}.attn_output.weight", tensors[f"{layer}.o"])
        add(f"blk.{layer}.ffn_gate.weight", tensors[f"{layer}.gate"], gate_type)
        add(f"blk.{layer}.ffn_up.weight", tensors[f"{layer}.up"], Q.Q4_1)
        add(f"blk.{layer}.ffn_down.weight", tensors[f"{layer}.down"], Q.F16)
        add(f"blk.{layer}.attn_norm.weight", tensors[f"{layer}.input_norm"])
        add(f"blk.{layer}.ffn_norm.weight", tensors[f"{layer}.post_norm"])
    for name, (array, kind) in (extra or {}).items():
        writer.add_tensor(name, array, raw_dtype=None if kind == Q.F32 else kind)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return seen


@pytest.mark.parametrize("tied", [False, True])
def test_tiny_gguf_weights_land_in_hugging_face_layout(tmp_path, tied):
    """After loading, every kernel equals the Hugging Face weight transposed (q/k un-permuted,
    quantised tensors dequantised), so the decoder checked in test_llama.py runs them."""
    tensors = hf_tensors(tied=tied)
    seen = write_gguf(tmp_path / "tiny.gguf", tensors)
    model, _ = gguf_loader.load_gguf(tmp_path / "tiny.gguf")
    c = model.config
    assert (c.num_layers, c.num_heads, c.num_kv_heads, c.head_dim, c.vocab_size, c.intermediate_size) == (
        LAYERS, HEADS, KV_HEADS, HEAD_DIM, VOCAB, INNER)
    assert c.rope_theta == 5000.0 and c.tie_embeddings == tied and c.max_position == 128
    np.testing.assert_array_equal(model.embed[...], seen["token_embd.weight"])
    assert not np.array_equal(seen["token_embd.weight"], tensors["embed"]), "the embedding should be Q8_0"
    if not tied:
        np.testing.assert_array_equal(model.lm_head[...], tensors["lm_head"].T)
    for layer in range(LAYERS):
        for name, hf_name in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
                              ("gate_proj", "gate")):
            np.testing.assert_array_equal(getattr(model.layers, name)[...][layer], tensors[f"{layer}.{hf_name}"].T,
                                          err_msg=f"layer {layer} {name} is not the HF weight transposed")
        np.testing.assert_array_equal(model.layers.up_proj[...][layer], seen[f"blk.{layer}.ffn_up.weight"].T)
        np.testing.assert_array_equal(model.layers.down_proj[...][layer], seen[f"blk.{layer}.ffn_down.weight"].T)
        np.testing.assert_array_equal(model.layers.input_norm[...][layer], tensors[f"{layer}.input_norm"])
    q4 = np.abs(seen["blk.0.ffn_up.weight"] - tensors["0.up"]).max()
    assert 0 < q4 < 0.2, f"Q4_1 round trip error {q4} is not that of a 4-bit quantisation"


def test_tiny_gguf_tokenizer_from_metadata(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", hf_tensors())
    tokenizer = gguf_loader.tokenizer_from_metadata(gguf.GGUFReader(str(tmp_path / "tiny.gguf")))
    index = {token: i for i, token in enumerate(TOKENS)}
    # Digits are split one by one before byte-level BPE; "Ġ" marks a leading space.
    expected = [index[t] for t in ["ab", "Ġab", "c", "Ġ", "1", "2", "3"]]
    assert tokenizer("ab abc 123", add_special_tokens=False)["input_ids"] == expected
    ids = tokenizer("<|im_start|>ab<tool>a<|im_end|>", add_special_tokens=False)["input_ids"]
    assert ids == [1, index["ab"], index["<tool>"], index["a"], 2], "control/user tokens were split"
    assert tokenizer.decode(expected) == "ab abc 123"
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab<tool>a", "only control tokens are special"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 0)
    assert tokenizer("ab")["input_ids"] == [index["ab"]], "add_bos_token=false must not add BOS"
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": "ab"}], tokenize=False)
    assert rendered == "<|im_start|>ab<|im_end|>", "chat template not taken from the metadata"


def test_tiny_gguf_add_bos_token(tmp_path):
    write_gguf(tmp_path / "tiny.gguf", hf_tensors(), add_bos=True)
    tokenizer = gguf_loader.tokenizer_from_metadata(gguf.GGUFReader(str(tmp_path / "tiny.gguf")))
    assert tokenizer("ab")["input_ids"] == [1, TOKENS.index("ab")], "add_bos_token=true must prepend BOS"


def tokenizer_file(path, model: str, tokens: list, types: list, **fields):
    """Our tokenizer of a GGUF holding only tokenizer metadata: `model`, `tokens`, their `types`, and each
    of `fields` written by the GGUFWriter method `add_<field>`."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tokenizer_model(model)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    for field, value in fields.items():
        getattr(writer, f"add_{field}")(value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.close()
    return gguf_loader.tokenizer_from_metadata(gguf.GGUFReader(str(path)))


def test_llama3_pre_tokenizer_splits_digits_in_threes(tmp_path):
    """Llama 3 GGUFs are byte-level BPE with tokenizer.ggml.pre "llama-bpe": text is split by Llama 3's
    regex (digits in groups of up to three, case-insensitive contractions, a space kept with the
    following word) before the merges, as in its tokenizer.json."""
    from tokenizers import pre_tokenizers

    symbols = sorted(pre_tokenizers.ByteLevel.alphabet())
    merges = ["3 4", "1 2", "12 3", "Ġ D", "ĠD O", "ĠDO N"]
    tokens = ["<|begin_of_text|>"] + symbols + ["34", "12", "123", "ĠD", "ĠDO", "ĠDON"]
    tokenizer = tokenizer_file(tmp_path / "l3.gguf", "gpt2", tokens, [3] + [1] * (len(tokens) - 1),
                               tokenizer_pre="llama-bpe", token_merges=merges, bos_token_id=0, eos_token_id=0)
    index = {token: i for i, token in enumerate(tokens)}
    # "1234" is split "123" + "4" first, so the top-ranked merge "3 4" never applies across the split.
    ids = tokenizer("1234 DON'T", add_special_tokens=False)["input_ids"]
    assert ids == [index[t] for t in ["123", "4", "ĠDON", "'", "T"]], [tokens[i] for i in ids]
    assert tokenizer.decode(ids) == "1234 DON'T"
    text = "Hé, 12345 don't!\n\n  x"
    assert tokenizer.decode(tokenizer(text, add_special_tokens=False)["input_ids"]) == text


def test_sentencepiece_tokenizer_of_llama2_and_mistral_files(tmp_path):
    """Llama 2 and Mistral GGUFs carry a SentencePiece vocabulary ("llama" model: scores, byte tokens,
    the "\u2581" word boundary); they were refused. Merges come from the scores (higher first), unknown
    characters fall back to their bytes, BOS is prepended (llama.cpp's default for these files)."""
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + ["\u2581", "a", "b", "\u2581a", "ab",
                                                                              "\u2581ab", "c"]
    tokenizer = tokenizer_file(tmp_path / "spm.gguf", "llama", tokens, [2, 3, 3] + [6] * 256 + [1] * 7,
                               token_scores=[0.0] * 259 + [-1.0, -2.0, -3.0, -4.0, -5.0, -6.0, -7.0],
                               bos_token_id=1, eos_token_id=2, unk_token_id=0)
    index = {token: i for i, token in enumerate(tokens)}
    ids = tokenizer("ab a cé")["input_ids"]
    expected = ["<s>", "\u2581ab", "\u2581a", "\u2581", "c", "<0xC3>", "<0xA9>"]  # é: no token, its two UTF-8 bytes
    assert ids == [index[t] for t in expected], [tokens[i] for i in ids]
    assert tokenizer.decode(ids, skip_special_tokens=True) == "ab a cé"
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id) == (1, 2, 0)


@pytest.mark.parametrize("tied", [True, False])
def test_qwen2_file_with_biases_matches_the_numpy_forward(tmp_path, tied):
    """Qwen2 GGUFs ('qwen2' keys, q/k/v biases, q/k rows not permuted: its rotary pairing is NeoX's) were
    refused. The logits equal the numpy transcription of transformers' Qwen2 (tests/test_llama.py), and
    the "qwen2" pre-tokenizer splits digits one by one."""
    from test_llama import VOCAB as LLAMA_VOCAB, make_checkpoint, numpy_forward

    config, tensors = make_checkpoint("qwen2", tied=tied)
    renames = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
               "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
               "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}
    writer = gguf.GGUFWriter(str(tmp_path / "qwen2.gguf"), "qwen2")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(64)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_parameters["rope_theta"] if getattr(config, "rope_parameters", None)
                              else config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(["<|endoftext|>", "1", "2", "12"] + [f"t{i}" for i in range(LLAMA_VOCAB - 4)])
    writer.add_token_merges(["1 2"])
    writer.add_eos_token_id(0)
    for name, value in tensors.items():
        name = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}.get(name, name)
        if name.startswith("model.layers."):
            layer, rest = name[len("model.layers."):].split(".", 1)
            site, kind = rest.rsplit(".", 1)
            name = f"blk.{layer}.{renames[site]}.{kind}"
        writer.add_tensor(name, value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    model, tokenizer = gguf_loader.load_gguf(tmp_path / "qwen2.gguf")
    assert model.config.attention_bias and not model.config.attention_output_bias
    ids = np.asarray([3, 17, 5, 9, 30, 2, 41], np.int32)
    np.testing.assert_allclose(np.asarray(model(jnp.asarray(ids[None])))[0], numpy_forward(tensors, config, ids),
                               rtol=1e-4, atol=1e-4)
    assert tokenizer("12 1212", add_special_tokens=False)["input_ids"] == [1, 2, 1, 2, 1, 2], "digits one by one"


def test_unsupported_files_give_checkpoint_errors(tmp_path):
    tensors = hf_tensors()
    write_gguf(tmp_path / "phi.gguf", tensors, architecture="phi3")
    with pytest.raises(hf.CheckpointError, match="architecture 'phi3'"):
        gguf_loader.load_gguf(tmp_path / "phi.gguf")
    write_gguf(tmp_path / "rwkv.gguf", tensors, tokenizer_model="rwkv")
    with pytest.raises(hf.CheckpointError, match=r"tokenizer model 'rwkv' .*\('llama': Llama 2, Mistral\) .*model.name=hf"):
        gguf_loader.load_gguf(tmp_path / "rwkv.gguf")
    write_gguf(tmp_path / "pre.gguf", tensors, pre="deepseek-llm")
    with pytest.raises(hf.CheckpointError, match="pre-tokenizer 'deepseek-llm'"):
        gguf_loader.load_gguf(tmp_path / "pre.gguf")
    write_gguf(tmp_path / "q81.gguf", tensors, gate_type=Q.Q8_1)
    with pytest.raises(hf.CheckpointError, match="blk.0.ffn_gate.weight has type Q8_1"):
        gguf_loader.load_gguf(tmp_path / "q81.gguf")
    write_gguf(tmp_path / "unknown.gguf", tensors, extra={"blk.0.attn_sinks.weight": (np.ones(4, np.float32), Q.F32)})
    with pytest.raises(hf.CheckpointError, match="blk.0.attn_sinks.weight"):
        gguf_loader.load_gguf(tmp_path / "unknown.gguf")
    with pytest.raises(hf.CheckpointError, match="does not exist"):
        gguf_loader.load_gguf(tmp_path / "absent.gguf")
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(hf.CheckpointError, match="not a readable GGUF"):
        gguf_loader.load_gguf(tmp_path / "junk.gguf")


def test_plan_of_a_bad_gguf_file_is_a_checkpoint_error(tmp_path):
    """`jaxtree-lora plan` reads only the header (backbone.abstract_module): a file that is not GGUF, or
    is cut short, is the same one-line CheckpointError as for loading, not the reader's ValueError."""
    import ml_collections

    from jaxtree_lora.train import backbone

    write_gguf(tmp_path / "tiny.gguf", hf_tensors())
    data = (tmp_path / "tiny.gguf").read_bytes()
    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    (tmp_path / "cut.gguf").write_bytes(data[:1000])
    for name in ("junk.gguf", "cut.gguf"):
        config = ml_collections.ConfigDict({"model": {"name": "gguf", "path": str(tmp_path / name)}})
        with pytest.raises(hf.CheckpointError, match="not a readable GGUF"):
            backbone.abstract_module(config)
    config = ml_collections.ConfigDict({"model": {"name": "gguf", "path": str(tmp_path / "tiny.gguf")}})
    planned, kind = backbone.abstract_module(config)
    assert kind == "decoder" and planned.config.num_layers == LAYERS


def test_rope_freqs_tensor_divides_the_frequencies(tmp_path):
    """llama.cpp stores Llama 3.x rope scaling as per-frequency divisors (`rope_freqs`)."""
    factors = np.linspace(1.0, 8.0, HEAD_DIM // 2).astype(np.float32)
    write_gguf(tmp_path / "l3.gguf", hf_tensors(), extra={"rope_freqs.weight": (factors, Q.F32)})
    model, _ = gguf_loader.load_gguf(tmp_path / "l3.gguf")
    from jaxtree_lora.models.llama import inverse_frequencies

    base = 1.0 / 5000.0 ** (np.arange(0, HEAD_DIM, 2) / HEAD_DIM)
    np.testing.assert_allclose(inverse_frequencies(model.config), base / factors, rtol=1e-6)


# ------------------------------------------------------------------------------- real asset
@pytest.fixture(scope="module")
def smollm2():
    assets = pytest.importorskip("jaxtree_lora.assets")
    try:
        path = assets.path("smollm2")
    except assets.AssetMissing:
        pytest.skip("SmolLM2 GGUF not installed (run `jaxtree-lora assets`)")
    with open(FIXTURE) as f:
        reference = json.load(f)
    start = time.perf_counter()
    model, tokenizer = gguf_loader.load_gguf(path)
    print(f"load_gguf: {time.perf_counter() - start:.1f} s")
    return model, tokenizer, reference


@pytest.mark.assets
def test_smollm2_tokenizer_matches_transformers(smollm2):
    _, tokenizer, reference = smollm2
    for prompt, ids in zip(reference["prompts"], reference["token_ids"]):
        assert tokenizer(prompt, add_special_tokens=False)["input_ids"] == ids, f"token ids differ for {prompt!r}"
        assert tokenizer.decode(ids) == prompt
    chat_text = tokenizer.apply_chat_template(reference["chat_messages"], add_generation_prompt=True, tokenize=False)
    assert chat_text == reference["chat_prompt_text"], "chat template from the GGUF metadata renders differently"
    assert tokenizer(chat_text, add_special_tokens=False)["input_ids"] == reference["chat_prompt_ids"]
    special = reference["special_ids"]
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (
        special["bos"], special["eos"], special["pad"])


@pytest.mark.assets
def test_smollm2_logits_and_greedy_continuation_match_transformers(smollm2):
    model, tokenizer, reference = smollm2
    graphdef, params = nnx.split(model)
    # One padded batch: a single compilation for the three prompts, and left padding exercised on real weights.
    width = max(len(ids) for ids in reference["token_ids"])
    tokens = np.zeros((len(reference["token_ids"]), width), np.int32)
    mask = np.zeros_like(tokens)
    for row, ids in enumerate(reference["token_ids"]):
        tokens[row, width - len(ids):], mask[row, width - len(ids):] = ids, 1
    logits = np.asarray(jax.jit(lambda p, t, m: nnx.merge(graphdef, p)(t, m))(params, tokens, mask))
    worst = 0.0
    for row, ids in enumerate(reference["token_ids"]):
        real = logits[row, width - len(ids):]
        top = reference["last_logits_top"][row]
        worst = max(worst, np.abs(real[-1][top["ids"]] - top["values"]).max())
        for position, values in zip(reference["logits_rows"][row]["positions"], reference["logits_rows"][row]["values"]):
            worst = max(worst, np.abs(real[position][:len(values)] - values).max())
        assert real.argmax(-1).tolist() == reference["argmax_per_position"][row], f"argmax differs, prompt {row}"
    print(f"max |logits - transformers| = {worst:.2e}")
    assert worst < 2e-3, f"max |logits - transformers| = {worst}"

    prompt = jnp.asarray([reference["chat_prompt_ids"]])
    expected = reference["greedy_continuation_ids"]
    steps = len(expected) + 4
    run = jax.jit(lambda p, ids: generate(nnx.merge(graphdef, p), ids, jnp.ones_like(ids), max_new_tokens=steps,
                                          temperature=0.0, eos_id=tokenizer.eos_token_id,
                                          pad_id=tokenizer.pad_token_id))
    continuation = np.asarray(run(params, prompt))[0].tolist()
    assert continuation[:len(expected)] == expected, "greedy continuation differs from transformers'"
    if expected[-1] == tokenizer.eos_token_id:  # transformers stops at EOS; this generator pads after it
        assert continuation[len(expected):] == [tokenizer.pad_token_id] * 4, "tokens after EOS are not padding"
    assert tokenizer.decode(continuation, skip_special_tokens=True) == reference["greedy_continuation_text"]
