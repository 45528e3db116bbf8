"""Continual-learning metrics over the accuracy matrix.

R[i, j] is the score (0-100) on task i after training task j; NaN where not evaluated (j < i, or a
run in progress). T is the number of tasks trained so far (the last filled column).

- average accuracy (TRACE's "OP", "Last Average"):  A_T = (1/T) sum_i R[i, T-1]
- average incremental accuracy (Rebuffi et al.):  AIA = (1/T) sum_j (1/(j+1)) sum_{i<=j} R[i, j]
- BWT, TRACE-code form (`inference/collect_results.py`): (1/T) sum_{i<T} min(R[i, T-1] - R[i, i], 0).
  The last task contributes 0 but is counted in the denominator, as the official code does. <= 0.
- BWT, paper form (TreeLoRA paper, forgetting as a positive number):
  (1/(T-1)) sum_{i<T-1} (R[i, i] - R[i, T-1]), no clipping; the last task is left out of the mean
  because its difference is 0 by definition (Lopez-Paz & Ranzato's denominator T-1).
- forgetting (Chaudhry et al. 2018): (1/(T-1)) sum_{i<T-1} max_{j<T-1} R[i, j] - R[i, T-1].
- FWT (Lopez-Paz & Ranzato 2017), with reference scores b_i of the untrained model:
  (1/(T-1)) sum_{i>0} R[i, i-1] - b_i. Needs the upper triangle (evaluating future tasks), so it is
  reported only when the matrix has it.
- "all average" (TRACE's code): mean of the lower triangle, R[i, j] for i <= j.
"""
from __future__ import annotations

from typing import Optional

import numpy as np


def trained(matrix) -> int:
    """Number of tasks trained so far: the index of the last column holding any score, plus one."""
    matrix = np.asarray(matrix, float)
    filled = [j for j in range(matrix.shape[1]) if np.any(np.isfinite(matrix[:, j]))]
    return (filled[-1] + 1) if filled else 0


def average_accuracy(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    return float(np.mean(matrix[:t, t - 1])) if t else float("nan")


def average_incremental_accuracy(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    return float(np.mean([np.mean(matrix[: j + 1, j]) for j in range(t)])) if t else float("nan")


def bwt_trace(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    if t == 0:
        return float("nan")
    return float(np.sum([min(matrix[i, t - 1] - matrix[i, i], 0.0) for i in range(t)]) / t)


def bwt_paper(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    if t < 2:
        return 0.0 if t == 1 else float("nan")
    return float(np.mean([matrix[i, i] - matrix[i, t - 1] for i in range(t - 1)]))


def forgetting(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    if t < 2:
        return 0.0 if t == 1 else float("nan")
    return float(np.mean([np.nanmax(matrix[i, i:t - 1]) - matrix[i, t - 1] for i in range(t - 1)]))


def fwt(matrix, reference) -> Optional[float]:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    if reference is None or t < 2:
        return None
    values = [matrix[i, i - 1] - reference[i] for i in range(1, t)]
    if not np.all(np.isfinite(values)):
        return None
    return float(np.mean(values))


def all_average(matrix) -> float:
    matrix = np.asarray(matrix, float)
    t = trained(matrix)
    values = [matrix[i, j] for j in range(t) for i in range(j + 1)]
    return float(np.mean(values)) if values else float("nan")


def summary(matrix, reference=None) -> dict:
    return {
        "tasks_trained": trained(matrix),
        "average_accuracy": average_accuracy(matrix),
        "average_incremental_accuracy": average_incremental_accuracy(matrix),
        "bwt_trace": bwt_trace(matrix),
        "bwt_paper": bwt_paper(matrix),
        "forgetting": forgetting(matrix),
        "fwt": fwt(matrix, reference),
        "all_average": all_average(matrix),
    }
