"""Where the wall time of a whole `jaxtree-lora run` goes: the run's time ledger, per job, as JSON.

Each job runs as its own `jaxtree-lora run` process (so start-up, imports and weight loading count,
as they do for a user) and the table is read from its results.json (`time.ledger`: start-up,
weights, data, setup, compile, train, each task's extra passes by name, prototypes, evaluation,
checkpoints, reports, other; the phases sum to the wall), with `ratio` = wall / (train + evaluation)
and `ratio_method_training_counted`, where a method's own optimisation outside the train step (HiDe's
heads: their own ledger line) counts as training too; `tool_overhead_seconds` is the time that is
neither the method's work nor evaluation (start-up, weights, data, setup, compile, checkpoints,
reports, other) and `ratio_tool_overhead` the wall over the rest.

    python -m experiments.benchmarks.run_profile                        # the default job + a 10-task stream
    python -m experiments.benchmarks.run_profile --jobs stream10 --methods fix,treelora
    python -m experiments.benchmarks.run_profile --jobs stream10 --per_class 160,80   # 4x the examples
    python -m experiments.benchmarks.run_profile --quick                # 3 tasks, 1 epoch: a smoke check
    python -m experiments.benchmarks.run_profile --tiny --quick         # a random tiny BERT written here (tests)
    JAXTREE_LORA_XLA_CACHE=off python -m experiments.benchmarks.run_profile   # a first run's compile times

Jobs: "default" (experiments/configs/default.py) and "stream10": a CSV stream of 20 classes in 10
tasks written by this script (class c's sentences carry their own words), read through
`data.name=files` as a user's own data would be. Last line: a JSON object {job: {method: table}}.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

WORDS = [f"w{i}" for i in range(60)]
# Ledger lines of a method's own optimisation outside the train step (`TaskContext.phase` parts):
# HiDe's, its TII head's training and alignment and its classifier's alignment.
METHOD_TRAINING = (": head training",)
# Ledger lines of the tool's own time: what a run costs beyond training, the method's passes and evaluation.
TOOL_OVERHEAD = ("startup", "weights", "data", "setup", "compile", "checkpoint", "checkpoint restore", "reports",
                 "other")


def write_stream(directory: str, classes: int = 20, per_class_train: int = 40, per_class_test: int = 20,
                 seed: int = 0) -> tuple[str, str]:
    """train.csv and test.csv: class c's texts hold its own two words among shared filler words."""
    rng = np.random.default_rng(seed)

    def records(per_class):
        out = []
        for label in range(classes):
            for _ in range(per_class):
                words = [WORDS[2 * label], WORDS[2 * label + 1]] + [WORDS[40 + int(k)] for k in rng.integers(0, 20, 4)]
                rng.shuffle(words)
                out.append({"text": " ".join(words), "label": f"class{label:02d}"})
        return out

    paths = []
    for name, per_class in (("train.csv", per_class_train), ("test.csv", per_class_test)):
        path = os.path.join(directory, name)
        with open(path, "w", newline="", encoding="utf-8") as file:
            writer = csv.DictWriter(file, fieldnames=["text", "label"])
            writer.writeheader()
            writer.writerows(records(per_class))
        paths.append(path)
    return paths[0], paths[1]


def write_tiny_bert(directory: str, seed: int = 0) -> str:
    """A random 2-layer BERT checkpoint (config, safetensors, a tokenizer knowing WORDS) in the HF layout."""
    from safetensors.numpy import save_file
    from transformers import BertConfig, BertTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    hidden, inner, layers, positions = 32, 64, 2, 32
    rng = np.random.default_rng(seed)
    tensors = {"embeddings.word_embeddings.weight": rng.normal(size=(len(vocab), hidden)),
               "embeddings.position_embeddings.weight": rng.normal(size=(positions, hidden)),
               "embeddings.token_type_embeddings.weight": rng.normal(size=(2, hidden)),
               "embeddings.LayerNorm.weight": np.ones(hidden), "embeddings.LayerNorm.bias": np.zeros(hidden)}
    for layer in range(layers):
        prefix = f"encoder.layer.{layer}."
        for name, shape in (("attention.self.query", (hidden, hidden)), ("attention.self.key", (hidden, hidden)),
                            ("attention.self.value", (hidden, hidden)), ("attention.output.dense", (hidden, hidden)),
                            ("intermediate.dense", (inner, hidden)), ("output.dense", (hidden, inner))):
            tensors[prefix + name + ".weight"] = 0.3 * rng.normal(size=shape)
            tensors[prefix + name + ".bias"] = np.zeros(shape[0])
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            tensors[prefix + name + ".weight"] = np.ones(hidden)
            tensors[prefix + name + ".bias"] = np.zeros(hidden)
    os.makedirs(directory, exist_ok=True)
    BertConfig(vocab_size=len(vocab), hidden_size=hidden, intermediate_size=inner, num_hidden_layers=layers,
               num_attention_heads=4, max_position_embeddings=positions, type_vocab_size=2).save_pretrained(directory)
    BertTokenizerFast(vocab={word: i for i, word in enumerate(vocab)}).save_pretrained(directory)
    save_file({name: value.astype(np.float32) for name, value in tensors.items()},
              os.path.join(directory, "model.safetensors"))
    return directory


def job_arguments(job: str, method: str, scratch: str, quick: bool, tiny: bool) -> list[str]:
    """The `jaxtree-lora run` arguments of one job."""
    arguments = [f"--config.method.name={method}"]
    if tiny:
        arguments += ["--config.model.name=hf", "--config.model.kind=encoder",
                      f"--config.model.path={os.path.join(scratch, 'tiny_bert')}", "--config.data.max_len=16"]
    if job == "stream10" or tiny:
        train, test = os.path.join(scratch, "train.csv"), os.path.join(scratch, "test.csv")
        arguments += ["--config.data.name=files", f"--config.data.train={train}", f"--config.data.test={test}",
                      f"--config.data.num_tasks={10 if job == 'stream10' else 5}"]
    if quick:
        arguments += ["--config.data.num_tasks=3", "--config.train.epochs=1"]
        if job == "default" and not tiny:
            arguments += ["--config.data.per_class_train=16", "--config.data.per_class_test=8"]
    return arguments


def profile(job: str, method: str, scratch: str, quick: bool, tiny: bool) -> dict:
    """One `jaxtree-lora run` in its own process; its results.json `time` (with the ledger)."""
    workdir = os.path.join(scratch, f"{job}-{method}")
    command = [sys.executable, "-m", "jaxtree_lora.cli", "run", "--no-progress", "--workdir", workdir,
               *job_arguments(job, method, scratch, quick, tiny)]
    completed = subprocess.run(command, capture_output=True, text=True)
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed with status {completed.returncode}:\n{completed.stderr[-2000:]}")
    with open(os.path.join(workdir, "results.json")) as file:
        results = json.load(file)
    time = results["time"]
    ledger = time["ledger"]
    counted = time["train_seconds"] + time["eval_seconds"]
    # The method's own gradient steps outside the train step (HiDe's heads).
    own = sum(seconds for name, seconds in ledger["phases"].items() if name.endswith(METHOD_TRAINING))
    tool = sum(seconds for name, seconds in ledger["phases"].items() if name in TOOL_OVERHEAD)
    return {**ledger, "train_seconds": time["train_seconds"], "eval_seconds": time["eval_seconds"],
            "ratio": ledger["wall_seconds"] / counted, "method_training_seconds": own,
            "ratio_method_training_counted": ledger["wall_seconds"] / (counted + own),
            "tool_overhead_seconds": tool,
            "ratio_tool_overhead": ledger["wall_seconds"] / (ledger["wall_seconds"] - tool),
            "average_accuracy": results["metrics"]["average_accuracy"]}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", default="default,stream10", help="comma-separated: default, stream10")
    parser.add_argument("--methods", default="treelora", help="comma-separated method names")
    parser.add_argument("--quick", action="store_true", help="3 tasks of 1 epoch (fewer examples on default)")
    parser.add_argument("--tiny", action="store_true", help="a random tiny BERT and the CSV stream: no assets")
    parser.add_argument("--per_class", default="", help="stream10's training,test examples per class "
                        "(default 40,20; 16,8 with --quick)")
    parser.add_argument("--workdir", default="", help="where the runs are written (default: a temporary folder)")
    args = parser.parse_args(argv)
    jobs = [job for job in args.jobs.split(",") if job]
    unknown = sorted(set(jobs) - {"default", "stream10"})
    if unknown:
        parser.error(f"unknown job(s) {', '.join(unknown)}: choose default, stream10")
    scratch = args.workdir or tempfile.mkdtemp(prefix="run_profile-")
    os.makedirs(scratch, exist_ok=True)
    per_class = args.per_class or ("16,8" if args.quick else "40,20")  # a written --per_class wins
    try:
        per_class_train, per_class_test = (int(n) for n in per_class.split(","))
    except ValueError:
        parser.error(f"--per_class takes TRAIN,TEST (two integers), got {per_class!r}")
    write_stream(scratch, per_class_train=per_class_train, per_class_test=per_class_test)
    if args.tiny:
        write_tiny_bert(os.path.join(scratch, "tiny_bert"))
    out = {}
    for job in jobs:
        for method in [name for name in args.methods.split(",") if name]:
            table = profile(job, method, scratch, args.quick, args.tiny)
            out.setdefault(job, {})[method] = table
            print(f"{job} {method}: wall {table['wall_seconds']:.1f} s (ratio {table['ratio']:.2f}, "
                  f"{table['ratio_method_training_counted']:.2f} with the method's own training counted; tool "
                  f"overhead {table['tool_overhead_seconds']:.1f} s, {table['ratio_tool_overhead']:.2f}x the rest) "
                  + ", ".join(f"{name} {seconds:.1f}" for name, seconds in table["phases"].items()), flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
