"""Sequence packing (data.packing): several texts per row, attention and pooling kept within each
text, so an encoder's features and a run's results are those of one text per row, on fewer token slots."""
import jax
import numpy as np
import pytest

from jaxtree_lora.data import packing
from jaxtree_lora.train.backbone import build_tiny

from test_loop import make_run, tiny_config


def right_padded(lengths, width, seed=0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, :length] = rng.integers(1, 128, length)
        mask[row, :length] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": np.arange(len(lengths)),
            "weight": np.ones(len(lengths), np.float32)}


def test_first_fit_layout_by_hand():
    batch = right_padded([3, 5, 2, 6], 8)
    packed = packing.pack(batch, rows=3)
    # 3 + 5 fill row 0; 2 opens row 1; 6 fits beside it (2 + 6 = 8).
    np.testing.assert_array_equal(packed["segment_ids"], [[1, 1, 1, 2, 2, 2, 2, 2], [3, 3, 4, 4, 4, 4, 4, 4],
                                                           [0] * 8])
    np.testing.assert_array_equal(packed["position_ids"][0], [0, 1, 2, 0, 1, 2, 3, 4])
    np.testing.assert_array_equal(packed["position_ids"][1], [0, 1, 0, 1, 2, 3, 4, 5])
    np.testing.assert_array_equal(packed["input_ids"][1, 2:], batch["input_ids"][3, :6])
    assert packed["attention_mask"].sum() == 16 and packed["examples"].tolist() == [1, 2, 3, 4]
    assert packing.rows_needed(batch) == 2 and packing.rows_needed(batch, 16) == 1
    wide = packing.pack(batch, rows=1, width=16)  # rows twice the texts' width, as the Packer packs
    np.testing.assert_array_equal(wide["segment_ids"][0], [1] * 3 + [2] * 5 + [3] * 2 + [4] * 6)
    with pytest.raises(ValueError):
        packing.pack(batch, rows=1)
    assert packing.row_choices(16) == (4, 8, 12, 16) and packing.row_choices(8, 8) == tuple(range(1, 9)) and packing.row_choices(3) == (1, 2, 3)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_packed_features_equal_one_text_per_row(pooling):
    backbone = build_tiny("tiny-bert", {"pooling": pooling})
    lengths = np.random.default_rng(1).integers(1, 20, 16)
    batch = right_padded(lengths, 24)
    packed = packing.Packer(16)(batch)
    assert packed["input_ids"].shape[0] < 16, "nothing was packed: the comparison shows nothing"
    np.testing.assert_allclose(np.asarray(backbone.features(backbone.params, packed)),
                               np.asarray(backbone.features(backbone.params, batch)), atol=1e-5,
                               err_msg="a packed text saw another text's tokens or was pooled with them")


def test_packed_run_ends_like_an_unpacked_one(tmp_path):
    """Dropout 0 (its masks follow the array shapes): the same matrices and adapters, fewer compiles
    than row counts."""
    def config(pack):
        c = tiny_config("seqlora", pack=pack, accumulation=1)
        c.lora.dropout = 0.0
        return c

    packed_run = make_run(config(True), tmp_path / "packed")
    packer, seen = packed_run.packer, []

    def recording(batch):
        out = packer(batch)
        seen.append(out["input_ids"].shape[0])
        return out

    packed_run.packer = recording
    packed = packed_run.fit()
    plain_run = make_run(config(False), tmp_path / "plain")
    plain = plain_run.fit()
    assert packer.planned and plain_run.packer is None
    np.testing.assert_array_equal(packed["matrix"], plain["matrix"])
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=2e-5),
                 jax.device_get(packed["state"].trainable), jax.device_get(plain["state"].trainable))
    # The rows planned before training (plan.packed_rows) are the ones the run packed: one compile each.
    assert sorted(set(seen)) == list(packer.planned), "the stream's plan missed or invented a row count"
    assert packed_run.train_step._cache_size() == len(packer.planned), "more compiles than planned row counts"


def test_row_plan_merges_rare_counts_by_hand():
    """A count joins the next one up while the rows that adds over the stream stay within the budget."""
    assert packing.plan_rows({2: 4, 3: 56, 4: 60}, merge_row_steps=16) == (3, 4)  # 4 steps x 1 row: merged
    assert packing.plan_rows({2: 4, 3: 56, 4: 60}, merge_row_steps=3) == (2, 3, 4)
    assert packing.plan_rows({2: 4, 3: 56, 4: 60}, merge_row_steps=10 ** 6) == (4,)
    # 30 steps x 1 row > 16: kept; 2 joins 3 (5 rows); the group {2, 3} would add 55 rows to reach 8.
    assert packing.plan_rows({1: 30, 2: 5, 3: 5, 8: 100}, merge_row_steps=16) == (1, 3, 8)
    assert packing.plan_rows({}) == ()
    packer = packing.Packer(8, planned=(3,))
    assert packer.choices[:1] == (3,) and packer(right_padded([8] * 8, 8))["input_ids"].shape[0] == 4, \
        "a batch beyond the plan must still be packed (next even step)"


def test_per_token_records_weigh_each_token_by_its_own_example(tmp_path):
    """LiLoRA's stability term sums over tokens with each token's example weight: its loss and gradients
    on a packed batch (padding examples included) equal those on the padded batch."""
    config = tiny_config("lilora")
    config.lora.dropout, config.lora.rank = 0.0, 2
    config.method.lilora.sub_rank, config.method.lilora.stability = 1, 1.0
    run = make_run(config, tmp_path / "run")
    state = run.initial_state()
    key = jax.random.PRNGKey(3)
    trainable = jax.tree.map(lambda leaf: leaf + 0.2 * jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape),
                             state.trainable)
    _, method_state = run.method.begin_task(trainable["adapters"], state.method_state, 1)
    batch = right_padded([3, 8, 2, 5, 1, 4, 6, 2], 8, seed=2)
    batch["labels"] = np.resize(np.asarray(run.stream.tasks[1].classes), 8)
    batch["weight"] = np.where(np.arange(8) < 6, 1.0, 0.0).astype(np.float32)  # two padding examples
    packed = packing.Packer(8)(batch)
    assert packed["input_ids"].shape[0] < 8

    def loss(trainable, b):
        closure = lambda tr, k, other=None: run.task_loss(tr, run.frozen, run.consts, method_state,
                                                           other if other is not None else b, k)
        return run.method.loss(trainable, method_state, b, None, closure)[0]

    for name in ("loss", "grad"):
        fn = loss if name == "loss" else jax.grad(loss)
        jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-6, err_msg=name),
                     jax.device_get(fn(trainable, packed)), jax.device_get(fn(trainable, batch)))


def test_feature_batches_pack_within_half_the_rows_and_pass_unpackable_ones_through():
    packer = packing.FeaturePacker()
    batch = right_padded(np.random.default_rng(4).integers(1, 24, 12), 24)
    packed = packer(batch)
    assert packed["input_ids"].shape[1] == 48 and packed["input_ids"].shape[0] in packing.row_choices(6, 4)
    np.testing.assert_array_equal(packed["labels"], batch["labels"])  # per-example arrays unchanged
    assert packer(packed) is packed, "a packed batch was packed again"
    left = {**batch, "attention_mask": batch["attention_mask"][:, ::-1].copy()}
    assert packer(left) is left, "a left-padded batch cannot be laid end to end and must pass through"
    long = right_padded(np.full(12, 23), 24)
    assert packer(long) is long, "texts filling their rows gain no slots from packing, only wider attention"


def test_packed_evaluation_takes_each_examples_own_slot(tmp_path):
    """HiDe-LoRA scores each example with the slot of its inferred task in one forward: on packed rows
    each token takes its own example's slot. Independent reference: the padded batch forwarded once per
    slot (a scalar task), each example's row read from its own slot's pass."""
    config = tiny_config("hide_lora")
    run = make_run(config, tmp_path / "run")
    assert run.feature_packer is not None
    state = run.initial_state()
    key = jax.random.PRNGKey(5)
    trainable = jax.tree.map(lambda leaf: leaf + 0.3 * jax.random.normal(jax.random.fold_in(key, leaf.size), leaf.shape),
                             state.trainable)
    evaluator = run.evaluator
    batch = right_padded(np.random.default_rng(6).integers(1, 12, 8), 12)
    batch.pop("labels"), batch.pop("weight")
    tasks = np.array([0, 1, 1, 0, 1, 0, 0, 1], np.int32)
    packed = run.feature_packer(dict(batch))
    assert packed["input_ids"].shape[0] < 8, "nothing was packed: the comparison shows nothing"
    weights = evaluator.weights(trainable, state.method_state)
    _, features = evaluator._predict_and_features(trainable, weights, evaluator.consts, state.method_state,
                                                  state.prototypes, evaluator.host_batch(packed), 1,
                                                  jax.numpy.asarray(tasks), None)
    per_slot = [np.asarray(evaluator._features(trainable, weights, {**state.method_state, "task": jax.numpy.int32(k)},
                                               evaluator.host_batch(batch))) for k in (0, 1)]
    expected = np.stack([per_slot[k][row] for row, k in enumerate(tasks)])
    assert not np.allclose(per_slot[0], per_slot[1], atol=1e-3), "the two slots agree: the test shows nothing"
    np.testing.assert_allclose(np.asarray(features), expected, atol=2e-5,
                               err_msg="a packed token went through another example's slot")
