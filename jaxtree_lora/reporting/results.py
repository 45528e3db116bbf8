"""What a run leaves behind: `results.json` (written atomically) and the append-only `metrics.jsonl`.

`results.json` holds the accuracy matrix (nested lists, `null` where not evaluated), every metric of
`evaluation.continual.summary`, per-task times, throughput, the trainable-parameter share, the
method's hyper-parameters, the config, the seed, library versions and the device. JSON has no NaN:
every non-finite float is written as `null`.

`metrics.jsonl` holds one JSON record per line, flushed as written, so a crash loses at most the line
being written; `read_metrics` skips such a torn line.
"""
from __future__ import annotations

import json
import math
import os
import platform
import warnings
from typing import Any, Mapping, Optional, Sequence

import numpy as np

from jaxtree_lora import atomic
from jaxtree_lora.evaluation import continual

RESULTS_FORMAT = 1


def to_jsonable(value: Any) -> Any:
    """`value` with numpy / JAX scalars and arrays turned into Python ones and non-finite floats into None."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value) if math.isfinite(float(value)) else None
    if isinstance(value, (str, type(None))):
        return value
    if isinstance(value, np.ndarray) or hasattr(value, "__array__"):
        return to_jsonable(np.asarray(value).tolist())
    if hasattr(value, "to_dict"):  # ml_collections.ConfigDict
        return to_jsonable(value.to_dict())
    return str(value)


def _library_versions() -> dict:
    import importlib.metadata as metadata

    versions = {"python": platform.python_version()}
    for package in ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = None
    return versions


def _device() -> dict:
    import jax

    devices = jax.devices()
    return {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices),
            "process_count": jax.process_count()}


# Metrics of a sequence of models: undefined for a run that trains one model on every task at once.
SEQUENCE_METRICS = ("average_incremental_accuracy", "bwt_trace", "bwt_paper", "forgetting", "fwt", "all_average")


def not_continual_summary(matrix, reference=None) -> dict:
    """`continual.summary` of a matrix that repeats one model's scores, with the sequence metrics None."""
    metrics = continual.summary(matrix, reference)
    metrics.update({key: None for key in SEQUENCE_METRICS})
    return metrics


def build_results(*, matrix, task_names: Sequence[str], method: str, method_config: Mapping, config: Mapping,
                  timings: Mapping[str, Sequence[float]], wall_seconds: float, trainable_parameters: int,
                  backbone_parameters: int, peak_memory_mb: Optional[float], stream: str,
                  reference: Optional[Sequence[float]] = None, seed: Optional[int] = None,
                  protocol: Optional[Mapping] = None, ncm_matrix=None,
                  recomputed_prototype_scores: Optional[Sequence[float]] = None,
                  task_identity: Optional[Sequence[float]] = None, continual_run: bool = True) -> dict:
    """The results dict (JSON-ready) of one continual run.

    Args:
      matrix: accuracy matrix [num_tasks, num_tasks], R[i, j] = score on task i after task j (NaN: not
        evaluated).
      timings: per-task lists `train_seconds`, `eval_seconds` and `tokens` (trained tokens), as the
        loop records them.
      trainable_parameters / backbone_parameters: counts; the share is 100 * trainable / backbone.
      reference: zero-shot scores of the untrained model per task, for forward transfer.
      seed: defaults to `config["seed"]`.
      protocol: what the run actually used: LoRA spec, head, classifier, task identity.
      ncm_matrix: the same matrix scored by the rehearsal-free nearest class mean (classification).
      recomputed_prototype_scores: per task, after the last task, nearest class mean with every
        prototype recomputed by the final model (a diagnostic that is not rehearsal-free).
      task_identity: per task, after the last task, the share (0-100) of its test examples whose task
        was inferred right (methods that infer it: HiDe-LoRA's TII, `eval.task_identity=inferred`).
      continual_run: False for the `joint` upper bound, whose matrix holds one model's scores in every
        column: the metrics of a sequence (BWT, forgetting, FWT, incremental averages) are null.
    """
    matrix = continual.as_matrix(matrix)
    if len(task_names) != matrix.shape[0]:
        raise ValueError(f"{len(task_names)} task names for a {matrix.shape[0]}-task accuracy matrix")
    train_seconds = [float(v) for v in timings.get("train_seconds", [])]
    eval_seconds = [float(v) for v in timings.get("eval_seconds", [])]
    tokens = [float(v) for v in timings.get("tokens", [])]
    total_train = float(sum(train_seconds))
    total_tokens = float(sum(tokens))
    per_task_throughput = [t / s if s > 0 else None for t, s in zip(tokens, train_seconds)]
    if seed is None and isinstance(config, Mapping):
        seed = config.get("seed")
    summarise = continual.summary if continual_run else not_continual_summary
    return to_jsonable({
        "format": RESULTS_FORMAT,
        "method": method,
        "stream": stream,
        "continual": bool(continual_run),
        "tasks": list(task_names),
        "accuracy_matrix": matrix,
        "metrics": summarise(matrix, reference),
        "protocol": protocol,
        "ncm": None if ncm_matrix is None else {"accuracy_matrix": continual.as_matrix(ncm_matrix),
                                                "metrics": summarise(continual.as_matrix(ncm_matrix))},
        "recomputed_prototypes": None if recomputed_prototype_scores is None else {
            "scores": list(recomputed_prototype_scores),
            "average_accuracy": float(np.mean(recomputed_prototype_scores)),
            "rehearsal_free": False},
        "task_identity": None if task_identity is None else {
            "final": [float(v) for v in task_identity], "average": float(np.mean(task_identity))},
        "reference_scores": reference,
        "time": {"wall_seconds": wall_seconds, "train_seconds": total_train,
                 "eval_seconds": float(sum(eval_seconds)),
                 "per_task_train_seconds": train_seconds, "per_task_eval_seconds": eval_seconds},
        "throughput": {"tokens": total_tokens,
                       "tokens_per_second": total_tokens / total_train if total_train > 0 else None,
                       "per_task_tokens_per_second": per_task_throughput},
        "parameters": {"trainable": int(trainable_parameters), "backbone": int(backbone_parameters),
                       "trainable_share_percent": 100.0 * trainable_parameters / max(int(backbone_parameters), 1)},
        "peak_memory_mb": peak_memory_mb,
        "method_config": method_config,
        "seed": seed,
        "config": config,
        "versions": _library_versions(),
        "device": _device(),
    })


def write_results(path: str, results: Mapping) -> None:
    """Writes a results dict as `results.json` (strict JSON: NaN becomes null), atomically."""
    atomic.write_text(path, json.dumps(to_jsonable(results), indent=2, allow_nan=False) + "\n")


def read_results(path: str) -> dict:
    """A results.json back as a dict; `accuracy_matrix` becomes a float array with NaN for null."""
    try:
        with open(path, encoding="utf-8") as file:
            results = json.load(file)
    except FileNotFoundError as error:
        raise FileNotFoundError(f"{path} does not exist: point at the results.json of a finished run") from error
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is not valid JSON ({error}): re-run the evaluation to write it again") from error
    if "accuracy_matrix" not in results:
        raise ValueError(f"{path} has no accuracy_matrix: it is not a jaxtree-lora results.json")
    results["accuracy_matrix"] = np.array(
        [[np.nan if v is None else v for v in row] for row in results["accuracy_matrix"]], dtype=np.float64)
    return results


class MetricsWriter:
    """Append-only `metrics.jsonl`: one JSON object per line, flushed after each record.

    Opening a file whose last line was cut off by a crash first ends that line, so the torn bytes stay
    on a line of their own and the next record is whole.
    """

    def __init__(self, path: str):
        self.path = path
        directory = os.path.dirname(os.path.abspath(path))
        os.makedirs(directory, exist_ok=True)
        needs_newline = False
        if os.path.exists(path) and os.path.getsize(path) > 0:
            with open(path, "rb") as existing:
                existing.seek(-1, os.SEEK_END)
                needs_newline = existing.read(1) != b"\n"
        self._file = open(path, "a", encoding="utf-8")
        if needs_newline:
            self._file.write("\n")
            self._file.flush()

    def write(self, record: Mapping) -> None:
        """Appends one record (non-finite floats become null) and flushes it to the OS."""
        line = json.dumps(to_jsonable(record), allow_nan=False, separators=(",", ":"))
        self._file.write(line + "\n")
        self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()

    def __enter__(self) -> "MetricsWriter":
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def read_metrics(path: str, strict: bool = False) -> list[dict]:
    """The records of a `metrics.jsonl`, in order.

    A line that does not parse is a write cut off by a crash: skipped when it is the last line. One in
    the middle (a crash followed by a resumed run) is skipped with a warning, or raises when `strict`.
    """
    records = []
    with open(path, encoding="utf-8", errors="replace") as file:
        lines = file.read().split("\n")
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    for number, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError:  # json.JSONDecodeError is a ValueError
            if number == last:
                continue
            if strict:
                raise ValueError(f"{path}:{number + 1} is not a JSON record: the file is damaged beyond a torn "
                                 f"last line")
            warnings.warn(f"{path}:{number + 1}: skipped a torn record (a crash mid-write)")
            continue
        records.append(record)
    return records
