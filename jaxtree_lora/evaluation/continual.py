"""Continual-learning metrics over the accuracy matrix.

The accuracy matrix `R` is a numpy array [num_tasks, num_tasks]: `R[i, j]` is the score (percent,
0-100) on task i after training task j; entries not evaluated are NaN. `T` below is the number of
*completed* tasks: the leading columns j whose entries R[0..j, j] are all finite, so every metric
of a partial matrix describes the run after its last completed task. Formulas use 0-based indices.
Sources (TRACE / TreeLoRA `inference/collect_results.py`, GEM, RWalk, iCaRL): docs/METRICS.md.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

# Scores are percentages; a little slack absorbs float noise from averaging.
_SCORE_SLACK = 1e-6


def as_matrix(matrix) -> np.ndarray:
    """The accuracy matrix as float64 [num_tasks, num_tasks], checked. `None` entries become NaN.

    Raises ValueError (naming the fix) for a non-square matrix or scores outside 0..100.
    """
    try:
        array = np.array(matrix, dtype=np.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"accuracy matrix must be numeric (NaN or None where not evaluated): {error}") from error
    if array.ndim != 2 or array.shape[0] != array.shape[1]:
        raise ValueError(f"accuracy matrix must be square [num_tasks, num_tasks] (row: evaluated task, "
                         f"column: after training task), got shape {array.shape}")
    finite = array[np.isfinite(array)]
    if finite.size and (finite.min() < -_SCORE_SLACK or finite.max() > 100.0 + _SCORE_SLACK):
        raise ValueError(f"accuracy matrix scores must be percentages in 0..100, got values in "
                         f"[{finite.min():g}, {finite.max():g}]: multiply fractions by 100")
    if np.any(np.isinf(array)):
        raise ValueError("accuracy matrix holds an infinite score: use NaN for entries not evaluated")
    return array


def empty_matrix(num_tasks: int) -> np.ndarray:
    """A fresh accuracy matrix [num_tasks, num_tasks], all NaN (nothing evaluated yet)."""
    if num_tasks < 1:
        raise ValueError(f"num_tasks must be >= 1, got {num_tasks}")
    return np.full((num_tasks, num_tasks), np.nan)


def completed_tasks(matrix) -> int:
    """T: the number of leading columns j whose entries R[0..j, j] are all finite."""
    array = as_matrix(matrix)
    count = 0
    for column in range(array.shape[1]):
        if not np.all(np.isfinite(array[: column + 1, column])):
            break
        count += 1
    return count


# The name the first version of this module used; kept for callers that still use it.
trained = completed_tasks


def average_accuracy(matrix) -> float:
    """Average accuracy after the last completed task (TRACE's "OP", the code's "Last Average").

        A = (1/T) sum_{i<T} R[i, T-1]

    NaN when no task is completed.
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t == 0:
        return float("nan")
    return float(np.mean(array[:t, t - 1]))


def average_incremental_accuracy(matrix) -> float:
    """Average incremental accuracy (Rebuffi et al. 2017): the mean over stages of the stage's accuracy.

        AIA = (1/T) sum_{j<T} (1/(j+1)) sum_{i<=j} R[i, j]
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t == 0:
        return float("nan")
    return float(np.mean([np.mean(array[: j + 1, j]) for j in range(t)]))


def bwt_trace(matrix) -> float:
    """Backward transfer as the official TRACE / TreeLoRA code computes it (`collect_results.py`).

        BWT_trace = (1/T) sum_{i<T} min(R[i, T-1] - R[i, i], 0)

    Each task's change is clipped at 0 (an improvement counts as no change), so the value is <= 0 and
    more negative means more forgetting. The sum runs over every i < T, the last task included: its
    term is min(R[T-1, T-1] - R[T-1, T-1], 0) = 0 but it still counts in the denominator T, exactly
    as the official loop does. T = 1 gives 0.
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t == 0:
        return float("nan")
    changes = array[np.arange(t), t - 1] - array[np.arange(t), np.arange(t)]
    return float(np.sum(np.minimum(changes, 0.0)) / t)


def bwt_paper(matrix, include_last: bool = False) -> float:
    """Backward transfer in the paper form, reported as forgetting (positive = forgot).

        BWT_paper = (1/(T-1)) sum_{i<T-1} (R[i, i] - R[i, T-1])

    No clipping: a task that improved after later training lowers the value (it can go negative).

    Denominator: T-1 by default, the tasks that later training could have changed; the last task's
    term is 0 by definition, so averaging it in only shrinks the value by (T-1)/T. This is GEM's
    (Lopez-Paz & Ranzato 2017) denominator with the sign flipped. The TreeLoRA paper writes the sum
    with 1/n over all n tasks; `include_last=True` gives that form, (1/T) sum_{i<T} (R[i,i] - R[i,T-1]).
    Undefined (NaN) before two tasks are completed unless `include_last` (then T = 1 gives 0).
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t == 0 or (t == 1 and not include_last):
        return float("nan")
    count = t if include_last else t - 1
    drops = array[np.arange(count), np.arange(count)] - array[np.arange(count), t - 1]
    return float(np.mean(drops))


def forgetting(matrix) -> float:
    """Average forgetting, max-based (Chaudhry et al. 2018, "RWalk", Eq. 9-10).

        f_i = max_{j<T-1} R[i, j] - R[i, T-1],    F = (1/(T-1)) sum_{i<T-1} f_i

    The max runs over every evaluated earlier stage j < T-1 (NaN entries, e.g. j < i, are skipped),
    so a task that peaked after its own training and then fell back counts the drop from its peak.
    f_i can be negative when the final score is the best ever. NaN before two tasks are completed.
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t < 2:
        return float("nan")
    values = [np.nanmax(array[i, : t - 1]) - array[i, t - 1] for i in range(t - 1)]
    return float(np.mean(values))


def forward_transfer(matrix, reference: Optional[Sequence[float]]) -> float:
    """Forward transfer (Lopez-Paz & Ranzato 2017) against the untrained model's scores b_i.

        FWT = (1/(T-1)) sum_{0<i<T} (R[i, i-1] - b_i)

    R[i, i-1] is task i evaluated *before* training on it, so the run must evaluate one task ahead
    (the entry just above the diagonal). `reference` [num_tasks]: the zero-shot score of each task.
    NaN when `reference` is None, fewer than two tasks are completed, or an R[i, i-1] is missing.
    """
    array = as_matrix(matrix)
    if reference is None:
        return float("nan")
    baseline = np.asarray(reference, dtype=np.float64).reshape(-1)
    if baseline.shape[0] != array.shape[0]:
        raise ValueError(f"reference scores need one value per task ({array.shape[0]}), got {baseline.shape[0]}")
    t = completed_tasks(array)
    if t < 2:
        return float("nan")
    tasks = np.arange(1, t)
    values = array[tasks, tasks - 1] - baseline[tasks]
    if not np.all(np.isfinite(values)):
        return float("nan")
    return float(np.mean(values))


# Short name used by summary() and older callers.
fwt = forward_transfer


def all_average(matrix) -> float:
    """TRACE's "All Average" (`collect_results.py`): the mean of every evaluated entry of the protocol,

        (1 / (T(T+1)/2)) sum_{j<T} sum_{i<=j} R[i, j]

    i.e. each task after its own training and after every later one. Not used in the paper.
    """
    array = as_matrix(matrix)
    t = completed_tasks(array)
    if t == 0:
        return float("nan")
    return float(np.mean([array[i, j] for j in range(t) for i in range(j + 1)]))


def final_scores(matrix) -> list[float]:
    """Per-task scores after the last completed task, R[i, T-1] for i < T."""
    array = as_matrix(matrix)
    t = completed_tasks(array)
    return [float(v) for v in array[:t, t - 1]] if t else []


def summary(matrix, reference: Optional[Sequence[float]] = None) -> dict:
    """Every metric of this module in one dict (floats; NaN where undefined).

    Keys: num_tasks, tasks_trained (T, completed tasks), average_accuracy, average_incremental_accuracy,
    bwt_trace, bwt_paper, forgetting, fwt, all_average, final_scores.
    """
    array = as_matrix(matrix)
    return {
        "num_tasks": int(array.shape[0]),
        "tasks_trained": completed_tasks(array),
        "average_accuracy": average_accuracy(array),
        "average_incremental_accuracy": average_incremental_accuracy(array),
        "bwt_trace": bwt_trace(array),
        "bwt_paper": bwt_paper(array),
        "forgetting": forgetting(array),
        "fwt": forward_transfer(array, reference),
        "all_average": all_average(array),
        "final_scores": final_scores(array),
    }
