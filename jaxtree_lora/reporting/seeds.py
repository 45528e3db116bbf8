"""Several seeds per method: mean, spread, and whether a method differs from a reference row.

A method "differs" from a reference (the `fix` row: the pre-trained model, nothing trained; or
`seqlora`) when the gap between their means exceeds the sum of their standard deviations over seeds.
That is a deliberately plain rule (no test statistic over 3 seeds pretends to more): a method whose
gap to `fix` is inside the spread has not shown that it learned anything useful on the stream.

    aggregated = aggregate({"fix": [r0, r1, r2], "seqlora": [...]})   # results dicts per seed
    print(format_seed_table(aggregated))
"""
from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence

import numpy as np

from jaxtree_lora import atomic
from jaxtree_lora.reporting.tables import NOT_CONTINUAL, _escape_markdown, _lookup, beside_fix, headroom_line, render

# (column, path in a results dict, digits)
SEED_METRICS = (
    ("avg acc", ("metrics", "average_accuracy"), 2),
    ("avg inc acc", ("metrics", "average_incremental_accuracy"), 2),
    ("NCM avg acc", ("ncm", "metrics", "average_accuracy"), 2),
    ("recomputed NCM (diag.)", ("recomputed_prototypes", "average_accuracy"), 2),
    ("TII acc", ("task_identity", "average"), 2),
    ("BWT (TRACE)", ("metrics", "bwt_trace"), 2),
    ("forgetting", ("metrics", "forgetting"), 2),
    ("train time (s)", ("time", "train_seconds"), 0),
)
REFERENCES = ("fix", "seqlora")


def mean_std(values: Sequence[Optional[float]]) -> tuple[Optional[float], Optional[float], list]:
    """(mean, sample standard deviation (ddof 1; 0 for one value), the finite values); None if none."""
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not finite:
        return None, None, []
    std = float(np.std(finite, ddof=1)) if len(finite) > 1 else 0.0
    return float(np.mean(finite)), std, finite


def aggregate(per_method: Mapping[str, Sequence[Mapping]]) -> dict:
    """{method: [results dict per seed]} -> {method: {"seeds", "not_applicable", metric: {"mean", "std", "values"}}}."""
    out = {}
    for method, runs in per_method.items():
        reasons = [r.get("not_applicable") for r in runs if r.get("not_applicable")]
        identities = {(r.get("protocol") or {}).get("task_identity") for r in runs} - {None}
        entry = {"seeds": [r.get("seed") for r in runs], "not_applicable": reasons[0] if reasons else None,
                 "task_identity": "/".join(sorted(identities)) or None,
                 "continual": not any(r.get("continual") is False for r in runs)}
        for column, path, _ in SEED_METRICS:
            mean, std, values = mean_std([_lookup(r, path) for r in runs])
            entry[column] = {"mean": mean, "std": std, "values": values}
        out[method] = entry
    return out


def differs(entry: Mapping, reference: Mapping, column: str = "avg acc") -> Optional[str]:
    """'+' (above the reference by more than both spreads), '-' (below by more), '=' (within); None if
    either has no value, or fewer than two seeds (its spread is unknown)."""
    a, b = entry.get(column) or {}, reference.get(column) or {}
    if a.get("mean") is None or b.get("mean") is None:
        return None
    if len(a.get("values", [])) < 2 or len(b.get("values", [])) < 2:
        return None
    gap = a["mean"] - b["mean"]
    spread = (a["std"] or 0.0) + (b["std"] or 0.0)
    if abs(gap) <= spread:
        return "="
    return "+" if gap > 0 else "-"


def _cell(stats: Mapping, digits: int) -> str:
    if not stats or stats.get("mean") is None:
        return "-"
    if len(stats.get("values", [])) < 2:
        return f"{stats['mean']:.{digits}f}"
    return f"{stats['mean']:.{digits}f} ± {stats['std']:.{digits}f}"


def format_seed_table(aggregated: Mapping[str, Mapping], markdown: bool = False) -> str:
    """mean ± std per metric, and columns `vs fix` / `vs seqlora` ('+', '-', '=': beyond or within the
    spread of avg acc), with a legend under the table and the methods that do not beat `fix` named. The
    `task identity` column is each method's test-time rule (free, inferred, given); rows scored with
    the identity given are named in the legend as not comparable with the others."""
    header = (["method", "task identity"] + [column for column, _, _ in SEED_METRICS]
              + [f"vs {r}" for r in REFERENCES])
    rows, notes = [], []
    aggregated = {name: aggregated[name] for name in beside_fix(list(aggregated))}
    for method, entry in aggregated.items():
        if entry.get("not_applicable"):
            rows.append([method] + ["n/a"] * (len(header) - 1))
            notes.append(f"n/a {method}: {entry['not_applicable']}")
            continue
        label = method + (NOT_CONTINUAL if entry.get("continual") is False else "")
        cells = [_cell(entry.get(column), digits) for column, _, digits in SEED_METRICS]
        for reference in REFERENCES:
            mark = None if reference == method or reference not in aggregated else \
                differs(entry, aggregated[reference])
            cells.append(mark or "")
        rows.append([label, entry.get("task_identity") or "-"] + cells)
    table = render(header, rows, markdown=markdown)
    seeds = sorted({s for e in aggregated.values() for s in e.get("seeds", []) if s is not None})
    several = any(len((e.get("avg acc") or {}).get("values", [])) > 1 for e in aggregated.values())
    if several:
        legend = [f"mean ± sample std over seeds {', '.join(map(str, seeds))}; vs fix / vs seqlora: '+' above, '-' "
                  f"below by more than the two spreads added, '=' within them (avg acc)"]
    else:
        legend = [f"one seed ({', '.join(map(str, seeds)) or '?'}): no +/-/= marks (the spread over seeds is unknown)"]
    for name in ("joint", "fix"):
        if name not in aggregated or aggregated[name].get("not_applicable"):
            break
    else:
        joint, fix = aggregated["joint"]["avg acc"], aggregated["fix"]["avg acc"]
        spread = f" (joint {_cell(joint, 2)}, fix {_cell(fix, 2)})" if several else ""
        line = headroom_line(joint.get("mean"), fix.get("mean"), spread)
        if line:
            legend.insert(0, line)
    if "fix" in aggregated:
        behind = [m for m, e in aggregated.items() if m != "fix" and not e.get("not_applicable")
                  and differs(e, aggregated["fix"]) in ("=", "-")]
        if behind:
            legend.append(f"not above fix by more than the spread (nothing useful learned on this stream): "
                          f"{', '.join(behind)}")
    given = [m for m, e in aggregated.items() if e.get("task_identity") == "given"]
    if given:
        legend.append(f"task identity given at test time (each task scored with its own slot, only its classes "
                      f"competing: task-incremental, not comparable with the identity-free rows): {', '.join(given)}")
    lines = legend + notes
    if markdown:
        return table + "\n\n" + "\n".join(f"- {_escape_markdown(line)}" for line in lines)
    return table + "\n" + "\n".join(lines)


def plot_seed_bars(aggregated: Mapping[str, Mapping], path: str, column: str = "avg acc", title: str = "") -> str:
    """Bars (mean) with error bars (std) of one metric per method, the `fix` mean as a dashed line."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [m for m, e in aggregated.items() if not e.get("not_applicable") and (e.get(column) or {}).get("mean") is not None]
    means = [aggregated[m][column]["mean"] for m in names]
    stds = [aggregated[m][column]["std"] or 0.0 for m in names]
    figure = Figure(figsize=(max(4.0, 0.7 * len(names) + 1.5), 3.6))
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    axes.bar(range(len(names)), means, yerr=stds, capsize=4, color="#4c72b0")
    if "fix" in names:
        axes.axhline(aggregated["fix"][column]["mean"], color="#c44e52", linestyle="--", linewidth=1, label="fix")
        axes.legend(loc="best", fontsize=8)
    axes.set_xticks(range(len(names)))
    axes.set_xticklabels(names, rotation=45, ha="right", fontsize=8)
    axes.set_ylabel(column)
    axes.set_title(title or f"{column}, mean ± std over seeds", fontsize=9)
    figure.tight_layout()
    return atomic.save_figure(figure, path)
