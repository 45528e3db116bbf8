"""LoRA as data: a spec, adapter pytrees, and pure functions over them.

A LoRA adapter on a frozen projection `y = x W` (kernel `W: [d_in, d_out]`) adds
`dy = scale * (dropout(x) A^T) B^T` with `A: [r, d_in]`, `B: [d_out, r]`, `scale = alpha / r`, in
PEFT's `lora_A` / `lora_B` layouts (export is a transpose-free copy). Adapters are stacked over
layers, `{"attn.q_proj": {"a": [num_layers, r, d_in], "b": [num_layers, d_out, r]}, ...}`.
Nothing here is a module: `init` builds the pytree, `apply` is the delta hook, `merge` and
`unmerge` fold an adapter into (or out of) a stacked kernel, `export_peft` writes PyTorch-loadable
files. More in docs/MODELS.md.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import json
import math
import os
from typing import Any, Callable, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend.random import threefry_2x32

from jaxtree_lora import keys
from jaxtree_lora import threefry  # noqa: F401  (the unrolled CPU lowering: same bits, faster masks)
from jaxtree_lora.models.common import Site

Array = jax.Array
PyTree = Any

INITS = ("kaiming_uniform", "gaussian", "orthogonal", "zeros")

# Attention projections by role, so a method's default spec ("q and v", "k and v") names the same
# projections in every backbone: Llama calls them q_proj/k_proj/v_proj/o_proj, BERT and ViT
# query/key/value/output. A target that is a role selects whichever of its sites the backbone has.
ROLES = {
    "q": ("attn.q_proj", "attn.query"),
    "k": ("attn.k_proj", "attn.key"),
    "v": ("attn.v_proj", "attn.value"),
    "o": ("attn.o_proj", "attn.output"),
}


class LoraSpecError(ValueError):
    """A LoRA spec that cannot be applied to a backbone (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Where and how LoRA is attached.

    Attributes:
      targets: fnmatch patterns over site names (`"attn.q_proj"`, `"*.v_proj"`, `"mlp.*"`), or attention
        roles (`"q"`, `"k"`, `"v"`, `"o"`: the query/key/value/output projection under the backbone's name).
      rank: r, the inner dimension.
      alpha: scale numerator; the delta is multiplied by `alpha / rank`.
      dropout: dropout rate on the adapter's input (PEFT's `lora_dropout`).
      init: initialisation of A: `kaiming_uniform` (PEFT/official TreeLoRA default, U(+-1/sqrt(d_in))),
        `gaussian` (normal with std 1/r), `orthogonal` (rows orthonormal), or `zeros`. B always starts at 0.
      max_modules: keep only the first `max_modules` (layer, site) modules in layer-major order
        (layer0.q, layer0.v, layer1.q, ...), as the official TreeLoRA's `--lora_depth`; -1 keeps all.
    """

    targets: tuple[str, ...] = ("q", "v")
    rank: int = 8
    alpha: float = 32.0
    dropout: float = 0.0
    init: str = "kaiming_uniform"
    max_modules: int = -1

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, (int, np.integer)):
            raise LoraSpecError(f"lora rank must be an integer, got {self.rank!r}: set --config.lora.rank=8")
        if isinstance(self.max_modules, bool) or not isinstance(self.max_modules, (int, np.integer)) \
                or self.max_modules < -1:
            raise LoraSpecError(f"lora max_modules must be an integer >= -1 (-1 keeps all), got {self.max_modules!r}")
        if self.rank < 1:
            raise LoraSpecError(f"lora rank must be >= 1, got {self.rank}: set --config.lora.rank to a positive integer")
        if not 0.0 <= self.dropout < 1.0:
            raise LoraSpecError(f"lora dropout must be in [0, 1), got {self.dropout}")
        if self.init not in INITS:
            raise LoraSpecError(f"unknown lora init {self.init!r}: choose one of {', '.join(INITS)}")
        if not self.targets:
            raise LoraSpecError("lora targets are empty: name at least one site, e.g. 'attn.q_proj'")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def select(self, sites: Mapping[str, Site]) -> dict[str, Site]:
        """The sites this spec targets, in the backbone's order. Raises if a pattern matches nothing."""
        chosen = {}
        for pattern in self.targets:
            matches = [name for name in sites if fnmatch.fnmatchcase(name, pattern)]
            if not matches and pattern in ROLES:
                matches = [name for name in sites if name in ROLES[pattern]]
            if not matches:
                raise LoraSpecError(
                    f"lora target {pattern!r} matches no site of this backbone; its sites are: "
                    + ", ".join(sites))
            for name in matches:
                chosen[name] = sites[name]
        return {name: sites[name] for name in sites if name in chosen}

    def layer_mask(self, sites: Mapping[str, Site], num_layers: int) -> dict[str, np.ndarray]:
        """Per chosen site, a float32 [num_layers] mask: 1 where the module carries an adapter."""
        chosen = list(self.select(sites))
        masks = {name: np.ones((num_layers,), np.float32) for name in chosen}
        if self.max_modules >= 0:
            order = [(layer, name) for layer in range(num_layers) for name in chosen]
            for index, (layer, name) in enumerate(order):
                if index >= self.max_modules:
                    masks[name][layer] = 0.0
        return masks


def init_a(key: Array, shape: Sequence[int], init: str, dtype=jnp.float32) -> Array:
    """Initial A of shape [..., r, d_in]."""
    r, d_in = shape[-2], shape[-1]
    if init == "kaiming_uniform":
        # torch's kaiming_uniform_(a=sqrt(5)) on an [r, d_in] weight: bound = 1/sqrt(d_in).
        bound = 1.0 / math.sqrt(d_in)
        return jax.random.uniform(key, shape, dtype, -bound, bound)
    if init == "gaussian":
        return (keys.settled(jax.random.normal(key, shape, jnp.float32)) / r).astype(dtype)
    if init == "orthogonal":
        if r <= d_in:  # rows orthonormal: A A^T = I_r
            q, _ = jnp.linalg.qr(jax.random.normal(key, (*shape[:-2], d_in, r), jnp.float32))
            return jnp.swapaxes(q, -1, -2).astype(dtype)
        # r > d_in: r orthonormal rows cannot exist; the columns are orthonormal instead (A^T A = I).
        q, _ = jnp.linalg.qr(jax.random.normal(key, (*shape[:-2], r, d_in), jnp.float32))
        return q.astype(dtype)
    if init == "zeros":
        return jnp.zeros(shape, dtype)
    raise LoraSpecError(f"unknown lora init {init!r}")


def init(key: Array, spec: LoraSpec, sites: Mapping[str, Site], num_layers: int,
         dtype=jnp.float32, leading: Sequence[int] = ()) -> dict[str, dict[str, Array]]:
    """A fresh adapter pytree for the sites `spec` selects.

    Returns `{site: {"a": [num_layers, *leading, r, d_in], "b": [num_layers, *leading, d_out, r]}}`.
    `leading` adds axes after the layer axis (for example `(max_tasks,)` for per-task stacks).
    Modules that `max_modules` leaves out get A = 0, so they carry nothing.
    """
    chosen = spec.select(sites)
    masks = spec.layer_mask(sites, num_layers)
    adapters = {}
    for index, (name, site) in enumerate(chosen.items()):
        shape = (num_layers, *leading, spec.rank, site.d_in)
        a = init_a(jax.random.fold_in(key, index), shape, spec.init, dtype)
        mask = jax.device_put(np.asarray(masks[name]).reshape((num_layers,) + (1,) * (a.ndim - 1)))
        adapters[name] = {
            "a": (a * mask).astype(dtype),
            "b": jnp.zeros((num_layers, *leading, site.d_out, spec.rank), dtype),
        }
    return adapters


DROPOUT_LEVELS = 1 << 16  # dropout draws one 16-bit number per entry: the rate is a multiple of 2^-16


def dropout_bits(key: Array, size: int) -> Array:
    """`size` independent uniform 16-bit numbers (as uint32) from `key`.

    A threefry2x32 evaluation gives 64 random bits; `jax.random.bernoulli` (and `bits`) spend one
    evaluation per entry and keep 23 (or 32) of them. Here each evaluation gives four entries, so the
    masks of a train step cost a quarter of the hashing (the largest elementwise cost of a LoRA step
    with dropout on CPU). Keys of another PRNG implementation draw 32-bit words and split each in two.
    """
    words = -(-size // 2)
    typed = key if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else jax.random.wrap_key_data(key)
    if str(jax.random.key_impl(typed)) == "threefry2x32":
        bits = threefry_2x32(jax.random.key_data(typed), jax.lax.iota(jnp.uint32, words))
    else:
        bits = jax.random.bits(typed, (words,), jnp.uint32)
    return jnp.concatenate([bits & 0xFFFF, bits >> 16])[:size]


def dropout(x: Array, rate: float, key: Optional[Array]) -> Array:
    """Inverted dropout; identity when `key` is None or the rate is 0.

    An entry is dropped when its 16-bit draw falls below round(rate * 2^16), so the rate is taken to
    the nearest multiple of 2^-16 (0.1 -> 0.100006); kept entries are scaled by the exact inverse of
    the keep probability, so the expectation of every entry is unchanged.
    """
    if key is None or rate == 0.0:
        return x
    threshold = min(max(int(round(rate * DROPOUT_LEVELS)), 1), DROPOUT_LEVELS - 1)
    keep = dropout_bits(key, x.size).reshape(x.shape) >= threshold
    return jnp.where(keep, x * (DROPOUT_LEVELS / (DROPOUT_LEVELS - threshold)), 0.0).astype(x.dtype)


def apply(adapter: Mapping[str, Array], x: Array, scale: float) -> Array:
    """The delta of one adapter at one layer: `scale * (x A^T) B^T`.

    adapter: {"a": [r, d_in], "b": [d_out, r]}; x: [..., d_in] -> [..., d_out].
    The rank-r path never forms the [d_in, d_out] product.
    """
    a, b = adapter["a"], adapter["b"]
    h = jnp.einsum("...i,ri->...r", x, a.astype(x.dtype))
    return scale * jnp.einsum("...r,or->...o", h, b.astype(x.dtype))


def apply_selected(adapter: Mapping[str, Array], x: Array, slots: Array, scale: float) -> Array:
    """`apply` with each token through its own slot of a slot stack: adapter {"a": [K, r, d_in],
    "b": [K, d_out, r]}, x: [..., d_in], slots: int, broadcastable to x's leading axes from the left
    ([B] per example of x [B, T, d_in], [B, T] per token of packed rows) -> [..., d_out].
    All K slots' rank products in one [K * r]-wide product, masked to each token's slot: no per-token
    copies of A and B (K * r stays small beside d_in)."""
    a, b = adapter["a"], adapter["b"]
    slots = jnp.reshape(slots, jnp.shape(slots) + (1,) * (x.ndim - 1 - jnp.ndim(slots)))
    h = jnp.einsum("...i,kri->...kr", x, a.astype(x.dtype))
    h = h * (slots[..., None] == jnp.arange(a.shape[0]))[..., None].astype(x.dtype)
    return scale * jnp.einsum("...kr,kor->...o", h, b.astype(x.dtype))


def delta_weight(adapter: Mapping[str, Array], scale: float) -> Array:
    """`scale * A^T B^T`, the kernel-layout update: [..., d_in, d_out]."""
    return scale * jnp.einsum("...ri,...or->...io", adapter["a"], adapter["b"])


def merge(kernel: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """Folds an adapter into a stacked kernel [num_layers, d_in, d_out] (or an unstacked one)."""
    return (kernel.astype(jnp.float32) + delta_weight(adapter, scale)).astype(kernel.dtype)


def unmerge(kernel: Array, adapter: Mapping[str, Array], scale: float) -> Array:
    """Inverse of `merge`: subtracts the adapter's update again."""
    return (kernel.astype(jnp.float32) - delta_weight(adapter, scale)).astype(kernel.dtype)


def count(tree: PyTree) -> int:
    """Number of scalar parameters in a pytree."""
    return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(tree)))


def export_peft(directory: str, adapters: Mapping[str, Mapping[str, Array]], spec: LoraSpec,
                module_path: Callable[[str, int], str], base_model: str = "",
                task_type: str = "CAUSAL_LM", layers: Optional[Sequence[int]] = None) -> list[str]:
    """Writes `adapter_model.safetensors` + `adapter_config.json` that PEFT's `PeftModel` loads.

    Args:
      adapters: `{site: {"a": [L, r, d_in], "b": [L, d_out, r]}}`, one adapter (no task axis).
      module_path: `(site, layer) -> "model.layers.3.self_attn.q_proj"`, the Hugging Face module name
        (each backbone provides `hf_module_path`).
      layers: layers to export; default all layers whose A is not identically zero.
    Returns the tensor names written.
    """
    from safetensors.numpy import save_file

    os.makedirs(directory, exist_ok=True)
    tensors, modules = {}, set()
    for site, adapter in adapters.items():
        a = np.asarray(jax.device_get(adapter["a"]), np.float32)
        b = np.asarray(jax.device_get(adapter["b"]), np.float32)
        if a.ndim != 3 or b.ndim != 3:
            raise LoraSpecError(f"export_peft takes one adapter per site ([L, r, d_in]); {site} has A {a.shape}")
        for layer in range(a.shape[0]):
            if layers is not None and layer not in layers:
                continue
            if layers is None and not np.any(a[layer]) and not np.any(b[layer]):
                continue
            path = module_path(site, layer)
            modules.add(path.rsplit(".", 1)[-1])
            tensors[f"base_model.model.{path}.lora_A.weight"] = np.ascontiguousarray(a[layer])
            tensors[f"base_model.model.{path}.lora_B.weight"] = np.ascontiguousarray(b[layer])
    save_file(tensors, os.path.join(directory, "adapter_model.safetensors"))
    config = {
        "peft_type": "LORA",
        "task_type": task_type,
        "base_model_name_or_path": base_model,
        "r": spec.rank,
        "lora_alpha": spec.alpha,
        "lora_dropout": spec.dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(directory, "adapter_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    return sorted(tensors)
