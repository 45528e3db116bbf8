"""Terminal and Markdown tables: the accuracy matrix, the metrics, a comparison of methods."""
from __future__ import annotations

import numpy as np


def _cell(value, width=7, digits=1):
    if value is None or (isinstance(value, float) and not np.isfinite(value)):
        return " " * (width - 1) + "-"
    return f"{value:{width}.{digits}f}"


def format_matrix(matrix, task_names) -> str:
    """Rows: task i; columns: after training task j (R[i, j])."""
    matrix = np.asarray(matrix, float)
    n = matrix.shape[0]
    width = max(len(name) for name in task_names) if task_names else 4
    header = " " * (width + 2) + "".join(f"{'after ' + str(j + 1):>10}" for j in range(n))
    lines = ["accuracy matrix R[i, j] (score on task i after training task j)", header]
    for i in range(n):
        cells = "".join(f"{_cell(matrix[i, j], 10)}" for j in range(n))
        lines.append(f"{task_names[i]:<{width}}  {cells}")
    return "\n".join(lines)


def format_summary(results: dict) -> str:
    m = results["metrics"]
    t = results["time"]
    p = results["parameters"]
    rows = [
        ("average accuracy (OP)", m["average_accuracy"]),
        ("average incremental accuracy", m["average_incremental_accuracy"]),
        ("BWT (TRACE code, <= 0)", m["bwt_trace"]),
        ("BWT (paper, forgetting > 0)", m["bwt_paper"]),
        ("forgetting (max-based)", m["forgetting"]),
        ("trainable parameters (%)", p["trainable_share_percent"]),
        ("train time (s)", t["train_seconds"]),
        ("wall time (s)", t["wall_seconds"]),
        ("peak memory (MiB)", results.get("peak_memory_mb")),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {_cell(value, 10, 2)}" for name, value in rows)


COLUMNS = [("method", None), ("avg acc", "average_accuracy"), ("AIA", "average_incremental_accuracy"),
           ("BWT trace", "bwt_trace"), ("BWT paper", "bwt_paper"), ("forgetting", "forgetting")]


def comparison_rows(results_list) -> list[list[str]]:
    rows = []
    for r in results_list:
        if r.get("not_applicable"):
            rows.append([r["method"], "n/a: " + r["not_applicable"]] + [""] * 7)
            continue
        m = r["metrics"]
        rows.append([r["method"]] + [_cell(m[key], 0, 2).strip() for _, key in COLUMNS[1:]] + [
            f"{r['parameters']['trainable_share_percent']:.3f}", f"{r['time']['train_seconds']:.0f}",
            f"{r['peak_memory_mb']:.0f}" if r.get("peak_memory_mb") else "-"])
    return rows


def format_comparison(results_list, markdown: bool = False) -> str:
    header = [name for name, _ in COLUMNS] + ["trainable %", "train s", "peak MiB"]
    rows = comparison_rows(results_list)
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = lambda row: "  ".join(f"{str(x):>{w}}" for x, w in zip(row, widths))
    return "\n".join([fmt(header)] + [fmt(row) for row in rows])
