"""tfds data_source over array_record, with a tiny dataset prepared here without TensorFlow."""
import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")


class TinyImages(tfds.core.GeneratorBasedBuilder):
    """Six classes of 12x12 RGB images whose colour encodes the class (test data only)."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "image": tfds.features.Tensor(shape=(12, 12, 3), dtype=np.uint8),
            "label": tfds.features.ClassLabel(num_classes=6)}), supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(30, 0), "test": self._generate_examples(12, 1)}

    def _generate_examples(self, count, seed):
        rng = np.random.default_rng(seed)
        for index in range(count):
            label = index % 6
            image = np.full((12, 12, 3), 40 * label, np.uint8) + rng.integers(0, 5, (12, 12, 3)).astype(np.uint8)
            yield index, {"image": image, "label": label}


def test_tfds_stream_reads_a_prepared_array_record_dataset(tmp_path):
    from jaxtree_lora.data.stream import DataError
    from jaxtree_lora.data.tfds_source import tfds_stream

    TinyImages(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
    stream = tfds_stream("tiny_images", str(tmp_path), num_tasks=3, seed=0, image_size=16)
    assert len(stream.tasks) == 3 and stream.num_classes == 6
    task = stream.tasks[0]
    assert task.train.inputs["images"].shape[1:] == (16, 16, 3) and task.train.inputs["images"].dtype == np.uint8
    assert set(np.unique(task.train.labels)) == set(task.classes)
    with pytest.raises(DataError, match="data_dir"):
        tfds_stream("tiny_images", str(tmp_path / "absent"), num_tasks=3)
