"""experiments/benchmarks/kernels.py: its matmul rows time the products they name (else the GFLOP/s
compare different work) and its threefry rows compare the same draws, printing one JSON line."""
import json


from experiments.benchmarks import kernels


def test_matmul_row_reports_every_pass_for_a_small_shape(capsys):
    kernels.main(["--rows", "matmul", "--repeats", "1", "--shapes", "8,4,6"])
    table = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    row = table["matmul"]["8 x 4 x 6"]
    assert set(row) == {"forward", "input gradient", "weight gradient"}
    assert all(value["jax"] > 0 for value in row.values())


def test_threefry_rows_draw_the_same_bits_both_ways():
    rows = kernels.threefry_rows(repeats=1)
    assert set(rows) == {"normal [20, 120, 384]", "bernoulli [32, 64, 384]"}
    assert all(row["same_bits"] and row["ours ms"] > 0 and row["jax lowering ms"] > 0 for row in rows.values())
