"""Tokenising for classification and for TRACE-style instruction tasks (fixed lengths, numpy out).

The tokenizer is a transformers fast tokenizer object (PreTrainedTokenizerFast, BertTokenizerFast,
or the one rebuilt from GGUF metadata); nothing here loads a tokenizer.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxtree_lora.data.stream import DataError

# The ChatML turn layout, used when chat formatting is asked for and the tokenizer has no template.
CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
INSTRUCTION_KEYS = ("input_ids", "attention_mask", "loss_mask")


def tokenize_classification(texts: Sequence[str], tokenizer, max_len: int) -> dict:
    """{"input_ids", "attention_mask"} [N, max_len] int32, right-padded and truncated."""
    if max_len < 2:
        raise DataError(f"data.max_len={max_len} leaves no room for text: use at least 8")
    if not len(texts):  # a tokenizer fails on an empty batch with an IndexError
        raise DataError("a split has no texts to tokenize: every task needs training and test examples")
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="np")
    return {"input_ids": np.asarray(encoded["input_ids"], np.int32),
            "attention_mask": np.asarray(encoded["attention_mask"], np.int32)}


def format_prompt(prompt: str, tokenizer, chat_template: bool) -> str:
    """The prompt as the model sees it: with chat formatting, a user turn plus the assistant header."""
    if not chat_template:
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return CHATML.format(prompt=prompt)


def special_prefix(tokenizer) -> list[int]:
    """Token ids the tokenizer itself puts before a text (BOS for Llama-style tokenizers, else none)."""
    probe = "a"
    plain = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    full = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    for start in range(len(full) - len(plain) + 1):
        if full[start:start + len(plain)] == plain:
            return full[:start]
    return []


def _ids(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    if not texts:
        return []
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def prompt_token_ids(prompts: Sequence[str], tokenizer, chat_template: bool) -> list[list[int]]:
    """Untruncated prompt ids as the model sees them. A chat template spells its own BOS in the text;
    a plain prompt gets the tokenizer's own prefix (BOS), as TRACE's tokenizer call adds it."""
    formatted = [format_prompt(p, tokenizer, chat_template) for p in prompts]
    prefix = [] if chat_template else special_prefix(tokenizer)
    return [prefix + ids for ids in _ids(tokenizer, formatted)]


def pad_id(tokenizer):
    """The id padding positions hold: the tokenizer's pad token, or its EOS where it has none."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def answer_token_ids(answers: Sequence[str], tokenizer) -> list[list[int]]:
    """Untruncated answer ids followed by EOS (the model learns to stop)."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no eos token: instruction tasks need one to end answers")
    return [ids + [int(eos)] for ids in _ids(tokenizer, answers)]


def tokenize_instruction(prompts: Sequence[str], answers: Sequence[str], tokenizer, max_prompt_len: int,
                         max_answer_len: int, chat_template: bool = False) -> dict:
    """TRACE-style arrays, all LEFT-padded to fixed lengths.

    input_ids / attention_mask / loss_mask: [N, max_prompt_len + max_answer_len] int32; the prompt is
      left-truncated to its last max_prompt_len tokens, the answer plus EOS right-truncated to
      max_answer_len, and loss_mask is 1 on answer tokens (and EOS) only (TRACE labels the prompt -100).
    prompt_ids / prompt_mask: [N, max_prompt_len] int32, left-padded, for generation.
    Padding positions hold the pad token (EOS when there is none) and attention_mask 0.
    """
    if len(prompts) != len(answers):
        raise DataError(f"{len(prompts)} prompts but {len(answers)} answers: every prompt needs one answer")
    if max_prompt_len < 1 or max_answer_len < 1:
        raise DataError("data.max_prompt_len and data.max_answer_len must be >= 1")
    answer_ids = answer_token_ids(answers, tokenizer)
    pad = pad_id(tokenizer)
    prompt_ids_all = prompt_token_ids(prompts, tokenizer, chat_template)
    total = max_prompt_len + max_answer_len
    count = len(prompts)
    input_ids = np.full((count, total), pad, np.int32)
    attention = np.zeros((count, total), np.int32)
    loss_mask = np.zeros((count, total), np.int32)
    prompt_ids = np.full((count, max_prompt_len), pad, np.int32)
    prompt_mask = np.zeros((count, max_prompt_len), np.int32)
    for row, (prompt, answer) in enumerate(zip(prompt_ids_all, answer_ids)):
        # TRACE truncates prompts from the left: the end of a prompt (the question, the answer cue)
        # matters more than its beginning.
        prompt = prompt[-max_prompt_len:]
        answer = answer[:max_answer_len]
        sequence = prompt + answer
        input_ids[row, total - len(sequence):] = sequence
        attention[row, total - len(sequence):] = 1
        loss_mask[row, total - len(answer):] = 1
        prompt_ids[row, max_prompt_len - len(prompt):] = prompt
        prompt_mask[row, max_prompt_len - len(prompt):] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}


def pad_to_common_length(tasks, pad_id: int = 0) -> None:
    """Left-pads every task's input_ids / attention_mask / loss_mask to the longest length in the
    stream, so one compiled train step serves every task. Prompt arrays already share max_prompt_len."""
    longest = max(split.arrays["input_ids"].shape[1] for task in tasks for split in (task.train, task.test))
    for task in tasks:
        for split in (task.train, task.test):
            width = split.arrays["input_ids"].shape[1]
            if width == longest:
                continue
            for key in INSTRUCTION_KEYS:
                fill = pad_id if key == "input_ids" else 0
                filler = np.full((len(split.arrays[key]), longest - width), fill, np.int32)
                split.arrays[key] = np.concatenate([filler, split.arrays[key]], axis=1)


def answer_window(loss_masks: Sequence[np.ndarray]) -> int:
    """How many trailing columns hold every loss token: max over rows of (width - first loss column).

    Answers are right-aligned (`tokenize_instruction` left-pads), so this is the longest answer plus
    EOS, and the instruction loss needs logits over the last `answer_window` tokens only
    (`step.make_task_loss`). Computed from the masks themselves, it stays exact for any layout: a
    stream whose loss tokens are not right-aligned just gets a wider window (at most the width).
    Trimming padding columns from the left (length buckets) keeps it valid. 0 when no row has loss tokens.
    loss_masks: [N, T] arrays (one per split), widths may differ.
    """
    window = 0
    for mask in loss_masks:
        mask = np.asarray(mask)
        if mask.size == 0:
            continue
        rows = mask.any(axis=1)
        if not rows.any():
            continue
        first = np.argmax(mask[rows] > 0, axis=1)
        window = max(window, int(mask.shape[1] - first.min()))
    return window
