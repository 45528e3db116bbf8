"""Bad input: one line naming the fix, exit status 2, no traceback, nothing good overwritten."""
import json
import os

import pytest

from jaxtree_lora import cli, config as config_lib


BAD = [
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.lora.rank=0"], "rank must be >= 1"),
    (["--config.optimizer.learning_rate=-0.1"], "learning_rate must be > 0"),
    (["--config.method.name=nosuch"], "unknown method 'nosuch'"),
    (["--config.train.epochs=0"], "train.epochs must be >= 1"),
    (["--config.lora.targets=attn.nothing"], None),  # caught when the backbone is known (see test_loop)
    (["--config", "experiments/configs/missing.py"], "not found"),
    (["--config.train.batch_size=abc"], "expected a value of type int"),
    (["--config.method.treelora.nosuch=1"], "unknown config key"),
    (["--config.lora.init=weird"], "unknown lora init"),
    (["--config.eval.temperature=-1"], "temperature must be >= 0"),
]


@pytest.mark.parametrize("argv,expected", [b for b in BAD if b[1] is not None])
def test_bad_input_is_one_line_and_exit_2(argv, expected, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = cli.main(["run", "--workdir", str(workdir), "--no-progress", *argv])
    err = capsys.readouterr().err.strip()
    assert code == 2, f"{argv}: exit status {code}, stderr {err!r}"
    assert len(err.splitlines()) == 1, f"{argv}: expected one line, got {err!r}"
    assert expected in err, f"{argv}: {err!r} does not name the problem ({expected!r})"
    assert "Traceback" not in err


def test_finished_run_is_not_overwritten(tmp_path, capsys):
    workdir = tmp_path / "done"
    workdir.mkdir()
    (workdir / "results.json").write_text(json.dumps({"keep": True}))
    code = cli.main(["run", "--workdir", str(workdir), "--no-progress"])
    assert code == 2
    assert "already holds a finished run" in capsys.readouterr().err
    assert json.loads((workdir / "results.json").read_text()) == {"keep": True}, "results.json was overwritten"


def test_overrides_are_typed():
    config = config_lib.load("")
    config_lib.apply_overrides(config, ["optimizer.learning_rate=1", "train.epochs=3", "lora.targets=attn.query",
                                        "method.treelora.lam=0.25"])
    assert config.optimizer.learning_rate == 1.0 and isinstance(config.optimizer.learning_rate, float)
    assert config.train.epochs == 3
    assert list(config.lora.targets) == ["attn.query"]
    assert config.method.treelora.lam == 0.25


def test_config_files_load():
    here = os.path.join(os.path.dirname(__file__), "..", "experiments", "configs")
    for name in sorted(os.listdir(here)):
        if name.endswith(".py") and not name.startswith("_"):
            config = config_lib.load(os.path.join(here, name))
            assert "method" in config and "lora" in config, name
