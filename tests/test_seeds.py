"""Several seeds: mean ± sample std, and the marks that say whether a method beats `fix` / `seqlora`
by more than the spread (hand-computed cases)."""

import pytest

from experiments.configs import default
from jaxtree_lora import cli
from jaxtree_lora.reporting import seeds as seeds_lib


def results(method, seed, accuracy, ncm=None, identity="free"):
    return {"method": method, "seed": seed, "protocol": {"task_identity": identity},
            "metrics": {"average_accuracy": accuracy, "average_incremental_accuracy": accuracy + 10,
                        "bwt_trace": -1.0, "forgetting": 2.0},
            "ncm": None if ncm is None else {"metrics": {"average_accuracy": ncm}},
            "time": {"train_seconds": 10.0}}


def test_mean_and_sample_std():
    mean, std, values = seeds_lib.mean_std([50.0, 52.0, 54.0, None, float("nan")])
    assert mean == 52.0 and std == pytest.approx(2.0) and values == [50.0, 52.0, 54.0], "ddof 1: sqrt(8/2)"
    assert seeds_lib.mean_std([None]) == (None, None, [])


def test_marks_against_fix_and_seqlora():
    aggregated = seeds_lib.aggregate({
        "fix": [results("fix", s, a) for s, a in enumerate([55.0, 56.0, 57.0])],      # 56 ± 1
        "seqlora": [results("seqlora", s, a) for s, a in enumerate([26.0, 27.0, 28.0])],  # 27 ± 1
        "good": [results("good", s, a) for s, a in enumerate([60.0, 61.0, 62.0])],     # 61 ± 1: +5 > 2
        "noisy": [results("noisy", s, a) for s, a in enumerate([50.0, 60.0, 70.0])],   # 60 ± 10: within
    })
    assert seeds_lib.differs(aggregated["good"], aggregated["fix"]) == "+"
    assert seeds_lib.differs(aggregated["noisy"], aggregated["fix"]) == "="
    assert seeds_lib.differs(aggregated["seqlora"], aggregated["fix"]) == "-"
    assert seeds_lib.differs(aggregated["noisy"], aggregated["seqlora"]) == "+", "33 above, spread 11"
    table = seeds_lib.format_seed_table(aggregated)
    row = next(line for line in table.splitlines() if line.startswith("good"))
    assert "61.00 ± 1.00" in row and row.split()[-2:] == ["+", "+"]
    assert "nothing useful learned on this stream): seqlora, noisy" in table, "the table says who does not beat fix"
    markdown = seeds_lib.format_seed_table(aggregated, markdown=True)
    assert "| fix | free | 56.00 ± 1.00 |" in markdown


def test_rows_scored_with_the_task_given_are_named_as_not_comparable():
    aggregated = seeds_lib.aggregate({
        "fix": [results("fix", s, a) for s, a in enumerate([55.0, 56.0, 57.0])],
        "lilora": [results("lilora", s, a, identity="given") for s, a in enumerate([94.0, 95.0, 96.0])],
    })
    table = seeds_lib.format_seed_table(aggregated)
    assert next(line for line in table.splitlines() if line.startswith("lilora")).split()[1] == "given"
    assert "not comparable with the identity-free rows): lilora" in table


def test_seed_bars_plot(tmp_path):
    aggregated = seeds_lib.aggregate({"fix": [results("fix", 0, 50.0), results("fix", 1, 52.0)],
                                      "seqlora": [results("seqlora", 0, 30.0), results("seqlora", 1, 34.0)]})
    path = seeds_lib.plot_seed_bars(aggregated, str(tmp_path / "bars.png"))
    assert open(path, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def test_seeds_parse_and_reach_every_seed_of_the_config():
    assert cli.parse_seeds("0,1,2") == [0, 1, 2] and cli.parse_seeds("") == []
    with pytest.raises(cli.UsageError, match="integers"):
        cli.parse_seeds("0,a")
    with pytest.raises(cli.UsageError, match="twice"):
        cli.parse_seeds("1,1")
    config = default.get_config()
    seeded = cli.seeded(config, 3)
    assert seeded.seed == 3 and seeded.data.seed == 3, "initialisation, class order and split all follow the seed"
    assert config.seed == 0, "the base config is left alone"
