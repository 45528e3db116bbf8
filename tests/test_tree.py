"""The gradient-similarity tree against the official rule, on hand-made and random task vectors."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora.tree import similarity, tree as tree_lib


def reference_tree(bank: np.ndarray, n: int, depth_limit: int):
    """The official rule (docs/METHODS.md, TreeLoRA tree) as plain recursive Python: an independent check
    of the fixed-shape jitted builder. Returns nested (tasks, median, left, right)."""
    delta = [bank[0]] + [bank[i] - bank[i - 1] for i in range(1, n)]

    def node(tasks, depth):
        if depth >= depth_limit or len(tasks) <= 1:
            return {"tasks": tasks}
        v = np.stack([delta[i][depth] for i in tasks])
        mean = v.mean(axis=0)
        s = v @ mean
        median = np.sort(s)[(len(s) - 1) // 2]  # torch.median: lower median
        left = [t for t, value in zip(tasks, s) if value >= median]
        right = [t for t, value in zip(tasks, s) if value < median]
        if not left or not right:
            left, right = tasks[: len(tasks) // 2], tasks[len(tasks) // 2:]
        return {"tasks": tasks, "median": float(median), "left": node(left, depth + 1), "right": node(right, depth + 1)}

    return node(list(range(n)), 0)


def strip(node):
    if "left" not in node:
        return {"tasks": node["tasks"]}
    return {"tasks": node["tasks"], "left": strip(node["left"]), "right": strip(node["right"])}


def as_reference(nested):
    if "left" not in nested:
        return {"tasks": nested["tasks"]}
    return {"tasks": nested["tasks"], "left": as_reference(nested["left"]), "right": as_reference(nested["right"])}


def test_lower_median_with_an_even_count():
    values = jnp.asarray([4.0, 1.0, 3.0, 2.0, 100.0])
    mask = jnp.asarray([True, True, True, True, False])
    # sorted members 1, 2, 3, 4: torch.median takes 2 (jnp.median would give 2.5)
    assert float(tree_lib.lower_median(values, mask)) == 2.0


def test_split_by_position_when_one_side_is_empty():
    # All members identical -> every score equals the median -> right side empty -> positional split.
    delta_module = jnp.ones((4, 3))
    members = jnp.asarray([True, True, True, False])
    left, right, _ = tree_lib.split(delta_module, members)
    assert left.tolist() == [True, False, False, False], "first floor(3/2) = 1 task goes left"
    assert right.tolist() == [False, True, True, False]


def test_hand_computed_root_split():
    # Module 0 differences: d0 = G0, d1 = G1 - G0, d2 = G2 - G1 (F = 2)
    bank = np.zeros((4, 2, 2), np.float32)
    bank[0, 0] = [1.0, 0.0]
    bank[1, 0] = [2.0, 0.0]   # d1 = [1, 0]
    bank[2, 0] = [5.0, 0.0]   # d2 = [3, 0]; mean = [5/3, 0]; s = [5/3, 5/3, 5]; lower median = 5/3
    tree = tree_lib.build(jnp.asarray(bank), 3)
    nested = tree_lib.to_nested(tree)
    # s >= 5/3 for all three -> right empty -> positional split: [0] left, [1, 2] right.
    assert nested["left"]["tasks"] == [0] and nested["right"]["tasks"] == [1, 2]
    assert nested["median_similarity"] == pytest.approx(5.0 / 3.0, rel=1e-5)


@pytest.mark.parametrize("seed,n,modules", [(0, 5, 4), (1, 8, 3), (2, 7, 6), (3, 2, 2), (4, 1, 3)])
def test_partition_matches_the_official_rule(seed, n, modules):
    rng = np.random.default_rng(seed)
    max_tasks = 8
    bank = np.zeros((max_tasks, modules, 5), np.float32)
    bank[:n] = rng.normal(size=(n, modules, 5))
    got = as_reference(tree_lib.to_nested(tree_lib.build(jnp.asarray(bank), n)))
    expected = strip(reference_tree(bank, n, modules))
    assert got == expected


def test_fixture_partition():
    """Vectors and the expected partition stored in tests/fixtures/tree_partition.json (made by
    reference_tree above from seeded vectors; see the fixture's "how" field)."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "tree_partition.json")
    with open(path) as f:
        fixture = json.load(f)
    bank = np.asarray(fixture["bank"], np.float32)
    got = as_reference(tree_lib.to_nested(tree_lib.build(jnp.asarray(bank), fixture["n"])))
    assert got == fixture["partition"]


def test_building_for_more_tasks_does_not_recompile():
    traces = []

    def counted(bank, n):
        traces.append(1)
        return tree_lib.build(bank, n)

    build = jax.jit(counted)
    bank = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 3)), jnp.float32)
    for n in (2, 5, 8):
        build(bank, jnp.asarray(n, jnp.int32))
    assert len(traces) == 1


def test_negative_median_flips_the_reweight_factor():
    # Two tasks whose module-0 differences point in opposite directions -> negative scores.
    bank = np.zeros((4, 1, 2), np.float32)
    bank[0, 0] = [1.0, 0.0]
    bank[1, 0] = [-1.0, 0.0]   # d1 = [-2, 0]; mean = [-0.5, 0]; s = [-0.5, 1.0]; median = -0.5
    bank[2, 0] = [-4.0, 0.0]   # d2 = [-3, 0]; mean = [-4/3, 0]; s = [-4/3, 8/3, 4]; median = 8/3
    tree = tree_lib.build(jnp.asarray(bank), 3)
    nested = tree_lib.to_nested(tree)
    assert nested["left"]["tasks"] == [1, 2] and nested["right"]["tasks"] == [0]
    # depth 1 split of [1, 2] on module... only one module: depth 1 >= D=1 -> leaf; factor of a leaf is 1.
    factor, rows = tree_lib.root_child_factor(tree, 0)
    assert float(factor) == 1.0 and rows.tolist()[:3] == [True, False, False]
    # With two modules the left child [1, 2] splits on module 1 and its median can be negative.
    bank2 = np.zeros((4, 2, 2), np.float32)
    bank2[:, 0] = bank[:, 0]
    bank2[0, 1] = [1.0, 0.0]
    bank2[1, 1] = [0.0, 0.0]   # d1 = [-1, 0]
    bank2[2, 1] = [3.0, 0.0]   # d2 = [3, 0]; mean = [1, 0]; s = [-1, 3]; median = -1 (negative)
    tree2 = tree_lib.build(jnp.asarray(bank2), 3)
    factor2, rows2 = tree_lib.root_child_factor(tree2, 1)
    assert float(factor2) == pytest.approx(-1.0), "min(median, 1.5) keeps a negative median: rows flip sign"
    assert rows2.tolist()[:3] == [False, True, True]


def test_similarities_match_numpy():
    rng = np.random.default_rng(0)
    q = rng.normal(size=(3, 4)).astype(np.float32)
    bank = rng.normal(size=(5, 3, 4)).astype(np.float32)
    np.testing.assert_allclose(similarity.l1(q, bank), np.abs(q[None] - bank).sum(-1), rtol=1e-5)
    np.testing.assert_allclose(similarity.dot(q, bank), (q[None] * bank).sum(-1), rtol=1e-5)
    cos = (q[None] * bank).sum(-1) / (np.linalg.norm(q, axis=-1)[None] * np.linalg.norm(bank, axis=-1))
    np.testing.assert_allclose(similarity.cosine(q, bank), cos, rtol=1e-5)
    masked = similarity.pairwise(q, bank, "l1", valid=jnp.asarray([True, True, False, False, False]))
    assert np.isnan(np.asarray(masked)[2:]).all()


def test_fixture_medians_equal_the_official_code():
    """median_similarity of every internal node equals what the official KD_LoRA_Tree stored for the
    same vectors (fixture "official_medians", from tests/fixtures/make_tree_partition.py under torch)."""
    path = os.path.join(os.path.dirname(__file__), "fixtures", "tree_partition.json")
    with open(path) as f:
        fixture = json.load(f)
    nested = tree_lib.to_nested(tree_lib.build(jnp.asarray(fixture["bank"], jnp.float32), fixture["n"]))
    ours = []

    def walk(node):
        if "left" in node:
            ours.append((node["tasks"], node["median_similarity"]))
            walk(node["left"])
            walk(node["right"])

    walk(nested)
    assert [tasks for tasks, _ in ours] == [tasks for tasks, _ in fixture["official_medians"]]
    np.testing.assert_allclose([m for _, m in ours], [m for _, m in fixture["official_medians"]], rtol=1e-5,
                               err_msg="lower-median dot-product similarities differ from the official tree's")
    assert min(m for _, m in ours) < 0, "the fixture includes a negative median"


def test_parent_links_and_depths_are_consistent():
    rng = np.random.default_rng(5)
    bank = jnp.asarray(rng.normal(size=(6, 4, 3)), jnp.float32)
    tree = jax.device_get(tree_lib.build(bank, 6))
    assert tree.parent[0] == -1
    for slot in np.flatnonzero(tree.valid):
        for child in (tree.left[slot], tree.right[slot]):
            if child >= 0:
                assert tree.parent[child] == slot and tree.depth[child] == tree.depth[slot] + 1
                assert child > slot, "children in higher slots (the one-pass build relies on it)"
        if tree.left[slot] >= 0:
            union = tree.members[tree.left[slot]] | tree.members[tree.right[slot]]
            assert (union == tree.members[slot]).all() and not (
                tree.members[tree.left[slot]] & tree.members[tree.right[slot]]).any(), "children partition the node"
    assert int(np.sum(tree.valid & (tree.left < 0))) == 6, "one leaf per task with D >= depth"


def test_depth_limit_makes_leaves_with_several_tasks():
    rng = np.random.default_rng(6)
    bank = jnp.asarray(rng.normal(size=(8, 4, 3)), jnp.float32)
    nested = tree_lib.to_nested(tree_lib.build(bank, 8, depth_limit=1))
    assert "left" in nested and "left" not in nested["left"] and "left" not in nested["right"]
    # 8 distinct scores, lower median = the 4th smallest: 5 scores are >= it (left), 3 below (right);
    # the averaged median (jnp.median) would give 4 / 4.
    assert [len(nested["left"]["tasks"]), len(nested["right"]["tasks"])] == [5, 3]


def test_format_and_draw(tmp_path):
    bank = jnp.asarray(np.random.default_rng(7).normal(size=(4, 3, 2)), jnp.float32)
    tree = tree_lib.build(bank, 3)
    text = tree_lib.format_tree(tree)
    assert text.splitlines()[0].startswith("root: tasks=[0, 1, 2] median_similarity="), text
    assert len(text.splitlines()) == 5, "root, two children, two leaves under the 2-task child"
    assert tree_lib.format_tree(tree_lib.empty(4)) == "(empty tree)"
    from jaxtree_lora.tree.draw import draw

    path = tmp_path / "tree.png"
    draw(tree, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", "draw must write a PNG"
