"""offline-lang-cil: class-incremental language identification over the ChatterBot corpus.

The stream tests read the cached asset "chatterbot_languages" (skipped when it is not installed, as
the other offline-stream tests are); the key and config tests need no asset.
"""
import collections

import numpy as np
import pytest

from jaxtree_lora import assets
from jaxtree_lora.data import DataError, get_stream
from test_data_offline import require

from jaxtree_lora.data.offline import (DEFAULT_LANGUAGES, language_key, language_texts, offline_lang_cil,
                                       text_has_native_letter)


@pytest.fixture(scope="module")
def tokenizer():
    require("minilm", "chatterbot_languages")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(assets.path("minilm")))


@pytest.fixture(scope="module")
def stream(tokenizer):
    return offline_lang_cil(tokenizer)


def test_language_key_keeps_every_script_and_folds_case_and_punctuation():
    assert language_key("Как дела?") == language_key("как  дела") == "как дела"
    assert language_key("你好！") == "你好", "CJK text must not fold to an empty key (text_key would)"
    # Devanagari vowel signs are marks (category M): dropping them would merge distinct words.
    assert language_key("धन्यवाद") == "धन्यवाद" and language_key("महीना") != language_key("मह न")
    assert language_key("Ｐｙｔｈｏｎ") == "python", "full-width Latin is folded by NFKC"


def test_native_letter_tells_script_text_from_latin_leftovers():
    assert text_has_native_letter("Bilbo Bagginsは、Tolkeinのキャラクターです")
    assert not text_has_native_letter("I love baseball 1963"), "English left in a Japanese file is not Japanese"
    assert not text_has_native_letter("Ｐｙｔｈｏｎ"), "full-width Latin is still Latin"


@pytest.mark.assets
def test_stream_has_ten_tasks_of_two_balanced_languages(stream):
    assert stream.name == "offline-lang-cil" and len(stream) == 10 and stream.num_classes == 20
    assert set(stream.class_names) == set(DEFAULT_LANGUAGES)
    assert sorted(c for task in stream.tasks for c in task.classes) == list(range(20)), "every language once"
    for task in stream.tasks:
        assert len(task.classes) == 2
        for split, per_class in ((task.train, 40), (task.test, 20)):
            counts = collections.Counter(split.labels.tolist())
            assert counts == {c: per_class for c in task.classes}, f"task {task.name} is not balanced"
            assert split.inputs["input_ids"].shape == (len(split), 64)


@pytest.mark.assets
def test_stream_never_uses_a_text_twice_and_labels_are_the_folder_language(stream):
    keys = [language_key(t) for task in stream.tasks for split in (task.train, task.test) for t in split.texts]
    assert len(keys) == 20 * 60 and all(keys), "every text has a non-empty key"
    assert len(set(keys)) == len(keys), "a text appears twice (train/test, or under two languages)"
    for task in stream.tasks:
        for split in (task.train, task.test):
            for text, label in zip(split.texts[::7], split.labels[::7]):
                language = stream.class_names[label]
                assert text in language_texts(language), f"{text!r} is labelled {language} but not from its folder"


@pytest.mark.assets
def test_no_usable_text_belongs_to_two_languages(stream):
    owners = collections.defaultdict(set)
    for language in DEFAULT_LANGUAGES:
        for text in language_texts(language):
            owners[language_key(text)].add(language)
    shared = {key: langs for key, langs in owners.items() if len(langs) > 1}
    assert not shared, f"texts found under two languages have no single label: {list(shared.items())[:3]}"


@pytest.mark.assets
def test_stream_is_reproducible_and_seeded(tokenizer, stream):
    again = offline_lang_cil(tokenizer)
    assert again.class_order == stream.class_order
    assert again.tasks[0].train.texts == stream.tasks[0].train.texts
    np.testing.assert_array_equal(again.tasks[9].test.inputs["input_ids"], stream.tasks[9].test.inputs["input_ids"])
    other = offline_lang_cil(tokenizer, seed=1, per_class_train=8, per_class_test=4)
    assert other.class_order != stream.class_order, "the seed moves the class order"
    assert other.tasks[0].train.texts != stream.tasks[0].train.texts[:16]


@pytest.mark.assets
def test_unknown_language_and_oversized_classes_name_the_fix(tokenizer):
    with pytest.raises(DataError, match=r"unknown languages \['klingon'\].*choose from .*english.*yoruba"):
        get_stream({"name": "offline-lang-cil", "classes": ["english", "klingon"]}, tokenizer)
    with pytest.raises(DataError, match="lower data.per_class_train"):
        offline_lang_cil(tokenizer, per_class_train=48, per_class_test=24)  # yoruba has 63 usable texts


def test_config_changes_only_the_data_source_and_sizes():
    from experiments.configs import default, offline_lang_cil as lang_config
    from jaxtree_lora.train import memory

    config, base = lang_config.get_config(), default.get_config()
    from jaxtree_lora.data import sources

    chosen = sources.options(config.data)  # the source's own defaults (the config sets only its name)
    assert (chosen.name, chosen.num_tasks, chosen.per_class_train, chosen.per_class_test) == \
        ("offline-lang-cil", 10, 40, 20)
    for field in ("model", "method", "optimizer", "train", "eval", "lora"):
        assert config[field].to_dict() == base[field].to_dict(), f"config.{field} differs from default.py"
    assert memory.stream_shape(config.data) == ("classification", 10, 20, 64), "the planner knows the stream"
