"""The stream data model (class-incremental builder, class masks) and fixed-shape, replayable batching."""
import numpy as np
import pytest

from jaxtree_lora.data import batching
from jaxtree_lora.data.stream import DataError, Split, class_incremental, class_order, split_classes


def labelled(num_classes=6, per_class=3):
    labels = np.repeat(np.arange(num_classes), per_class).astype(np.int32)
    return Split(inputs={"x": np.arange(len(labels))[:, None]}, labels=labels,
                 texts=[f"text {i}" for i in range(len(labels))])


def names(count):
    return [f"class{i}" for i in range(count)]


def test_class_order_is_the_seeded_numpy_permutation():
    """PyCIL/PILOT convention: np.random.seed(seed); np.random.permutation(num_classes)."""
    np.random.seed(1993)
    expected = np.random.permutation(10).tolist()
    assert class_order(10, 1993) == expected
    assert class_order(10, 1993) == class_order(10, 1993), "the same seed gives the same order"
    assert class_order(10, 0) != class_order(10, 1), "different seeds give different orders"
    assert class_order(10, 5, shuffle=False) == list(range(10))


def test_class_incremental_splits_the_order_into_tasks_with_their_own_examples():
    stream = class_incremental("s", labelled(), labelled(), names(6), num_tasks=3, seed=5)
    assert len(stream) == 3 and stream.kind == "classification" and stream.num_classes == 6
    assert stream.class_order == tuple(class_order(6, 5))
    assert [t.classes for t in stream.tasks] == [stream.class_order[i:i + 2] for i in (0, 2, 4)]
    for task in stream.tasks:
        assert set(task.train.labels.tolist()) == set(task.classes), "a task holds exactly its classes"
        assert len(task.train) == 6 and task.train.labels.dtype == np.int32
        rows = task.train.inputs["x"][:, 0]
        assert [task.train.texts[i] for i in range(len(rows))] == [f"text {r}" for r in rows], \
            "texts stay aligned with the selected rows"
    assert stream.tasks[0].name == "+".join(f"class{c}" for c in stream.tasks[0].classes)


def test_class_mask_marks_the_classes_seen_so_far():
    stream = class_incremental("s", labelled(), labelled(), names(6), num_tasks=3, seed=2)
    for upto in range(3):
        mask = stream.class_mask(upto)
        seen = {c for task in stream.tasks[:upto + 1] for c in task.classes}
        assert mask.dtype == bool and mask.shape == (6,)
        assert set(np.flatnonzero(mask).tolist()) == seen, f"mask after task {upto} is wrong"
    assert stream.class_mask(2).all()
    with pytest.raises(DataError, match="outside"):
        stream.class_mask(3)


def test_tasks_by_classes_per_task_and_uneven_counts():
    assert split_classes(range(7), classes_per_task=3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert split_classes(range(7), num_tasks=3) == [[0, 1, 2], [3, 4], [5, 6]], "remainder to the first tasks"
    stream = class_incremental("s", labelled(), labelled(), names(6), seed=0, classes_per_task=3)
    assert [len(t.classes) for t in stream.tasks] == [3, 3]


def test_impossible_streams_raise_value_errors_that_name_the_fix():
    with pytest.raises(ValueError, match="lower data.num_tasks"):
        class_incremental("s", labelled(), labelled(), names(6), num_tasks=7, seed=0)
    with pytest.raises(ValueError, match="num_tasks >= 1"):
        class_incremental("s", labelled(), labelled(), names(6), num_tasks=0, seed=0)
    test = labelled()
    test.labels = np.where(test.labels == 4, 3, test.labels).astype(np.int32)  # class 4 has no test example
    with pytest.raises(ValueError, match="no test examples"):
        class_incremental("s", labelled(), test, names(6), num_tasks=6, seed=0)
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        class_incremental("s", labelled(), labelled(), names(5), num_tasks=5, seed=0)


def test_batches_have_fixed_shapes_and_padding_weights():
    arrays = {"x": np.arange(10), "y": np.arange(10) * 2}
    epoch = list(batching.batches(arrays, 4, seed=1, task=2, epoch=3))
    assert batching.num_batches(10, 4) == len(epoch) == 3 and batching.num_batches(8, 4) == 2
    assert [b["x"].shape for b in epoch] == [(4,)] * 3, "every batch has the full batch size"
    assert [b["weight"].tolist() for b in epoch] == [[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0]]
    assert all(b["weight"].dtype == np.float32 for b in epoch)
    real = np.concatenate([b["x"][b["weight"] > 0] for b in epoch])
    assert sorted(real.tolist()) == list(range(10)), "every example appears exactly once with weight 1"
    assert all((b["y"] == 2 * b["x"]).all() for b in epoch), "rows stay aligned across arrays"
    padding = epoch[-1]["x"][2:]
    assert set(padding.tolist()) <= set(range(10)), "padding repeats real rows"


def test_batch_order_is_a_pure_function_of_seed_task_epoch_and_restarts_exactly():
    arrays = {"x": np.arange(23)}
    first = list(batching.batches(arrays, 5, seed=7, task=1, epoch=0))
    again = list(batching.batches(arrays, 5, seed=7, task=1, epoch=0))
    assert all((a["x"] == b["x"]).all() for a, b in zip(first, again)), "same (seed, task, epoch), same batches"
    resumed = list(batching.batches(arrays, 5, seed=7, task=1, epoch=0, start=3))
    assert len(resumed) == 2
    for a, b in zip(resumed, first[3:]):
        np.testing.assert_array_equal(a["x"], b["x"], err_msg="a resumed epoch must replay the same batches")
        np.testing.assert_array_equal(a["weight"], b["weight"])
    for other in ({"seed": 8, "task": 1, "epoch": 0}, {"seed": 7, "task": 2, "epoch": 0},
                  {"seed": 7, "task": 1, "epoch": 1}):
        changed = list(batching.batches(arrays, 5, **other))
        assert any((a["x"] != b["x"]).any() for a, b in zip(first, changed)), f"{other} must reshuffle"
    ordered = list(batching.batches(arrays, 5, seed=7, task=1, epoch=0, shuffle=False))
    assert ordered[0]["x"].tolist() == [0, 1, 2, 3, 4], "shuffle=False keeps the stored order (evaluation)"


def test_batching_rejects_bad_input():
    with pytest.raises(DataError, match="batch_size"):
        list(batching.batches({"x": np.arange(3)}, 0, seed=0, task=0, epoch=0))
    with pytest.raises(DataError, match="same number of rows"):
        list(batching.batches({"x": np.arange(3), "y": np.arange(4)}, 2, seed=0, task=0, epoch=0))
    assert list(batching.batches({"x": np.arange(0)}, 2, seed=0, task=0, epoch=0)) == []
