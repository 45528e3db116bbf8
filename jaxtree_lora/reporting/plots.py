"""Pictures: the accuracy matrix as an annotated heat map."""
from __future__ import annotations

import numpy as np


def plot_accuracy_matrix(matrix, task_names, path: str, title: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    matrix = np.asarray(matrix, float)
    n = matrix.shape[0]
    fig, ax = plt.subplots(figsize=(1.2 * n + 3, 0.8 * n + 2))
    masked = np.ma.masked_invalid(matrix)
    image = ax.imshow(masked, vmin=0, vmax=100, cmap="viridis")
    for i in range(n):
        for j in range(n):
            if np.isfinite(matrix[i, j]):
                ax.text(j, i, f"{matrix[i, j]:.1f}", ha="center", va="center",
                        color="white" if matrix[i, j] < 60 else "black", fontsize=9)
    ax.set_xticks(range(n), [f"after {j + 1}" for j in range(n)], rotation=30, ha="right")
    ax.set_yticks(range(n), list(task_names))
    ax.set_xlabel("trained up to task")
    ax.set_ylabel("evaluated task")
    ax.set_title(title or "accuracy matrix")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
