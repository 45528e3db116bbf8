"""TRACE benchmark loader: `root/<task>/{train,eval,test}.json`, each a list of {"prompt", "answer"}.

Task metrics follow TRACE's evaluation code (reference/treelora.md §5.1): accuracy (the stripped
prediction truncated to the target's length must equal it) for C-STANCE, FOMC, NumGLUE-cm/ds;
first-character accuracy for ScienceQA; ROUGE-L for MeetingBank; fuzzy ratio for Py150; SARI for
20Minuten. Unknown task names default to accuracy.
"""
from __future__ import annotations

import json
import os

from jaxtree_lora.data.offline import _fix_lengths
from jaxtree_lora.data.stream import DataError, Split, Stream, Task
from jaxtree_lora.data.tokenize import tokenize_instruction

TRACE_ORDER = ("C-STANCE", "FOMC", "MeetingBank", "Py150", "ScienceQA", "NumGLUE-cm", "NumGLUE-ds", "20Minuten")
METRICS = {"C-STANCE": "accuracy", "FOMC": "accuracy", "MeetingBank": "rouge_l", "Py150": "fuzzy",
           "ScienceQA": "first_char", "NumGLUE-cm": "accuracy", "NumGLUE-ds": "accuracy", "20Minuten": "sari"}
MAX_NEW = {"MeetingBank": 256, "Py150": 64, "20Minuten": 256}


def read_split(root: str, task: str, split: str, limit: int = 0) -> tuple[list, list]:
    path = os.path.join(root, task, f"{split}.json")
    if not os.path.isfile(path):
        raise DataError(f"TRACE file {path} is missing: data.root must hold <task>/{{train,eval,test}}.json")
    with open(path, encoding="utf-8") as f:
        try:
            records = json.load(f)
        except json.JSONDecodeError as error:
            raise DataError(f"{path} is not valid JSON ({error})") from error
    if not isinstance(records, list) or not records:
        raise DataError(f"{path} must be a non-empty list of {{\"prompt\", \"answer\"}} records")
    if limit:
        records = records[:limit]
    try:
        return [str(r["prompt"]) for r in records], [str(r["answer"]) for r in records]
    except (KeyError, TypeError) as error:
        raise DataError(f"{path}: every record needs 'prompt' and 'answer' ({error!r} missing)") from error


def trace_stream(root: str, tokenizer, tasks=TRACE_ORDER, max_train: int = 0, max_test: int = 0,
                 max_prompt_len: int = 1024, max_answer_len: int = 512, chat_template: bool = False,
                 test_split: str = "test") -> Stream:
    if not root or not os.path.isdir(root):
        raise DataError(f"TRACE root {root!r} is not a directory: set --config.data.root to the unpacked "
                        f"TRACE benchmark (LLM-CL-Benchmark_500 or _5000)")
    stream_tasks = []
    for index, name in enumerate(tasks):
        splits = []
        for split, limit in (("train", max_train), (test_split, max_test)):
            prompts, answers = read_split(root, name, split, limit)
            arrays = tokenize_instruction(prompts, answers, tokenizer, max_prompt_len, max_answer_len, chat_template)
            splits.append(Split(prompts=prompts, answers=answers, arrays=arrays))
        stream_tasks.append(Task(index=index, name=name, train=splits[0], test=splits[1],
                                 metric=METRICS.get(name, "accuracy"),
                                 max_new_tokens=min(MAX_NEW.get(name, 32), max_answer_len)))
    _fix_lengths(stream_tasks)
    return Stream(name="trace", kind="instruction", tasks=stream_tasks, metadata={"root": root})
