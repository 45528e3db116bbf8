"""HiDe-LoRA and TreeLoRA in HiDe's decomposition: slot copy and momentum merge, class statistics and
Gaussian-replay alignment, task-identity inference, TreeLoRA's regulariser on the current slot only,
one compiled step for every task, and resume equivalence."""
import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from jaxtree_lora.methods import hide_lora as hide
from jaxtree_lora.methods.base import ModelInfo, StreamInfo, TaskContext
from jaxtree_lora.methods.treelora_hide import TreeLoRAHiDe
from jaxtree_lora.models.common import Site

from test_loop import interrupted_and_resumed, make_run, tiny_config

SITES = {"attn.query": Site(4, 4), "attn.key": Site(4, 4), "attn.value": Site(4, 4)}
QUICK = {"tap_epochs": 2, "tii_epochs": 3, "tap_samples_per_class": 8, "tii_samples_per_class": 8}


def hide_config(method="hide_lora", **train):
    config = tiny_config(method, **train)
    config.lora.targets = None  # the method's own spec: k and v of the first 5 blocks, rank 4
    config.lora.rank = None
    config.method.hide_lora.update(QUICK)
    config.method.treelora.form = "auto"  # the default: HiDe's decomposition on this classification stream
    return config


def test_a_new_slot_starts_as_the_previous_one_and_is_merged_with_the_mean_of_the_earlier_ones():
    # adapters [L=1, K=3, r=1, d=1]: slot values 1, 2, 5.
    adapters = {"site": {"a": jnp.asarray([1.0, 2.0, 5.0]).reshape(1, 3, 1, 1)}}
    copied = hide.copy_previous_slot(adapters, jnp.int32(2))["site"]["a"].ravel()
    np.testing.assert_array_equal(copied, [1.0, 2.0, 2.0]), "slot 2 <- slot 1, the others untouched"
    unchanged = hide.copy_previous_slot(adapters, jnp.int32(0))["site"]["a"].ravel()
    np.testing.assert_array_equal(unchanged, [1.0, 2.0, 5.0]), "task 0 has no previous slot"
    merged = hide.momentum_merge(adapters, jnp.int32(2), jnp.float32(0.1))["site"]["a"].ravel()
    # 0.9 * 5 + 0.1 * mean(1, 2) = 4.65
    np.testing.assert_allclose(merged, [1.0, 2.0, 4.65], rtol=1e-6)
    np.testing.assert_array_equal(hide.momentum_merge(adapters, jnp.int32(0), jnp.float32(0.1))["site"]["a"].ravel(),
                                  [1.0, 2.0, 5.0]), "slot 0 is never merged"


def test_class_statistics_are_the_mean_and_the_unbiased_covariance_plus_a_ridge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(12, 3))
    labels = np.repeat([4, 7], 6)
    weight = np.ones(12)
    weight[-1] = 0.0  # padding: left out
    stats = hide.class_statistics([(x[:8], labels[:8], weight[:8]), (x[8:], labels[8:], weight[8:])], [4, 7],
                                  "covariance")
    np.testing.assert_allclose(stats[4][0], x[:6].mean(0))
    np.testing.assert_allclose(stats[7][1], np.cov(x[6:11].T) + 1e-4 * np.eye(3))
    variance = hide.class_statistics([(x, labels, weight)], [4], "variance")
    np.testing.assert_allclose(variance[4][1], np.var(x[:6], axis=0, ddof=1) + 1e-4)


def test_gaussian_replay_aligns_a_head_whose_tasks_were_trained_apart():
    """Four classes on the axes of R^4, two tasks of two. The unaligned head separates each task's
    classes only and the second task's columns carry a large bias (they were trained last, alone):
    over all seen classes it predicts task 1's classes for everything (50%). Alignment on samples of
    the stored Gaussians must fix that."""
    classes, dim = 4, 4
    means = 3.0 * jnp.eye(classes, dim)
    covariance = jnp.stack([0.05 * jnp.eye(dim)] * classes)
    stored = jnp.ones((classes,), bool)
    head = {"w": jnp.eye(dim, classes), "b": jnp.asarray([0.0, 0.0, 4.0, 4.0])}
    key = jax.random.PRNGKey(0)
    test = means[:, None, :] + 0.2 * jax.random.normal(key, (classes, 50, dim))
    labels = np.repeat(np.arange(classes), 50)

    def accuracy(head):
        return float(np.mean(np.argmax(hide.linear_head(head, test.reshape(-1, dim)), -1) == labels))

    assert accuracy(head) == pytest.approx(0.5), "the unaligned head favours the last task's classes"
    factor = hide.sampling_factor(covariance, stored, "covariance")
    aligned = hide.align(head, means, factor, stored, jnp.int32(4), jax.random.PRNGKey(1), apply=hide.linear_head,
                         statistics="covariance", epochs=30, samples=32, learning_rate=0.05)
    assert accuracy(aligned) > 0.95, f"alignment on Gaussian samples must balance the tasks: {accuracy(aligned)}"
    # multi-centroid: each class as two clusters (the class mean +- a shift), diagonal deviations.
    shift = 0.3 * jnp.roll(jnp.eye(classes, dim), 1, axis=1)
    centroids = jnp.stack([means - shift, means + shift], axis=1)  # [C, 2, d]
    deviation = jnp.full((classes, 2, dim), 0.2)
    valid = jnp.ones((classes, 2), bool).at[0, 1].set(False)  # a cluster the code skips (zero variance)
    aligned = hide.align(head, centroids, deviation, stored, jnp.int32(4), jax.random.PRNGKey(1),
                         apply=hide.linear_head, statistics="multi-centroid", epochs=30, samples=16, learning_rate=0.05,
                         valid=valid)
    assert accuracy(aligned) > 0.95, f"multi-centroid alignment must balance the tasks too: {accuracy(aligned)}"


def reference_identity_training(params, features, labels, weight, mask, key, epochs, batch_size, learning_rate):
    """The TII head's training as a host loop: per epoch a host permutation, per batch one jitted Adam step
    (clip 1.0); a short last batch filled with its first row at weight 0; the rate x0.1 every 30 epochs."""
    optimizer = optax.chain(optax.clip_by_global_norm(1.0), optax.scale_by_adam())

    @jax.jit
    def step(params, opt_state, x, y, w, rate):
        grads = jax.grad(lambda p: hide.masked_ce(hide.identity_head(p, x), y, mask, w))(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return jax.tree.map(lambda p, u: p - rate * u, params, updates), opt_state

    opt_state = optimizer.init(params)
    for epoch in range(epochs):
        order = np.asarray(jax.random.permutation(jax.random.fold_in(key, epoch), len(labels)))
        rate = np.float32(learning_rate * 0.1 ** (epoch // 30))
        for start in range(0, len(order), batch_size):
            rows = order[start:start + batch_size]
            real = np.ones(batch_size, np.float32)
            real[len(rows):] = 0.0
            rows = np.concatenate([rows, np.full(batch_size - len(rows), rows[0])])
            params, opt_state = step(params, opt_state, features[rows], labels[rows], weight[rows] * real, rate)
    return params


def test_identity_head_training_in_one_call_equals_the_host_loop():
    """The TII head trained in one jitted call (scans over epochs and batches) must end where the host
    loop of one step per batch ends: same row order per epoch, same padding of the short last batch
    (13 rows in batches of 4), same rate schedule (32 epochs: the x0.1 at epoch 30 is reached), same
    Adam. A wrong order, padding or rate would move the head far more than float32 rounding."""
    rng = np.random.default_rng(0)
    dim, classes, count, batch_size, epochs = 5, 4, 13, 4, 32
    params = hide.init_identity_head(jax.random.PRNGKey(0), dim, classes, expansion=2)
    features = rng.normal(size=(count, dim)).astype(np.float32)
    labels = rng.choice([1, 2], size=count).astype(np.int32)
    weight = np.ones(count, np.float32)
    weight[[3, 11]] = 0.0  # padding rows of the task's own batches
    mask = jnp.asarray([False, True, True, False])  # this task's classes
    key = jax.random.PRNGKey(7)
    expected = reference_identity_training(params, features, labels, weight, mask, key, epochs, batch_size, 0.01)
    rates = jnp.asarray([0.01 * 0.1 ** (epoch // 30) for epoch in range(epochs)], jnp.float32)
    trained = hide.train_identity_head(params, jnp.asarray(features), jnp.asarray(labels), jnp.asarray(weight), mask,
                                       rates, key, batch_size=batch_size)
    moved = max(float(np.max(np.abs(np.asarray(trained[name]) - np.asarray(params[name])))) for name in params)
    assert moved > 1e-2, "the head hardly trained: the comparison would prove nothing"
    for name in params:
        np.testing.assert_allclose(trained[name], expected[name], rtol=1e-6, atol=1e-6,
                                   err_msg=f"{name}: the one-call training departs from the host loop")


def test_multi_centroid_statistics_find_the_clusters_of_a_class():
    """A class made of two tight blobs: KMeans with 2 centroids recovers each blob's mean and (ddof 0)
    deviation + ridge; a class with one example has a zero-variance cluster, which is not drawn from."""
    rng = np.random.default_rng(0)
    blobs = np.concatenate([rng.normal(0.0, 0.1, (10, 3)) + [5.0, 0.0, 0.0], rng.normal(0.0, 0.1, (10, 3)) - [5.0, 0.0, 0.0]])
    x = np.concatenate([blobs, [[1.0, 2.0, 3.0]]])
    labels = np.array([2] * 20 + [6])
    stats = hide.centroid_statistics([(x, labels, np.ones(21))], [2, 6], 2, np.random.default_rng(1))
    mean, (centres, deviations, valid) = stats[2]
    np.testing.assert_allclose(mean, blobs.mean(0))
    order = np.argsort(centres[:, 0])
    np.testing.assert_allclose(centres[order], [blobs[10:].mean(0), blobs[:10].mean(0)])
    np.testing.assert_allclose(deviations[order], np.sqrt([blobs[10:].var(0) + 1e-4, blobs[:10].var(0) + 1e-4]))
    assert valid.all()
    _, (_, _, single) = stats[6]
    assert not single.any(), "one example: zero variance, skipped as the code skips it"


def fake_context(task, features, labels, size=8):
    """A TaskContext whose pre-trained features are given (and the adapted ones equal them)."""
    def batches(*_):
        for start in range(0, len(labels), size):
            f, l = features[start:start + size], labels[start:start + size]
            pad = size - len(l)
            yield (np.concatenate([f, np.zeros((pad, f.shape[1]), np.float32)]),
                   np.concatenate([l, np.zeros(pad, np.int32)]), np.concatenate([np.ones(len(l)), np.zeros(pad)]))

    return TaskContext(task=task, steps_per_epoch=1, features=batches, pretrained_features=batches)


@pytest.mark.slow  # ~10 s alone, over 20 s on a loaded 2-core machine (three compiles)
def test_task_identity_inference_routes_every_example_of_separable_tasks_to_its_task():
    rng = np.random.default_rng(0)
    dim, classes = 6, 4
    # The variance statistics here (the covariance ones in the test above); a larger alignment rate than
    # the code's 0.005 so that the few alignment steps of a 2-task, 4-class case suffice.
    method = hide.HiDeLoRA(tii_epochs=30, tii_learning_rate=0.01, tap_epochs=20, tap_samples_per_class=16,
                           tap_learning_rate=0.05, statistics="variance")
    model = ModelInfo(sites=SITES, num_layers=2, feature_dim=dim)
    trainable, state = method.init(jax.random.PRNGKey(0), model, StreamInfo(2, 2, "classification", classes))
    trainable = {"adapters": trainable, "head": {"w": jnp.zeros((dim, classes)), "b": jnp.zeros((classes,))}}
    centres = 4.0 * np.eye(classes, dim)
    data = []
    for task in range(2):
        labels = np.repeat([2 * task, 2 * task + 1], 20).astype(np.int32)
        features = (centres[labels] + 0.3 * rng.normal(size=(40, dim))).astype(np.float32)
        data.append((features, labels))
        _, state = method.begin_task(trainable["adapters"], state, task)
        trainable, state = method.end_task(trainable, state, fake_context(task, features, labels))
    np.testing.assert_array_equal(state["class_task"], [0, 0, 1, 1])
    for task, (features, _) in enumerate(data):
        inferred = np.asarray(jax.jit(method.infer_task)(state, jnp.asarray(features), jnp.int32(1)))
        assert np.all(inferred == task), f"examples of task {task} routed to {np.unique(inferred)}"
        assert np.all(np.asarray(method.infer_task(state, jnp.asarray(features), jnp.int32(0))) == 0), \
            "only tasks seen so far can be inferred"
    assert bool(np.all(state["stored"])) and float(np.abs(trainable["head"]["w"]).sum()) > 0, \
        "every class's statistics are stored and the head was aligned after the second task"


def numpy_identity_head(params, features):
    """The TII head written again in numpy (float64): Linear, exact GELU, Linear, + input, LayerNorm
    (eps 1e-6), Linear."""
    p = {name: np.asarray(value, np.float64) for name, value in params.items()}
    pre = features @ p["w1"] + p["b1"]
    hidden = 0.5 * pre * (1.0 + np.vectorize(math.erf)(pre / math.sqrt(2.0)))
    out = hidden @ p["w2"] + p["b2"] + features
    out = (out - out.mean(-1, keepdims=True)) / np.sqrt(out.var(-1, keepdims=True) + 1e-6) * p["scale"] + p["bias"]
    return out @ p["w"] + p["b"]


def test_task_identity_inference_on_overlapping_tasks_routes_as_a_numpy_head_does():
    """Two tasks of two classes whose Gaussians overlap (centres 1.5 apart, noise 0.8): the Bayes rule
    routes 87% of fresh examples to their task, so routing cannot be perfect and a head that routed
    everything to one task would score 50%. The trained TII head (class-masked training per task, then
    alignment on the stored statistics) must route every example exactly as the numpy head with the
    same parameters does (argmax over the seen classes -> that class's task), and be right for most
    of what the Bayes rule gets right. The TAP half of end_task is left out: not under test, and a
    compile fewer."""
    rng = np.random.default_rng(0)
    dim, classes, spread = 6, 4, 0.8
    method = hide.HiDeLoRA(tii_epochs=3, tii_learning_rate=0.01, tap_epochs=20, tii_samples_per_class=16,
                           tap_learning_rate=0.05, statistics="variance")
    _, state = method.init(jax.random.PRNGKey(0), ModelInfo(sites=SITES, num_layers=2, feature_dim=dim),
                           StreamInfo(2, 2, "classification", classes))
    centres = 1.5 * np.eye(classes, dim)
    draw = lambda labels: (centres[labels] + spread * rng.normal(size=(len(labels), dim))).astype(np.float32)
    for task in range(2):
        labels = np.repeat([2 * task, 2 * task + 1], 20).astype(np.int32)
        features = draw(labels)
        batches = [(features[s:s + 8], labels[s:s + 8], np.ones(8, np.float32)) for s in range(0, 40, 8)]
        state = {**state, "class_task": state["class_task"].at[2 * task:2 * task + 2].set(task)}
        state = method._train_identity(state, batches, [2 * task, 2 * task + 1], task)
    labels = np.repeat(np.arange(classes), 250)
    features, true_task = draw(labels), labels // 2
    inferred = np.asarray(method.infer_task(state, jnp.asarray(features), jnp.int32(1)))
    expected = np.asarray(state["class_task"])[np.argmax(numpy_identity_head(state["identity_head"], features), -1)]
    np.testing.assert_array_equal(inferred, expected, err_msg="infer_task routes otherwise than the numpy head")
    # The Bayes rule of these equal-variance isotropic Gaussians: the task whose classes' densities sum higher.
    density = np.exp(-((features[:, None, :] - centres[None]) ** 2).sum(-1) / (2 * spread ** 2))
    bayes = np.mean(np.argmax(density.reshape(-1, 2, 2).sum(-1), -1) == true_task)
    share = np.mean(inferred == true_task)
    assert 0.8 < bayes < 0.95, f"the tasks must overlap without being inseparable (Bayes share {bayes})"
    assert bayes - 0.1 < share <= bayes + 0.03, f"routed right: {share:.3f}, the Bayes rule: {bayes:.3f}"
    assert np.all(np.asarray(method.infer_task(state, jnp.asarray(features), jnp.int32(0))) == 0), \
        "only tasks seen so far can be inferred"


def test_treelora_in_hide_form_penalises_the_current_slot_only():
    method = TreeLoRAHiDe()  # the form's own defaults: TreeLoRA's ViT lam and depth, HiDe-LoRA's LoRA spec
    assert (method.tree.lam, method.tree.tree_depth) == (0.1, 5)
    assert method.lora.targets == ("k", "v") and method.lora.rank == 4, "HiDe-LoRA's own spec"
    model = ModelInfo(sites=SITES, num_layers=2, feature_dim=4)
    adapters, state = method.init(jax.random.PRNGKey(0), model, StreamInfo(3, 3, "classification", 6))
    assert state["bank"].shape == (3, 2, 2 * 4 * 4), "one tree module per block: both sites' A together"
    # Task 1 (slot 1), a stored vector for task 0, B non-zero, mid-epoch so that lam_t > 0.
    adapters = jax.tree.map(lambda leaf: leaf + 0.1, adapters)
    state = {**state, "task": jnp.int32(1), "t": jnp.int32(1), "steps_per_epoch": jnp.int32(2),
             "bank": state["bank"].at[0].set(1.0)}
    batch = {"weight": jnp.ones((2,))}

    def task_loss(trainable, key, b=None):  # a constant task loss: every gradient below is the regulariser's
        return jnp.float32(1.0), {"features": jnp.zeros((2, 4)), "accuracy": jnp.float32(0.0)}

    trainable = {"adapters": adapters, "head": {}}
    grads, aux = jax.jit(jax.grad(lambda tr: method.loss(tr, state, batch, jax.random.PRNGKey(1), task_loss),
                                  has_aux=True))(trainable)
    for site, leaves in grads["adapters"].items():
        a = np.asarray(leaves["a"])  # [L, K, r, d]
        assert np.abs(a[:, 1]).sum() > 0, f"{site}: the regulariser reaches the current slot's A"
        assert np.abs(a[:, 0]).sum() == 0 and np.abs(a[:, 2]).sum() == 0, f"{site}: and no other slot"
        assert np.abs(np.asarray(leaves["b"])).sum() == 0, "only A is regularised"
    np.testing.assert_array_equal(aux["treelora_choice"], [0, 0]), "task 0 is the only past task to select"
    after = method.after_step(state, aux, grads)
    np.testing.assert_array_equal(after["counts"][0], [1.0, 1.0]), "the bandit counts each block's selection"


@pytest.mark.parametrize("method,statistics", [("hide_lora", "covariance"), ("treelora", "covariance"),
                                               ("hide_lora", "multi-centroid")])
def test_one_compiled_step_for_all_tasks_and_identity_accuracy_recorded(method, statistics, tmp_path):
    config = hide_config(method)
    config.method.hide_lora.statistics = statistics
    config.method.hide_lora.centroids = 3
    run = make_run(config, tmp_path / "run")
    # `treelora` on this classification stream trains its HiDe form, under that form's name.
    assert run.method.name == {"treelora": "treelora_hide"}.get(method, method)
    assert type(run.method).__name__ in ("HiDeLoRA", "TreeLoRAHiDe")
    compiled = hide.train_identity_head._cache_size()
    outcome = run.fit()
    assert run.train_step._cache_size() == 1, "a new task compiled the train step again"
    # Tasks of one size: the TII head's training compiles once (at most; another test may have compiled it).
    assert hide.train_identity_head._cache_size() - compiled <= 1, "a new task compiled the TII training again"
    assert np.all(np.isfinite(np.diag(outcome["matrix"])))
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    identity = [r["task_identity_accuracy"] for r in records if r["type"] == "task"]
    assert [len(row) for row in identity] == [1, 2, 3], "the TII accuracy of every seen task, after every task"
    assert identity[0] == [100.0], "with one task every example is routed to it"
    assert outcome["task_identity_accuracy"] == identity[-1], "results.json takes the TII accuracy after the last task"
    if statistics == "multi-centroid":
        method_state = outcome["state"].method_state
        learned = np.asarray(method_state["class_task"]) >= 0
        for prefix in ("", "identity_"):
            assert np.asarray(method_state[f"{prefix}centroid_valid"]).any(axis=1)[learned].all(), \
                f"every learned class has {prefix or 'TAP '}centroids to draw from"


def test_per_example_slots_equal_the_slot_of_each_example_run_alone():
    """The one-pass evaluation (each example gathers its inferred task's slot) must compute what running
    the example through that slot alone computes; a wrong gather axis would mix examples' slots."""
    method = hide.HiDeLoRA()
    key_a, key_b, key_x = jax.random.split(jax.random.PRNGKey(0), 3)
    adapter = {"a": jax.random.normal(key_a, (5, 4, 6)), "b": jax.random.normal(key_b, (5, 7, 4))}
    x = jax.random.normal(key_x, (3, 2, 6))  # [B, S, d_in]
    tasks = jnp.array([2, 0, 4], jnp.int32)
    together = method.delta({"task": tasks}, "attn.key", adapter, x, None)
    alone = jnp.stack([method.delta({"task": tasks[b]}, "attn.key", adapter, x[b:b + 1], None)[0] for b in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-6, atol=1e-6)


def test_one_pass_evaluation_scores_as_one_forward_per_slot(tmp_path, monkeypatch):
    """The evaluator's one forward with per-example slots gives the scores of the K forwards (one per
    slot) it replaced, on a trained run whose tasks are inferred per example."""
    from jaxtree_lora.evaluation.evaluator import Evaluator

    run = make_run(hide_config("hide_lora"), tmp_path / "run")
    outcome = run.fit()
    state = outcome["state"]
    gathered = [run.evaluator.evaluate(state, task, 2) for task in range(3)]
    evaluator = run.evaluator
    per_slot = Evaluator(backbone=run.backbone, method=run.method, stream=run.stream, protocol=run.protocol,
                         consts=run.consts, frozen=run.frozen, host_batch=evaluator.host_batch,
                         out_sharding=evaluator._out_sharding, identity=run.identity, batches=evaluator.batches)
    per_slot.one_forward_per_example = False  # the inferred slots gathered from one forward per slot
    assert [per_slot.evaluate(state, task, 2) for task in range(3)] == gathered
    # RESULTS.md: "the TII column depends only on the pre-trained features". Other adapters (every slot
    # shifted and scaled) change the scores, never the identity accuracy.
    leaves, tree = jax.tree.flatten(state.trainable["adapters"])
    noise = [5.0 * jax.random.normal(jax.random.PRNGKey(i), leaf.shape, leaf.dtype) for i, leaf in enumerate(leaves)]
    other = jax.tree.unflatten(tree, [leaf + n for leaf, n in zip(leaves, noise)])
    changed = dataclasses.replace(state, trainable={**state.trainable, "adapters": other})
    moved = [run.evaluator.evaluate(changed, task, 2) for task in range(3)]
    assert [m["identity"] for m in moved] == [g["identity"] for g in gathered], "the TII column moved with the adapters"
    assert [(m["score"], m["ncm"]) for m in moved] != [(g["score"], g["ncm"]) for g in gathered], \
        "the other adapters changed nothing: the check would prove nothing"


def test_prototypes_reuse_the_end_of_task_pass_only_for_the_same_model(tmp_path, monkeypatch):
    """HiDe-LoRA's class statistics under the task's slot and the task's rehearsal-free prototypes see the
    same model (the merged slot; alignment moves heads only): the prototypes must read that pass back
    instead of forwarding the task's data again, and equal bit for bit the means of a fresh pass. A kept
    pass must not be read for another model (other adapters, another slot), and must be for a method state
    that differs only where the forward never reads (the class statistics)."""
    run = make_run(hide_config("hide_lora"), tmp_path / "run")
    evaluator = run.evaluator
    update_prototypes, forwards = evaluator.update_prototypes, []

    def checked(state, task):
        before = evaluator.forward_count
        state = update_prototypes(state, task)
        forwards.append(evaluator.forward_count - before)
        fresh = evaluator._task_class_means(state, task)  # the kept pass was read once: this one forwards
        assert evaluator.forward_count > before, "the fresh pass made no forward: the comparison proves nothing"
        rows = list(run.stream.tasks[task].classes)
        np.testing.assert_array_equal(np.asarray(state.prototypes)[rows], fresh[rows],
                                      err_msg="prototypes from the kept pass differ from a fresh pass")
        return state

    monkeypatch.setattr(evaluator, "update_prototypes", checked)
    final = run.fit()["state"]
    assert forwards == [0] * run.num_tasks, "the prototypes forwarded the task's training data again"
    last = run.num_tasks - 1

    def reads_kept_pass(state, task):
        """Whether task `task`'s prototypes in `state` read a pass kept for the last task's final model."""
        list(evaluator.train_features(final.trainable, evaluator._feature_state(final, last), last, keep=True))
        before = evaluator.forward_count
        evaluator._task_class_means(state, task)
        return evaluator.forward_count == before

    assert reads_kept_pass(final, last), "the same model forwarded again"
    shifted = jax.tree.map(lambda leaf: leaf + 1.0, final.trainable["adapters"])
    assert not reads_kept_pass(dataclasses.replace(final, trainable={**final.trainable, "adapters": shifted}), last), \
        "a pass kept for other adapters was read back"
    assert not reads_kept_pass(final, last - 1), "a pass kept for another task's slot was read back"
    statistics = {**final.method_state, "means": final.method_state["means"] + 1.0}
    assert reads_kept_pass(dataclasses.replace(final, method_state=statistics), last), \
        "a change the forward never reads (the class means) forced a second pass"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["hide_lora", "treelora"])
def test_resumed_run_equals_an_uninterrupted_one(method, tmp_path):
    whole_run, _ = interrupted_and_resumed(lambda **train: hide_config(method, **train), tmp_path)
    assert whole_run.train_step._cache_size() == 1


def test_sampling_factors_are_memoised_by_content_never_stale():
    """Each stored class's Cholesky factor equals the batched float64 factorisation bit for bit, on the
    first call and from the memo; a class whose covariance changed gets a new factor, not the old one."""
    rng = np.random.default_rng(0)
    classes, dim = 5, 12
    x = rng.normal(size=(classes, 40, dim))
    spread = np.stack([np.cov(x[c].T) + 1e-4 * np.eye(dim) for c in range(classes)]).astype(np.float32)
    stored = np.array([True, True, False, True, True])

    def reference(spread):
        factor = np.zeros(spread.shape)
        factor[stored] = np.linalg.cholesky(spread.astype(np.float64)[stored])
        return np.asarray(jnp.asarray(factor, jnp.float32))

    for _ in range(2):  # first computed, then read back
        np.testing.assert_array_equal(np.asarray(hide.sampling_factor(jnp.asarray(spread), jnp.asarray(stored),
                                                                      "covariance")), reference(spread))
    spread[3] = 2.0 * spread[3]
    np.testing.assert_array_equal(np.asarray(hide.sampling_factor(jnp.asarray(spread), jnp.asarray(stored), "covariance")),
                                  reference(spread), err_msg="a changed covariance got its old factor")


def test_recomputed_prototypes_reuse_a_slot_that_never_changed_and_recompute_one_that_did(tmp_path):
    """The diagnostic recomputes every class's prototype with the final model. Under HiDe-LoRA's slots a
    finished task's slot never changes, so its features, and its prototypes, are the ones already taken:
    no forward, the same scores as the rehearsal-free NCM. Once a slot's values change (here by hand),
    that task's prototypes are forwarded again and move."""
    from test_loop import make_run, tiny_config

    config = tiny_config("hide_lora")
    config.method.hide_lora.tii_epochs, config.method.hide_lora.tap_epochs = 2, 2
    config.eval.recomputed_prototypes = False  # called below, counted
    run = make_run(config, tmp_path / "run")
    outcome = run.fit()
    state, evaluator = outcome["state"], run.evaluator
    before = evaluator.forward_count
    scores = evaluator.recomputed_prototype_scores(state)
    assert evaluator.forward_count == before, "unchanged slots were forwarded again"
    np.testing.assert_allclose(scores, np.asarray(outcome["ncm_matrix"])[:, -1])

    moved = jax.tree.map(lambda value: value.at[:, 0].add(0.5), state.trainable["adapters"])
    changed = state.replace(trainable={**state.trainable, "adapters": moved})
    before = evaluator.forward_count
    evaluator.recomputed_prototype_scores(changed)
    assert evaluator.forward_count > before, "a changed slot's prototypes were reused"


def test_inferred_slot_features_are_computed_once_per_example_and_slot_while_the_slot_is_unchanged(tmp_path, monkeypatch):
    """After task t every seen task's test set is scored again, each example under the slot its task is
    inferred to be. A finished task's slot never changes, so an example's features under it are the
    ones already taken: only (example, slot) pairs not seen before are forwarded. The scores must equal
    a run that forwards every example at every evaluation, with fewer examples forwarded; a slot whose
    values change (here by hand) must be forwarded again and score as a fresh forward does."""
    from jaxtree_lora.evaluation.evaluator import Evaluator

    config = hide_config("hide_lora", epochs=1)
    config.eval.batch_size = 32  # chunks of 8 for the examples forwarded again
    reusing = make_run(config, tmp_path / "reusing")
    assert reusing.evaluator.reuses_slot_features
    outcome = reusing.fit()
    with monkeypatch.context() as patch:
        patch.setattr(Evaluator, "reuses_slot_features", property(lambda self: False))
        forwarding = make_run(config, tmp_path / "forwarding")
        expected = forwarding.fit()
    for name in ("matrix", "ncm_matrix", "task_identity_accuracy", "recomputed_prototype_scores"):
        np.testing.assert_array_equal(np.asarray(outcome[name], float), np.asarray(expected[name], float),
                                      err_msg=f"{name} moved when features were reused")
    assert reusing.evaluator.forward_count < forwarding.evaluator.forward_count, "nothing was reused"

    state, evaluator, last = outcome["state"], reusing.evaluator, reusing.num_tasks - 1
    before = evaluator.forward_count
    again = [evaluator.evaluate(state, task, last) for task in range(reusing.num_tasks)]
    assert evaluator.forward_count == before, "unchanged slots were forwarded again"
    moved = jax.tree.map(lambda value: value.at[:, 0].add(0.5), state.trainable["adapters"])
    changed = state.replace(trainable={**state.trainable, "adapters": moved})
    scores = [evaluator.evaluate(changed, task, last) for task in range(reusing.num_tasks)]
    assert evaluator.forward_count > before, "features under a changed slot were reused"
    with monkeypatch.context() as patch:
        patch.setattr(Evaluator, "reuses_slot_features", property(lambda self: False))
        assert scores == [forwarding.evaluator.evaluate(changed, task, last) for task in range(reusing.num_tasks)]
        assert again == [forwarding.evaluator.evaluate(state, task, last) for task in range(reusing.num_tasks)]
