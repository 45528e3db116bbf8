"""Text tables for the terminal and Markdown for RESULTS.md: the accuracy matrix, the metrics of one
run, and a comparison of several methods' results."""
from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

from jaxtree_lora.evaluation import continual

MISSING = "-"


def format_number(value: Any, digits: int = 2) -> str:
    """`value` with `digits` decimals; `-` for None, NaN and other missing values."""
    if value is None:
        return MISSING
    try:
        number = float(value)
    except (TypeError, ValueError):
        return str(value)
    if not math.isfinite(number):
        return MISSING
    return f"{number:.{digits}f}"


def _escape_markdown(text: str) -> str:
    return str(text).replace("|", "\\|")


def render(header: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool = False,
           align_left: int = 1) -> str:
    """A table: aligned plain text (the first `align_left` columns left-aligned, the rest right-aligned)
    or a GitHub Markdown table."""
    header = [str(h) for h in header]
    rows = [[str(cell) for cell in row] for row in rows]
    if any(len(row) != len(header) for row in rows):
        raise ValueError("every table row needs one cell per header column")
    if markdown:
        lines = ["| " + " | ".join(_escape_markdown(h) for h in header) + " |",
                 "|" + "|".join(":---" if i < align_left else "---:" for i in range(len(header))) + "|"]
        lines += ["| " + " | ".join(_escape_markdown(c) for c in row) + " |" for row in rows]
        return "\n".join(lines)
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows)]

    def line(cells):
        return "  ".join(cell.ljust(w) if i < align_left else cell.rjust(w)
                         for i, (cell, w) in enumerate(zip(cells, widths))).rstrip()

    return "\n".join([line(header), line(["-" * w for w in widths])] + [line(row) for row in rows])


def format_matrix(matrix, task_names: Sequence[str], digits: int = 1, markdown: bool = False) -> str:
    """The accuracy matrix: row i is task i, column j is "after training task j" (R[i, j]); `-` where
    not evaluated. Plain text starts with a one-line caption."""
    array = continual.as_matrix(matrix)
    if len(task_names) != array.shape[0]:
        raise ValueError(f"{len(task_names)} task names for a {array.shape[0]}-task accuracy matrix")
    header = ["task"] + [f"after {j + 1}" for j in range(array.shape[1])]
    rows = [[f"{i + 1}. {name}"] + [format_number(array[i, j], digits) for j in range(array.shape[1])]
            for i, name in enumerate(task_names)]
    table = render(header, rows, markdown=markdown)
    if markdown:
        return table
    return "accuracy matrix R[i, j]: score on task i (row) after training task j (column)\n" + table


SUMMARY_ROWS = (
    ("average accuracy (OP)", ("metrics", "average_accuracy")),
    ("average incremental accuracy", ("metrics", "average_incremental_accuracy")),
    ("BWT, TRACE code (<= 0, clipped)", ("metrics", "bwt_trace")),
    ("BWT, paper (forgetting > 0)", ("metrics", "bwt_paper")),
    ("forgetting (max-based)", ("metrics", "forgetting")),
    ("forward transfer", ("metrics", "fwt")),
    ("all average (TRACE)", ("metrics", "all_average")),
    ("trainable parameters (% of backbone)", ("parameters", "trainable_share_percent")),
    ("train time (s)", ("time", "train_seconds")),
    ("eval time (s)", ("time", "eval_seconds")),
    ("wall time (s)", ("time", "wall_seconds")),
    ("throughput (tokens/s)", ("throughput", "tokens_per_second")),
    ("peak memory (MiB)", ("peak_memory_mb",)),
)


def _lookup(results: Mapping, path: Sequence[str]) -> Any:
    value: Any = results
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def format_summary(results: Mapping, markdown: bool = False) -> str:
    """The metrics of one run (a results dict from `reporting.results.build_results`)."""
    digits = {"trainable_share_percent": 4, "peak_memory_mb": 0}
    rows = []
    for label, path in SUMMARY_ROWS:
        rows.append([label, format_number(_lookup(results, path), digits.get(path[-1], 2))])
    tasks = _lookup(results, ("metrics", "tasks_trained"))
    total = _lookup(results, ("metrics", "num_tasks"))
    if tasks is not None and total is not None:
        rows.insert(0, ["tasks completed", f"{tasks}/{total}"])
    return render(["metric", "value"], rows, markdown=markdown)


COMPARISON_HEADER = ("method", "avg acc", "avg inc acc", "NCM avg acc", "BWT (TRACE)", "BWT (paper)", "forgetting",
                     "trainable %", "train time (s)", "peak MiB")


NOT_CONTINUAL = " (not continual)"


def method_label(results: Mapping) -> str:
    """The method's name, marked where its results say it is not continual (the `joint` upper bound)."""
    return str(results.get("method", "?")) + (NOT_CONTINUAL if results.get("continual") is False else "")


def beside_fix(names: Sequence[str]) -> list[str]:
    """`names` with the upper bound `joint` moved right after `fix` (the two reference rows together)."""
    names = list(names)
    if "joint" in names and "fix" in names:
        names.remove("joint")
        names.insert(names.index("fix") + 1, "joint")
    return names


def headroom_line(joint: Any, fix: Any, detail: str = "") -> str:
    """The line under a table: what the stream leaves to learn, joint − fix (avg acc points); "" when
    either is missing."""
    try:
        gap = float(joint) - float(fix)
    except (TypeError, ValueError):
        return ""
    if not math.isfinite(gap):
        return ""
    return f"headroom (joint − fix, avg acc): {gap:+.2f} points{detail}; joint trains on every task at once"


def comparison_row(results: Mapping) -> list[str]:
    """One row of the comparison table. A results dict with `not_applicable` (a reason) shows n/a cells;
    `format_comparison` prints the reason under the table."""
    method = method_label(results)
    if results.get("not_applicable"):
        return [method] + ["n/a"] * (len(COMPARISON_HEADER) - 1)
    return [method,
            format_number(_lookup(results, ("metrics", "average_accuracy"))),
            format_number(_lookup(results, ("metrics", "average_incremental_accuracy"))),
            format_number(_lookup(results, ("ncm", "metrics", "average_accuracy"))),
            format_number(_lookup(results, ("metrics", "bwt_trace"))),
            format_number(_lookup(results, ("metrics", "bwt_paper"))),
            format_number(_lookup(results, ("metrics", "forgetting"))),
            format_number(_lookup(results, ("parameters", "trainable_share_percent")), 3),
            format_number(_lookup(results, ("time", "train_seconds")), 0),
            format_number(_lookup(results, ("peak_memory_mb",)), 0)]


def comparison_rows(results_list: Sequence[Mapping]) -> list[list[str]]:
    return [comparison_row(results) for results in results_list]


def format_comparison(results_list: Sequence[Mapping], markdown: bool = False) -> str:
    """Methods side by side: average accuracy (final, and average incremental), the rehearsal-free
    nearest-class-mean average accuracy (classification), BWT in both forms, forgetting, trainable share, train
    time and peak memory. Plain text for the terminal, or Markdown for RESULTS.md. Methods that could
    not run on the stream (`not_applicable`) are listed with their reason below the table; `joint` sits
    beside `fix`, and the line under the table gives the stream's headroom (joint − fix)."""
    by_name = {str(results.get("method", "?")): results for results in results_list}
    order = beside_fix(list(by_name)) if len(by_name) == len(results_list) else None
    results_list = [by_name[name] for name in order] if order else list(results_list)
    table = render(COMPARISON_HEADER, comparison_rows(results_list), markdown=markdown)
    notes = [f"n/a {results.get('method', '?')}: {results['not_applicable']}"
             for results in results_list if results.get("not_applicable")]
    if "joint" in by_name and "fix" in by_name:
        average = lambda name: _lookup(by_name[name], ("metrics", "average_accuracy"))
        line = headroom_line(average("joint"), average("fix"))
        notes = ([line] if line else []) + notes
    if not notes:
        return table
    if markdown:
        notes = [_escape_markdown(note) for note in notes]
        return table + "\n\n" + "\n".join(f"- {note}" for note in notes)
    return table + "\n" + "\n".join(notes)
