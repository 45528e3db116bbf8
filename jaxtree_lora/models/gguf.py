"""Loading Llama-family GGUF files (llama.cpp's format): dequantised weights and the tokenizer.

Weights: `gguf.GGUFReader` + `gguf.quants.dequantize` give float32 arrays in PyTorch's [out, in]
layout (any quantisation gguf supports: Q4_0/Q4_1/Q8_0/K-quants/F16/F32). llama.cpp's converter
permutes the rows of q and k for its rotary layout; `unpermute` undoes it so the weights match the
Hugging Face rotate-half convention. The tokenizer is rebuilt from the file's metadata with the
`tokenizers` library (byte-level BPE for "gpt2"-type vocabularies) and wrapped as a transformers
PreTrainedTokenizerFast, with the chat template from the file.
"""
from __future__ import annotations

import os

import numpy as np

from jaxtree_lora.models import hf
from jaxtree_lora.models.llama import LlamaConfig, expected_shapes, from_arrays


def _field(reader, key, default=None):
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_metadata(reader) -> LlamaConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise hf.CheckpointError(f"GGUF architecture {arch!r} is not supported (llama only: Llama, Mistral, SmolLM2)")
    get = lambda name, default=None: _field(reader, f"llama.{name}", default)
    heads = int(get("attention.head_count"))
    hidden = int(get("embedding_length"))
    names = {t.name for t in reader.tensors}
    vocab = get("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    return LlamaConfig(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
                       num_layers=int(get("block_count")), num_heads=heads,
                       num_kv_heads=int(get("attention.head_count_kv", heads)),
                       head_dim=int(get("rope.dimension_count", hidden // heads)),
                       rope_theta=float(get("rope.freq_base", 10000.0)),
                       rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                       max_position=int(get("context_length", 4096)), tie_embeddings="output.weight" not in names)


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (rows [out] of an [out, in] weight)."""
    return (weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def tensors(reader, config: LlamaConfig) -> dict:
    from gguf import quants

    out = {}
    for tensor in reader.tensors:
        try:
            array = quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError as error:
            raise hf.CheckpointError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                                     f"package cannot dequantise") from error
        array = np.asarray(array, np.float32).reshape([int(d) for d in reversed(tensor.shape)])
        out[tensor.name] = array
    return out


NAMES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj", "ffn_gate": "gate_proj",
         "ffn_up": "up_proj", "ffn_down": "down_proj", "attn_norm": "input_norm", "ffn_norm": "post_norm"}


def map_tensors(raw: dict, config: LlamaConfig) -> dict:
    """GGUF names -> the decoder's stacked params, with shape checks."""
    mapped, per_layer, unknown = {}, {}, []
    for name, array in raw.items():
        if name == "token_embd.weight":
            mapped[("embed",)] = array
        elif name == "output_norm.weight":
            mapped[("final_norm",)] = array
        elif name == "output.weight":
            mapped[("lm_head",)] = array.T
        elif name.startswith("blk."):
            _, layer, kind, _ = name.split(".", 3)
            if kind not in NAMES:
                unknown.append(name)
                continue
            if kind == "attn_q":
                array = unpermute(array, config.num_heads)
            elif kind == "attn_k":
                array = unpermute(array, config.num_kv_heads)
            per_layer.setdefault(NAMES[kind], {})[int(layer)] = array if array.ndim == 1 else array.T
        elif name != "rope_freqs.weight":
            unknown.append(name)
    if unknown:
        raise hf.CheckpointError("GGUF file has tensors this loader does not understand: " + ", ".join(unknown[:8]))
    for target, layers in per_layer.items():
        if sorted(layers) != list(range(config.num_layers)):
            raise hf.CheckpointError(f"GGUF {target}: layers {sorted(layers)} do not match block_count")
        mapped[("layers", target)] = np.stack([layers[i] for i in range(config.num_layers)])
    for target, shape in expected_shapes(config).items():
        if target not in mapped:
            raise hf.CheckpointError(f"GGUF file lacks {'.'.join(target)}")
        if tuple(mapped[target].shape) != tuple(shape):
            raise hf.CheckpointError(f"GGUF {'.'.join(target)} has shape {mapped[target].shape}, expected {shape}")
    return mapped


def tokenizer_from_metadata(reader):
    """A PreTrainedTokenizerFast rebuilt from tokenizer.ggml.* metadata (byte-level BPE)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    kind = _field(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise hf.CheckpointError(f"GGUF tokenizer model {kind!r} is not supported (byte-level BPE 'gpt2' only)")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    vocab = {token: index for index, token in enumerate(tokens)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                     pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                              use_regex=True)])
    backend.decoder = decoders.ByteLevel()
    special = [tokens[i] for i, t in enumerate(types) if int(t) == 3]
    backend.add_special_tokens(special)
    name = lambda key: tokens[int(_field(reader, key))] if _field(reader, key) is not None else None
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=name("tokenizer.ggml.bos_token_id"),
                                        eos_token=name("tokenizer.ggml.eos_token_id"),
                                        unk_token=name("tokenizer.ggml.unknown_token_id"),
                                        pad_token=name("tokenizer.ggml.padding_token_id")
                                        or name("tokenizer.ggml.eos_token_id"))
    template = _field(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = template
    return tokenizer


def load_gguf(path: str, dtype=None):
    """(LlamaDecoder, tokenizer) from a GGUF file."""
    import gguf
    import jax.numpy as jnp

    if not os.path.isfile(path):
        raise hf.CheckpointError(f"GGUF file {path} does not exist")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:
        raise hf.CheckpointError(f"{path} is not a readable GGUF file ({error})") from error
    config = config_from_metadata(reader)
    model = from_arrays(config, map_tensors(tensors(reader, config), config), dtype or jnp.float32)
    return model, tokenizer_from_metadata(reader)
