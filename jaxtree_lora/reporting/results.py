"""results.json and metrics.jsonl: what a run leaves behind, written atomically."""
from __future__ import annotations

import json
import math
import os
import platform
import tempfile
from typing import Optional

import numpy as np

from jaxtree_lora.evaluation import continual


def _jsonable(value):
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return _jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return None if not math.isfinite(float(value)) else float(value)
    if isinstance(value, (np.integer,)):
        return int(value)
    return value


def build_results(*, matrix, task_names, method, method_config, config, timings, wall_seconds,
                  trainable_parameters, backbone_parameters, peak_memory_mb, stream, reference=None) -> dict:
    import jax
    import flax

    matrix = np.asarray(matrix, float)
    train_seconds = float(np.sum(timings.get("train_seconds", [])))
    tokens = float(np.sum(timings.get("tokens", [])))
    return _jsonable({
        "method": method,
        "stream": stream,
        "tasks": list(task_names),
        "accuracy_matrix": matrix,
        "metrics": continual.summary(matrix, reference),
        "time": {"wall_seconds": wall_seconds, "train_seconds": train_seconds,
                 "eval_seconds": float(np.sum(timings.get("eval_seconds", []))),
                 "per_task_train_seconds": timings.get("train_seconds", []),
                 "per_task_eval_seconds": timings.get("eval_seconds", [])},
        "throughput": {"tokens": tokens, "tokens_per_second": tokens / train_seconds if train_seconds else None},
        "parameters": {"trainable": int(trainable_parameters), "backbone": int(backbone_parameters),
                       "trainable_share_percent": 100.0 * trainable_parameters / max(backbone_parameters, 1)},
        "peak_memory_mb": peak_memory_mb,
        "method_config": method_config,
        "seed": config.get("seed") if isinstance(config, dict) else None,
        "config": config,
        "versions": {"jax": jax.__version__, "flax": flax.__version__, "python": platform.python_version()},
        "device": jax.devices()[0].device_kind,
    })


def atomic_write(path: str, text: str) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(handle, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)


def write_results(path: str, results: dict) -> None:
    atomic_write(path, json.dumps(results, indent=2) + "\n")


def read_metrics(path: str) -> list[dict]:
    """The records of a metrics.jsonl; a truncated last line (a crash mid-write) is skipped."""
    records = []
    with open(path) as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records
