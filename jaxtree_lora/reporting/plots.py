"""The accuracy matrix as an annotated heat map, and a comparison's average-accuracy curves (PNG).

Drawn on a bare `matplotlib.figure.Figure` with the Agg canvas: no pyplot state, no display, and the
global backend of a caller (a notebook, say) is left alone.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from jaxtree_lora import atomic
from jaxtree_lora.evaluation import continual


def accuracy_matrix_figure(matrix, task_names: Sequence[str], title: str = ""):
    """A Figure of R[i, j] (row: evaluated task i, column: after training task j), colour scale 0..100.

    Evaluated cells carry their score as text; NaN cells (not evaluated) are left blank.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    array = continual.as_matrix(matrix)
    num_tasks = array.shape[0]
    if len(task_names) != num_tasks:
        raise ValueError(f"{len(task_names)} task names for a {num_tasks}-task accuracy matrix")
    figure = Figure(figsize=(1.1 * num_tasks + 3.0, 0.7 * num_tasks + 2.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    colormap = "viridis"
    image = axes.imshow(np.ma.masked_invalid(array), vmin=0.0, vmax=100.0, cmap=colormap)
    rgba = image.cmap(image.norm(np.nan_to_num(array)))
    for i in range(num_tasks):
        for j in range(num_tasks):
            if np.isfinite(array[i, j]):
                # Dark text on light cells and light text on dark ones (relative luminance).
                red, green, blue = rgba[i, j, :3]
                luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
                axes.text(j, i, f"{array[i, j]:.1f}", ha="center", va="center", fontsize=9,
                          color="black" if luminance > 0.5 else "white")
    axes.set_xticks(range(num_tasks), [f"after {j + 1}" for j in range(num_tasks)], rotation=30, ha="right")
    axes.set_yticks(range(num_tasks), [f"{i + 1}. {name}" for i, name in enumerate(task_names)])
    axes.set_xlabel("trained up to task")
    axes.set_ylabel("evaluated task")
    axes.set_title(title or "accuracy matrix (%)")
    figure.colorbar(image, ax=axes, fraction=0.046, pad=0.04)
    figure.tight_layout()
    return figure


def plot_accuracy_matrix(matrix, task_names: Sequence[str], path: str, title: str = "", dpi: int = 110) -> str:
    """Writes the heat map of `accuracy_matrix_figure` as a PNG at `path` (atomically); returns `path`."""
    figure = accuracy_matrix_figure(matrix, task_names, title)
    return atomic.save_figure(figure, path, dpi)


def average_accuracy_curve(results) -> np.ndarray:
    """[num_tasks] average accuracy after each task, mean of R[0..j, j] (NaN where not evaluated)."""
    rows = results.get("accuracy_matrix") or []
    array = np.array([[np.nan if v is None else v for v in row] for row in rows], dtype=np.float64)
    return np.array([np.mean(array[: j + 1, j]) for j in range(array.shape[0])]) if array.size else np.zeros(0)


def plot_average_accuracy(per_method, path: str, title: str = "", dpi: int = 110) -> str:
    """`compare.png`: each method's average accuracy after every task, the mean over seeds with a
    min-max band. A method that is not continual (`joint`, one model trained on every task) is a
    dashed horizontal line at its final average accuracy, its band the same over seeds.

    per_method: {method: [results dict per seed]}; methods that were not applicable are left out."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    most = 1
    for index, (method, runs) in enumerate(per_method.items()):
        colour = f"C{index % 10}"  # one colour per method, a horizontal line included
        runs = [r for r in runs if not r.get("not_applicable") and r.get("accuracy_matrix")]
        if not runs:
            continue
        curves = np.array([average_accuracy_curve(r) for r in runs])
        tasks = np.arange(1, curves.shape[1] + 1)
        most = max(most, curves.shape[1])
        if any(r.get("continual") is False for r in runs):
            final = curves[:, -1]
            axes.axhline(np.nanmean(final), color=colour, linestyle="--", linewidth=1.2,
                         label=f"{method} (not continual: one model, every task)")
            axes.axhspan(np.nanmin(final), np.nanmax(final), color=colour, alpha=0.15)
            continue
        with np.errstate(all="ignore"):
            mean, low, high = np.nanmean(curves, 0), np.nanmin(curves, 0), np.nanmax(curves, 0)
        axes.plot(tasks, mean, color=colour, marker="o", markersize=3, linewidth=1.2, label=method)
        if len(runs) > 1:
            axes.fill_between(tasks, low, high, color=colour, alpha=0.2)
    axes.set_xticks(range(1, most + 1))
    axes.set_xlabel("after task")
    axes.set_ylabel("average accuracy over tasks seen (%)")
    seeds = max((len(runs) for runs in per_method.values()), default=1)
    axes.set_title(title or ("average accuracy after every task" + (", mean and min-max over seeds" if seeds > 1 else "")),
                   fontsize=9)
    axes.legend(loc="best", fontsize=7)
    figure.tight_layout()
    return atomic.save_figure(figure, path, dpi)
