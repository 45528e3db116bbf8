"""Bad input: one line naming the fix, exit status 2, no traceback, nothing good overwritten."""
import json
import os

import pytest

from jaxtree_lora import cli, config as config_lib


BAD = [
    (["--config.nope=1"], "unknown config key 'nope'"),
    (["--config.lora.rank=0"], "rank must be >= 1"),
    (["--config.optimizer.learning_rate=-0.1"], "learning_rate must be a finite number > 0"),
    (["--config.method.name=nosuch"], "unknown method 'nosuch'"),
    (["--config.train.epochs=0"], "train.epochs must be >= 1"),
    (["--config.lora.targets=attn.nothing"], None),  # caught when the backbone is known (see test_loop)
    (["--config", "experiments/configs/missing.py"], "not found"),
    (["--config.train.batch_size=abc"], "expected a value of type int"),
    (["--config.method.treelora.nosuch=1"], "unknown config key"),
    # An option of the other TreeLoRA form than the run's (the LLM form has no HiDe-LoRA options).
    (["--config.method.treelora.form=llm", "--config.method.treelora.reg=0.5"], "is an option of treelora_hide only"),
    (["--config.method.treelora.form=tree"], "method.treelora.form must be auto, llm, hide"),
    (["--config.lora.init=weird"], "unknown lora init"),
    (["--config.eval.temperature=-1"], "temperature must be >= 0"),
    (["--config.data.num_tasks=20"], "20 tasks need at least as many classes, but there are 10"),
    (["--config.model.name=hf", "--config.model.path=/nonexistent"], "does not exist"),
    (["--config.train.mesh=[0,0,0]"], "train.mesh must be"),
    (["--config.model.compute_dtype=int8"], "compute_dtype must be float32 or bfloat16"),
    (["--config.train.device_memory_gib=0.05"], "per device but the device has 0.05 GiB"),
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


def test_non_finite_loss_names_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    from test_cli_compare import CONFIG
    from test_paper_configs import write_tiny_llama_and_trace

    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=8)
    config = tmp_path / "exploding.py"
    config.write_text(CONFIG.format(llama=llama, trace=trace))
    workdir = tmp_path / "run"
    status = cli.main(["run", "--config", str(config), "--workdir", str(workdir), "--no-progress",
                       "--config.optimizer.learning_rate=1e38", "--config.optimizer.clip_norm=0.0",
                       "--config.method.name=seqlora", "--config.train.log_every=1"])
    err = capsys.readouterr().err
    assert status == 2, err
    assert err.count("\n") == 1 and "loss became" in err and "global step" in err, err
    assert "last good checkpoint is kept" in err
    assert not (workdir / "results.json").exists(), "no results from a diverged run"


def test_a_fresh_process_prints_only_the_one_line():
    """In a new interpreter transformers announces on import that PyTorch is absent; that notice must not
    join the one-line answer (it did, after it, before TRANSFORMERS_NO_ADVISORY_WARNINGS was set)."""
    import subprocess
    import sys

    repo = os.path.join(os.path.dirname(__file__), "..")
    for argv in (["run", "--config.lora.rank=0"], ["plan", "--device_memory_gib", "0.05"]):
        done = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", *argv], cwd=repo, capture_output=True,
                              text=True, timeout=300)
        assert done.returncode == 2, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, f"{argv}: {done.stderr!r}"
