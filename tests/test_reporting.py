"""results.json, metrics.jsonl, tables and the accuracy-matrix plot."""
import json
import math
import os

import numpy as np
import pytest

from jaxtree_lora.reporting import plots, results as results_lib, tables

NAN = np.nan
MATRIX = np.array([[90.0, 95.0, 70.0],
                   [NAN, 60.0, 65.0],
                   [NAN, NAN, 40.0]])
TASKS = ["sentiment", "speaker", "reply"]


def make_results(method="treelora", train_seconds=(10.0, 20.0, 30.0), peak=512.0):
    return results_lib.build_results(
        matrix=MATRIX, task_names=TASKS, method=method, method_config={"lam": 0.5, "rank": 8},
        config={"seed": 1234, "method": {"name": method}, "lr": float("nan")},
        timings={"train_seconds": list(train_seconds), "eval_seconds": [1.0, 2.0, 3.0],
                 "tokens": [1000.0, 4000.0, 0.0]},
        wall_seconds=70.0, trainable_parameters=2_000, backbone_parameters=1_000_000, peak_memory_mb=peak,
        stream="offline-trace")


# -- results.json ---------------------------------------------------------------------------------------
def test_build_results_holds_what_a_run_must_report():
    results = make_results()
    assert results["accuracy_matrix"] == [[90.0, 95.0, 70.0], [None, 60.0, 65.0], [None, None, 40.0]], \
        "NaN (not evaluated) must become null"
    metrics = results["metrics"]
    assert metrics["average_accuracy"] == pytest.approx(175 / 3)
    assert metrics["bwt_trace"] == pytest.approx(-20 / 3) and metrics["bwt_paper"] == pytest.approx(7.5)
    assert metrics["forgetting"] == pytest.approx(10.0) and metrics["fwt"] is None
    assert results["time"]["train_seconds"] == 60.0 and results["time"]["per_task_train_seconds"] == [10.0, 20.0, 30.0]
    # 5000 tokens in 60 s; per task 1000/10, 4000/20, 0/30
    assert results["throughput"]["tokens_per_second"] == pytest.approx(5000 / 60)
    assert results["throughput"]["per_task_tokens_per_second"] == [100.0, 200.0, 0.0]
    assert results["parameters"]["trainable_share_percent"] == pytest.approx(0.2), "100 * 2000 / 1e6"
    assert results["seed"] == 1234 and results["method_config"] == {"lam": 0.5, "rank": 8}
    assert results["config"]["lr"] is None, "NaN in the config must not make the JSON invalid"
    assert results["versions"]["jax"] and results["versions"]["flax"]
    assert results["device"]["platform"] in ("cpu", "gpu", "tpu") and results["device"]["count"] >= 1


def test_write_and_read_results_round_trip_as_strict_json(tmp_path):
    path = tmp_path / "run" / "results.json"
    results_lib.write_results(str(path), make_results())
    text = path.read_text()
    json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} is not valid JSON"))
    back = results_lib.read_results(str(path))
    np.testing.assert_array_equal(back["accuracy_matrix"], MATRIX)  # NaN where null
    assert back["metrics"]["average_accuracy"] == pytest.approx(175 / 3)
    assert [p.name for p in path.parent.iterdir()] == ["results.json"], "no temporary file may be left behind"


def test_read_results_names_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="finished run"):
        results_lib.read_results(str(tmp_path / "missing.json"))
    (tmp_path / "other.json").write_text("{}")
    with pytest.raises(ValueError, match="no accuracy_matrix"):
        results_lib.read_results(str(tmp_path / "other.json"))


# -- metrics.jsonl --------------------------------------------------------------------------------------
def test_metrics_writer_appends_flushed_records(tmp_path):
    path = tmp_path / "metrics.jsonl"
    with results_lib.MetricsWriter(str(path)) as writer:
        writer.write({"type": "step", "step": 1, "loss": np.float32(2.5)})
        assert results_lib.read_metrics(str(path)) == [{"type": "step", "step": 1, "loss": 2.5}], \
            "a record must be readable as soon as it is written (flushed)"
        writer.write({"type": "step", "step": 2, "loss": float("nan")})
    with results_lib.MetricsWriter(str(path)) as writer:  # a resumed run appends
        writer.write({"type": "task", "task": 0})
    records = results_lib.read_metrics(str(path))
    assert [r.get("step", r.get("task")) for r in records] == [1, 2, 0]
    assert records[1]["loss"] is None, "NaN must be written as null"


def test_read_metrics_skips_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert results_lib.read_metrics(str(path)) == [{"step": 1}, {"step": 2}]


def test_a_resumed_writer_isolates_the_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')  # crash mid-write
    with results_lib.MetricsWriter(str(path)) as writer:
        writer.write({"step": 3})
    assert path.read_text().splitlines()[-1] == '{"step":3}', "the new record must start on its own line"
    with pytest.warns(UserWarning, match="torn record"):
        assert results_lib.read_metrics(str(path)) == [{"step": 1}, {"step": 3}]
    with pytest.raises(ValueError, match="damaged"):
        results_lib.read_metrics(str(path), strict=True)


# -- tables ---------------------------------------------------------------------------------------------
def test_format_matrix_rows_are_tasks_and_columns_are_stages():
    text = tables.format_matrix(MATRIX, TASKS)
    lines = text.splitlines()
    assert lines[1].split() == ["task", "after", "1", "after", "2", "after", "3"]
    assert lines[3].split() == ["1.", "sentiment", "90.0", "95.0", "70.0"]
    assert lines[4].split() == ["2.", "speaker", "-", "60.0", "65.0"], "not evaluated shows as -"
    markdown = tables.format_matrix(MATRIX, TASKS, markdown=True).splitlines()
    assert markdown[0] == "| task | after 1 | after 2 | after 3 |"
    assert markdown[4] == "| 3. reply | - | - | 40.0 |"
    with pytest.raises(ValueError, match="2 task names"):
        tables.format_matrix(MATRIX, TASKS[:2])


def test_format_summary_lists_the_metrics():
    text = tables.format_summary(make_results())
    rows = {line.rsplit(None, 1)[0].strip(): line.rsplit(None, 1)[1] for line in text.splitlines()[2:]}
    assert rows["tasks completed"] == "3/3"
    assert rows["average accuracy (OP)"] == "58.33"
    assert rows["BWT, TRACE code (<= 0, clipped)"] == "-6.67" and rows["BWT, paper (forgetting > 0)"] == "7.50"
    assert rows["forgetting (max-based)"] == "10.00" and rows["forward transfer"] == "-"
    assert rows["trainable parameters (% of backbone)"] == "0.2000" and rows["peak memory (MiB)"] == "512"


def test_comparison_table_plain_and_markdown():
    rows = [make_results("seqlora", train_seconds=(5.0, 5.0, 5.0), peak=None), make_results("treelora"),
            {"method": "lora|x", "not_applicable": "needs task identity"}]
    markdown = tables.format_comparison(rows, markdown=True).splitlines()
    assert markdown[0] == ("| method | avg acc | avg inc acc | NCM avg acc | BWT (TRACE) | BWT (paper) | forgetting | "
                           "trainable % | train time (s) | peak MiB |")
    assert markdown[1] == "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    assert markdown[2] == "| seqlora | 58.33 | 75.28 | - | -6.67 | 7.50 | 10.00 | 0.200 | 15 | - |"
    assert markdown[3] == "| treelora | 58.33 | 75.28 | - | -6.67 | 7.50 | 10.00 | 0.200 | 60 | 512 |"
    assert markdown[4] == "| lora\\|x | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a | n/a |", "pipes in names are escaped"
    assert markdown[-1] == "- n/a lora\\|x: needs task identity", "the reason is given under the table"
    plain = tables.format_comparison(rows).splitlines()
    assert plain[0].split()[:3] == ["method", "avg", "acc"] and set(plain[1]) <= {"-", " "}
    assert plain[3].split() == ["treelora", "58.33", "75.28", "-", "-6.67", "7.50", "10.00", "0.200", "60", "512"]
    assert plain[-1] == "n/a lora|x: needs task identity"
    # right-aligned numbers: every row ends its "avg acc" cell at the same column
    end = plain[0].index("avg acc") + len("avg acc")
    assert plain[2][:end].endswith("58.33") and plain[3][:end].endswith("58.33"), "columns are aligned"


def test_format_number():
    assert tables.format_number(None) == "-" and tables.format_number(float("nan")) == "-"
    assert tables.format_number(3.14159, 3) == "3.142" and tables.format_number(np.float32(2)) == "2.00"


# -- plot -----------------------------------------------------------------------------------------------
def test_heatmap_annotates_evaluated_cells_and_leaves_nan_blank():
    figure = plots.accuracy_matrix_figure(MATRIX, TASKS, title="t")
    axes = figure.axes[0]
    labels = sorted(text.get_text() for text in axes.texts)
    assert labels == sorted(["90.0", "95.0", "70.0", "60.0", "65.0", "40.0"]), \
        "one annotation per evaluated cell, none for NaN"
    positions = {(round(t.get_position()[1]), round(t.get_position()[0])): t.get_text() for t in axes.texts}
    assert positions[(0, 1)] == "95.0" and positions[(2, 2)] == "40.0", "cell (row i, column j) shows R[i, j]"
    image = axes.images[0]
    assert np.ma.getmaskarray(image.get_array())[1, 0], "NaN cells are masked (drawn blank)"
    assert image.norm.vmin == 0 and image.norm.vmax == 100


def test_plot_writes_a_png(tmp_path):
    import matplotlib.image

    path = plots.plot_accuracy_matrix(MATRIX, TASKS, str(tmp_path / "accuracy_matrix.png"), dpi=50)
    with open(path, "rb") as file:
        assert file.read(8) == b"\x89PNG\r\n\x1a\n"
    pixels = matplotlib.image.imread(path)
    assert pixels.ndim == 3 and pixels.shape[0] > 50 and pixels.shape[1] > 50
    assert os.listdir(tmp_path) == ["accuracy_matrix.png"], "no temporary file may be left behind"
    assert not math.isnan(float(pixels.mean()))
