"""Export the adapters of a finished (or interrupted) run to PEFT's format.

A run with one adapter (SeqLoRA, TreeLoRA) gives one PEFT directory; a run with per-task adapter slots
(IncLoRA and friends, leaves [L, max_tasks, ...]) gives one directory per learned task, `task_K/`,
which PEFT loads as separate adapters (their sum is what the run applied).
"""
from __future__ import annotations

import json
import os

import jax
import ml_collections
import numpy as np

from jaxtree_lora import checkpoint as checkpoint_lib
from jaxtree_lora import lora as lora_lib


class ExportError(ValueError):
    pass


def export_run(workdir: str, out: str) -> list[str]:
    from jaxtree_lora import data as data_lib
    from jaxtree_lora.data import sources
    from jaxtree_lora.train import backbone as backbone_lib
    from jaxtree_lora.train.loop import Run

    config_path = os.path.join(workdir, "config.json")
    if not os.path.isfile(config_path):
        raise ExportError(f"{workdir} has no config.json: pass the --workdir of a jaxtree-lora run")
    with open(config_path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    checkpoints = checkpoint_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
    if checkpoints.latest() is None:
        raise ExportError(f"{workdir}/checkpoints holds no checkpoint: the run saved nothing yet")
    backbone = backbone_lib.build(config)
    stream = data_lib.get_stream(sources.recorded(config.data), backbone.tokenizer)  # as the run read it
    run = Run(config=config, backbone=backbone, stream=stream, workdir=workdir, progress=False)
    state, loop, _ = checkpoints.restore(checkpoint_lib.abstract(run.initial_state()))
    checkpoints.close()
    adapters = jax.device_get(state.trainable["adapters"])
    spec = run.method.lora
    task_type = "CAUSAL_LM" if backbone.kind == "decoder" else "FEATURE_EXTRACTION"
    name = config.model.get("path", "") or config.model.name
    sample = jax.tree.leaves(adapters)[0]
    if sample.ndim == 3:
        return lora_lib.export_peft(out, adapters, spec, backbone.hf_module_path, base_model=name, task_type=task_type)
    if sample.ndim == 4:
        learned = int(loop["position"]["task"])
        written = []
        for slot in range(learned):
            one = jax.tree.map(lambda leaf: np.asarray(leaf[:, slot]), adapters)
            written += lora_lib.export_peft(os.path.join(out, f"task_{slot}"), one, spec, backbone.hf_module_path,
                                            base_model=name, task_type=task_type)
        return written
    raise ExportError(f"method {run.method.name} keeps adapters of rank {sample.ndim}; only [L, r, d] and "
                      f"[L, tasks, r, d] layouts export to PEFT")
