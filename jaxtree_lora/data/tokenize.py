"""Tokenising for classification and for TRACE-style instruction tasks (fixed lengths, numpy out)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"


def tokenize_classification(texts: Sequence[str], tokenizer, max_len: int) -> dict:
    """{"input_ids", "attention_mask"} [N, max_len] int32, right-padded and truncated."""
    encoded = tokenizer(list(texts), padding="max_length", truncation=True, max_length=max_len,
                        return_tensors="np")
    return {"input_ids": encoded["input_ids"].astype(np.int32),
            "attention_mask": encoded["attention_mask"].astype(np.int32)}


def format_prompt(prompt: str, tokenizer, chat_template: bool) -> str:
    """The prompt as the model sees it: a user turn plus the assistant header for chat models."""
    if not chat_template:
        return prompt
    template = getattr(tokenizer, "chat_template", None)
    if template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    return CHATML.format(prompt=prompt)


def _ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def tokenize_instruction(prompts: Sequence[str], answers: Sequence[str], tokenizer, max_prompt_len: int,
                         max_answer_len: int, chat_template: bool = False) -> dict:
    """TRACE-style arrays, all left-padded to fixed lengths.

    input_ids / attention_mask / loss_mask: [N, max_prompt_len + max_answer_len]; the prompt is
      left-truncated to max_prompt_len, the answer (plus EOS) right-truncated to max_answer_len, and
      loss_mask is 1 on answer tokens only (TRACE labels the prompt -100).
    prompt_ids / prompt_mask: [N, max_prompt_len], left-padded, for generation.
    """
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    if eos is None:
        raise ValueError("the tokenizer has no eos token: instruction tasks need one to end answers")
    total = max_prompt_len + max_answer_len
    n = len(prompts)
    input_ids = np.full((n, total), pad, np.int32)
    attention = np.zeros((n, total), np.int32)
    loss_mask = np.zeros((n, total), np.int32)
    prompt_ids = np.full((n, max_prompt_len), pad, np.int32)
    prompt_mask = np.zeros((n, max_prompt_len), np.int32)
    for row, (prompt, answer) in enumerate(zip(prompts, answers)):
        p = _ids(tokenizer, format_prompt(prompt, tokenizer, chat_template))[-max_prompt_len:]
        a = (_ids(tokenizer, answer) + [eos])[:max_answer_len]
        sequence = p + a
        input_ids[row, total - len(sequence):] = sequence
        attention[row, total - len(sequence):] = 1
        loss_mask[row, total - len(a):] = 1
        prompt_ids[row, max_prompt_len - len(p):] = p
        prompt_mask[row, max_prompt_len - len(p):] = 1
    return {"input_ids": input_ids, "attention_mask": attention, "loss_mask": loss_mask,
            "prompt_ids": prompt_ids, "prompt_mask": prompt_mask}
