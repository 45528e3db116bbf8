"""The papers' configs load and train: experiments/configs/trace_llama3_2_1b.py runs two real steps
through the loop on a tiny Hugging Face Llama checkpoint and a tiny TRACE directory written here, with
every setting of the config kept except the sizes (model shape, prompt/answer lengths, rows)."""
import json

import numpy as np
import pytest

from experiments.configs import trace_llama3_2_1b
from jaxtree_lora.data import get_stream
from jaxtree_lora.data.trace import TRACE_ORDER
from jaxtree_lora.train import backbone as backbone_lib
from jaxtree_lora.train.loop import Run, StopRequested

from test_llama import make_checkpoint, write_checkpoint


def test_trace_llama3_2_1b_config_is_the_official_recipe():
    config = trace_llama3_2_1b.get_config()
    assert list(config.data.tasks) == list(TRACE_ORDER), "TRACE order"
    assert list(config.train.epochs) == [2, 1, 3, 2, 1, 2, 2, 3], "official per-task epochs"
    assert (config.optimizer.learning_rate, config.optimizer.b1, config.optimizer.b2) == (1e-4, 0.9, 0.95)
    assert config.optimizer.schedule == "constant" and config.optimizer.clip_norm == 1.0
    assert (config.train.batch_size, config.train.accumulation) == (4, 8), "4 ranks x 1 x accumulation 8"
    assert config.method.name == "treelora" and config.method.treelora.lam == 0.5
    assert config.eval.temperature == 0.1, "TRACE evaluation samples at temperature 0.1"


def write_tiny_llama_and_trace(root, tasks=TRACE_ORDER, train_rows=40, test_rows=4):
    """A 2-layer Hugging Face Llama directory (with a word-level tokenizer over w0..w45) at root/llama and
    a TRACE directory at root/trace whose prompts use words that tokenizer knows (no <unk>)."""
    hf_config, tensors = make_checkpoint("llama")
    write_checkpoint(str(root / "llama"), hf_config, tensors)
    for task in tasks:
        (root / "trace" / task).mkdir(parents=True)
        for split, rows in (("train", train_rows), ("eval", test_rows), ("test", test_rows)):
            records = [{"prompt": " ".join(f"w{(i * 7 + j) % 40}" for j in range(5)), "answer": f"w{i % 3}"}
                       for i in range(rows)]
            (root / "trace" / task / f"{split}.json").write_text(json.dumps(records))
    return str(root / "llama"), str(root / "trace")


def test_trace_llama3_2_1b_config_runs_two_steps_on_tiny_shapes(tmp_path):
    write_tiny_llama_and_trace(tmp_path)
    config = trace_llama3_2_1b.get_config()
    config.model.path = str(tmp_path / "llama")
    config.model.compute_dtype = "float32"
    config.data.root = str(tmp_path / "trace")
    config.data.max_prompt_len, config.data.max_answer_len = 8, 2
    config.train.log_every = 1
    backbone = backbone_lib.build(config)
    stream = get_stream(config.data, backbone.tokenizer)
    assert [t.name for t in stream.tasks] == list(TRACE_ORDER)
    records = []
    run = Run(config=config, backbone=backbone, stream=stream, workdir=str(tmp_path / "run"), progress=False,
              logger=records.append, stop_after_steps=2)
    assert run.micro_batch * run.accumulation == 32, "one update sees 32 examples, as 4 ranks x 1 x 8"
    with pytest.raises(StopRequested):
        run.fit()
    steps = [r for r in records if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2], "two optimiser steps ran"
    assert all(np.isfinite(r["loss"]) and r["loss"] > 0 for r in steps), "answer-only loss is finite"
    assert run.train_step._cache_size() == 1
