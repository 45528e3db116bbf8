"""TreeLoRA's bandit against the official selection formulas (docs/METHODS.md, TreeLoRA), the official
code's own output (tests/fixtures/tree_partition.json "official_selection"), and the paper's LCB."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora.tree import bandit, tree as tree_lib

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "tree_partition.json")


def test_bonus_at_zero_count():
    t, steps = 3, 10
    expected = np.sqrt(np.log(2 * steps * (t + 1) * (t + 2))) / np.sqrt(1e-5)
    assert float(bandit.bonus(jnp.zeros(()), t, steps)) == pytest.approx(expected, rel=1e-5), \
        "an unexplored arm's bonus is sqrt(log(2T(t+1)(t+2))) / sqrt(1e-5)"
    assert float(bandit.bonus(jnp.asarray(2.0), t, steps)) == pytest.approx(
        np.sqrt(np.log(2 * steps * 4 * 5)) / np.sqrt(4 + 1e-5), rel=1e-5), "bonus with N = 2"


def test_official_scores_add_the_minimum_and_favour_larger_distances():
    # Three explored arms, one module, mean distances 100 / 300 / 900 (sums are negative distances).
    counts = jnp.asarray([[4.0], [4.0], [4.0]])
    sums = -jnp.asarray([[400.0], [1200.0], [3600.0]])
    valid = jnp.asarray([True, True, True])
    scores = bandit.official_scores(sums, counts, valid, 5, 100)
    beta = float(bandit.bonus(jnp.asarray(4.0), 5, 100))
    raw = np.asarray([100.0, 300.0, 900.0]) + beta
    np.testing.assert_allclose(np.asarray(scores)[:, 0], raw + raw.min(), rtol=1e-5,
                               err_msg="s = mean distance + beta, then s += min(s)")
    normalised = np.asarray(bandit.normalise(scores, valid))[:, 0]
    probabilities = np.exp(normalised) / np.exp(normalised).sum()
    assert probabilities[0] < probabilities[1] < probabilities[2], "official code prefers the LARGER distance"
    # a NumPy re-run of the official scoring (ZinYY/TreeLoRA utils/kd_lora_tree.py): about 0.20 / 0.26 / 0.54
    np.testing.assert_allclose(probabilities, [0.20, 0.26, 0.54], atol=0.015)


def test_min_shift_subtract_option():
    counts = jnp.asarray([[1.0], [1.0]])
    sums = -jnp.asarray([[10.0], [30.0]])
    valid = jnp.asarray([True, True])
    beta = float(bandit.bonus(jnp.asarray(1.0), 0, 10))
    raw = np.asarray([10.0, 30.0]) + beta
    np.testing.assert_allclose(np.asarray(bandit.official_scores(sums, counts, valid, 0, 10, "subtract"))[:, 0],
                               raw - raw.min(), rtol=1e-5, err_msg="subtract: s - min(s) >= 0 with 0 at the min")


def test_range_normalisation_ignores_unused_slots():
    scores = jnp.asarray([[1.0, 3.0], [2.0, 5.0], [100.0, -100.0]])
    valid = jnp.asarray([True, True, False])
    got = np.asarray(bandit.normalise(scores, valid))[:2]
    np.testing.assert_allclose(got, np.asarray([[1.0, 3.0], [2.0, 5.0]]) / (5.0 - 1.0 + 1e-5), rtol=1e-6,
                               err_msg="range max - min over the valid rows only")


def test_selection_frequencies_match_softmax_probabilities():
    """Per-module draws follow softmax of the normalised scores (no tree reweight: an empty tree);
    each frequency within 4 binomial standard errors of its probability (fixed seed)."""
    k, d, draws = 3, 2, 20000
    counts = jnp.asarray([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    sums = -jnp.asarray([[30.0, 5.0], [40.0, 20.0], [5.0, 90.0]])
    valid = jnp.asarray([True, True, True])
    tree = tree_lib.empty(k)
    draw = jax.jit(jax.vmap(lambda key: bandit.select_official(key, sums, counts, valid, tree, 4, 50)[0]))
    choices = np.asarray(draw(jax.random.split(jax.random.PRNGKey(0), draws)))
    # The probabilities, recomputed here from the formulas (not from select_official's output).
    beta = np.sqrt(np.log(2 * 50 * 5 * 6)) / np.sqrt(2 * np.asarray(counts) + 1e-5)
    scores = -np.asarray(sums) / np.asarray(counts) + beta
    scores = scores + scores.min()
    scores = scores / (scores.max() - scores.min() + 1e-5)
    expected = np.exp(scores) / np.exp(scores).sum(axis=0)
    for module in range(d):
        frequencies = np.bincount(choices[:, module], minlength=k) / draws
        error = np.sqrt(expected[:, module] * (1 - expected[:, module]) / draws)
        assert np.all(np.abs(frequencies - expected[:, module]) < 4 * error), (module, frequencies, expected)


def test_unused_slots_are_never_selected():
    valid = jnp.asarray([True, True, False, False])
    sums = jnp.zeros((4, 3)).at[2:].set(-1e6)  # huge distances would be favoured if not masked
    counts = jnp.ones((4, 3))
    keys = jax.random.split(jax.random.PRNGKey(1), 200)
    draw = jax.jit(jax.vmap(lambda key: bandit.select_official(key, sums, counts, valid, tree_lib.empty(4), 0, 5)[0]))
    choices = draw(keys)
    assert int(jnp.max(choices)) <= 1, "a slot with no stored task must have probability 0"


def test_bandit_update_uses_the_running_vector_including_the_step():
    running = jnp.asarray([[1.0, 2.0], [0.0, 0.0]])
    bank = jnp.asarray([[[0.0, 0.0], [1.0, 1.0]], [[3.0, 3.0], [0.0, 0.0]]])  # [K=2, D=2, F=2]
    sums, counts = bandit.update(jnp.zeros((2, 2)), jnp.zeros((2, 2)), jnp.asarray([1, 0]), running, bank)
    # module 0 chose task 1: |1-3| + |2-3| = 3; module 1 chose task 0: |0-1| + |0-1| = 2
    np.testing.assert_allclose(np.asarray(sums), [[0.0, -2.0], [-3.0, 0.0]])
    np.testing.assert_allclose(np.asarray(counts), [[0.0, 1.0], [1.0, 0.0]])


def test_matches_one_step_of_the_official_tree_search():
    """The official `KD_LoRA_Tree.tree_search` (run under torch by tests/fixtures/make_tree_partition.py,
    with its draws fixed) built these softmax inputs; ours must equal them, including the bonus at
    N = 0 (module 0), the added minimum, the x1.5-capped root-child reweight and the range
    normalisation, and the statistics update that follows."""
    with open(FIXTURE) as f:
        fixture = json.load(f)
    case = fixture["official_selection"]
    bank = jnp.asarray(fixture["bank"], jnp.float32)
    n, max_tasks = case["n"], bank.shape[0]
    tree = tree_lib.build(bank, n)
    valid = jnp.arange(max_tasks) < n
    sums = jnp.zeros((max_tasks, bank.shape[1])).at[:n].set(jnp.asarray(case["sums"]))
    counts = jnp.asarray(case["counts"])
    scores = bandit.official_scores(sums, counts, valid, case["t"], case["steps_per_epoch"])
    focus = jax.nn.softmax(bandit.focus_logits(scores, valid))[:n]
    np.testing.assert_allclose(np.asarray(focus), case["focus_probabilities"], atol=1e-6,
                               err_msg="focus draw: softmax over tasks of sum_l s[:, l]")
    logits = bandit.module_logits(scores, valid, tree, case["focus"])
    probabilities = jax.nn.softmax(logits, axis=0)
    np.testing.assert_allclose(np.asarray(probabilities)[:n], case["probabilities"], rtol=2e-4, atol=1e-6,
                               err_msg="per-module probabilities differ from the official code's")
    assert float(jnp.sum(probabilities[n:])) == 0.0
    new_sums, new_counts = bandit.update(sums, counts, jnp.asarray(case["choice"]), jnp.asarray(case["running"]), bank)
    np.testing.assert_allclose(np.asarray(new_sums)[:n], case["sums_after"], rtol=1e-5,
                               err_msg="S update differs from the official update_similarity")
    np.testing.assert_allclose(np.asarray(new_counts), case["counts_after"], err_msg="N update")


def test_selection_compiles_once_for_any_number_of_past_tasks():
    traces = []

    def select(key, sums, counts, bank, n, t):
        traces.append(1)
        valid = jnp.arange(bank.shape[0]) < n
        tree = tree_lib.build(bank, n)
        official, _ = bandit.select_official(key, sums, counts, valid, tree, t, 20)
        return official, bandit.select_paper(sums, counts, valid, tree)

    select = jax.jit(select)
    rng = np.random.default_rng(0)
    bank = jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
    sums, counts = -jnp.ones((8, 4)), jnp.ones((8, 4))
    for n in (2, 5):
        official, paper = select(jax.random.PRNGKey(n), sums, counts, bank, jnp.asarray(n), jnp.asarray(3))
        assert int(jnp.max(official)) < n and int(jnp.max(paper)) < n
    assert len(traces) == 1, "build + select must not recompile when the number of past tasks changes"


# -- the paper's LCB (a reconstruction of arXiv 2506.10355 Eq. 2) ---------------------------------

def test_paper_lcb_hand_computed():
    valid = jnp.asarray([True, True, True])
    # Arm 2 unexplored: tried first whatever the others' statistics.
    counts = jnp.asarray([[2.0], [1.0], [0.0]])
    sums = -jnp.asarray([[4.0], [3.0], [0.0]])
    assert int(bandit.select_paper(sums, counts, valid, tree_lib.empty(3), tree_bound=False)[0]) == 2
    # All explored: mean distances 2, 3, 10 with counts 2, 1, 1, t = 4 selections + 1 = 5.
    counts = jnp.asarray([[2.0], [1.0], [1.0]])
    sums = -jnp.asarray([[4.0], [3.0], [10.0]])
    width = lambda count: 2 * math.sqrt(math.log(5) / count)
    expected = np.asarray([2 - width(2), 3 - width(1), 10 - width(1)])
    got = bandit.lcb(sums, counts, jnp.sum(counts, axis=0, keepdims=True) + 1)[:, 0]
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, err_msg="LCB = mu_hat - 2 sqrt(log t / n)")
    assert int(bandit.select_paper(sums, counts, valid, tree_lib.empty(3), tree_bound=False)[0]) == \
        int(np.argmin(expected)), "the paper selects the MINIMUM LCB (smallest distance)"


def reference_smooth_choice(nested, sums, counts, rounds):
    """Plain-Python smooth-tree descent for one module: B(leaf) = min LCB of its tasks, B(node) =
    max(min(B(left), B(right)), LCB(pooled) - |median|); walk into the child of smaller B."""

    def lcb(total, count):
        return -math.inf if count == 0 else -total / count - 2 * math.sqrt(math.log(rounds) / count)

    def bound(node):
        if "left" not in node:
            return min(lcb(sums[k], counts[k]) for k in node["tasks"])
        pooled = lcb(sum(sums[k] for k in node["tasks"]), sum(counts[k] for k in node["tasks"]))
        return max(min(bound(node["left"]), bound(node["right"])), pooled - abs(node["median_similarity"]))

    node = nested
    while "left" in node:
        node = node["left"] if bound(node["left"]) <= bound(node["right"]) else node["right"]
    return min(node["tasks"], key=lambda k: lcb(sums[k], counts[k]))


def test_paper_tree_bound_matches_a_plain_recursive_version():
    with open(FIXTURE) as f:
        fixture = json.load(f)
    bank = jnp.asarray(fixture["bank"], jnp.float32) * 0.05  # medians of the order of the distances
    n, max_tasks, modules = fixture["n"], bank.shape[0], 3
    tree = tree_lib.build(bank, n)
    nested = tree_lib.to_nested(tree)
    valid = jnp.arange(max_tasks) < n
    differs_from_flat = 0
    select = jax.jit(bandit.select_paper, static_argnames=("tree_bound",))
    for seed in range(12):
        rng = np.random.default_rng(seed)
        counts = rng.integers(1, 6, size=(max_tasks, modules)).astype(np.float32)
        sums = -(counts * rng.uniform(0.0, 8.0, size=(max_tasks, modules))).astype(np.float32)
        got = np.asarray(select(jnp.asarray(sums), jnp.asarray(counts), valid, tree))
        flat = np.asarray(select(jnp.asarray(sums), jnp.asarray(counts), valid, tree, tree_bound=False))
        for module in range(modules):
            rounds = counts[:, module].sum() + 1
            expected = reference_smooth_choice(nested, sums[:, module].tolist(), counts[:, module].tolist(), rounds)
            assert got[module] == expected, (seed, module)
        differs_from_flat += int(np.sum(got != flat))
    assert differs_from_flat > 0, "the tree bound never changed a choice: the test does not exercise it"


def test_random_selection_is_uniform_over_past_tasks():
    choices = np.asarray(bandit.select_random(jax.random.PRNGKey(0), jnp.asarray([True] * 3 + [False]), 30000))
    frequencies = np.bincount(choices, minlength=4) / choices.size
    np.testing.assert_allclose(frequencies, [1 / 3, 1 / 3, 1 / 3, 0.0], atol=0.012)


def test_a_negative_root_child_median_flips_that_block():
    """The official reweight multiplies the focus child's rows by min(median, 1.5), which may be
    negative: those tasks' scores change sign before the range normalisation."""
    bank = np.zeros((4, 2, 2), np.float32)
    bank[:3, 0] = [[1.0, 0.0], [-1.0, 0.0], [-4.0, 0.0]]  # root split: [1, 2] left, [0] right
    bank[:3, 1] = [[1.0, 0.0], [0.0, 0.0], [3.0, 0.0]]    # left child [1, 2] on module 1: median -1
    tree = tree_lib.build(jnp.asarray(bank), 3)
    assert tree_lib.to_nested(tree)["left"]["median_similarity"] == pytest.approx(-1.0)
    valid = jnp.asarray([True, True, True, False])
    scores = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [0.0, 0.0]])
    expected = np.asarray([[1.0, 2.0], [-3.0, -4.0], [-5.0, -6.0]])
    expected = expected / (expected.max() - expected.min() + 1e-5)
    got = np.asarray(bandit.module_logits(scores, valid, tree, 2))
    np.testing.assert_allclose(got[:3], expected, rtol=1e-6, err_msg="rows of tasks 1, 2 times -1, then range")
    assert np.all(got[3] <= bandit.NEG), "the unused slot keeps probability 0"
    unchanged = np.asarray(bandit.module_logits(scores, valid, tree, 0))[:3]  # focus in the leaf child [0]
    np.testing.assert_allclose(unchanged, np.asarray(scores)[:3] / (6.0 - 1.0 + 1e-5), rtol=1e-6,
                               err_msg="a leaf child's factor is 1")


def test_a_root_child_median_of_exactly_zero_zeroes_that_block():
    """The official code takes `median_similarity if median_similarity is not None else 1.0`, so a
    median of exactly 0 gives the factor min(0, 1.5) = 0 (only a leaf child, median None, gives 1):
    the focus child's rows become 0 before the range normalisation."""
    bank = np.zeros((4, 2, 2), np.float32)
    bank[:3, 0] = [[1.0, 0.0], [-1.0, 0.0], [-4.0, 0.0]]  # root split: [1, 2] left, [0] right
    bank[:3, 1] = [[1.0, 0.0], [1.0, 0.0], [3.0, 0.0]]    # left child on module 1: Delta 0 and 2, scores 0, 2
    tree = tree_lib.build(jnp.asarray(bank), 3)
    nested = tree_lib.to_nested(tree)
    assert nested["left"]["tasks"] == [1, 2] and nested["left"]["median_similarity"] == 0.0
    factor, rows = tree_lib.root_child_factor(tree, 2)
    assert float(factor) == 0.0, "median 0 is a number, not a missing median: the factor is 0, not 1"
    valid = jnp.asarray([True, True, True, False])
    scores = jnp.asarray([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [0.0, 0.0]])
    expected = np.asarray([[1.0, 2.0], [0.0, 0.0], [0.0, 0.0]]) / (2.0 - 0.0 + 1e-5)
    got = np.asarray(bandit.module_logits(scores, valid, tree, 2))
    np.testing.assert_allclose(got[:3], expected, rtol=1e-6, err_msg="rows of tasks 1, 2 times 0, then range")


def test_mean_keeps_the_sum_where_an_arm_was_never_selected():
    """Official: `sim[valid_mask] /= N[valid_mask]` divides only the arms with N > 0 and keeps S where
    N = 0 (S there is 0 in training, as S only changes with a selection; here it is not)."""
    sums = -jnp.asarray([[5.0], [8.0]])
    counts = jnp.asarray([[0.0], [2.0]])
    valid = jnp.asarray([True, True])
    got = np.asarray(bandit.official_scores(sums, counts, valid, 1, 10))[:, 0]
    beta = np.asarray([float(bandit.bonus(jnp.asarray(c), 1, 10)) for c in (0.0, 2.0)])
    raw = -(np.asarray([-5.0, -4.0]) - beta)  # mu = S (N = 0) and S / N = -8 / 2
    np.testing.assert_allclose(got, raw + raw.min(), rtol=1e-6)
