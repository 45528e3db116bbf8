"""Issue 24's bad inputs, each through the real `jaxtree-lora run` (cli.main, in-process, a tiny random
BERT checkpoint): a one-row file, a class with one example, a split that holding out would leave
empty, a task with no test example, for every loader that reads the user's data (files,
instruction_files, image_folder; tfds through its shared hold-out). Each is refused in one line,
exit status 2, with nothing written to the work directory."""
import json
import os

import numpy as np
import pytest

from jaxtree_lora import cli


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    from test_bert import make_checkpoint

    path = tmp_path_factory.mktemp("bert") / "bert"
    make_checkpoint(str(path))
    return str(path)


def write(path, text: str) -> str:
    path.write_text(text)
    return str(path)


def jsonl(path, count: int) -> str:
    return write(path, "".join(json.dumps({"prompt": f"w{i % 9}", "answer": "w20"}) + "\n" for i in range(count)))


def images(root, counts: dict) -> str:
    from PIL import Image

    for name, count in counts.items():
        os.makedirs(root / name, exist_ok=True)
        for index in range(count):
            Image.fromarray(np.full((4, 4, 3), 20 * index, np.uint8)).save(root / name / f"{index}.png")
    return str(root)


def rows(path, *lines: str) -> str:
    """A file of `lines` (the header first); its path."""
    return write(path, "".join(line + "\n" for line in lines))


CASES = {  # case -> (data.name and settings from a tmp folder, what the one line must say)
    "a one-row CSV": (lambda d: ["files", f"train={rows(d / 'one.csv', 'text,label', 'w1 w20,c0')}"],
                      "class 'c0' has 1 example"),
    "a one-row TSV": (lambda d: ["files", "train=" + rows(d / "one.tsv", "text\tlabel", "w1\tc0")], "has 1 example"),
    "a header-only CSV": (lambda d: ["files", f"train={rows(d / 'empty.csv', 'text,label')}"], "has no rows"),
    "a class with one example": (
        lambda d: ["files", f"train={rows(d / 'lonely.csv', 'text,label', 'w1,c0', 'w2,c0', 'w3,c1')}", "num_tasks=1"],
        "class 'c1' has 1 example"),
    "a task with no test example (test file)": (
        lambda d: ["files", f"train={rows(d / 'tr.csv', 'text,label', 'w1,c0', 'w2,c0', 'w3,c1', 'w4,c1')}",
                   f"test={rows(d / 'te.csv', 'text,label', 'w1,c0')}", "num_tasks=2"], "has no test examples"),
    "a task with no test example (task column)": (
        lambda d: ["files", "task_column=task",
                   f"train={rows(d / 'tasks.csv', 'text,label,task', 'w1,c0,a', 'w2,c0,a', 'w3,c1,b')}"],
        "has no test examples to hold out"),
    "a split left empty by holding out (test_fraction 0)": (
        lambda d: ["files", f"train={rows(d / 'two.csv', 'text,label', 'w1,c0', 'w2,c0')}", "test_fraction=0.0"],
        "must lie strictly between 0 and 1"),
    "an instruction task of one example": (lambda d: ["instruction_files", f"train={jsonl(d / 'task.jsonl', 1)}"],
                                           "too few to hold out"),
    "an instruction test file with no rows": (
        lambda d: ["instruction_files", f"train={jsonl(d / 'task.jsonl', 4)}", f"test={write(d / 'test.jsonl', '')}"],
        "no rows"),
    "an image class of one image": (lambda d: ["image_folder", f"data_dir={images(d / 'img', {'a': 1, 'b': 3})}",
                                               "image_size=4", "num_tasks=1"], "class 'a' has 1 example"),
    "an image task with no test image": (
        lambda d: ["image_folder", f"train={images(d / 'img_train', {'a': 2, 'b': 2})}",
                   f"test={images(d / 'img_test', {'a': 1})}", "image_size=4", "num_tasks=2"], "has no test examples"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_data_is_one_line_and_exit_2_from_run(case, bert, tmp_path, capsys):
    make, expected = CASES[case]
    name, *settings = make(tmp_path)
    workdir = tmp_path / "run"
    status = cli.main(["run", "--no-progress", "--workdir", str(workdir), "--config.model.name=hf",
                       "--config.model.kind=encoder", f"--config.model.path={bert}", f"--config.data.name={name}",
                       *(f"--config.data.{setting}" for setting in settings)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, f"{case}: exit {status}: {err}"
    assert expected in err, f"{case}: {err}"
    assert not workdir.exists() or not os.listdir(workdir), f"{case}: the work directory was written"


def test_tfds_holdout_refuses_a_class_of_one_example():
    """tfds and image_folder share `holdout`: a class that cannot give one training and one test example."""
    from jaxtree_lora.data import DataError
    from jaxtree_lora.data.tfds_source import holdout

    train, test = holdout(np.array([0, 0, 1, 1, 1]), 0.34, seed=0)
    assert len(train) + len(test) == 5 and len(test) == 2, "one held out per class"
    with pytest.raises(DataError, match="class 'red' has 1 example"):
        holdout(np.array([0, 1, 1]), 0.2, seed=0, names=["red", "green"])
