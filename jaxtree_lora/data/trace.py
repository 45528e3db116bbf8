"""TRACE benchmark loader: `root/<task>/{train,eval,test}.json`, each a list of {"prompt", "answer"}.

TRACE (Wang et al., 2023) ships LLM-CL-Benchmark_500 / _5000 in this layout; the files are not
bundled here, so `data.root` must point at an unpacked copy. Each task is scored by the metric
TRACE's evaluation code uses for it (`METRICS` below; docs/DATA.md and docs/METRICS.md): accuracy
for C-STANCE, FOMC, NumGLUE-cm/ds; first-character accuracy for ScienceQA; ROUGE-L for MeetingBank;
fuzzy ratio for Py150; SARI for 20Minuten. Other task names are scored by accuracy.
"""
from __future__ import annotations

import json
import os
from typing import Sequence

from jaxtree_lora.data.stream import DataError, Split, Stream, Task
from jaxtree_lora.data.tokenize import pad_id, pad_to_common_length, tokenize_instruction

TRACE_ORDER = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
METRICS = {"C-STANCE": "accuracy", "FOMC": "accuracy", "MeetingBank": "rouge_l", "Py150": "fuzzy",
           "ScienceQA": "first_char", "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy", "20Minuten": "sari"}
# Generation budgets: long outputs for the summarisation, code and simplification tasks.
MAX_NEW = {"MeetingBank": 256, "Py150": 64, "20Minuten": 256}
SPLITS = ("train", "eval", "test")


def read_split(root: str, task: str, split: str, limit: int = 0) -> tuple[list, list]:
    """(prompts, answers) of root/<task>/<split>.json, the first `limit` records when limit > 0."""
    path = os.path.join(root, task, f"{split}.json")
    if not os.path.isfile(path):
        raise DataError(f"TRACE file {path} is missing: data.root must hold <task>/{{train,eval,test}}.json "
                        f"for every task in data.tasks")
    with open(path, encoding="utf-8") as file:
        try:
            records = json.load(file)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({error}): re-extract the TRACE benchmark") from error
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must be a non-empty JSON list of {{\"prompt\", \"answer\"}} records")
    if limit:
        records = records[:limit]
    try:
        return [str(r["prompt"]) for r in records], [str(r["answer"]) for r in records]
    except (KeyError, TypeError) as error:
        raise DataError(f"{path}: every record needs 'prompt' and 'answer' ({error!r} missing)") from error


def trace_stream(root: str, tokenizer, tasks: Sequence[str] = TRACE_ORDER, max_train: int = 0, max_eval: int = 0,
                 max_prompt_len: int = 1024, max_answer_len: int = 512, chat_template: bool = False,
                 eval_split: str = "test") -> Stream:
    """An instruction Stream over TRACE tasks in the given order.

    max_train / max_eval: keep the first N records of each task's train / `eval_split` file (0: all).
    The evaluation split is TRACE's "test" by default ("eval" is its validation split).
    Arrays are padded to one length across tasks (one compiled step for the whole stream).
    """
    if not root or not os.path.isdir(root):
        raise DataError(f"TRACE root {root!r} is not a directory: set --config.data.root to the unpacked TRACE "
                        f"benchmark (LLM-CL-Benchmark_500 or _5000, one folder per task)")
    if eval_split not in SPLITS:
        raise DataError(f"data.eval_split {eval_split!r} must be one of {', '.join(SPLITS)}")
    tasks = tuple(tasks)
    if not tasks:
        raise DataError("data.tasks is empty: name at least one TRACE task folder")
    missing = [name for name in tasks if not os.path.isdir(os.path.join(root, name))]
    if missing:
        present = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
        raise DataError(f"TRACE task folder(s) {', '.join(missing)} missing under {root} (found: "
                        f"{', '.join(present) or 'none'}): fix data.tasks or data.root")
    stream_tasks = []
    for index, name in enumerate(tasks):
        splits = []
        for split, limit in (("train", max_train), (eval_split, max_eval)):
            prompts, answers = read_split(root, name, split, limit)
            arrays = tokenize_instruction(prompts, answers, tokenizer, max_prompt_len, max_answer_len, chat_template)
            splits.append(Split(prompts=prompts, answers=answers, arrays=arrays))
        stream_tasks.append(Task(index=index, name=name, train=splits[0], test=splits[1],
                                 metric=METRICS.get(name, "accuracy"),
                                 max_new_tokens=min(MAX_NEW.get(name, 32), max_answer_len)))
    pad = pad_id(tokenizer)
    pad_to_common_length(stream_tasks, int(pad))
    return Stream(name="trace", kind="instruction", tasks=stream_tasks,
                  metadata={"root": root, "eval_split": eval_split, "max_prompt_len": max_prompt_len,
                            "max_answer_len": max_answer_len})
