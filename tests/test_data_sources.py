"""Sources: the TRACE directory loader (json written here), tfds data_source over tiny array_record
datasets prepared here without TensorFlow, and the get_stream dispatcher."""
import json
import os

import ml_collections
import numpy as np
import pytest

from jaxtree_lora.data import DataError, get_stream
from jaxtree_lora.data.trace import TRACE_ORDER, trace_stream

from test_data_tokenize import ID, word_tokenizer


def write_trace(root, tasks, rows=3):
    for task in tasks:
        os.makedirs(root / task, exist_ok=True)
        for split in ("train", "eval", "test"):
            records = [{"prompt": f"is it good answer {'is ' * i}".strip(), "answer": "yes" if i % 2 else "no"}
                       for i in range(rows + (split == "test"))]
            (root / task / f"{split}.json").write_text(json.dumps(records))


def test_trace_order_is_the_benchmarks():
    assert TRACE_ORDER == ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds",
                           "20Minuten")


def test_trace_stream_reads_tasks_in_order_with_their_metrics(tmp_path):
    write_trace(tmp_path, TRACE_ORDER)
    stream = trace_stream(str(tmp_path), word_tokenizer(), max_prompt_len=8, max_answer_len=4)
    assert stream.kind == "instruction" and [t.name for t in stream.tasks] == list(TRACE_ORDER)
    assert [t.metric for t in stream.tasks] == ["accuracy", "accuracy", "rouge_l", "fuzzy", "first_char",
                                                "accuracy", "accuracy", "sari"], "TRACE's per-task metrics"
    first = stream.tasks[0]
    assert len(first.train) == 3 and len(first.test) == 4, "evaluation reads test.json by default"
    assert first.train.arrays["input_ids"].shape == (3, 12) and first.test.arrays["prompt_ids"].shape == (4, 8)
    assert first.train.answers == ["no", "yes", "no"]
    row = first.train.arrays
    assert row["input_ids"][1][row["loss_mask"][1] == 1].tolist() == [ID["yes"], ID["</s>"]]


def test_trace_limits_and_eval_split(tmp_path):
    write_trace(tmp_path, ("FOMC",), rows=5)
    stream = trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC",), max_train=2, max_eval=3,
                          max_prompt_len=8, max_answer_len=2, eval_split="eval")
    assert len(stream.tasks[0].train) == 2 and len(stream.tasks[0].test) == 3
    assert stream.tasks[0].train.prompts == ["is it good answer", "is it good answer is"], "the first records"


def test_trace_errors_name_the_fix(tmp_path):
    with pytest.raises(DataError, match="data.root"):
        trace_stream(str(tmp_path / "absent"), word_tokenizer())
    write_trace(tmp_path, ("FOMC",))
    with pytest.raises(DataError, match=r"Py150 missing .*found: FOMC"):
        trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC", "Py150"))
    (tmp_path / "FOMC" / "test.json").write_text("[{\"prompt\": \"is\"}]")
    with pytest.raises(DataError, match="'prompt' and 'answer'"):
        trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC",))
    (tmp_path / "FOMC" / "test.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC",))
    os.remove(tmp_path / "FOMC" / "eval.json")
    with pytest.raises(DataError, match="eval.json is missing"):
        trace_stream(str(tmp_path), word_tokenizer(), tasks=("FOMC",), eval_split="eval")


def test_get_stream_dispatches_and_rejects_unknown_names(tmp_path):
    write_trace(tmp_path, ("FOMC", "ScienceQA"))
    config = ml_collections.ConfigDict({"name": "trace", "root": str(tmp_path), "tasks": ["ScienceQA", "FOMC"],
                                        "max_train": 2, "max_eval": 1, "max_prompt_len": 8, "max_answer_len": 2})
    stream = get_stream(config, word_tokenizer())
    assert [t.name for t in stream.tasks] == ["ScienceQA", "FOMC"] and len(stream.tasks[0].test) == 1
    with pytest.raises(DataError, match="choose one of"):
        get_stream(ml_collections.ConfigDict({"name": "mnist"}), word_tokenizer())
    with pytest.raises(DataError, match="no tokenizer"):
        get_stream(config, None)


tfds = pytest.importorskip("tensorflow_datasets")


class VariedImages(tfds.core.GeneratorBasedBuilder):
    """Four classes of RGB photos of different sizes, only a train split (test data only).
    Colour encodes the class; images go in as PIL images, the TF-free encoding path."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(None, None, 3)),
            "label": tfds.features.ClassLabel(names=["red", "green", "blue", "grey"])}))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        from PIL import Image

        colours = [(200, 0, 0), (0, 200, 0), (0, 0, 200), (100, 100, 100)]
        for index in range(20):
            label = index % 4
            size = (8 + index % 3, 6 + index % 5)
            yield index, {"image": Image.new("RGB", size, colours[label]), "label": label}


@pytest.fixture(scope="module")
def varied_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("tfds")
    VariedImages(data_dir=str(directory), file_format="array_record").download_and_prepare()
    return str(directory)


def test_tfds_single_split_dataset_with_a_seeded_holdout_and_float_images(varied_dir):
    from jaxtree_lora.data.tfds_source import tfds_stream

    stream = tfds_stream("varied_images", varied_dir, num_tasks=2, seed=3, image_size=12, test_split="",
                         test_fraction=0.2, image_dtype="float32")
    assert stream.class_names == ("red", "green", "blue", "grey") and len(stream) == 2
    train_rows = sum(len(t.train) for t in stream.tasks)
    test_rows = sum(len(t.test) for t in stream.tasks)
    assert (train_rows, test_rows) == (16, 4), "one of five images per class held out"
    for task in stream.tasks:
        images = task.train.inputs["images"]
        assert images.shape[1:] == (12, 12, 3) and images.dtype == np.float32
        assert 0.0 <= images.min() and images.max() <= 1.0
        for image, label in zip(images, task.train.labels):
            expected = {0: (200, 0, 0), 1: (0, 200, 0), 2: (0, 0, 200), 3: (100, 100, 100)}[int(label)]
            np.testing.assert_allclose(image.mean(axis=(0, 1)) * 255, expected, atol=1.0,
                                       err_msg="the decoded image does not belong to its label")
    again = tfds_stream("varied_images", varied_dir, num_tasks=2, seed=3, image_size=12, test_split="")
    assert again.tasks[0].train.inputs["images"].dtype == np.uint8
    np.testing.assert_array_equal(again.tasks[0].test.labels, stream.tasks[0].test.labels)


def test_tfds_errors_name_the_fix(varied_dir, tmp_path):
    from jaxtree_lora.data.tfds_source import tfds_stream

    with pytest.raises(DataError, match="image_size > 0"):
        tfds_stream("varied_images", varied_dir, num_tasks=2, image_size=0, test_split="")
    with pytest.raises(DataError, match="data.image_key"):
        tfds_stream("varied_images", varied_dir, num_tasks=2, image_size=8, image_key="photo", test_split="")
    with pytest.raises(DataError, match="download_and_prepare"):
        tfds_stream("varied_images", str(tmp_path), num_tasks=2, image_size=8, test_split="")
    config = ml_collections.ConfigDict({"name": "tfds", "dataset": "varied_images", "data_dir": varied_dir,
                                        "classes_per_task": 3, "image_size": 8, "test_split": ""})
    assert [len(t.classes) for t in get_stream(config).tasks] == [3, 1]
