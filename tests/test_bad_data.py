"""Bad data: an empty task, labels outside a task's classes, token ids beyond the model's embedding and a
tokenizer of another model are refused before training, in one line naming the fix (exit status 2).
Without these checks JAX's gathers clamp out-of-range indices: the run would train on wrong classes
or wrong tokens and say nothing."""

import numpy as np
import pytest

from jaxtree_lora import cli
from jaxtree_lora.data import DataError, Split, Stream, Task, check_stream

from test_cli_compare import CONFIG
from test_paper_configs import write_tiny_llama_and_trace


def text_task(index, classes, labels, ids):
    split = Split(inputs={"input_ids": np.asarray(ids, np.int32),
                          "attention_mask": np.ones_like(np.asarray(ids, np.int32))},
                  labels=np.asarray(labels, np.int32))
    return Task(index=index, name=f"t{index}", train=split, test=split, classes=tuple(classes))


def stream_of(*tasks, num_classes=4):
    return Stream(name="hand", kind="classification", tasks=list(tasks), num_classes=num_classes)


def test_a_sound_stream_passes():
    check_stream(stream_of(text_task(0, (0, 1), [0, 1], [[1, 2], [3, 4]]),
                           text_task(1, (2, 3), [3, 2], [[5, 6], [7, 0]])), vocab_size=8)


@pytest.mark.parametrize("stream,vocab,message", [
    (stream_of(), 8, "the stream has no tasks"),
    (stream_of(text_task(0, (0, 1), [], np.zeros((0, 2)))), 8, "task 0 (t0) has no training examples"),
    (stream_of(text_task(0, (0, 1), [0, 2], [[1, 2], [3, 4]])), 8, "training label 2, outside its classes [0, 1]"),
    (stream_of(text_task(0, (0, 7), [0, 7], [[1, 2], [3, 4]])), 8, "names classes outside [0, 4)"),
    (stream_of(text_task(0, (0, 1), [0, 1], [[1, 2], [3, 8]])), 8, "token id 8 but the model's embedding has 8 rows"),
    (stream_of(text_task(0, (0, 1), [0, 1], [[1, -1], [3, 4]])), 8, "token id -1"),
])
def test_bad_streams_are_refused_with_the_fix(stream, vocab, message):
    with pytest.raises(DataError, match=message.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        check_stream(stream, vocab)


def run_cli(tmp_path, llama, trace, capsys, *extra):
    config = tmp_path / "bad.py"
    config.write_text(CONFIG.format(llama=llama, trace=trace))
    workdir = tmp_path / "run"
    status = cli.main(["run", "--config", str(config), "--workdir", str(workdir), "--no-progress", *extra])
    err = capsys.readouterr().err.strip()
    assert status == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert not (workdir / "results.json").exists()
    return err


def test_an_empty_task_file_is_one_line(tmp_path, capsys):
    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    (tmp_path / "trace" / "Py150" / "train.json").write_text("[]")
    err = run_cli(tmp_path, llama, trace, capsys)
    assert "Py150" in err and "non-empty" in err, err


def test_a_tokenizer_of_another_model_is_one_line(tmp_path, capsys):
    """The checkpoint's tokenizer files replaced by a 100-word vocabulary; the model's embedding has 48 rows."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    words = {f"w{i}": i for i in range(98)}
    words.update({"<unk>": 98, "</s>": 99})
    backend = Tokenizer(models.WordLevel(vocab=words, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", eos_token="</s>",
                            pad_token="</s>").save_pretrained(llama)
    err = run_cli(tmp_path, llama, trace, capsys)
    assert "the tokenizer has 100 tokens but the model's embedding has 48 rows" in err, err


def test_an_answer_token_beyond_the_embedding_is_refused_before_training(tmp_path):
    """Through the trainer: a stream whose ids (task 1) exceed the backbone's vocabulary never reaches a step."""
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run
    from test_loop import synthetic_stream, tiny_config

    config = tiny_config("seqlora")
    backbone = backbone_lib.build(config)
    stream = synthetic_stream()
    stream.tasks[1].train.inputs["input_ids"][0, 0] = backbone.vocab_size + 5
    with pytest.raises(DataError, match="the tokenizer does not belong to the model"):
        Run(config=config, backbone=backbone, stream=stream, workdir=str(tmp_path / "run"), progress=False)
