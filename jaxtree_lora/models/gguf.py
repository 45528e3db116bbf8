"""Llama-family GGUF files (llama.cpp's "llama" and "qwen2" architectures): weights, config, tokenizer.

Weights: the `gguf` package's reader and dequantiser give float32 [out, in] arrays for every type it
implements; `unpermute` undoes llama.cpp's pairing of rotary dimensions in a llama file's q and k, back
to the Hugging Face order `llama.decoder_block` expects. Config: the `<architecture>.*` metadata keys
(Llama 3.x rope scaling as `rope_freqs`, kept as `LlamaConfig.rope_frequency_factors`). Tokenizer:
rebuilt from the `tokenizer.ggml.*` metadata (byte-level BPE here, SentencePiece through transformers)
and wrapped as a transformers `PreTrainedTokenizerFast` with the file's chat template. docs/MODELS.md.
"""
from __future__ import annotations

import os
import re
from typing import Any, Optional

import numpy as np

from jaxtree_lora.models import hf
from jaxtree_lora.models.llama import LlamaConfig, LlamaDecoder, expected_shapes, from_arrays

# llama.cpp's per-layer tensor names -> the decoder's stacked parameter names.
LAYER_NAMES = {"attn_q": "q_proj", "attn_k": "k_proj", "attn_v": "v_proj", "attn_output": "o_proj",
               "ffn_gate": "gate_proj", "ffn_up": "up_proj", "ffn_down": "down_proj",
               "attn_norm": "input_norm", "ffn_norm": "post_norm"}
LAYER_PATTERN = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
# Architectures read, and whether llama.cpp permuted their q/k rows for its rotary pairing (Qwen2: NeoX order).
ARCHITECTURES = {"llama": True, "qwen2": False}

# tokenizer.ggml.token_type values (llama.cpp's llama_token_type).
TOKEN_CONTROL, TOKEN_USER_DEFINED = 3, 4
# The split before byte-level BPE of Llama 3 and Qwen2 (their tokenizer.json): contractions, letters, a
# run of digits, punctuation, whitespace. Llama 3 keeps up to three digits together, Qwen2 one.
_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{digits}"
          r"| ?[^\s\p{{L}}\p{{N}}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPLIT, QWEN2_SPLIT = _SPLIT.format(digits=r"\p{N}{1,3}"), _SPLIT.format(digits=r"\p{N}")
# tokenizer.ggml.pre -> how text is split before byte-level BPE: "digits" (one by one, then GPT-2's
# regex), "gpt-2" (GPT-2's regex) or a regex of its own.
PRE_TOKENIZERS = {"smollm": "digits", "gpt-2": "gpt-2", "llama-bpe": LLAMA3_SPLIT, "llama3": LLAMA3_SPLIT,
                  "qwen2": QWEN2_SPLIT}


def metadata(reader, key: str, default: Any = None) -> Any:
    """One metadata value (scalars, strings and arrays decoded), or `default` when absent."""
    field = reader.fields.get(key)
    if field is None:
        return default
    return field.contents()


def config_from_metadata(reader) -> LlamaConfig:
    """LlamaConfig from the `<architecture>.*` keys ("llama" or "qwen2"), with biases and tied
    embeddings read off the tensors present."""
    architecture = metadata(reader, "general.architecture")
    if architecture not in ARCHITECTURES:
        raise hf.CheckpointError(
            f"GGUF architecture {architecture!r} is not supported: use a 'llama' (Llama 2/3, Mistral, SmolLM2) "
            f"or 'qwen2' GGUF, or the Hugging Face checkpoint with model.name=hf")

    def get(name, default=None):
        value = metadata(reader, f"{architecture}.{name}", default)
        if value is None:
            raise hf.CheckpointError(f"GGUF metadata lacks {architecture}.{name}: the file is incomplete")
        return value

    heads, hidden = int(get("attention.head_count")), int(get("embedding_length"))
    head_dim = int(get("attention.key_length", hidden // heads))
    rotary = int(get("rope.dimension_count", head_dim))
    if rotary != head_dim:
        raise hf.CheckpointError(f"GGUF rope.dimension_count={rotary} differs from head_dim={head_dim}: partial "
                                 f"rotary embeddings are not supported")
    scaling = metadata(reader, f"{architecture}.rope.scaling.type")
    if scaling not in (None, "none"):
        raise hf.CheckpointError(f"GGUF rope scaling {scaling!r} is not supported (none, or llama3 via rope_freqs)")
    names = {tensor.name for tensor in reader.tensors}
    factors = None
    if "rope_freqs.weight" in names:
        tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
        factors = tuple(float(v) for v in np.asarray(dequantize(tensor)).reshape(-1))
    vocab = metadata(reader, f"{architecture}.vocab_size") or len(metadata(reader, "tokenizer.ggml.tokens", []))
    return LlamaConfig(vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(get("feed_forward_length")),
                       num_layers=int(get("block_count")), num_heads=heads,
                       num_kv_heads=int(get("attention.head_count_kv", heads)), head_dim=head_dim,
                       rope_theta=float(get("rope.freq_base", 10000.0)),
                       rms_norm_eps=float(get("attention.layer_norm_rms_epsilon", 1e-5)),
                       max_position=int(get("context_length", 4096)),
                       tie_embeddings="output.weight" not in names, rope_frequency_factors=factors,
                       attention_bias="blk.0.attn_q.bias" in names, attention_output_bias="blk.0.attn_output.bias" in names,
                       mlp_bias="blk.0.ffn_up.bias" in names)


def dequantize(tensor) -> np.ndarray:
    """One GGUF tensor as float32 in numpy order (GGUF lists dimensions innermost first)."""
    from gguf import quants

    try:
        array = quants.dequantize(tensor.data, tensor.tensor_type)
    except NotImplementedError as error:
        raise hf.CheckpointError(f"GGUF tensor {tensor.name} has type {tensor.tensor_type.name}, which the gguf "
                                 f"package cannot dequantise: re-quantise the file (e.g. Q8_0, Q4_1 or F16)") from error
    return np.asarray(array, np.float32).reshape([int(d) for d in reversed(tensor.shape)])


def unpermute(weight: np.ndarray, heads: int) -> np.ndarray:
    """Undoes llama.cpp's q/k row permutation. weight: [heads * head_dim, ...] (PyTorch [out, in])."""
    rows = weight.shape[0]
    return (weight.reshape(heads, rows // heads // 2, 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def _layer_target(kind: str, part: str) -> Optional[str]:
    """The stacked parameter of `blk.N.<kind>.<part>`: q_proj for attn_q.weight, q_bias for attn_q.bias
    (projections only; a norm has no bias here), else None."""
    name = LAYER_NAMES.get(kind)
    if name is None or part == "weight":
        return name
    return name.replace("_proj", "_bias") if name.endswith("_proj") else None


def map_tensors(reader, config: LlamaConfig) -> dict[tuple[str, ...], np.ndarray]:
    """GGUF tensors -> `{parameter path: array}` in the decoder's layout, shapes checked."""
    mapped: dict[tuple[str, ...], np.ndarray] = {}
    per_layer: dict[str, dict[int, np.ndarray]] = {}
    unknown = []
    permuted = ARCHITECTURES.get(metadata(reader, "general.architecture"), True)
    for tensor in reader.tensors:
        name = tensor.name
        if name == "rope_freqs.weight":
            continue  # already in the config
        match = LAYER_PATTERN.fullmatch(name)
        target = _layer_target(match.group(2), match.group(3)) if match is not None else None
        if target is not None:
            array = dequantize(tensor)
            kind = match.group(2)
            if permuted and kind == "attn_q":
                array = unpermute(array, config.num_heads)
            elif permuted and kind == "attn_k":
                array = unpermute(array, config.num_kv_heads)
            # Linear weights [out, in] become kernels [in, out]; norms and biases are 1-D.
            per_layer.setdefault(target, {})[int(match.group(1))] = (
                np.ascontiguousarray(array.T) if array.ndim == 2 else array)
        elif name == "token_embd.weight":
            mapped[("embed",)] = dequantize(tensor)
        elif name == "output_norm.weight":
            mapped[("final_norm",)] = dequantize(tensor)
        elif name == "output.weight":
            mapped[("lm_head",)] = np.ascontiguousarray(dequantize(tensor).T)
        else:
            unknown.append(name)
    problems = []
    if unknown:
        problems.append("tensors this loader does not know: " + ", ".join(unknown[:8]))
    for target, layers in per_layer.items():
        if sorted(layers) != list(range(config.num_layers)):
            problems.append(f"{target} has layers {sorted(layers)}, expected 0..{config.num_layers - 1}")
            continue
        mapped[("layers", target)] = np.stack([layers[i] for i in range(config.num_layers)])
    for target, shape in expected_shapes(config).items():
        if target not in mapped:
            if target[0] != "layers" or target[1] not in per_layer:
                problems.append(f"missing {'.'.join(target)}")
        elif tuple(mapped[target].shape) != tuple(shape):
            problems.append(f"{'.'.join(target)} has shape {tuple(mapped[target].shape)}, expected {tuple(shape)}")
    if problems:
        raise hf.CheckpointError("GGUF file does not fit a Llama decoder: " + "; ".join(problems))
    return mapped


def _byte_level_backend(reader, tokens: list[str]):
    """The `tokenizers` backend of a byte-level BPE file ("gpt2": SmolLM2, Llama 3): vocabulary, merges,
    the split `tokenizer.ggml.pre` names, control tokens special, user-defined ones added."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers

    pre = metadata(reader, "tokenizer.ggml.pre", "gpt-2")
    if pre not in PRE_TOKENIZERS:
        raise hf.CheckpointError(f"GGUF pre-tokenizer {pre!r} is not supported ({', '.join(PRE_TOKENIZERS)}): use "
                                 f"the Hugging Face checkpoint (tokenizer.json) instead")
    merges = [tuple(str(merge).split(" ", 1)) for merge in metadata(reader, "tokenizer.ggml.merges", [])]
    types = [int(t) for t in metadata(reader, "tokenizer.ggml.token_type", [1] * len(tokens))]
    backend = Tokenizer(models.BPE(vocab={token: index for index, token in enumerate(tokens)}, merges=merges,
                                   fuse_unk=False, byte_fallback=False))
    split = PRE_TOKENIZERS[pre]
    if split in ("digits", "gpt-2"):
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                                 if split == "digits" else byte_level)
    else:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    if pre == "qwen2":
        backend.normalizer = normalizers.NFC()  # Qwen2's tokenizer.json composes characters first
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                                for i, t in enumerate(types) if t == TOKEN_CONTROL])
    backend.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                        for i, t in enumerate(types) if t == TOKEN_USER_DEFINED])
    return backend


def _sentencepiece_backend(reader):
    """The `tokenizers` backend of a SentencePiece file ("llama": Llama 2, Mistral), built by
    transformers' GGUF tokenizer conversion from this reader's metadata (transformers' own GGUF reader
    needs torch): merges recovered from the token scores, byte fallback, the "\u2581" word boundary."""
    try:
        from transformers.integrations.gguf.gguf_tokenizer_mapping import (GGUF_TOKENIZER_MAPPING,
                                                                           convert_gguf_tokenizer)
    except ImportError as error:
        raise hf.CheckpointError(f"this transformers cannot rebuild a SentencePiece GGUF tokenizer ({error}): use the "
                                 f"Hugging Face checkpoint with model.name=hf") from error
    values = {name: metadata(reader, f"tokenizer.{key}") for key, name in GGUF_TOKENIZER_MAPPING["tokenizer"].items()}
    return convert_gguf_tokenizer(metadata(reader, "general.architecture"),
                                  {name: value for name, value in values.items() if value is not None})[0]


def tokenizer_from_metadata(reader):
    """A transformers PreTrainedTokenizerFast rebuilt from the `tokenizer.ggml.*` metadata.

    Byte-level BPE ("gpt2" model) with the "smollm" (digits split one by one), "gpt-2", Llama 3's
    "llama-bpe" or Qwen2's "qwen2" pre-tokenizer, built here; SentencePiece ("llama" model: Llama 2, Mistral) through
    transformers' GGUF conversion. bos/eos/unk/pad come from the metadata ids;
    BOS is prepended where `tokenizer.ggml.add_bos_token` says (SentencePiece files: by default).
    """
    from tokenizers import processors
    from transformers import PreTrainedTokenizerFast

    kind = metadata(reader, "tokenizer.ggml.model")
    tokens = [str(token) for token in metadata(reader, "tokenizer.ggml.tokens")]
    if kind == "gpt2":
        backend, add_bos = _byte_level_backend(reader, tokens), metadata(reader, "tokenizer.ggml.add_bos_token", False)
    elif kind == "llama":
        backend, add_bos = _sentencepiece_backend(reader), metadata(reader, "tokenizer.ggml.add_bos_token", True)
    else:
        raise hf.CheckpointError(f"GGUF tokenizer model {kind!r} is not supported: byte-level BPE ('gpt2': Llama 3, "
                                 f"SmolLM2) and SentencePiece ('llama': Llama 2, Mistral) are; use the Hugging Face "
                                 f"checkpoint with model.name=hf")

    def token(key: str) -> Optional[str]:
        index = metadata(reader, key)
        return tokens[int(index)] if index is not None and 0 <= int(index) < len(tokens) else None

    bos, eos = token("tokenizer.ggml.bos_token_id"), token("tokenizer.ggml.eos_token_id")
    if add_bos and bos is not None:
        bos_id = tokens.index(bos)
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B:1", special_tokens=[(bos, bos_id)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=bos, eos_token=eos,
                                        unk_token=token("tokenizer.ggml.unknown_token_id"),
                                        pad_token=token("tokenizer.ggml.padding_token_id") or eos)
    template = metadata(reader, "tokenizer.chat_template")
    if template:
        tokenizer.chat_template = str(template)
    return tokenizer


def open_reader(path: str):
    """The `gguf` package's reader for `path`; a missing or unreadable file is a CheckpointError."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise hf.CheckpointError(f"GGUF file {path} does not exist: run `jaxtree-lora assets` or fix model.path")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # the reader raises ValueError, struct errors, ... for a bad file
        raise hf.CheckpointError(f"{path} is not a readable GGUF file ({error})") from error


def load_gguf(path: str, dtype=None) -> tuple[LlamaDecoder, Any]:
    """(LlamaDecoder, tokenizer) from a Llama-architecture GGUF file; weights dequantised to `dtype`
    (float32 by default)."""
    import jax.numpy as jnp

    reader = open_reader(path)
    config = config_from_metadata(reader)
    model = from_arrays(config, map_tensors(reader, config), dtype or jnp.float32)
    return model, tokenizer_from_metadata(reader)
