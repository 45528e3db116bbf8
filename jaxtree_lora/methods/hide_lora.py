"""HiDe-LoRA (Wang et al., HiDe-Prompt / HiDe-PET), following thu-ml/HiDe-Prompt
(`peft/lora/hide_lora.py`, `engines/hide_lora_wtp_and_tap_engine.py`, `engines/hide_tii_engine.py`).

Class-incremental learning split in three: within-task prediction (a pool of per-task LoRA slots,
each started from the previous one, trained on its task's classes with a contrastive term, then
moved towards the earlier slots' mean), task-identity inference (a residual MLP head on the frozen
pre-trained features picks the slot at test time) and task-adaptive prediction (the head retrained on
Gaussian samples of every seen class's features). Shapes are fixed for the stream, so the step and
the host-side trainers compile once; the slot pool is IncLoRA's. What each part does, its defaults
and where it departs from the official code: docs/METHODS.md, section HiDe-LoRA.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
import hashlib
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.errors import ConfigError
from jaxtree_lora.methods.base import InferenceRule, MethodNotApplicable, ModelInfo, StreamInfo, TaskContext
from jaxtree_lora.methods.inclora import IncLoRA
from jaxtree_lora import keys

STATISTICS = ("covariance", "variance", "multi-centroid")
NEG = -1e9


# ----------------------------------------------------------------------------------------------
# pure pieces (module level, so each compiles once per shape for every task and every instance)
# ----------------------------------------------------------------------------------------------

def contrastive_loss(features, weight, means, stored, temperature: float):
    """HiDe's `orth_loss`: cross-entropy of M M^T / temperature with identity targets, M = [stored
    class means; batch features]. features [B, d], weight [B] (0: padding), means [C, d], stored [C]
    bool. Rows and columns of unstored classes and padding examples are left out (fixed shapes)."""
    rows = jnp.concatenate([means.astype(jnp.float32), features.astype(jnp.float32)], axis=0)  # [C + B, d]
    valid = jnp.concatenate([stored, weight > 0])
    similarity = rows @ rows.T / temperature
    similarity = jnp.where(valid[None, :], similarity, -1e30)
    nll = -jnp.diagonal(jax.nn.log_softmax(similarity, axis=-1))
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


@jax.jit
def copy_previous_slot(adapters, task):
    """Slot `task` <- slot `task - 1` (leaves [L, K, ...]); unchanged for task 0."""
    def copy(leaf):
        previous = jax.lax.dynamic_index_in_dim(leaf, jnp.maximum(task - 1, 0), axis=1, keepdims=True)
        current = jax.lax.dynamic_index_in_dim(leaf, task, axis=1, keepdims=True)
        return jax.lax.dynamic_update_index_in_dim(leaf, jnp.where(task > 0, previous, current), task, axis=1)

    return jax.tree.map(copy, adapters)


@jax.jit
def momentum_merge(adapters, task, momentum):
    """Slot `task` <- (1 - momentum) slot `task` + momentum mean(slots 0 .. task-1); unchanged for task 0."""
    def merge(leaf):
        slots = leaf.shape[1]
        past = (jnp.arange(slots) < task).astype(leaf.dtype).reshape((1, slots) + (1,) * (leaf.ndim - 2))
        mean = jnp.sum(leaf * past, axis=1, keepdims=True) / jnp.maximum(task, 1).astype(leaf.dtype)
        current = jax.lax.dynamic_index_in_dim(leaf, task, axis=1, keepdims=True)
        merged = (1.0 - momentum) * current + momentum * mean
        return jax.lax.dynamic_update_index_in_dim(leaf, jnp.where(task > 0, merged, current), task, axis=1)

    return jax.tree.map(merge, adapters)


def linear_head(params, features):
    """The run's linear head: features [N, d] -> logits [N, C]."""
    return features @ params["w"] + params["b"]


def init_identity_head(key, feature_dim: int, num_classes: int, expansion: int = 2) -> dict:
    """HiDe's original-model head with `mlp_structure [expansion]`: timm's init (weights
    trunc-normal std 0.02, here normal; biases 0; LayerNorm 1 / 0)."""
    k1, k2, k3 = jax.random.split(key, 3)
    hidden = feature_dim * expansion
    return {"w1": 0.02 * keys.settled(jax.random.normal(k1, (feature_dim, hidden), jnp.float32)),
            "b1": jnp.zeros((hidden,), jnp.float32),
            "w2": 0.02 * keys.settled(jax.random.normal(k2, (hidden, feature_dim), jnp.float32)),
            "b2": jnp.zeros((feature_dim,), jnp.float32),
            "scale": jnp.ones((feature_dim,), jnp.float32), "bias": jnp.zeros((feature_dim,), jnp.float32),
            "w": 0.02 * keys.settled(jax.random.normal(k3, (feature_dim, num_classes), jnp.float32)),
            "b": jnp.zeros((num_classes,), jnp.float32)}


def identity_head(params, features):
    """The TII head: residual MLP (Linear, GELU, Linear, + input, LayerNorm eps 1e-6) then a linear
    classifier. features [N, d] (pre-trained) -> logits [N, C]."""
    x = features.astype(jnp.float32)
    hidden = jax.nn.gelu(x @ params["w1"] + params["b1"], approximate=False)
    out = hidden @ params["w2"] + params["b2"] + x
    mean = jnp.mean(out, axis=-1, keepdims=True)
    var = jnp.var(out, axis=-1, keepdims=True)
    out = (out - mean) / jnp.sqrt(var + 1e-6) * params["scale"] + params["bias"]
    return out @ params["w"] + params["b"]


def masked_ce(logits, labels, mask, weight):
    logits = jnp.where(mask[None, :], logits, NEG)
    nll = -jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1), labels[:, None], axis=-1)[:, 0]
    return jnp.sum(nll * weight) / jnp.maximum(jnp.sum(weight), 1.0)


_IDENTITY_OPTIMIZER = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())


def identity_update(params, opt_state, features, labels, weight, mask, learning_rate):
    """One Adam step (clip 1.0) of the TII head on a batch of pre-trained features, logits masked."""
    grads = jax.grad(lambda p: masked_ce(identity_head(p, features), labels, mask, weight))(params)
    updates, opt_state = _IDENTITY_OPTIMIZER.update(grads, opt_state, params)
    params = jax.tree.map(lambda p, u: p - learning_rate * u, params, updates)
    return params, opt_state


@functools.partial(jax.jit, static_argnames=("batch_size",))
def train_identity_head(params, features, labels, weight, mask, rates, key, *, batch_size: int):
    """The TII head trained on one task's pre-trained features, one jitted call (scans over epochs and batches).

    features [N, d], labels [N], weight [N] (0: padding); mask [C]: the classes whose logits compete;
    rates [E]: each epoch's learning rate (E epochs). A fresh Adam (clip 1.0). Epoch e visits the rows in
    the order `permutation(fold_in(key, e), N)`, `batch_size` at a time; a short last batch is filled
    with its first row at weight 0, so every step has one shape. Compiles once per (N, batch_size, E)."""
    count = labels.shape[0]
    steps = -(-count // batch_size)
    offsets = jnp.arange(batch_size)

    def epoch_body(carry, epoch_and_rate):
        epoch, rate = epoch_and_rate
        order = jax.random.permutation(jax.random.fold_in(key, epoch), count)
        order = jnp.concatenate([order, jnp.zeros((steps * batch_size - count,), order.dtype)])

        def step_body(carry, step):
            params, opt_state = carry
            rows = jax.lax.dynamic_slice_in_dim(order, step * batch_size, batch_size)
            real = step * batch_size + offsets < count
            rows = jnp.where(real, rows, rows[0])
            return identity_update(params, opt_state, features[rows], labels[rows],
                                   weight[rows] * real.astype(weight.dtype), mask, rate), None

        return jax.lax.scan(step_body, carry, jnp.arange(steps))[0], None

    epochs = jnp.arange(rates.shape[0])
    (params, _), _ = jax.lax.scan(epoch_body, (params, _IDENTITY_OPTIMIZER.init(params)), (epochs, rates))
    return params


# Cholesky factors already taken, by the bytes of their covariance: a class's statistics never change
# once stored, yet every later task's alignment draws from them again. Bounded in bytes.
_FACTORS: "collections.OrderedDict[bytes, np.ndarray]" = collections.OrderedDict()
_FACTOR_CACHE_BYTES = 256 * 2 ** 20


def _cholesky(covariance: np.ndarray) -> np.ndarray:
    """The float32 Cholesky factor of one float32 covariance [d, d], taken in float64, memoised."""
    key = hashlib.blake2b(covariance.tobytes(), digest_size=16, person=str(covariance.shape).encode()[:16]).digest()
    if key in _FACTORS:
        _FACTORS.move_to_end(key)
        return _FACTORS[key]
    factor = np.linalg.cholesky(covariance.astype(np.float64)).astype(np.float32)
    _FACTORS[key] = factor
    while sum(value.nbytes for value in _FACTORS.values()) > _FACTOR_CACHE_BYTES and len(_FACTORS) > 1:
        _FACTORS.popitem(last=False)
    return factor


def sampling_factor(spread, stored, statistics: str):
    """[C, d, d] Cholesky factors of the covariances, or [C, d] standard deviations (variance); zero for
    classes without statistics. Host side, in float64: a ridge of 1e-4 on features of norm ~sqrt(d)
    leaves covariances too ill-conditioned for a float32 factorisation. Each class's factor is taken
    once per run (`_cholesky`), however many tasks draw from it."""
    spread, stored = np.asarray(spread), np.asarray(stored)
    factor = np.zeros(spread.shape, np.float32)
    if statistics == "covariance":
        for label in np.flatnonzero(stored):
            factor[label] = _cholesky(np.ascontiguousarray(spread[label]))
    else:
        factor[stored] = np.sqrt(np.maximum(spread[stored].astype(np.float64), 0.0))
    return jax.device_put(factor)  # a host array: a transfer, not a program per shape


@functools.partial(jax.jit, static_argnames=("apply", "statistics", "epochs", "samples"))
def align(params, means, factor, seen, steps, key, *, apply, statistics: str, epochs: int, samples: int,
          learning_rate: float = 0.005, momentum: float = 0.9, weight_decay: float = 5e-4, valid=None):
    """HiDe's classifier alignment (`train_task_adaptive_prediction`), one jitted call.

    params: the head (`apply(params, features [N, d]) -> [N, C]`); means [C, d] and `sampling_factor`
    ([C, d, d] Cholesky factors or [C, d] standard deviations) of every class; seen [C] bool: the classes to draw from and to
    score; steps: batches per epoch (the official `crct_num`, a traced integer <= C). Each epoch draws
    `samples` examples per class from N(mu_c, Sigma_c), shuffles the seen classes' samples and trains
    on `steps` batches of `samples` rows: SGD with momentum, weight decay (added to the gradient, as
    torch), lr cosine-annealed over the epochs (CosineAnnealingLR, stepped per epoch).

    "multi-centroid": means and factor are [C, K, d] (each centroid's mean and standard deviation) and
    `valid` [C, K] marks the centroids to draw from; `samples` are drawn per centroid, as the code does."""
    if statistics == "multi-centroid":
        classes, centroids, dim = means.shape
        labels = jnp.repeat(jnp.arange(classes), centroids * samples)  # [C * K * S]
        valid = jnp.repeat((seen[:, None] & valid).reshape(-1), samples)
    else:
        classes, dim = means.shape
        centroids = 1
        labels = jnp.repeat(jnp.arange(classes), samples)  # [C * S]
        valid = jnp.repeat(seen, samples)

    def loss_fn(p, x, y):
        return masked_ce(apply(p, x), y, seen, jnp.ones_like(y, jnp.float32))

    def epoch_body(epoch, carry):
        params, velocity = carry
        epoch_key = jax.random.fold_in(key, epoch)
        noise = jax.random.normal(jax.random.fold_in(epoch_key, 0), (classes, samples, dim), jnp.float32)
        if statistics == "covariance":
            drawn = means[:, None, :] + jnp.einsum("csk,cdk->csd", noise, factor)
        elif statistics == "variance":
            drawn = means[:, None, :] + noise * factor[:, None, :]
        else:
            noise = jax.random.normal(jax.random.fold_in(epoch_key, 0), (classes, centroids, samples, dim), jnp.float32)
            drawn = means[:, :, None, :] + noise * factor[:, :, None, :]
        drawn = drawn.reshape(classes * centroids * samples, dim)
        # Seen classes' samples first, in random order; the rest (unseen classes) are never reached.
        order = jnp.argsort(jax.random.uniform(jax.random.fold_in(epoch_key, 1), (classes * centroids * samples,))
                            + 2.0 * (~valid))
        rate = 0.5 * learning_rate * (1.0 + jnp.cos(math.pi * epoch / epochs))

        def step_body(index, carry):
            params, velocity = carry
            rows = jax.lax.dynamic_slice_in_dim(order, index * samples, samples)
            grads = jax.grad(loss_fn)(params, drawn[rows], labels[rows])
            grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
            velocity = jax.tree.map(lambda v, g: momentum * v + g, velocity, grads)
            return jax.tree.map(lambda p, v: p - rate * v, params, velocity), velocity

        # `steps` batches (a traced count, at most `classes`): the loop runs only those, one compile.
        return jax.lax.fori_loop(0, jnp.minimum(steps, classes), step_body, (params, velocity))

    velocity = jax.tree.map(jnp.zeros_like, params)
    params, _ = jax.lax.fori_loop(0, epochs, epoch_body, (params, velocity))
    return params


def _class_rows(batches, classes):
    """(label, its rows [n, d] in float64) for each of `classes`, from (features, labels, weight) batches
    (rows of weight 0 are padding and left out)."""
    rows, names = [], []
    for features, labels, weight in batches:
        keep = np.asarray(weight) > 0
        rows.append(np.asarray(features, np.float64)[keep])
        names.append(np.asarray(labels)[keep])
    rows, names = np.concatenate(rows), np.concatenate(names)
    for label in classes:
        x = rows[names == label]
        if len(x) == 0:
            raise ValueError(f"class {label} has no training example: its statistics cannot be computed")
        yield int(label), x


def class_statistics(batches, classes, statistics: str, ridge: float = 1e-4):
    """Per class of `classes`: (mean [d], spread) over the (features, labels, weight) batches; spread is
    the unbiased covariance + ridge I ([d, d], torch.cov) or its diagonal ([d], "variance")."""
    out = {}
    for label, x in _class_rows(batches, classes):
        mean = x.mean(axis=0)
        covariance = np.cov(x.T, ddof=1) if len(x) > 1 else np.zeros((x.shape[1], x.shape[1]))
        covariance = np.atleast_2d(covariance) + ridge * np.eye(x.shape[1])
        out[label] = (mean, covariance if statistics == "covariance" else np.diag(covariance).copy())
    return out


def kmeans(x: np.ndarray, clusters: int, rng: np.random.Generator, iterations: int = 100) -> np.ndarray:
    """Lloyd's k-means with k-means++ seeding (scikit-learn's default initialisation), host side.
    x [N, d] -> cluster index [N] in [0, min(clusters, N))."""
    count = min(clusters, len(x))
    centres = [x[rng.integers(len(x))]]
    for _ in range(1, count):
        distance = np.min(((x[:, None, :] - np.asarray(centres)[None]) ** 2).sum(-1), axis=1)
        total = distance.sum()
        centres.append(x[rng.choice(len(x), p=distance / total)] if total > 0 else x[rng.integers(len(x))])
    centres = np.asarray(centres)
    assignment = np.zeros(len(x), np.int64)
    for _ in range(iterations):
        assignment = ((x[:, None, :] - centres[None]) ** 2).sum(-1).argmin(axis=1)
        moved = np.array([x[assignment == k].mean(0) if np.any(assignment == k) else centres[k] for k in range(count)])
        if np.allclose(moved, centres):
            break
        centres = moved
    return assignment


def centroid_statistics(batches, classes, centroids: int, rng: np.random.Generator, ridge: float = 1e-4):
    """Per class of `classes`: (mean [d], (centroid means [K, d], centroid standard deviations [K, d],
    valid [K])). HiDe's `multi-centroid`: KMeans with K clusters over the class's features, each cluster's
    mean and variance (ddof 0); a cluster of zero variance (a single example, or none) is not drawn from,
    as the code skips it; samples are drawn from N(mean, diag(variance) + ridge I)."""
    out = {}
    for label, x in _class_rows(batches, classes):
        assignment = kmeans(x, centroids, rng)
        means = np.zeros((centroids, x.shape[1]))
        deviations = np.zeros((centroids, x.shape[1]))
        valid = np.zeros((centroids,), bool)
        for k in range(centroids):
            members = x[assignment == k]
            if len(members) == 0:
                continue
            variance = members.var(axis=0)
            means[k], deviations[k] = members.mean(axis=0), np.sqrt(variance + ridge)
            valid[k] = variance.mean() > 0
        out[label] = (x.mean(axis=0), (means, deviations, valid))
    return out


def write_centroids(state: dict, prefix: str, statistics: dict) -> dict:
    """The centroid statistics written into the state's fixed-shape arrays `{prefix}centroids` [C, K, d],
    `{prefix}centroid_deviation` [C, K, d] and `{prefix}centroid_valid` [C, K] (host side, new arrays)."""
    means = np.array(state[f"{prefix}centroids"])
    deviation = np.array(state[f"{prefix}centroid_deviation"])
    valid = np.array(state[f"{prefix}centroid_valid"])
    for label, (_, (centre, spread, ok)) in statistics.items():
        means[label], deviation[label], valid[label] = centre, spread, ok
    return {**state, f"{prefix}centroids": jax.device_put(np.asarray(means, np.float32)),
            f"{prefix}centroid_deviation": jax.device_put(np.asarray(deviation, np.float32)),
            f"{prefix}centroid_valid": jax.device_put(np.asarray(valid))}


def write_statistics(means, spread, stored, statistics: dict):
    """The class statistics written into the fixed-shape arrays (host side, new arrays)."""
    means, spread, stored = np.array(means), np.array(spread), np.array(stored)
    for label, (mean, value) in statistics.items():
        means[label], spread[label], stored[label] = mean, value, True
    return jax.device_put(means), jax.device_put(spread), jax.device_put(stored)


# ----------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class HiDeLoRA(IncLoRA):
    """HiDe-LoRA on the Method contract (defaults: `configs/imr_hidelora.py`, `train_imr_lora.sh`).

    lora                   k and v (`targets=("k", "v")`) of the first 5 blocks (`max_modules` 10 in the
                           layer-major (layer, site) order), rank 4, alpha 1 (scale 1/4), no dropout.
    reg                    0.001: weight of the contrastive term (`--reg`).
    temperature            0.8: of the contrastive term (`orth_loss`).
    lora_momentum          0.1: the merge of slot t with the mean of the earlier slots after task t.
    statistics             "covariance" (`ca_storage_efficient_method`) | "variance".
    tap_epochs             30 (`--crct_epochs`).
    tap_samples_per_class  120 (batch 24 x 5): samples per class per epoch, and the alignment batch.
    tap_learning_rate      0.005 (`--ca_lr`); SGD momentum 0.9, weight decay 5e-4 (fixed, as the code).
    tii_epochs             50 (the TII run of `train_imr_lora.sh`); Adam, lr `tii_learning_rate`
                           5e-4, x0.1 every 30 epochs, clip 1.0.
    tii_samples_per_class  24 (the TII alignment draws `batch` samples per class).
    tii_expansion          2 (`original_model_mlp_structure [2]`: hidden width 2 d).
    centroids              10 (`--n_centroids`): KMeans clusters per class with statistics "multi-centroid".

    Smaller `tap_epochs`/`tii_epochs` give a quicker run (e.g. on a laptop CPU); the defaults are the code's.
    """

    name = "hide_lora"
    fold_past = None  # one slot per example, never a sum: nothing to fold
    lora: lora_lib.LoraSpec = lora_lib.LoraSpec(targets=("k", "v"), rank=4, alpha=1.0, dropout=0.0, max_modules=10)
    reg: float = 0.001
    temperature: float = 0.8
    lora_momentum: float = 0.1
    statistics: str = "covariance"
    tap_epochs: int = 30
    tap_samples_per_class: int = 120
    tap_learning_rate: float = 0.005
    tii_epochs: int = 50
    tii_learning_rate: float = 5e-4
    tii_samples_per_class: int = 24
    tii_expansion: int = 2
    centroids: int = 10

    # Each example scored with one slot, its task's from `infer_task`, in one forward pass (`delta`
    # gathers each example's slot).
    inference_rule = InferenceRule.INFERRED_TASK_SLOT
    stream_kinds = ("classification",)
    not_applicable_reason = ("hide_lora infers the task from class predictions of a head on pre-trained "
                             "features: it needs a classification stream")
    default_head = "linear"

    def __post_init__(self):
        if self.statistics not in STATISTICS:
            raise ConfigError(f"hide_lora statistics must be one of {', '.join(STATISTICS)}, got {self.statistics!r}: "
                              f"set --config.method.hide_lora.statistics")
        for field in ("tap_epochs", "tii_epochs", "tap_samples_per_class", "tii_samples_per_class", "tii_expansion",
                      "centroids"):
            if int(getattr(self, field)) < 1:
                raise ConfigError(f"hide_lora {field} must be >= 1, got {getattr(self, field)}")
        if not 0.0 <= self.lora_momentum <= 1.0:
            raise ConfigError(f"hide_lora lora_momentum must be in [0, 1], got {self.lora_momentum}")
        if self.temperature <= 0 or self.reg < 0:
            raise ConfigError(f"hide_lora needs temperature > 0 and reg >= 0, got {self.temperature}, {self.reg}")

    def default_optimizer(self, batch_size: int) -> dict:
        """Adam at the script's `--lr 0.03`, scaled as the code scales it: lr x global batch / 256."""
        return {"learning_rate": 0.03 * batch_size / 256.0}

    # -- set-up -------------------------------------------------------------------------------
    def init(self, key, model: ModelInfo, stream: StreamInfo):
        if stream.kind != "classification" or stream.num_classes < 1:
            raise MethodNotApplicable(self.not_applicable_reason)
        adapters, state = super().init(key, model, stream)
        classes, dim = stream.num_classes, model.feature_dim
        spread_shape = (classes, dim, dim) if self.statistics == "covariance" else (classes, dim)
        state.update({
            "class_task": jnp.full((classes,), -1, jnp.int32),
            # TAP statistics under each class's own slot; the means are also the contrastive term's.
            "means": jnp.zeros((classes, dim), jnp.float32),
            "spread": jnp.zeros(spread_shape, jnp.float32),
            "stored": jnp.zeros((classes,), bool),
            # TII: its head and the pre-trained features' statistics for its own alignment.
            "identity_head": init_identity_head(keys.derive(key, "hide_lora.identity_head"), dim, classes,
                                                self.tii_expansion),
            # The host-side draws (TII batch order, Gaussian replay) come from the run's initialisation
            # key, so a seed changes them and a resumed run repeats them.
            "host_key": keys.derive(key, "hide_lora.host"),
            "identity_means": jnp.zeros((classes, dim), jnp.float32),
            "identity_spread": jnp.zeros(spread_shape, jnp.float32),
        })
        if self.statistics == "multi-centroid":  # [C, K, d] per class and cluster, for TAP and for TII
            for prefix in ("", "identity_"):
                state[f"{prefix}centroids"] = jnp.zeros((classes, self.centroids, dim), jnp.float32)
                state[f"{prefix}centroid_deviation"] = jnp.zeros((classes, self.centroids, dim), jnp.float32)
                state[f"{prefix}centroid_valid"] = jnp.zeros((classes, self.centroids), bool)
        return adapters, state

    def _statistics(self, state, batches, classes, prefix: str, task: int):
        """The classes' statistics ({label: (mean, spread)}) and the state with their centroids written
        ("multi-centroid"); KMeans is seeded from the run's host key, so a seed changes it."""
        if self.statistics != "multi-centroid":
            return class_statistics(batches, classes, self.statistics), state
        seed = jax.random.randint(jax.random.fold_in(keys.derive(state["host_key"], f"kmeans.{prefix}"), task),
                                  (), 0, 2 ** 31 - 1)
        stats = centroid_statistics(batches, classes, self.centroids, np.random.default_rng(int(seed)))
        state = write_centroids(state, prefix, stats)
        variance = {label: (mean, np.zeros_like(mean)) for label, (mean, _) in stats.items()}
        return variance, state

    def _align(self, state, params, prefix: str, means, spread, stored, seen, steps, key, apply, samples):
        """Classifier alignment of `params` on Gaussian samples of every seen class's statistics."""
        if self.statistics == "multi-centroid":
            return align(params, state[f"{prefix}centroids"], state[f"{prefix}centroid_deviation"], seen, steps, key,
                         apply=apply, statistics=self.statistics, epochs=self.tap_epochs, samples=samples,
                         learning_rate=self.tap_learning_rate, valid=state[f"{prefix}centroid_valid"])
        factor = sampling_factor(spread, stored, self.statistics)
        return align(params, means, factor, seen, steps, key, apply=apply, statistics=self.statistics,
                     epochs=self.tap_epochs, samples=samples, learning_rate=self.tap_learning_rate)

    def begin_task(self, adapters, state, task):
        adapters, state = super().begin_task(adapters, state, task)
        return copy_previous_slot(adapters, state["task"]), state

    @staticmethod
    def slot_inputs(trainable, state, task: int):
        """What the forward under slot `task` reads from the trainable and method state: that slot of
        every adapter ([L, K, ...] leaves -> [L, ...]; `delta` with a scalar task, `forward_adapters` the
        identity, no dropout at evaluation)."""
        return jax.tree.map(lambda value: value[:, task], trainable["adapters"])

    # -- inside the step ----------------------------------------------------------------------
    def delta(self, state, site, adapter, x, key):
        """Only the current task's slot: adapter {"a": [K, r, d_in], "b": [K, d_out, r]} -> its row `task`.
        With state["task"] of shape [B] (tasks inferred per example), example b takes slot task[b]; of
        shape [B, T] (packed rows: each token its own example's task), token (b, t) takes task[b, t]."""
        x = lora_lib.dropout(x, self.lora.dropout, key)
        task = state["task"]
        if jnp.ndim(task) >= 1:
            return lora_lib.apply_selected(adapter, x, task, self.lora.scale)
        slot = {name: jax.lax.dynamic_index_in_dim(value, task, axis=0, keepdims=False)
                for name, value in adapter.items()}
        return lora_lib.apply(slot, x, self.lora.scale)

    def loss(self, trainable, state, batch, key, task_loss):
        """Task-masked cross-entropy (the trainer's) + reg x the contrastive term on the batch features."""
        loss, aux = task_loss(trainable, key)
        contrast = contrastive_loss(aux["features"], batch["weight"], state["means"], state["stored"],
                                    self.temperature)
        return loss + self.reg * contrast, {**aux, "hide_contrastive": contrast}

    # -- inference ----------------------------------------------------------------------------
    def infer_task(self, state, pretrained_features, seen_upto):
        """[B] int32: argmax of the TII head over the classes of tasks 0..seen_upto -> that class's task."""
        logits = identity_head(state["identity_head"], pretrained_features)
        seen = (state["class_task"] >= 0) & (state["class_task"] <= seen_upto)
        predicted = jnp.argmax(jnp.where(seen[None, :], logits, -jnp.inf), axis=-1)
        return state["class_task"][predicted].astype(jnp.int32)

    # -- between tasks ------------------------------------------------------------------------
    def end_task(self, trainable, state, context: TaskContext):
        """Momentum merge of the slot, then (host side) the task's class statistics under its slot, the
        TII head's training and alignment, and (t > 0) the head's alignment on Gaussian samples."""
        task = int(context.task)
        adapters = momentum_merge(trainable["adapters"], state["task"], jnp.float32(self.lora_momentum))
        trainable = {**trainable, "adapters": adapters}
        # The pre-trained features of the task's data (one pass), and its classes: those the data holds.
        pretrained = [(np.asarray(f, np.float32), np.asarray(l, np.int32), np.asarray(w, np.float32))
                      for f, l, w in context.pretrained_features()]
        classes = sorted({int(label) for _, labels, weight in pretrained for label in labels[weight > 0]})
        class_task = np.array(state["class_task"])
        class_task[classes] = task
        state = {**state, "class_task": jax.device_put(class_task)}
        # Statistics under this task's slot (after the merge), computed once.
        with context.phase("class statistics"):
            stats, state = self._statistics(state, context.features(trainable, state), classes, "", task)
            means, spread, stored = write_statistics(state["means"], state["spread"], state["stored"], stats)
            state = jax.block_until_ready({**state, "means": means, "spread": spread, "stored": stored})
        seen = jax.device_put(class_task >= 0)
        earlier = int(np.sum((class_task >= 0) & (class_task < task)))  # the official crct_num
        # The heads' optimisation, one ledger line: the classifier's alignment is dispatched first (it
        # does not wait for the TII head, and the independent programs share the cores: blocking
        # between them cost 1.2 s of a 10-task stream's 9 s), then the TII head's statistics,
        # training and alignment.
        with context.phase("head training"):
            if task > 0:
                trainable = {**trainable, "head": self._align(
                    state, trainable["head"], "", state["means"], state["spread"], state["stored"], seen,
                    jnp.int32(earlier), jax.random.fold_in(keys.derive(state["host_key"], "tap"), task),
                    linear_head, self.tap_samples_per_class)}
            state = self._train_identity(state, pretrained, classes, task, context.batch_size)
            trainable, state = jax.block_until_ready((trainable, state))
        return trainable, state

    def _train_identity(self, state, batches, classes, task: int, batch_size: int = 0):
        """The TII head: class-masked CE on this task's pre-trained features (`batches` of (features
        [B, d], labels [B], weight [B])) in batches of `batch_size` real examples (the training micro-batch;
        0: the size of `batches`), a fresh Adam per task (as `reinit_optimizer`); the classes'
        pre-trained statistics; for t > 0 its alignment on every seen class."""
        weight = np.concatenate([b[2] for b in batches])
        real = weight > 0  # padding rows out: the trainer fills its own batches
        features = np.concatenate([b[0] for b in batches])[real]
        labels = np.concatenate([b[1] for b in batches])[real]
        weight = weight[real]
        mask = jax.device_put(np.asarray(state["class_task"]) == task)
        # Each epoch's rate in float32 as the host computes it: x0.1 every 30 epochs.
        rates = np.array([self.tii_learning_rate * 0.1 ** (epoch // 30) for epoch in range(self.tii_epochs)],
                         np.float32)
        key = jax.random.fold_in(keys.derive(state["host_key"], "tii_order"), task)
        params = train_identity_head(state["identity_head"], *jax.device_put((features, labels, weight)),
                                     mask, jax.device_put(rates), key,
                                     batch_size=int(batch_size) or len(batches[0][1]))
        stats, state = self._statistics(state, batches, classes, "identity_", task)
        means, spread, _ = write_statistics(state["identity_means"], state["identity_spread"], state["stored"], stats)
        class_task = np.asarray(state["class_task"])
        if task > 0:
            params = self._align(state, params, "identity_", means, spread, state["stored"], jax.device_put(class_task >= 0),
                                 jnp.int32(int(np.sum((class_task >= 0) & (class_task < task)))),
                                 jax.random.fold_in(keys.derive(state["host_key"], "tii_align"), task), identity_head,
                                 self.tii_samples_per_class)
        return {**state, "identity_head": params, "identity_means": means, "identity_spread": spread}
