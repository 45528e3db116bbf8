"""What a finished run scores when each test example's task is given, against the task it inferred.

For methods that infer each example's task and score it with that task's slot (HiDe-LoRA, TreeLoRA in
its HiDe form, LiLoRA with `eval.task_identity=inferred`), the final accuracy is the product of two
parts: how often the task is inferred right (task-identity inference, TII) and how well the right
slot scores its task's classes. This script restores the final checkpoint of each work directory,
scores every task after the last one with the identity given (the task's own slot, its classes
competing), and reads the inferred-identity scores and the TII accuracy the run recorded.

    python -m experiments.identity_given /work/runs/cil/seed_0/hide_lora /work/runs/cil/seed_0/treelora

Last line: a JSON object {workdir: {"given": [per task], "inferred": [per task], "identity": [per task],
"given_mean", "inferred_mean", "identity_mean"}}.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def final_run_and_state(workdir: str):
    """(Run, the state of the newest checkpoint) of a finished work directory."""
    from experiments.adapter_drift import restored_run

    run, _, state, loop, _ = restored_run(workdir)
    if loop["position"]["task"] != len(run.stream.tasks):
        raise SystemExit(f"{workdir} did not finish its stream (its newest checkpoint is at {loop['position']})")
    return run, state


def identity_given(workdir: str) -> dict:
    run, state = final_run_and_state(workdir)
    from jaxtree_lora.methods.base import InferenceRule

    if run.method.inference_rule not in (InferenceRule.GIVEN_TASK_SLOT, InferenceRule.INFERRED_TASK_SLOT):
        raise SystemExit(f"{workdir}: {run.method.name} does not score examples with a per-task slot")
    last = len(run.stream.tasks) - 1
    evaluator = run.evaluator
    evaluator.rule = InferenceRule.GIVEN_TASK_SLOT  # the evaluated task's slot scores it, its classes compete
    given = [evaluator.evaluate(state, task, last)["score"] for task in range(last + 1)]
    with open(os.path.join(workdir, "results.json")) as f:
        results = json.load(f)
    inferred = [row[-1] for row in results["accuracy_matrix"]]
    records = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    identity = [r.get("task_identity_accuracy") for r in records if r["type"] == "task"][-1]
    out = {"method": run.method.name, "given": given, "inferred": inferred, "identity": identity,
           "given_mean": float(np.mean(given)), "inferred_mean": float(np.mean(inferred))}
    if identity and all(value is not None for value in identity):
        out["identity_mean"] = float(np.mean(identity))
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    args = parser.parse_args(argv)
    out = {}
    for workdir in args.workdirs:
        out[workdir] = identity_given(workdir)
        row = out[workdir]
        print(f"{workdir} ({row['method']}): identity given {row['given_mean']:.2f}, inferred {row['inferred_mean']:.2f}"
              + (f", task identity right for {row['identity_mean']:.2f}%" if "identity_mean" in row else ""), flush=True)
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
