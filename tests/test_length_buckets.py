"""Length buckets: each text batch cut to the smallest of a few widths holding its longest row, with
the batch composition untouched, the loss unchanged, and at most one compile per bucket."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxtree_lora import lora as lora_lib
from jaxtree_lora.data import batching
from jaxtree_lora.data.tokenize import answer_window
from jaxtree_lora.methods.base import StreamInfo
from jaxtree_lora.methods.seqlora import SeqLoRA
from jaxtree_lora.train.backbone import build_tiny
from jaxtree_lora.train.step import make_task_loss


def padded(lengths, width, side, vocab=128, seed=0):
    """{input_ids, attention_mask} [N, width], padded on `side`, row i holding lengths[i] tokens."""
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(lengths), width), np.int32)
    mask = np.zeros_like(ids)
    for row, length in enumerate(lengths):
        cols = slice(width - length, width) if side == "left" else slice(0, length)
        ids[row, cols] = rng.integers(1, vocab, length)
        mask[row, cols] = 1
    return {"input_ids": ids, "attention_mask": mask}


def test_buckets_are_few_ascending_and_cover_the_longest_row():
    lengths = np.random.default_rng(0).integers(5, 50, 400)
    widths = batching.choose_buckets(lengths, 64, batch_size=16)
    assert 1 <= len(widths) <= 4 and list(widths) == sorted(set(widths))
    assert all(w % 8 == 0 and w <= 64 for w in widths) and widths[-1] >= lengths.max()
    assert batching.choose_buckets([64, 64], 64, 16) == (64,), "full rows leave one bucket: the full width"
    assert batching.choose_buckets([3], 5, 16) == (5,), "no width beyond the arrays' own"


@pytest.mark.parametrize("side", ["right", "left"])
def test_cut_batches_keep_rows_order_and_every_real_token(side):
    lengths = [3, 17, 9, 30, 5, 12, 2, 7, 21, 4]
    arrays = {**padded(lengths, 40, side), "labels": np.arange(10)}
    if side == "left":
        arrays["loss_mask"] = arrays["attention_mask"] * (np.arange(40)[None, :] >= 37)
    buckets = batching.LengthBuckets.for_splits([arrays], side, batch_size=4)
    full = list(batching.batches(arrays, 4, seed=3, task=1, epoch=2))
    cut = list(buckets.batches(arrays, 4, seed=3, task=1, epoch=2))
    widths = buckets.widths()["attention_mask"]
    for whole, part in zip(full, cut):
        np.testing.assert_array_equal(part["labels"], whole["labels"], err_msg="cutting changed the batch's rows")
        np.testing.assert_array_equal(part["weight"], whole["weight"])
        width = part["input_ids"].shape[1]
        assert width in widths + (40,)
        kept = slice(40 - width, 40) if side == "left" else slice(0, width)
        for name in part:
            if name not in ("labels", "weight"):
                np.testing.assert_array_equal(part[name], whole[name][:, kept])
        assert part["attention_mask"].sum() == whole["attention_mask"].sum(), "a real token was cut"
    assert min(b["input_ids"].shape[1] for b in cut) < 40, "no batch was cut: the test shows nothing"


def test_shards_of_processes_are_cut_to_the_global_batch_width():
    arrays = padded([3, 30, 4, 5, 6, 2, 8, 9], 32, "right")
    buckets = batching.LengthBuckets.for_splits([arrays], "right", batch_size=8)
    whole = next(buckets.batches(arrays, 8, seed=0, task=0, epoch=0))
    for rows in ([0, 1, 2, 3], [4, 5, 6, 7]):
        shard = next(buckets.batches(arrays, 8, seed=0, task=0, epoch=0, take=np.asarray(rows)))
        assert shard["input_ids"].shape[1] == whole["input_ids"].shape[1], \
            "each process must cut its shard to the width of the whole global batch"


def test_cut_batches_give_the_full_width_loss_for_encoder_and_decoder():
    method = SeqLoRA(lora=lora_lib.LoraSpec(targets=("attn.*",), rank=2, alpha=4.0, dropout=0.0))
    for name, kind, side in (("tiny-bert", "classification", "right"), ("tiny-llama", "instruction", "left")):
        backbone = build_tiny(name, {}, seed=0)
        info = StreamInfo(num_tasks=1, max_tasks=1, kind=kind, num_classes=4 if kind == "classification" else 0)
        adapters, state = method.init(jax.random.PRNGKey(1), backbone.info, info)
        adapters = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.PRNGKey(2), x.shape), adapters)
        # Every row has a prompt token before its 3 answer tokens (a token predicted from padding has
        # no real context, and tokenize_instruction never makes one: prompts are never empty).
        arrays = padded([5, 9, 6, 12, 7, 4], 32, side)
        if kind == "classification":
            arrays["labels"] = np.asarray([0, 1, 2, 3, 0, 1], np.int32)
            trainable = {"adapters": adapters, "head": {"w": jax.random.normal(jax.random.PRNGKey(3), (32, 4)),
                                                        "b": jnp.zeros(4)}}
        else:
            arrays["loss_mask"] = arrays["attention_mask"] * (np.arange(32)[None, :] >= 29)
            trainable = {"adapters": adapters, "head": {}}
        window = answer_window([arrays["loss_mask"]]) if kind == "instruction" else None
        task_loss = make_task_loss(backbone, method, kind, answer_window=window)
        consts = {"task_classes": jnp.ones((1, 4), bool), "seen_classes": jnp.ones((1, 4), bool)}
        loss = jax.jit(lambda batch: task_loss(trainable, backbone.params, consts, state, batch, None)[0])
        buckets = batching.LengthBuckets.for_splits([arrays], side, batch_size=6)
        full = next(batching.batches(arrays, 6, seed=0, task=0, epoch=0))
        cut = next(buckets.batches(arrays, 6, seed=0, task=0, epoch=0))
        assert cut["input_ids"].shape[1] == 16 < 32
        np.testing.assert_allclose(float(loss(cut)), float(loss(full)), rtol=1e-5,
                                   err_msg=f"{name}: the cut batch's loss differs from the full-width batch's")


def test_run_compiles_the_train_step_at_most_once_per_bucket(tmp_path):
    from tests.test_loop import synthetic_stream, tiny_config
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run

    stream = synthetic_stream(num_tasks=3, seq=32)
    rng = np.random.default_rng(0)
    for task in stream.tasks:
        for split in (task.train, task.test):
            # Mostly short rows, a few full ones: batches of 8 land in different buckets.
            lengths = np.where(rng.random(len(split.labels)) < 0.08, 32, rng.integers(2, 12, len(split.labels)))
            split.inputs["attention_mask"] = (np.arange(32)[None, :] < lengths[:, None]).astype(np.int32)
    config = tiny_config("treelora", epochs=1, pack=False)  # packed batches keep the full width (test_packing)
    run = Run(config=config, backbone=backbone_lib.build(config), stream=stream, workdir=str(tmp_path / "run"),
              progress=False)
    widths = run.batching.widths()["attention_mask"]
    assert 1 < len(widths) <= 4
    run.fit()
    seen = {batch["input_ids"].shape[1] for task in stream.tasks
            for batch in run.batching.batches(dict(task.train.inputs, labels=task.train.labels), 8, seed=0,
                                              task=task.index, epoch=0)}
    assert len(seen) > 1, "every batch had one width: the test shows nothing"
    assert run.train_step._cache_size() == len(seen) <= len(widths), \
        "the train step compiled more than once per bucket width it saw"


def sized_stream(*sizes, kind="classification"):
    """A stand-in stream of tasks with (train, test) splits of the given sizes."""
    import types

    from jaxtree_lora.data.stream import Split

    split = lambda n: Split(inputs={"input_ids": np.zeros((n, 4), np.int32)}, labels=np.zeros((n,), np.int32))
    return types.SimpleNamespace(kind=kind, tasks=[types.SimpleNamespace(train=split(a), test=split(b))
                                                   for a, b in sizes])


def test_evaluation_batch_size_leaves_few_filler_rows_and_a_written_size_wins():
    """eval.batch_size unset: the multiple of 8 up to 96 forwarding the fewest rows (+8 a forward) over
    every split, the largest within 5%. Hand-computed: splits 80 / 40 -> 40 (3 forwards, 144 row-units,
    where 96 costs 2 x 104 = 208 and computes 56 filler rows per test forward); 192 / 96 -> 96 (no filler
    either way, the larger); 97 / 97 -> 56 (4 x 64 = 256 against 96's 4 x 104 = 416)."""
    from experiments.configs import default
    from jaxtree_lora.train import plan

    config = default.get_config()
    assert config.eval.batch_size is None, "the default leaves the size to the stream"
    assert plan.evaluation_batch_size(config, sized_stream(*[(80, 40)] * 10)) == 40
    assert plan.evaluation_batch_size(config, sized_stream(*[(192, 96)] * 5)) == 96
    assert plan.evaluation_batch_size(config, sized_stream((97, 97))) == 56
    config.eval.batch_size = 96
    assert plan.evaluation_batch_size(config, sized_stream(*[(80, 40)] * 10)) == 96, "a size the user wrote wins"


def test_a_splits_last_evaluation_batch_is_cut_to_a_planned_tail():
    """The README's main job: batches of 100 over 256 training and 100 test images a task. The last
    training batch held 56 images and 44 rows of filler; it is cut to 56 rows (a multiple of 8 holding
    them). Tails few splits need join the next size up; instruction streams keep full batches."""
    from jaxtree_lora.data import batching
    from jaxtree_lora.train import plan

    assert plan.evaluation_tails(sized_stream(*[(256, 100)] * 5), 100) == (56,)
    assert plan.evaluation_tails(sized_stream(*[(256, 100)] * 5, kind="instruction"), 100) == ()
    assert plan.evaluation_tails(sized_stream((200, 100)), 100) == (), "no split ends short: nothing to cut"
    # Tails 8 (one split), 16 (one split), 56 (five): 8 joins 16 (1 x 8 rows <= 64); {8, 16} would add
    # 1 x 48 + 1 x 40 = 88 rows to reach 56: kept apart.
    assert plan.evaluation_tails(sized_stream((203, 100), (216, 100), *[(256, 100)] * 5), 100) == (16, 56)
    batches = plan.feature_batches(batching, None, 100, sized_stream(*[(256, 100)] * 5))
    arrays = {"input_ids": np.arange(256 * 4, dtype=np.int32).reshape(256, 4), "labels": np.arange(256)}
    sizes = [len(batch["weight"]) for batch in batches(arrays, 0)]
    assert sizes == [100, 100, 56], sizes
    last = list(batches(arrays, 0))[-1]
    np.testing.assert_array_equal(last["labels"], np.arange(200, 256))
    assert last["weight"].sum() == 56, "the cut batch must keep every real row and no filler"
