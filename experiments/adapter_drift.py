"""How far a run's adapters moved, and how far two runs' adapters are apart.

Evidence for questions such as "does TreeLoRA's regulariser change what SeqLoRA learns?": for each
work directory, the final adapters (newest checkpoint) against the initial ones the same config and
seed produce, split into the LoRA A and B factors; for the first directory against each other one,
the distance between their final A and B relative to the first run's own drift.

    python -m experiments.adapter_drift /tmp/exp/cil/seqlora /tmp/exp/cil/treelora

Cosines of the A drifts and of the B factors, and their norm ratios, tell a rescaling from a change
of direction. Last line: a JSON object {"runs": {workdir: {...}}, "versus_first": {workdir: {...}}}.
"""
from __future__ import annotations

import argparse
import json
import os

import jax
import ml_collections
import numpy as np


def restored_run(workdir: str):
    """(Run rebuilt from the work directory's config.json, its initial state, the newest checkpoint's
    state, that checkpoint's loop record, its step)."""
    from jaxtree_lora import checkpoint as checkpoint_lib
    from jaxtree_lora import data as data_lib
    from jaxtree_lora.data import sources
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run

    with open(os.path.join(workdir, "config.json")) as f:
        config = ml_collections.ConfigDict(json.load(f))
    backbone = backbone_lib.build(config)
    stream = data_lib.get_stream(sources.recorded(config.data), backbone.tokenizer)  # as the run read it
    run = Run(config=config, backbone=backbone, stream=stream, workdir=workdir, progress=False)
    initial = run.initial_state()
    checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    state, loop, step = checkpoints.restore(checkpoint_lib.abstract(initial))
    checkpoints.close()
    return run, initial, state, loop, step


def final_and_initial(workdir: str):
    _, initial, state, _, step = restored_run(workdir)
    return (jax.device_get(state.trainable["adapters"]), jax.device_get(initial.trainable["adapters"]), step)


def factor(adapters, name: str) -> np.ndarray:
    """All leaves called `name` ("a" or "b"), flattened and concatenated in sorted site order."""
    leaves = []
    for site in sorted(adapters):
        value = adapters[site]
        if isinstance(value, dict) and name in value:
            leaves.append(np.asarray(value[name], np.float64).ravel())
    return np.concatenate(leaves) if leaves else np.zeros(0)


def norm(x: np.ndarray) -> float:
    return float(np.linalg.norm(x))


def cosine(x: np.ndarray, y: np.ndarray) -> float:
    return float(np.dot(x, y) / max(norm(x) * norm(y), 1e-30))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("workdirs", nargs="+")
    args = parser.parse_args(argv)
    finals, initials, runs = {}, {}, {}
    for workdir in args.workdirs:
        final, initial, step = final_and_initial(workdir)
        finals[workdir], initials[workdir] = final, initial
        a0, a1, b1 = factor(initial, "a"), factor(final, "a"), factor(final, "b")
        runs[workdir] = {"step": step, "a_norm_initial": norm(a0), "a_drift": norm(a1 - a0),
                         "a_relative_drift": norm(a1 - a0) / max(norm(a0), 1e-12), "b_norm": norm(b1)}
        print(workdir, json.dumps(runs[workdir]))
    first = args.workdirs[0]
    versus = {}
    for workdir in args.workdirs[1:]:
        if factor(finals[workdir], "a").shape != factor(finals[first], "a").shape:
            versus[workdir] = None  # another adapter layout (e.g. per-task slots): no distance to report
            continue
        a, a_first = factor(finals[workdir], "a"), factor(finals[first], "a")
        b, b_first = factor(finals[workdir], "b"), factor(finals[first], "b")
        drift, drift_first = a - factor(initials[workdir], "a"), a_first - factor(initials[first], "a")
        da, db = norm(a - a_first), norm(b - b_first)
        # Cosines and norm ratios tell a rescaling (cosine ~1, ratio != 1) from another direction.
        versus[workdir] = {"a_distance": da, "a_distance_over_first_drift": da / max(runs[first]["a_drift"], 1e-12),
                           "a_drift_cosine": cosine(drift, drift_first), "a_drift_norm_ratio": norm(drift) / max(norm(drift_first), 1e-12),
                           "b_distance": db, "b_distance_over_first_b": db / max(runs[first]["b_norm"], 1e-12),
                           "b_cosine": cosine(b, b_first), "b_norm_ratio": norm(b) / max(norm(b_first), 1e-12)}
        print(workdir, "vs", first, json.dumps(versus[workdir]))
    out = {"runs": runs, "versus_first": versus}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
