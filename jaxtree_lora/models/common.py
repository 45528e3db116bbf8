"""What every backbone shares: LoRA sites, the delta hook, and small pure layers.

Every backbone keeps its transformer blocks *stacked* (a leading `num_layers` axis, run under
`jax.lax.scan`), so a 30-layer model compiles one block. A *site* is one frozen projection a method
may change, named "<group>.<projection>" ("attn.q_proj"); `lora_sites()` lists them with their
shapes. An adapter pytree maps site names to leaves with a leading `num_layers` axis; inside its
scan the backbone slices it per layer and, at each present site, adds

    dy = delta(site_name, adapter_slice, x, key)    # x: [..., d_in] -> dy: [..., d_out]

to the projection's output (`key`: adapter dropout, or None). Absent sites cost nothing. More in
docs/MODELS.md.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Mapping, Optional

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
PyTree = Any

# delta(site_name, adapter_slice_for_one_layer, x, key_or_None) -> dy
DeltaFn = Callable[[str, PyTree, Array, Optional[Array]], Array]


@dataclasses.dataclass(frozen=True)
class Site:
    """Shape of one LoRA site: the projection maps [..., d_in] to [..., d_out] in every layer."""

    d_in: int
    d_out: int


class SiteHook:
    """Applies the method's delta at the sites of one layer.

    Built inside the layer scan from the adapter slice of that layer; a backbone calls
    `hook(site_name, x, y)` after each frozen projection and gets `y + delta` back (or `y` when the
    site carries no adapter). When the delta has a `record(site, adapter, x)` method (see
    `SiteRecorder`), what it returns for each adapted site is kept in `records`
    and comes out of the scan per layer.
    """

    def __init__(self, adapters: Optional[Mapping[str, PyTree]], delta: Optional[DeltaFn],
                 key: Optional[Array]):
        self.adapters = adapters or {}
        self.delta = delta
        self.key = key
        self.records: dict[str, Array] = {}

    def __call__(self, site: str, x: Array, y: Array) -> Array:
        if self.delta is None or site not in self.adapters:
            return y
        key = None
        if self.key is not None:
            # A stable per-site key: the site's position in the sorted site list.
            key = jax.random.fold_in(self.key, sorted(self.adapters).index(site))
        dy = self.delta(site, self.adapters[site], x, key)
        record = getattr(self.delta, "record", None)
        if record is not None:
            self.records[site] = record(site, self.adapters[site], x)
        return y + dy.astype(y.dtype)


def token_weight(weight: Array, shape) -> Array:
    """A float32 weight per token of x's leading `shape` ([batch, seq] or [batch, tokens]) from a
    [batch, seq] weight, or from a [batch] weight that every token of an example shares."""
    w = weight.astype(jnp.float32)
    return jnp.broadcast_to(w.reshape(w.shape + (1,) * (len(shape) - w.ndim)), shape)


def input_moment(site: str, adapter: PyTree, x: Array, weight: Array) -> Array:
    """sum over tokens of w * x x^T of a site's input x [..., d_in], in float32: [d_in, d_in]. As the
    `record` of a `SiteRecorder` it gives the input statistics InfLoRA's and LoDA's subspaces use."""
    x32 = x.astype(jnp.float32)
    return jnp.einsum("...i,...j,...->ij", x32, x32, token_weight(weight, x.shape[:-1]))


class SiteRecorder:
    """A delta hook that also lets a method measure something at every adapted site and layer.

    The delta itself is unchanged. `record(site, adapter, x, weight) -> array` is the measurement
    (`input_moment`; LiLoRA's stability term); `weight` is the token weight ([batch, seq] or [batch],
    see `token_weight`). After a forward pass under jit, `records` is `{site: [num_layers, ...]}`.
    """

    def __init__(self, delta: DeltaFn, record: Callable, weight: Array):
        self.delta = delta
        self._record = record
        self.weight = weight
        self.records: dict[str, Array] = {}

    def __call__(self, site: str, adapter: PyTree, x: Array, key: Optional[Array]) -> Array:
        return self.delta(site, adapter, x, key)

    def record(self, site: str, adapter: PyTree, x: Array) -> Array:
        return self._record(site, adapter, x, self.weight)

    def collect(self, records: Mapping[str, Array]) -> None:
        self.records = dict(records)


def layer_keys(key: Optional[Array], num_layers: int) -> Optional[Array]:
    """One PRNG key per layer (for adapter dropout), or None in deterministic mode."""
    if key is None:
        return None
    return jax.random.split(key, num_layers)


# What the layer scan keeps for the backward on CPU when blocks are not rematerialised: in float32, the
# outputs of the products (the projections, LoRA's), with the elementwise operations between them
# (norms, activations, softmax, residual adds) recomputed in the backward. Every value autodiff keeps
# under `lax.scan` is a stacked [layers, ...] buffer that XLA CPU zero-fills, writes layer by layer and
# copies; recomputing the elementwise values costs less (float32 within a few %, gradients equal to
# float32 rounding; docs/MODELS.md). In bf16 the products run on the bf16 matrix units, 4-5x float32,
# so recomputing whole blocks costs less than keeping their float32 outputs (`blocks_recomputed`: 5-10%
# faster steps). Other backends keep autodiff's residuals (unmeasured there). None: autodiff's on CPU too.
CPU_SCAN_POLICY = jax.checkpoint_policies.dots_with_no_batch_dims_saveable


def blocks_recomputed(remat: bool, compute_dtype) -> bool:
    """Whether the layer scan keeps only each block's input for the backward: `model.remat`, or bf16 on
    CPU (where it is the fastest choice). The memory planner plans `remat` as written (it may plan for
    another backend; on CPU it then over-estimates)."""
    return bool(remat) or narrow_on_cpu(compute_dtype)


def scan_layers(body, carry, layer_params: PyTree, adapters: Optional[Mapping[str, PyTree]],
                delta: Optional[DeltaFn], key: Optional[Array], num_layers: int,
                remat: bool = False):
    """Runs `body(carry, params_l, hook_l) -> (carry, out_l)` over the stacked layers.

    `layer_params` and every adapter leaf carry a leading `num_layers` axis; the scan slices both.
    `remat`: each block recomputed whole in the backward (only its input kept), as in bf16 on CPU
    (`blocks_recomputed`); otherwise, on CPU, `CPU_SCAN_POLICY` chooses what is kept.
    """
    keys = layer_keys(key, num_layers)
    xs = (layer_params, dict(adapters or {}), keys)
    dtypes = jax.tree.map(lambda leaf: leaf.dtype, carry)

    def step(c, x):
        params_l, adapters_l, key_l = x
        hook = SiteHook(adapters_l, delta, key_l)
        c, out = body(jax.tree.map(jnp.astype, c, dtypes), params_l, hook)
        return jax.tree.map(_wide, c), (out, hook.records)

    if blocks_recomputed(remat, _compute_dtype(carry)):
        step = jax.checkpoint(step, prevent_cse=False)
    elif CPU_SCAN_POLICY is not None and jax.default_backend() == "cpu":
        step = jax.checkpoint(step, prevent_cse=False, policy=CPU_SCAN_POLICY)
    carry, (outs, records) = jax.lax.scan(step, jax.tree.map(_wide, carry), xs, length=num_layers)
    carry = jax.tree.map(jnp.astype, carry, dtypes)
    if records and hasattr(delta, "collect"):
        delta.collect(records)  # per-site measurements stacked over layers (SiteRecorder)
    return carry, outs


# bfloat16 on XLA CPU, and what works around it (float32 and other backends are untouched):
# - a bf16 x bf16 -> bf16 dot is run by widening both operands to float32 (float32's speed plus the
#   conversions), while bf16 operands with a float32 result reach the CPU's bf16 matrix units (AMX
#   where present: 4-5x float32 on the development box). `dense` asks for the float32 result.
# - a dynamic-update-slice into a bf16 buffer is widened over the WHOLE buffer: under the layer scan
#   every stacked bf16 array (the residuals kept for the backward, remat's saved layer inputs) had all
#   L layers' slots converted twice at each layer's write, quadratic in depth. The layer carry is held
#   in float32 between layers (`_wide`: bf16 -> f32 -> bf16 is exact) and the residuals our own
#   backward rules keep are stored as their bits (`stash`: uint16), which the scan writes in place.
def narrow_on_cpu(dtype) -> bool:
    """Whether `dtype` is bfloat16 computed by XLA CPU (where the workarounds above apply)."""
    return jnp.dtype(dtype) == jnp.bfloat16 and jax.default_backend() == "cpu"


def _compute_dtype(carry: PyTree):
    """The layer carry's narrowest floating dtype: the block's compute dtype."""
    floats = [leaf.dtype for leaf in jax.tree.leaves(carry) if jnp.issubdtype(leaf.dtype, jnp.floating)]
    return min(floats, key=lambda dtype: jnp.dtype(dtype).itemsize, default=jnp.float32)


def _wide(x: Array) -> Array:
    return x.astype(jnp.float32) if narrow_on_cpu(x.dtype) else x


def stash(x: Array) -> Array:
    """A residual for a custom backward rule: bf16 on CPU as its uint16 bits, anything else as it is."""
    return jax.lax.bitcast_convert_type(x, jnp.uint16) if narrow_on_cpu(x.dtype) else x


def unstash(x: Array, dtype) -> Array:
    """The residual `stash` kept, back in `dtype`."""
    return jax.lax.bitcast_convert_type(x, dtype) if x.dtype == jnp.uint16 else x


def dense(x: Array, kernel: Array, out_dtype=None) -> Array:
    """x [..., d_in] @ kernel [d_in, d_out] with the kernel cast to x's dtype; the result in `out_dtype`
    (default x's dtype). Every frozen projection and the LM head go through here. bf16 on CPU: the
    products accumulate in float32 and are rounded once, forward and backward (`_narrow_product`)."""
    if not narrow_on_cpu(x.dtype):
        return jnp.matmul(x, kernel.astype(x.dtype), preferred_element_type=out_dtype)
    return _narrow_product(x, kernel, jnp.dtype(out_dtype or x.dtype))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _narrow_product(x, kernel, out_dtype):
    return jnp.einsum("...i,io->...o", x, kernel.astype(x.dtype), preferred_element_type=jnp.float32).astype(out_dtype)


def _narrow_product_forward(x, kernel, out_dtype):
    # The kernel is kept as stored (a slice of the layer scan's input, not a stacked narrow copy).
    return _narrow_product(x, kernel, out_dtype), (stash(x), kernel)


def _narrow_product_backward(out_dtype, residuals, grad):
    """Both gradients as the forward: narrow operands, float32 sums, one rounding (autodiff's own
    transpose would widen the kernel again). A float32 cotangent (the LM head's logits) enters as two
    bf16 terms, its rounding and the rest, so it keeps about 16 bits. A frozen kernel's gradient is
    never read, and XLA drops it."""
    x, kernel = residuals
    x = unstash(x, jnp.bfloat16)
    narrow = kernel.astype(x.dtype)
    high = grad.astype(x.dtype)
    terms = [high] if grad.dtype == x.dtype else [high, (grad - high.astype(grad.dtype)).astype(x.dtype)]
    dx = sum(jnp.einsum("...o,io->...i", term, narrow, preferred_element_type=jnp.float32) for term in terms)
    dkernel = sum(jnp.einsum("...i,...o->io", x, term, preferred_element_type=jnp.float32) for term in terms)
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


_narrow_product.defvjp(_narrow_product_forward, _narrow_product_backward)


def attention(query: Array, key: Array, value: Array, mask: Optional[Array] = None) -> Array:
    """Scaled dot-product attention: softmax(q k^T / sqrt(head_dim)) v, softmax in float32.

    query: [batch, q_len, heads, head_dim]; key, value: [batch, k_len, kv_heads, head_dim] with heads a
    multiple of kv_heads (grouped-query attention: keys are shared by their group, never repeated);
    mask: bool, broadcastable to [batch, heads or 1, q_len, k_len], True where a query may attend.
    Returns [batch, q_len, heads, head_dim] in query's dtype.

    Through `jax.nn.dot_product_attention` with implementation=None, so the backend picks the kernel
    (XLA's here; a fused one where jax selects it). A query whose keys are all masked (a padding
    query) gets a uniform softmax, not NaN; its output is never read.
    """
    return jax.nn.dot_product_attention(query, key.astype(query.dtype), value.astype(query.dtype), mask=mask,
                                        implementation=None)


# Activations whose backward pass recomputes from the input alone. Autodiff of jax.nn.gelu (exact)
# keeps three [tokens, intermediate] arrays per layer for the backward pass (0.5 x, erfc and exp
# terms), and of jax.nn.silu three (x, sigmoid, sigmoid (1 - sigmoid)); under the layer scan each is a
# stacked buffer written in the forward and read in the backward, which on CPU costs more than
# recomputing the few elementwise terms (what torch's gelu_backward / silu_backward do). The backward
# rules below are autodiff's own operations in autodiff's order, so gradients are bit-identical
# (tests/test_activations.py compares them with jax.grad of jax.nn.gelu / jax.nn.silu).
def _float32_inside(function, *arrays):
    """`function` of the arrays; bf16 on CPU computed in float32 and rounded once (XLA CPU would widen
    and round around every elementwise operation of the chain: slower, and rounded at each step)."""
    if not narrow_on_cpu(arrays[0].dtype):
        return function(*arrays)
    return function(*(a.astype(jnp.float32) for a in arrays)).astype(arrays[0].dtype)


def _every_bf16() -> Array:
    """[65536] bf16: every bfloat16 value, indexed by its bits."""
    return jax.lax.bitcast_convert_type(jnp.arange(1 << 16, dtype=jnp.uint32).astype(jnp.uint16), jnp.bfloat16)


def _by_bits(table: Array, bits: Array) -> Array:
    """table[bits] for uint16 bits: a lookup in a [65536] table of a function of one bf16 value."""
    return table.at[bits.astype(jnp.int32)].get(mode="promise_in_bounds")


def _gelu(v):
    return jax.nn.gelu(v, approximate=False)


@jax.custom_vjp
def gelu_exact(x: Array) -> Array:
    """The exact (erf) GELU, x Phi(x), as jax.nn.gelu(approximate=False); its backward keeps only x.
    bf16 on CPU: read from the GELU of all 65536 bf16 values (the same bits, about half the time of
    XLA's float32 erfc over a [tokens, intermediate] array)."""
    if narrow_on_cpu(x.dtype):
        return _by_bits(_float32_inside(_gelu, _every_bf16()), stash(x))
    return _gelu(x)


def _gelu_exact_forward(x):
    return gelu_exact(x), stash(x)


def _gelu_exact_backward(x, grad):
    if x.dtype != jnp.uint16:
        return (_gelu_exact_gradient(grad, x),)
    # bf16 on CPU: the exp and erfc terms of every bf16 x in float32, looked up; the rest as autodiff's.
    terms = [_by_bits(table, x) for table in _gelu_exact_terms(_every_bf16().astype(jnp.float32))]
    wide = _gelu_exact_gradient(grad.astype(jnp.float32), unstash(x, grad.dtype).astype(jnp.float32), terms)
    return (wide.astype(grad.dtype),)


def _gelu_exact_terms(x):
    """exp(-z^2) and erfc(z) for z = -x / sqrt 2: the two transcendental terms of GELU's derivative."""
    z = -x * np.sqrt(0.5).astype(x.dtype)
    return jnp.exp(-jnp.square(z)), jax.lax.erfc(z)


def _gelu_exact_gradient(grad, x, terms=None):
    # gelu(x) = (0.5 x) erfc(-x / sqrt 2); d erfc(z) / dz = -2 / sqrt(pi) exp(-z^2).
    exp_term, erfc_term = _gelu_exact_terms(x) if terms is None else terms
    through_erfc = -(((np.asarray(-2 / np.sqrt(np.pi), x.dtype) * ((0.5 * x) * grad)) * exp_term)
                     * np.sqrt(0.5).astype(x.dtype))
    return through_erfc + 0.5 * (grad * erfc_term)


gelu_exact.defvjp(_gelu_exact_forward, _gelu_exact_backward)


@jax.custom_vjp
def silu(x: Array) -> Array:
    """x sigmoid(x), as jax.nn.silu; its backward keeps only x. bf16 on CPU: read by the input's bits
    from the SiLU of every bf16 value, as `gelu_exact`."""
    if narrow_on_cpu(x.dtype):
        return _by_bits(_float32_inside(jax.nn.silu, _every_bf16()), stash(x))
    return jax.nn.silu(x)


def _silu_forward(x):
    return silu(x), stash(x)


def _silu_backward(x, grad):
    if x.dtype != jnp.uint16:
        return (_silu_gradient(grad, x),)
    sigmoid = _by_bits(jax.lax.logistic(_every_bf16().astype(jnp.float32)), x)  # float32, looked up
    wide = _silu_gradient(grad.astype(jnp.float32), unstash(x, grad.dtype).astype(jnp.float32), sigmoid)
    return (wide.astype(grad.dtype),)


def _silu_gradient(grad, x, sigmoid=None):
    sigmoid = jax.lax.logistic(x) if sigmoid is None else sigmoid
    return grad * sigmoid + (x * grad) * (sigmoid * (1.0 - sigmoid))


silu.defvjp(_silu_forward, _silu_backward)


def rms_norm(x: Array, weight: Array, eps: float) -> Array:
    """RMSNorm computed in float32, returned in x's dtype. x: [..., d], weight: [d]."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 * weight.astype(jnp.float32)).astype(dtype)


def layer_norm(x: Array, weight: Array, bias: Array, eps: float) -> Array:
    """LayerNorm computed in float32, returned in x's dtype. x: [..., d]."""
    dtype = x.dtype
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (y * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(dtype)
