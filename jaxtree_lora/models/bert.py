"""A BERT-style encoder in Flax NNX (post-LayerNorm blocks), e.g. all-MiniLM-L6-v2.

Per-layer weights are stacked and the blocks run under `jax.lax.scan` (common.scan_layers); kernels
are [d_in, d_out]. LoRA sites: "attn.query", "attn.key", "attn.value", "attn.output",
"mlp.intermediate", "mlp.output". With `segment_ids` (packed batches) a token attends only within
its segment and each example pools over its own.

    model, tokenizer = load_hf(directory)                           # config.json + safetensors
    pooled = model.features(input_ids, attention_mask)              # [batch, hidden], mean pooling

Only absolute-position BERT checkpoints are read: RoBERTa-family ones are refused rather than run
wrongly (their position ids skip padding). Pure use and site shapes: docs/MODELS.md.
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxtree_lora.models import hf
from jaxtree_lora.models.common import DeltaFn, Site, attention, dense, gelu_exact, layer_norm, scan_layers
from jaxtree_lora.models.stacked import Stacked

SITES = ("attn.query", "attn.key", "attn.value", "attn.output", "mlp.intermediate", "mlp.output")
POOLINGS = ("mean", "cls")
ACTIVATIONS = ("gelu", "gelu_new")

# Our site -> the Hugging Face / PEFT module name inside "encoder.layer.{i}.".
HF_MODULES = {"attn.query": "attention.self.query", "attn.key": "attention.self.key",
              "attn.value": "attention.self.value", "attn.output": "attention.output.dense",
              "mlp.intermediate": "intermediate.dense", "mlp.output": "output.dense"}
# Stacked parameter name of each site's kernel (its bias is the same name + "_bias").
SITE_KERNELS = {"attn.query": "query", "attn.key": "key", "attn.value": "value", "attn.output": "attn_out",
                "mlp.intermediate": "intermediate", "mlp.output": "output"}


@dataclasses.dataclass(frozen=True)
class BertConfig:
    """Shape and behaviour of a BERT-style encoder (defaults: all-MiniLM-L6-v2).

    hidden_act: "gelu" is the exact erf GELU of HF BERT; "gelu_new" the tanh approximation.
    pooling: what `features` returns: "mean" over real tokens (sentence-transformers) or "cls".
    remat: rematerialise each scanned block in the backward pass (memory for compute).
    """

    vocab_size: int = 30522
    hidden_size: int = 384
    intermediate_size: int = 1536
    num_layers: int = 6
    num_heads: int = 12
    max_position: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    pooling: str = "mean"
    remat: bool = False

    def __post_init__(self):
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}: "
                             "choose num_heads that divides hidden_size")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"hidden_act {self.hidden_act!r} is not supported: use one of {', '.join(ACTIVATIONS)}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling {self.pooling!r} is not supported: use one of {', '.join(POOLINGS)}")

    @classmethod
    def from_hf(cls, config) -> "BertConfig":
        """From a transformers BertConfig (as `hf.read_config` returns it)."""
        model_type = getattr(config, "model_type", None)
        if model_type != "bert":
            raise hf.CheckpointError(
                f"model_type {model_type!r} is not a BERT-style encoder this loader reads (model_type 'bert'): "
                "point model.path to a BERT checkpoint or choose the matching model.kind")
        if getattr(config, "position_embedding_type", "absolute") != "absolute":
            raise hf.CheckpointError(f"position_embedding_type {config.position_embedding_type!r} is not supported: "
                                     "only absolute position embeddings are implemented")
        activations = {"gelu": "gelu", "gelu_new": "gelu_new", "gelu_pytorch_tanh": "gelu_new"}
        if config.hidden_act not in activations:
            raise hf.CheckpointError(f"hidden_act {config.hidden_act!r} is not supported: "
                                     f"supported are {', '.join(activations)}")
        return hf.make_config(cls, vocab_size=config.vocab_size, hidden_size=config.hidden_size,
                              intermediate_size=config.intermediate_size, num_layers=config.num_hidden_layers,
                              num_heads=config.num_attention_heads, max_position=config.max_position_embeddings,
                              type_vocab_size=config.type_vocab_size, layer_norm_eps=config.layer_norm_eps,
                              hidden_act=activations[config.hidden_act])


def gelu(x, kind: str):
    """Exact (erf) GELU for "gelu" (common.gelu_exact: its backward keeps only x), the tanh
    approximation for "gelu_new"."""
    return gelu_exact(x) if kind == "gelu" else jax.nn.gelu(x, approximate=True)


def layer_shapes(config: BertConfig) -> dict:
    """Stacked per-layer parameter shapes, each with the leading num_layers axis."""
    h, f, n = config.hidden_size, config.intermediate_size, config.num_layers
    return {
        "query": (n, h, h), "query_bias": (n, h), "key": (n, h, h), "key_bias": (n, h),
        "value": (n, h, h), "value_bias": (n, h), "attn_out": (n, h, h), "attn_out_bias": (n, h),
        "attn_norm": (n, h), "attn_norm_bias": (n, h),
        "intermediate": (n, h, f), "intermediate_bias": (n, f), "output": (n, f, h), "output_bias": (n, h),
        "out_norm": (n, h), "out_norm_bias": (n, h),
    }


def encoder_block(x, p, hook, key_mask, num_heads: int, eps: float, act: str):
    """One post-LN BERT block.

    x: [batch, seq, hidden]; key_mask: [batch, 1, 1, seq] bool, True for real keys;
    p: this layer's weights (kernels [d_in, d_out]); hook: the layer's SiteHook.
    """
    batch, seq, hidden = x.shape
    head_dim = hidden // num_heads
    dtype = x.dtype

    def project(site, inputs):
        name = SITE_KERNELS[site]
        y = dense(inputs, p[name]) + p[name + "_bias"].astype(dtype)
        return hook(site, inputs, y)

    q = project("attn.query", x).reshape(batch, seq, num_heads, head_dim)
    k = project("attn.key", x).reshape(batch, seq, num_heads, head_dim)
    v = project("attn.value", x).reshape(batch, seq, num_heads, head_dim)
    context = attention(q, k, v, key_mask).reshape(batch, seq, hidden)
    attended = project("attn.output", context)
    x = layer_norm(attended + x, p["attn_norm"], p["attn_norm_bias"], eps)
    inner = gelu(project("mlp.intermediate", x), act)
    out = project("mlp.output", inner)
    return layer_norm(out + x, p["out_norm"], p["out_norm_bias"], eps)


class BertEncoder(nnx.Module):
    """Embeddings (word + position + token type, LayerNorm) and `num_layers` stacked post-LN blocks."""

    def __init__(self, config: BertConfig, *, rngs: nnx.Rngs, param_dtype=jnp.float32):
        self.config = config
        h = config.hidden_size
        normal = nnx.initializers.normal(0.02)
        key = rngs.params()
        self.word_embeddings = nnx.Param(normal(jax.random.fold_in(key, 0), (config.vocab_size, h), param_dtype))
        self.position_embeddings = nnx.Param(normal(jax.random.fold_in(key, 1), (config.max_position, h), param_dtype))
        self.type_embeddings = nnx.Param(normal(jax.random.fold_in(key, 2), (config.type_vocab_size, h), param_dtype))
        self.embed_norm = nnx.Param(jnp.ones((h,), param_dtype))
        self.embed_norm_bias = nnx.Param(jnp.zeros((h,), param_dtype))
        self.layers = Stacked(layer_shapes(config), jax.random.fold_in(key, 3), param_dtype,
                              ones=("attn_norm", "out_norm"))

    @property
    def feature_dim(self) -> int:
        """Width of `features`: hidden_size."""
        return self.config.hidden_size

    def lora_sites(self) -> dict[str, Site]:
        h, f = self.config.hidden_size, self.config.intermediate_size
        return {"attn.query": Site(h, h), "attn.key": Site(h, h), "attn.value": Site(h, h),
                "attn.output": Site(h, h), "mlp.intermediate": Site(h, f), "mlp.output": Site(f, h)}

    @staticmethod
    def site_kernel(site: str) -> str:
        """The stacked kernel of a site in `layers`, e.g. "attn.output" -> "attn_out"."""
        return SITE_KERNELS[site]

    @staticmethod
    def hf_module_path(site: str, layer: int) -> str:
        """PEFT/HF module name of a site in one layer, e.g. "encoder.layer.3.attention.self.query"."""
        if site not in HF_MODULES:
            raise ValueError(f"unknown BERT site {site!r}: choose one of {', '.join(HF_MODULES)}")
        return f"encoder.layer.{layer}.{HF_MODULES[site]}"

    def __call__(self, input_ids, attention_mask=None, token_type_ids=None, *, adapters=None,
                 delta: Optional[DeltaFn] = None, rng=None, compute_dtype=None, position_ids=None,
                 segment_ids=None):
        """Hidden states [batch, seq, hidden] after the last block.

        input_ids: [batch, seq] int; attention_mask: [batch, seq], 1 for real tokens, 0 for padding
        (default all ones); token_type_ids: [batch, seq] (default zeros).
        Packed rows (`data.packing`): position_ids [batch, seq] (each token's position in its own text)
        and segment_ids [batch, seq] (which text a token belongs to, 0 for padding): a token attends
        only to the real tokens of its own segment.
        adapters: {site: pytree with leading num_layers axis}; delta: the method's delta function;
        rng: key for adapter dropout (None: deterministic); compute_dtype: activation dtype
        (default: the parameters' dtype; LayerNorm and softmax stay float32 inside).
        """
        config = self.config
        dtype = compute_dtype or self.word_embeddings[...].dtype
        batch, seq = input_ids.shape
        if seq > config.max_position and position_ids is None:  # packed rows: positions restart per text
            raise ValueError(f"sequence length {seq} exceeds the encoder's {config.max_position} positions: "
                             f"truncate inputs to at most {config.max_position} tokens")
        if attention_mask is None:
            attention_mask = jnp.ones((batch, seq), jnp.int32)
        if token_type_ids is None:
            token_type_ids = jnp.zeros((batch, seq), jnp.int32)
        positions = (self.position_embeddings[...][:seq][None] if position_ids is None
                     else self.position_embeddings[...][position_ids])
        x = self.word_embeddings[...][input_ids] + positions + self.type_embeddings[...][token_type_ids]
        x = layer_norm(x, self.embed_norm[...], self.embed_norm_bias[...], config.layer_norm_eps).astype(dtype)
        if segment_ids is None:
            key_mask = attention_mask[:, None, None, :] > 0  # [batch, 1, 1, seq]: padding keys are never attended
        else:  # [batch, 1, seq, seq]: the real keys of the query's own segment
            key_mask = ((segment_ids[:, None, :, None] == segment_ids[:, None, None, :])
                        & (attention_mask[:, None, None, :] > 0))

        def body(carry, params_l, hook):
            return encoder_block(carry, params_l, hook, key_mask, config.num_heads, config.layer_norm_eps,
                                 config.hidden_act), None

        x, _ = scan_layers(body, x, self.layers.as_dict(), adapters, delta, rng, config.num_layers,
                           remat=config.remat)
        return x

    def features(self, input_ids, attention_mask=None, token_type_ids=None, examples=None, **kwargs):
        """Sentence features [batch, hidden] in float32.

        "mean" pooling averages the hidden states of real tokens (attention_mask 1), as
        sentence-transformers does for all-MiniLM-L6-v2 (without its final L2 normalisation);
        "cls" returns the first token's hidden state. kwargs go to `__call__`. Packed rows: `examples`
        [B] lists the segments (with kwargs position_ids and segment_ids), one feature row each: [B, hidden].
        """
        hidden = self(input_ids, attention_mask, token_type_ids, **kwargs).astype(jnp.float32)
        if examples is not None:
            segments = kwargs["segment_ids"]
            member = segments[None, :, :] == examples[:, None, None]  # [B, rows, seq]
            if self.config.pooling == "cls":
                member = member & (kwargs["position_ids"][None] == 0)
            weight = (member & (attention_mask[None] > 0)).astype(jnp.float32)
            total = jnp.einsum("brs,rsd->bd", weight, hidden)
            return total / jnp.maximum(jnp.sum(weight, axis=(1, 2))[:, None], 1e-9)
        if self.config.pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return jnp.mean(hidden, axis=1)
        mask = attention_mask[..., None].astype(jnp.float32)
        return jnp.sum(hidden * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)


def _linear(weight):
    return np.asarray(weight).T  # torch nn.Linear [out, in] -> kernel [in, out]


def _rules() -> list:
    rules = [
        hf.KeyRule(r"embeddings\.word_embeddings\.weight", ("word_embeddings",)),
        hf.KeyRule(r"embeddings\.position_embeddings\.weight", ("position_embeddings",)),
        hf.KeyRule(r"embeddings\.token_type_embeddings\.weight", ("type_embeddings",)),
        # Old TF-converted checkpoints name LayerNorm parameters gamma/beta.
        hf.KeyRule(r"embeddings\.LayerNorm\.(weight|gamma)", ("embed_norm",)),
        hf.KeyRule(r"embeddings\.LayerNorm\.(bias|beta)", ("embed_norm_bias",)),
    ]
    layer = r"encoder\.layer\.(?P<layer>\d+)\."
    for site, module in HF_MODULES.items():
        escaped = module.replace(".", r"\.")
        rules.append(hf.KeyRule(layer + escaped + r"\.weight", ("layers", SITE_KERNELS[site]), _linear))
        rules.append(hf.KeyRule(layer + escaped + r"\.bias", ("layers", SITE_KERNELS[site] + "_bias")))
    for module, ours in (("attention.output.LayerNorm", "attn_norm"), ("output.LayerNorm", "out_norm")):
        escaped = module.replace(".", r"\.")
        rules.append(hf.KeyRule(layer + escaped + r"\.(weight|gamma)", ("layers", ours)))
        rules.append(hf.KeyRule(layer + escaped + r"\.(bias|beta)", ("layers", ours + "_bias")))
    return rules


RULES = _rules()
# Known tensors this encoder does not use: buffers, the pooler, pre-training heads (cls.*) and the task
# heads of a fine-tuned BertFor{Sequence,Token}Classification / MultipleChoice (classifier.*) or
# BertForQuestionAnswering (qa_outputs.*).
IGNORED = (r"embeddings\.position_ids", r"embeddings\.token_type_ids", r"pooler\..*", r"cls\..*",
           r"classifier\..*", r"qa_outputs\..*")


def expected_shapes(config: BertConfig) -> dict:
    h = config.hidden_size
    shapes = {("word_embeddings",): (config.vocab_size, h), ("position_embeddings",): (config.max_position, h),
              ("type_embeddings",): (config.type_vocab_size, h), ("embed_norm",): (h,), ("embed_norm_bias",): (h,)}
    shapes.update({("layers", name): shape for name, shape in layer_shapes(config).items()})
    return shapes


def strip_prefix(tensors: dict) -> dict:
    """BertModel names as they are, and BertFor* names with their "bert." prefix removed."""
    return {(name[len("bert."):] if name.startswith("bert.") else name): value for name, value in tensors.items()}


def load_hf(directory: str, dtype=jnp.float32, pooling: str = "mean"):
    """(BertEncoder, tokenizer) from a Hugging Face BERT checkpoint directory.

    Reads config.json (hf.read_config), model.safetensors or sharded safetensors with
    model.safetensors.index.json (hf.read_tensors); tensor names with or without a "bert." prefix;
    the pooler, pre-training heads and task heads (a fine-tuned classifier) are ignored. Every shape
    is checked: a tensor that does not fit raises CheckpointError naming it. The tokenizer is
    transformers' AutoTokenizer from the same directory (local files only).
    """
    from transformers import AutoTokenizer

    config = dataclasses.replace(BertConfig.from_hf(hf.read_config(directory)), pooling=pooling)
    tensors = strip_prefix(hf.read_tensors(directory))
    mapped = hf.map_checkpoint(tensors, RULES, expected_shapes(config), config.num_layers, ignore=IGNORED)
    model = nnx.eval_shape(lambda: BertEncoder(config, rngs=nnx.Rngs(0), param_dtype=dtype))
    hf.assign(model, mapped, dtype)
    try:
        tokenizer = AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as error:  # transformers raises several types for missing tokenizer files
        raise hf.CheckpointError(f"cannot load a tokenizer from {directory}: {error}; "
                                 "add its tokenizer files (tokenizer.json or vocab.txt)") from error
    return model, tokenizer
