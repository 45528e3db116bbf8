"""The scaling sweep writes its table, JSON and one plot per axis with a measured row per grid point."""
import json
import os

import pytest

from experiments import sweep


@pytest.mark.slow
def test_a_two_point_grid_writes_measured_rows_and_plots(tmp_path):
    out = str(tmp_path / "sweep")
    summary = sweep.main(["--widths", "64,128", "--ranks", "4", "--tasks", "2", "--repeats", "2", "--seq", "16",
                          "--out", out])
    rows = json.load(open(os.path.join(out, "sweep.json")))
    assert [(r["width"], r["rank"], r["tasks"]) for r in rows] == [(64, 4, 2), (128, 4, 2)]
    assert all(r["step_seconds"] > 0 for r in rows)
    # What is timed is a training step, not a no-op: its updates move the trainable parameters.
    assert all(r["update_norm"] > 0 for r in rows), [r["update_norm"] for r in rows]
    assert rows[1]["parameters"] > rows[0]["parameters"], "the wider model has more parameters"
    if rows[0]["step_memory_bytes"] is not None:
        assert rows[1]["step_memory_bytes"] > rows[0]["step_memory_bytes"], "and needs more memory"
    table = open(os.path.join(out, "sweep.md")).read()
    assert table.count("\n| ") == 2 and "| 128 |" in table
    for axis in ("width", "rank", "tasks"):
        assert os.path.getsize(os.path.join(out, f"sweep_{axis}.png")) > 1000
    assert summary["out"] == out
