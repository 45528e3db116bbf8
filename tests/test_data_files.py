"""Streams from the user's own files (jaxtree_lora/data/files.py): every text format gives the same
stream, task_column, the seeded held-out split, instruction files, sequences across sources and
image folders. The files are written here; the tokenizer is a word-level BERT one (test data only)."""
import csv
import json
import os

import numpy as np
import pytest

from jaxtree_lora.data import DataError, get_stream

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(25)]


@pytest.fixture(scope="module")
def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast(vocab={word: i for i, word in enumerate(WORDS)})


def rows(classes=6, per_class=10, seed=0, label=lambda c: f"c{c}"):
    """(text, label) records: class c's sentences carry the word w{c} among filler words w20..w24."""
    rng = np.random.default_rng(seed)
    return [{"text": " ".join([f"w{c}"] + [f"w{20 + int(k)}" for k in rng.integers(0, 5, 3)]), "label": label(c)}
            for c in range(classes) for _ in range(per_class)]


def write_csv(path, records, delimiter=","):
    with open(path, "w", newline="", encoding="utf-8") as file:
        writer = csv.DictWriter(file, fieldnames=list(records[0]), delimiter=delimiter)
        writer.writeheader()
        writer.writerows(records)
    return str(path)


def write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as file:
        file.writelines(json.dumps(record) + "\n" for record in records)
    return str(path)


def write_parquet(path, records):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.Table.from_pylist(records), str(path))
    return str(path)


def write_saved_dataset(folder, records, names):
    """A `datasets.Dataset.save_to_disk` folder as `datasets` writes it: an Arrow IPC stream, state.json,
    and dataset_info.json with the label as a ClassLabel (stored as the index of its name)."""
    import pyarrow as pa

    os.makedirs(folder, exist_ok=True)
    table = pa.Table.from_pylist([{"text": r["text"], "label": names.index(r["label"])} for r in records])
    with pa.OSFile(os.path.join(folder, "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    with open(os.path.join(folder, "state.json"), "w") as file:
        json.dump({"_data_files": [{"filename": "data-00000-of-00001.arrow"}], "_split": None}, file)
    with open(os.path.join(folder, "dataset_info.json"), "w") as file:
        json.dump({"features": {"text": {"dtype": "string", "_type": "Value"},
                                "label": {"names": names, "_type": "ClassLabel"}}}, file)
    return str(folder)


def summary(stream):
    return [(task.name, task.classes, sorted(task.train.texts), sorted(task.test.texts),
             task.train.labels.tolist()) for task in stream.tasks]


FORMATS = ["tsv", "jsonl", "parquet", "parquet_shards", "save_to_disk", "dataset_dict"]


@pytest.mark.parametrize("kind", FORMATS)
def test_every_format_gives_the_csv_stream(kind, tmp_path, tokenizer):
    train, test = rows(per_class=8), rows(per_class=2, seed=1)
    names = [f"c{c}" for c in range(6)]
    reference = get_stream({"name": "files", "train": write_csv(tmp_path / "train.csv", train),
                            "test": write_csv(tmp_path / "test.csv", test), "num_tasks": 3, "max_len": 8}, tokenizer)
    if kind == "tsv":
        paths = write_csv(tmp_path / "train.tsv", train, "\t"), write_csv(tmp_path / "test.tsv", test, "\t")
    elif kind == "jsonl":
        paths = write_jsonl(tmp_path / "train.jsonl", train), write_jsonl(tmp_path / "test.jsonl", test)
    elif kind == "parquet":
        paths = write_parquet(tmp_path / "train.parquet", train), write_parquet(tmp_path / "test.parquet", test)
    elif kind == "parquet_shards":
        for folder, records in (("train", train), ("test", test)):
            (tmp_path / folder).mkdir()
            half = len(records) // 2
            write_parquet(tmp_path / folder / "part-0.parquet", records[:half])
            write_parquet(tmp_path / folder / "part-1.parquet", records[half:])
        paths = str(tmp_path / "train"), str(tmp_path / "test")
    elif kind == "save_to_disk":
        paths = (write_saved_dataset(tmp_path / "train_ds", train, names),
                 write_saved_dataset(tmp_path / "test_ds", test, names))
    else:  # DatasetDict.save_to_disk: one folder, its train and test splits found by dataset_dict.json
        write_saved_dataset(tmp_path / "dd" / "train", train, names)
        write_saved_dataset(tmp_path / "dd" / "test", test, names)
        (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
        paths = str(tmp_path / "dd"), ""
    stream = get_stream({"name": "files", "train": paths[0], "test": paths[1], "num_tasks": 3, "max_len": 8},
                        tokenizer)
    assert stream.class_names == tuple(names), f"{kind}: label names (ClassLabel names for save_to_disk)"
    assert summary(stream) == summary(reference), f"{kind} read differently from the same rows as CSV"
    np.testing.assert_array_equal(stream.tasks[0].train.inputs["input_ids"][:1],
                                  tokenizer([stream.tasks[0].train.texts[0]], padding="max_length", max_length=8,
                                            return_tensors="np")["input_ids"])


def test_integer_labels_are_one_class_whatever_their_type_and_ordered_numerically(tmp_path, tokenizer):
    records = rows(classes=3, per_class=6, label=lambda c: [10, 9, 2][c])
    train = write_jsonl(tmp_path / "train.jsonl", records)  # integers in JSON
    test = write_csv(tmp_path / "test.csv", rows(classes=3, per_class=2, label=lambda c: [10, 9, 2][c]))  # strings
    stream = get_stream({"name": "files", "train": train, "test": test, "num_tasks": 1, "max_len": 8}, tokenizer)
    assert stream.class_names == ("2", "9", "10"), "integer labels sort as numbers, and 9 in JSON is '9' in CSV"
    assert len(stream.tasks[0].test) == 6


def test_a_float_column_written_as_text_is_the_same_class_as_its_integer(tmp_path, tokenizer):
    """A float label column saved to CSV reads "3.0": it was a class apart from the 3 of a JSONL or
    Parquet file, and a test file written that way was refused for labels the training file lacks."""
    train = write_jsonl(tmp_path / "train.jsonl", rows(classes=3, per_class=6, label=lambda c: [3, 4, 12][c]))
    test = write_csv(tmp_path / "test.csv", rows(classes=3, per_class=2, label=lambda c: ["3.0", "4.", "+12.00"][c]))
    stream = get_stream({"name": "files", "train": train, "test": test, "num_tasks": 1, "max_len": 8}, tokenizer)
    assert stream.class_names == ("3", "4", "12") and len(stream.tasks[0].test) == 6
    labels = write_csv(tmp_path / "other.csv", rows(classes=3, per_class=4, label=lambda c: ["3.5", "v1.0", "03"][c]))
    stream = get_stream({"name": "files", "train": labels, "num_tasks": 1, "max_len": 8, "test_fraction": 0.25},
                        tokenizer)
    assert sorted(stream.class_names) == ["03", "3.5", "v1.0"], "only whole numbers written with a point change"


def test_task_column_gives_one_task_per_value_with_its_own_classes(tmp_path, tokenizer):
    records = [dict(r, task="sentiment", label=["pos", "neg"][i % 2]) for i, r in enumerate(rows(2, 6))]
    records += [dict(r, task="topic", label=["pos", "sport", "news"][i % 3]) for i, r in enumerate(rows(3, 6))]
    stream = get_stream({"name": "files", "train": write_csv(tmp_path / "all.csv", records), "task_column": "task",
                         "test_fraction": 0.25, "max_len": 8, "num_tasks": 5}, tokenizer)
    assert [t.name for t in stream.tasks] == ["sentiment", "topic"], "tasks in order of first appearance"
    assert stream.class_names == ("sentiment/neg", "sentiment/pos", "topic/news", "topic/pos", "topic/sport")
    assert stream.tasks[0].classes == (0, 1) and stream.tasks[1].classes == (2, 3, 4), \
        "'pos' of the topic task is not the sentiment task's 'pos'"
    for task in stream.tasks:
        assert set(task.test.labels.tolist()) == set(task.classes), "every class of the task is tested"


def test_test_fraction_is_seeded_and_stratified(tmp_path, tokenizer):
    train = write_csv(tmp_path / "train.csv", rows(classes=4, per_class=10))
    config = {"name": "files", "train": train, "num_tasks": 2, "max_len": 8, "test_fraction": 0.3}
    first, again = get_stream(config, tokenizer), get_stream(config, tokenizer)
    other = get_stream(dict(config, seed=1), tokenizer)
    assert summary(first) == summary(again), "same seed, same split"
    assert summary(first) != summary(other), "another seed holds out other rows"
    for task in first.tasks:
        counts = np.bincount(task.test.labels, minlength=4)[list(task.classes)]
        assert counts.tolist() == [3, 3], "30% of every class held out"


def test_instruction_files_one_task_per_file_with_its_metric(tmp_path):
    from test_paper_configs import write_tiny_llama_and_trace
    from jaxtree_lora.models import llama

    llama_dir, _ = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC",), train_rows=1, test_rows=1)
    _, tokenizer = llama.load_hf(llama_dir)
    for name, count in (("stance", 10), ("summary", 8)):
        write_jsonl(tmp_path / f"{name}.jsonl", [{"question": f"w{i} w{i + 1} w{i + 2}", "reply": f"w{i % 3} w5"}
                                                 for i in range(count)])
    config = {"name": "instruction_files", "train": f"{tmp_path}/stance.jsonl,{tmp_path}/summary.jsonl",
              "prompt_column": "question", "answer_column": "reply", "metrics": {"summary": "rouge_l"},
              "test_fraction": 0.25, "max_prompt_len": 6, "max_answer_len": 4, "chat_template": False}
    stream = get_stream(config, tokenizer)
    assert stream.kind == "instruction"
    assert [(t.name, t.metric) for t in stream.tasks] == [("stance", "accuracy"), ("summary", "rouge_l")]
    assert [(len(t.train), len(t.test)) for t in stream.tasks] == [(8, 2), (6, 2)], "a quarter of each file held out (rounded)"
    assert stream.tasks[0].max_new_tokens == 3, "budget: the longest training answer, two words and EOS"
    assert {t.train.arrays["input_ids"].shape[1] for t in stream.tasks} == {10}, "one length for every task"
    listed = get_stream(dict(config, metrics="[exact_match,fuzzy]"), tokenizer)
    assert [t.metric for t in listed.tasks] == ["exact_match", "fuzzy"], "a list names one metric per task"
    with pytest.raises(DataError, match="unknown metric 'bleu'"):
        get_stream(dict(config, metrics="bleu"), tokenizer)


def test_sequence_gives_each_source_its_own_classes(tmp_path, tokenizer):
    sentiment = write_csv(tmp_path / "sentiment.csv", rows(classes=2, per_class=6, label=lambda c: ["neg", "pos"][c]))
    topics = write_jsonl(tmp_path / "topics.jsonl", rows(classes=4, per_class=6, label=lambda c: f"t{c}"))
    sources = json.dumps([{"name": "files", "train": sentiment},
                          {"name": "files", "train": topics, "num_tasks": 2}])
    with pytest.raises(DataError, match="'sequence' has no option.*num_tasks.*its options are: sources"):
        get_stream({"name": "sequence", "sources": [sources], "num_tasks": 5}, tokenizer)  # each source's own
    stream = get_stream({"name": "sequence", "sources": [sources], "max_len": 8, "test_fraction": 0.34}, tokenizer)
    assert stream.kind == "classification" and stream.num_classes == 6
    assert len(stream.tasks) == 3, "one task from the sentiment file (default), two from the topics file"
    assert sorted(stream.tasks[0].classes) == [0, 1], "the first source keeps ids 0..1"
    assert sorted(stream.tasks[1].classes + stream.tasks[2].classes) == [2, 3, 4, 5], "the second is offset by 2"
    for task in stream.tasks:
        assert set(task.train.labels.tolist()) == set(task.classes)
    assert stream.class_names[:2] == ("neg", "pos") and stream.class_names[2 + 0] == "t0"
    assert [t.index for t in stream.tasks] == [0, 1, 2]
    same = get_stream({"name": "sequence", "sources": [{"name": "files", "train": sentiment},
                                                       {"name": "files", "train": sentiment}],
                       "max_len": 8}, tokenizer)
    assert same.class_names == ("files:sentiment.csv#0/neg", "files:sentiment.csv#0/pos",
                                "files:sentiment.csv#1/neg", "files:sentiment.csv#1/pos"), \
        "the same label from two sources is two classes, named by source"


def test_sequence_refuses_mixing_classification_and_instruction(tmp_path, tokenizer):
    from test_paper_configs import write_tiny_llama_and_trace
    from jaxtree_lora.models import llama

    llama_dir, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC",), train_rows=4, test_rows=2)
    _, llama_tokenizer = llama.load_hf(llama_dir)
    texts = write_csv(tmp_path / "a.csv", [dict(r, text=r["text"].replace("w2", "w3")) for r in rows(2, 4)])
    config = {"name": "sequence", "max_len": 8, "max_prompt_len": 8, "max_answer_len": 2,
              "sources": [{"name": "files", "train": texts}, {"name": "trace", "root": trace, "tasks": ["FOMC"]}]}
    with pytest.raises(DataError, match="mixes classification and instruction sources"):
        get_stream(config, llama_tokenizer)
    instructions = get_stream(dict(config, sources=[{"name": "trace", "root": trace, "tasks": ["FOMC"]},
                                                    {"name": "trace", "root": trace, "tasks": ["FOMC"]}]),
                              llama_tokenizer)
    assert [t.index for t in instructions.tasks] == [0, 1] and instructions.kind == "instruction"


def write_images(root, classes=3, per_class=4, size=(20, 12)):
    """root/<class>/<i>.png (and one .jpg): class c is mostly the colour channel c % 3, and from class 3 on
    also half of channel (c + 1) % 3 (class 3 is orange, not class 0's red), so every class is told apart."""
    from PIL import Image

    for c in range(classes):
        folder = os.path.join(root, f"class{c}")
        os.makedirs(folder, exist_ok=True)
        for i in range(per_class):
            pixels = np.zeros(size[::-1] + (3,), np.uint8)
            pixels[..., c % 3] = 200 + i
            if c >= 3:
                pixels[..., (c + 1) % 3] = 100 * (c // 3)
            Image.fromarray(pixels).save(os.path.join(folder, f"{i}.{'jpg' if i == 0 else 'png'}"))
        open(os.path.join(folder, "notes.txt"), "w").write("not an image: skipped as ImageFolder does")


def test_image_folder_train_and_test_folders(tmp_path):
    write_images(tmp_path / "train", per_class=4)
    write_images(tmp_path / "test", per_class=2)
    stream = get_stream({"name": "image_folder", "data_dir": str(tmp_path), "image_size": 8, "num_tasks": 3}, None)
    images = stream.tasks[0].train.inputs["images"]
    assert images.shape[1:] == (8, 8, 3) and images.dtype == np.uint8, "[N, S, S, 3] uint8, as tfds_stream gives"
    assert stream.class_names == ("class0", "class1", "class2")
    assert sum(len(t.train) for t in stream.tasks) == 12 and sum(len(t.test) for t in stream.tasks) == 6
    for task in stream.tasks:
        (label,) = task.classes
        assert task.train.inputs["images"][..., label % 3].min() >= 190, "each image kept its class's colour"


def test_image_folder_without_test_holds_out_a_fraction(tmp_path):
    write_images(tmp_path / "photos", per_class=5)
    stream = get_stream({"name": "image_folder", "data_dir": str(tmp_path / "photos"), "image_size": 8,
                         "num_tasks": 1, "test_fraction": 0.2, "image_dtype": "float32"}, None)
    assert len(stream.tasks[0].test) == 3 and len(stream.tasks[0].train) == 12, "one of five per class held out"
    assert stream.tasks[0].test.inputs["images"].dtype == np.float32
    assert stream.tasks[0].test.inputs["images"].max() <= 1.0


def test_image_folder_tests_on_val_when_there_is_no_test_folder(tmp_path):
    """root/train and root/val (ImageNet's layout): val/ was left unread and a fraction of train/ held out."""
    write_images(tmp_path / "photos" / "train", per_class=4)
    write_images(tmp_path / "photos" / "val", per_class=2)
    stream = get_stream({"name": "image_folder", "data_dir": str(tmp_path / "photos"), "image_size": 8,
                         "num_tasks": 1, "test_fraction": 0.25}, None)
    assert len(stream.tasks[0].train) == 3 * 4, "every training image trained on, none held out"
    assert len(stream.tasks[0].test) == 3 * 2, "val/ is the test split"
    assert stream.metadata["test"] == str(tmp_path / "photos" / "val")


def test_image_folder_reads_the_subfolders_of_a_class_folder(tmp_path):
    """ImageFolder's layout includes root/<class>/<any folder>/x.png; only root/<class>/x.png was read,
    and the rest dropped without a word."""
    import shutil

    write_images(tmp_path / "photos", per_class=4)
    for c in range(3):
        shutil.copytree(tmp_path / "photos" / f"class{c}", tmp_path / "photos" / f"class{c}" / "batch2")
        shutil.copytree(tmp_path / "photos" / f"class{c}", tmp_path / "photos" / f"class{c}" / ".ipynb_checkpoints")
        # macOS writes ._<name> resource forks beside each file it copies to a foreign disk or zip: no images.
        (tmp_path / "photos" / f"class{c}" / "._1.png").write_bytes(b"\x00\x05\x16\x07Mac OS X")
    stream = get_stream({"name": "image_folder", "data_dir": str(tmp_path / "photos"), "image_size": 8,
                         "num_tasks": 1, "test_fraction": 0.25}, None)
    assert len(stream.tasks[0].train) + len(stream.tasks[0].test) == 3 * 8, "4 + 4 per class, hidden ones skipped"


def test_sixteen_bit_grey_images_are_scaled_not_clipped(tmp_path):
    """A 16-bit grey PNG (microscopy, depth, medical scans): PIL's convert("RGB") clips its values at 255,
    which made a mid-grey image white."""
    from PIL import Image

    from jaxtree_lora.data.files import load_image

    grey = np.full((6, 6), 128 * 257, np.uint16)  # mid-grey in 16 bits
    grey[0, 0] = 65535
    Image.fromarray(grey).save(tmp_path / "scan.png")
    pixels = load_image(str(tmp_path / "scan.png"), 0)
    assert pixels.shape == (6, 6, 3) and pixels[1, 1].tolist() == [128] * 3, "mid-grey stays mid-grey"
    assert pixels[0, 0].tolist() == [255] * 3
    # A float image in [0, 1] (PIL mode F, a TIFF): convert("RGB") truncated it to black.
    Image.fromarray(np.full((6, 6), 0.5, np.float32), "F").save(tmp_path / "float.tiff")
    assert load_image(str(tmp_path / "float.tiff"), 0)[2, 2].tolist() == [128] * 3, "0.5 is mid-grey"


BAD = [
    ("missing.csv", None, {}, "does not exist"),
    ("train.xlsx", None, {}, "unknown data format '.xlsx'"),
    ("train.csv", None, {"text_column": "sentence"}, "has no column 'sentence' (its columns: text, label)"),
    ("empty_text.csv", None, {}, "line 3 has an empty text"),
    ("train.csv", "test_unseen.csv", {}, "line 2 has label 'c9', which the training file"),
    ("bytes.csv", None, {}, "line 4 holds bytes that are not UTF-8"),
    ("bytes.jsonl", None, {}, "line 2 holds bytes that are not UTF-8"),
    ("train.csv", None, {"num_tasks": 7}, "7 tasks need at least as many classes, but there are 6"),
    ("tasks.csv", None, {"task_column": "task", "test_fraction": 0.1}, "task 'lonely' (column 'task') has no test"),
    # An unquoted comma in a text would otherwise cut the text short and make its tail the label.
    ("comma.csv", None, {}, "line 3 has 3 cells but the header names 2 columns: put a cell that holds a comma"),
    # Two columns of one name would interleave their cells in one column: every row's text shifted.
    ("twice.csv", None, {}, "names the column 'text' twice in its header: rename one"),
    # NaN (JSON's, or a Parquet float column's gap) is no label: it was a class named 'nan'.
    ("nan.jsonl", None, {}, "line 2 has an empty label (column 'label')"),
    # A record spanning lines (an unclosed quote runs on to the end) is named by its first line, the quote's.
    ("runaway.tsv", None, {}, "runaway.tsv line 3 (to line 4) has an empty label"),
    # UTF-16 without a byte-order mark was read as UTF-8: "has no column 'text' (its columns: t e x t ...)".
    ("utf16.csv", None, {}, "line 1 holds NUL bytes, as UTF-16 files do: save the file as UTF-8"),
    # A list label was one class of its own ("['c1', 'c2']"); an object text trained on its Python repr.
    ("multi.jsonl", None, {}, "line 2 has a list as its label (column 'label'): give one label per row"),
    ("object.jsonl", None, {}, "line 1 has an object as its text (column 'text'): give one string per row"),
]


def write_bad_files(folder):
    """The files BAD refers to (also used by the CLI tests)."""
    good = rows(classes=6, per_class=4)
    write_csv(folder / "train.csv", good)
    (folder / "train.xlsx").write_bytes(b"PK\x03\x04")
    write_csv(folder / "empty_text.csv", [good[0], {"text": "  ", "label": "c1"}] + good[1:])
    write_csv(folder / "test_unseen.csv", [{"text": "w9 w20", "label": "c9"}])
    text = "text,label\nw1 w20,c1\nw2 w21,c2\n".encode() + b"w3 \xff\xfe,c3\n"
    (folder / "bytes.csv").write_bytes(text)
    (folder / "bytes.jsonl").write_bytes(b'{"text": "w1", "label": 1}\n{"text": "w\xe9", "label": 2}\n')
    (folder / "comma.csv").write_text("text,label\nw1 w20,c1\nw2, w21 w22,c2\nw3 w23,c3\n")
    (folder / "twice.csv").write_text("text,label,text\n" + "".join(f"w{c} w20,c{c},note\n" for c in range(3)) * 2)
    write_jsonl(folder / "nan.jsonl", [dict(r, label=float("nan") if i % 4 == 1 else r["label"])
                                       for i, r in enumerate(good)])
    (folder / "runaway.tsv").write_text('text\tlabel\nw1 w20\tc1\n"w2 w21\tc2\nw3 w23\tc3\n')
    (folder / "utf16.csv").write_bytes("text,label\nw1 w20,c1\nw2 w21,c2\n".encode("utf-16-le"))
    write_jsonl(folder / "multi.jsonl", [dict(r, label=[r["label"], "c1"] if i % 4 == 1 else r["label"])
                                         for i, r in enumerate(good)])
    write_jsonl(folder / "object.jsonl", [dict(r, text={"title": r["text"]}) for r in good])
    write_csv(folder / "tasks.csv", [dict(r, task="big") for r in good] + [{"text": "w1 w2", "label": "c1",
                                                                            "task": "lonely"}])


@pytest.mark.parametrize("train,test,options,expected", BAD)
def test_bad_files_are_refused_with_the_place_and_the_fix(train, test, options, expected, tmp_path, tokenizer):
    write_bad_files(tmp_path)
    config = {"name": "files", "train": str(tmp_path / train), "test": str(tmp_path / test) if test else "",
              "num_tasks": 3, "max_len": 8, **options}
    with pytest.raises(DataError) as error:
        get_stream(config, tokenizer)
    assert expected in str(error.value)
    assert "\n" not in str(error.value), "one line"
