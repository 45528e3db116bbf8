"""Building a backbone from a config, and the pure functions the trainer calls on it.

`Backbone` bundles the NNX module split into a static graph definition and a frozen parameter
pytree, the tokenizer, and what a method may know (`ModelInfo`). The trainer never holds the module
itself inside jit: it calls `backbone.features(params, ...)` / `backbone.logits(params, ...)`, which
merge the graph with the parameters they are given, so the frozen weights flow in as an argument
(one copy, sharded, never differentiated) instead of being baked into the compiled program.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
from flax import nnx

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.methods.base import ModelInfo

KINDS = ("encoder", "decoder", "vit")


class BackboneError(ValueError):
    pass


@dataclasses.dataclass
class Backbone:
    name: str
    kind: str  # "encoder" | "decoder" | "vit"
    graphdef: Any
    params: Any
    tokenizer: Any
    info: ModelInfo
    hf_module_path: Callable[[str, int], str]
    compute_dtype: Any = None
    remat: bool = False
    hf_config: Any = None
    vocab_size: int = 0  # rows of the token embedding (0: not a text model)
    # site -> the name of its stacked kernel [num_layers, d_in, d_out] in the parameters' `layers`.
    site_kernel: Optional[Callable[[str], str]] = None

    def module(self, params=None):
        return nnx.merge(self.graphdef, self.params if params is None else params)

    def features(self, params, inputs: dict, *, adapters=None, delta=None, rng=None):
        """Pooled features [batch, feature_dim] (encoder: mean pooling; ViT: CLS)."""
        model = nnx.merge(self.graphdef, params)
        kwargs = dict(adapters=adapters, delta=delta, rng=rng, compute_dtype=self.compute_dtype)
        if self.kind == "vit":
            return model.features(inputs["images"], **kwargs)
        if "segment_ids" in inputs:  # packed rows (data.packing): one feature row per example
            kwargs.update(position_ids=inputs["position_ids"], segment_ids=inputs["segment_ids"],
                          examples=inputs["examples"])
        return model.features(inputs["input_ids"], inputs["attention_mask"], **kwargs)

    def logits(self, params, tokens, attention_mask, *, adapters=None, delta=None, rng=None, window=None):
        """Next-token logits [batch, seq, vocab] (decoder only); with `window` (static (start, stop))
        only at positions start..stop-1: [batch, stop - start, vocab]."""
        model = nnx.merge(self.graphdef, params)
        return model(tokens, attention_mask, adapters=adapters, delta=delta, rng=rng,
                     compute_dtype=self.compute_dtype, logits_window=window)


def _kernel_name(path) -> Optional[str]:
    """The name of a stacked per-layer weight from its path in the parameters ("layers", name, ...), else None."""
    if len(path) >= 2 and getattr(path[0], "key", None) == "layers":
        return getattr(path[1], "key", None)
    return None


def site_kernels(params, site_kernel: Callable[[str], str], sites) -> dict:
    """{site: its stacked kernel [num_layers, d_in, d_out]} for the given sites (arrays or abstract leaves)."""
    by_name = {site_kernel(site): site for site in sites}
    return {by_name[_kernel_name(path)]: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]
            if _kernel_name(path) in by_name}


def folds_slots(config, method, params, site_kernel: Optional[Callable[[str], str]], sites, compute_dtype) -> bool:
    """Whether a run folds the method's frozen past slots into the kernels (`Method.fold_past`): the method
    defines it, `train.fold_slots` is on, and the adapted kernels and the compute are float32 (in
    bfloat16, W + dW would round the small past update to W's precision, not its own). `sites` is a
    callable giving the adapted sites, asked only when the rest holds."""
    if getattr(method, "fold_past", None) is None or not config.train.get("fold_slots", True) or site_kernel is None:
        return False
    if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32:
        return False
    return all(jnp.dtype(leaf.dtype) == jnp.float32 for leaf in site_kernels(params, site_kernel, sites()).values())


def merge_into_kernels(params, site_kernel: Callable[[str], str], adapters: dict):
    """`params` with each adapter of `adapters` ({site: {"a": [L, r, d_in], "b": [L, d_out, r]}}, its scale
    already in B) merged into its site's stacked kernel (`lora.merge`: the sum in float32, stored in the
    kernel's dtype); every other leaf is returned as it is (the same array). Pure: folds frozen LoRA
    slots into the kernels they adapt (`Method.fold_past`)."""
    by_name = {site_kernel(site): adapter for site, adapter in adapters.items()}

    def merge(path, leaf):
        adapter = by_name.get(_kernel_name(path))
        return leaf if adapter is None else lora_lib.merge(leaf, adapter, 1.0)

    return jax.tree_util.tree_map_with_path(merge, params)


def _finish(name, kind, module, tokenizer, compute_dtype, remat, hf_config=None) -> Backbone:
    if remat and hasattr(module.config, "remat"):
        # Rematerialise each scanned block in the backward pass (model.remat in the config).
        module.config = dataclasses.replace(module.config, remat=True)
    graphdef, params = nnx.split(module)
    sites = module.lora_sites()
    num_layers = module.config.num_layers
    feature_dim = getattr(module, "feature_dim", None) or module.config.hidden_size
    info = ModelInfo(sites=sites, num_layers=num_layers, feature_dim=feature_dim)
    vocab_size = int(getattr(module.config, "vocab_size", 0) or 0) if kind != "vit" else 0
    if tokenizer is not None and vocab_size and len(tokenizer) > vocab_size:
        raise BackboneError(f"the tokenizer has {len(tokenizer)} tokens but the model's embedding has {vocab_size} "
                            f"rows: it belongs to another model; put the checkpoint's own tokenizer files beside it")
    return Backbone(name=name, kind=kind, graphdef=graphdef, params=params, tokenizer=tokenizer, info=info,
                    hf_module_path=module.hf_module_path, compute_dtype=compute_dtype, remat=remat,
                    hf_config=hf_config, vocab_size=vocab_size, site_kernel=module.site_kernel)


def _dtype(name: Optional[str]):
    if name in (None, "", "float32"):
        return None if name is None else jnp.float32
    if name == "bfloat16":
        return jnp.bfloat16
    raise BackboneError(f"unknown dtype {name!r}: use float32 or bfloat16")


def build(config) -> Backbone:
    """Builds the backbone named by `config` (an ml_collections ConfigDict, `config.model`).

    model.name:
      "minilm"     all-MiniLM-L6-v2 from the offline asset (encoder)
      "smollm2"    SmolLM2-135M-Instruct Q4_1 GGUF from the offline asset (decoder)
      "dinov2_small"  DINOv2 ViT-S/14 from the offline asset (vit; data.image_size, a multiple of 14, default 224)
      "hf"         a Hugging Face checkpoint directory at model.path (model.kind says which family; a
                   config.json with model_type "dinov2" is read as DINOv2 under kind "vit" or "dinov2")
      "gguf"       a GGUF file at model.path (Llama family)
      "tiny-bert" | "tiny-llama" | "tiny-vit"   random weights with the shapes in model.tiny (tests, benchmarks)
    """
    model_config = config.model
    name = model_config.name
    compute_dtype = _dtype(model_config.get("compute_dtype", None))
    remat = bool(model_config.get("remat", False))
    seed = int(config.get("seed", 0))
    if name == "minilm":
        from jaxtree_lora import assets
        from jaxtree_lora.models import bert

        module, tokenizer = bert.load_hf(str(assets.ensure("minilm")))
        return _finish(name, "encoder", module, tokenizer, compute_dtype, remat)
    if name == "smollm2":
        from jaxtree_lora import assets
        from jaxtree_lora.models import gguf

        module, tokenizer = gguf.load_gguf(str(assets.ensure("smollm2")))
        return _finish(name, "decoder", module, tokenizer, compute_dtype, remat)
    if name == "dinov2_small":
        from jaxtree_lora import assets
        from jaxtree_lora.models import dinov2

        image_size = _dinov2_image_size(config)
        module = dinov2.load_onnx(str(assets.ensure("dinov2_small")), image_size=image_size)
        return _finish(name, "vit", module, None, compute_dtype, remat)
    if name in ("hf", "gguf"):
        path = model_config.get("path", "")
        if not path or not os.path.exists(path):
            raise BackboneError(f"model.path {path!r} does not exist: set --config.model.path to a checkpoint "
                                f"{'directory' if name == 'hf' else 'file'}")
        kind = model_config.get("kind", "decoder")
        if name == "gguf":
            from jaxtree_lora.models import gguf

            module, tokenizer = gguf.load_gguf(path)
            return _finish(name, "decoder", module, tokenizer, compute_dtype, remat)
        if kind == "decoder":
            from jaxtree_lora.models import llama

            module, tokenizer = llama.load_hf(path)
        elif kind == "encoder":
            from jaxtree_lora.models import bert

            module, tokenizer = bert.load_hf(path)
        elif kind in ("vit", "dinov2"):
            from jaxtree_lora.models import dinov2, vit

            if kind == "dinov2" or dinov2.is_dinov2_directory(path):
                image_size = _dinov2_image_size(config, dinov2.directory_patch_size(path))
                module = dinov2.load_hf(path, image_size=image_size)
            else:
                image_size = config.get("data", {}).get("image_size", None)
                module = vit.load_hf(path, image_size=int(image_size) if image_size else None)
            kind, tokenizer = "vit", None
        else:
            raise BackboneError(f"unknown model.kind {kind!r}: choose one of {', '.join(KINDS)} "
                                "(or dinov2 with model.name hf)")
        return _finish(name, kind, module, tokenizer, compute_dtype, remat)
    if name.startswith("tiny-"):
        return build_tiny(name, dict(model_config.get("tiny", {})), seed, compute_dtype, remat)
    raise BackboneError(f"unknown model.name {name!r}: choose minilm, smollm2, dinov2_small, hf, gguf, tiny-bert, "
                        "tiny-llama or tiny-vit")


def _dinov2_image_size(config, patch_size: int = 14) -> int:
    """data.image_size for a DINOv2 backbone (default 224), refused unless a positive multiple of the patch."""
    from jaxtree_lora.models import dinov2

    image_size = config.get("data", {}).get("image_size", None) or dinov2.DEFAULT_IMAGE_SIZE
    problem = dinov2.image_size_error(image_size, patch_size, label="data.image_size")
    if problem:
        raise BackboneError(problem)
    return int(image_size)


def build_tiny(name: str, shape: dict, seed: int = 0, compute_dtype=None, remat=False) -> Backbone:
    """Random-weight backbones for tests and shape-level benchmarks (never for reported accuracy)."""
    rngs = nnx.Rngs(seed)
    if name == "tiny-bert":
        from jaxtree_lora.models import bert

        cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   max_position=64, type_vocab_size=2)
        cfg.update(shape)
        module = bert.BertEncoder(bert.BertConfig(**cfg), rngs=rngs)
        return _finish(name, "encoder", module, None, compute_dtype, remat)
    if name == "tiny-llama":
        from jaxtree_lora.models import llama

        cfg = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, max_position=128)
        cfg.update(shape)
        module = llama.LlamaDecoder(llama.LlamaConfig(**cfg), rngs=rngs)
        return _finish(name, "decoder", module, None, compute_dtype, remat)
    if name == "tiny-vit":
        from jaxtree_lora.models import vit

        cfg = dict(image_size=16, patch_size=4, num_channels=3, hidden_size=32, intermediate_size=64,
                   num_layers=2, num_heads=4)
        cfg.update(shape)
        module = vit.ViT(vit.ViTConfig(**cfg), rngs=rngs)
        return _finish(name, "vit", module, None, compute_dtype, remat)
    raise BackboneError(f"unknown tiny backbone {name!r}: tiny-bert, tiny-llama or tiny-vit")


def abstract_module(config) -> tuple[Any, str]:
    """(module with ShapeDtypeStruct parameters, kind) for `config.model`, reading configs only: an HF
    directory needs just its config.json, a GGUF file just its header. For planning (train.memory)."""
    model_config = config.model
    name = model_config.name
    if name.startswith("tiny-"):
        built = nnx.eval_shape(lambda: build_tiny(name, dict(model_config.get("tiny", {}))).module())
        return built, {"tiny-bert": "encoder", "tiny-llama": "decoder", "tiny-vit": "vit"}[name]
    from jaxtree_lora.models import bert, dinov2, hf, llama, vit

    if name == "dinov2_small":  # the asset's shape is known: no need to read the file
        cfg = dataclasses.replace(dinov2.SMALL, image_size=_dinov2_image_size(config))
        return nnx.eval_shape(lambda: vit.ViT(cfg, rngs=nnx.Rngs(0))), "vit"

    if name in ("minilm", "smollm2"):
        from jaxtree_lora import assets

        path = str(assets.ensure(name))
        name, kind = ("hf", "encoder") if name == "minilm" else ("gguf", "decoder")
    else:
        path, kind = model_config.get("path", ""), model_config.get("kind", "decoder")
        if name not in ("hf", "gguf"):
            raise BackboneError(f"unknown model.name {name!r}: choose minilm, smollm2, dinov2_small, hf, gguf "
                                "or tiny-*")
        if not path or not os.path.exists(path):
            raise BackboneError(f"model.path {path!r} does not exist: set --config.model.path to a checkpoint "
                                f"{'directory (its config.json is enough to plan)' if name == 'hf' else 'file'}")
    rngs = lambda: nnx.Rngs(0)  # noqa: E731
    if name == "gguf":
        from jaxtree_lora.models.gguf import config_from_metadata, open_reader

        cfg = config_from_metadata(open_reader(path))
        return nnx.eval_shape(lambda: llama.LlamaDecoder(dataclasses.replace(cfg, param_dtype=jnp.float32),
                                                         rngs=rngs())), "decoder"
    hf_config = hf.read_config(path)
    if kind == "decoder":
        cfg = dataclasses.replace(llama.LlamaConfig.from_hf(hf_config), param_dtype=jnp.float32)
        return nnx.eval_shape(lambda: llama.LlamaDecoder(cfg, rngs=rngs())), kind
    if kind == "encoder":
        return nnx.eval_shape(lambda: bert.BertEncoder(bert.BertConfig.from_hf(hf_config), rngs=rngs())), kind
    if kind == "dinov2" and getattr(hf_config, "model_type", None) != "dinov2":
        raise BackboneError(f"model.kind dinov2 but {path}/config.json has model_type "
                            f"{getattr(hf_config, 'model_type', None)!r}: set model.kind to the checkpoint's family")
    if kind == "dinov2" or (kind == "vit" and getattr(hf_config, "model_type", None) == "dinov2"):
        cfg = hf.make_config(vit.ViTConfig, **{
            **dataclasses.asdict(dinov2.SMALL), "image_size": _dinov2_image_size(config, hf_config.patch_size),
            "patch_size": hf_config.patch_size, "hidden_size": hf_config.hidden_size,
            "intermediate_size": int(hf_config.hidden_size * hf_config.mlp_ratio),
            "num_layers": hf_config.num_hidden_layers, "num_heads": hf_config.num_attention_heads})
        return nnx.eval_shape(lambda: vit.ViT(cfg, rngs=rngs())), "vit"
    if kind == "vit":
        cfg = vit.ViTConfig.from_hf(hf_config)
        image_size = config.get("data", {}).get("image_size", None)
        if image_size:
            cfg = vit.with_image_size(cfg, int(image_size))
        return nnx.eval_shape(lambda: vit.ViT(cfg, rngs=rngs())), kind
    raise BackboneError(f"unknown model.kind {kind!r}: choose one of {', '.join(KINDS)} "
                        "(or dinov2 with model.name hf)")

