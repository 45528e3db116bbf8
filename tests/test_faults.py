"""Kill anywhere, lose nothing: a real `jaxtree-lora run` killed with SIGKILL (no chance to save) at
several points, then resumed with --resume, ends with exactly the accuracy matrix and the adapters of an
uninterrupted run with the same seed (CPU, bitwise). A checkpoint is written every step.

The default test lands its kills at named points (jaxtree_lora/faults.py: inside a step, during the
end-of-task evaluation, while a checkpoint is being written) and then preempts the run with SIGTERM,
which must save and exit with status 143; the slow test kills on a timer at four more places."""
import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from test_cli_compare import CONFIG, REPO
from test_paper_configs import write_tiny_llama_and_trace

FAULT_CONFIG = CONFIG.replace("    return config\n", """    config.method.name = "treelora"
    config.train.checkpoint_every = 1
    config.train.epochs = 2
    config.train.log_every = 1
    return config
""")


def write_config(tmp_path):
    llama, trace = write_tiny_llama_and_trace(tmp_path, tasks=("FOMC", "Py150"), train_rows=16)
    path = tmp_path / "faults.py"
    path.write_text(FAULT_CONFIG.format(llama=llama, trace=trace))
    return str(path)


def command(config, workdir, resume=False):
    return ([sys.executable, "-m", "jaxtree_lora.cli", "run", "--config", config, "--workdir", workdir,
             "--no-progress"] + (["--resume"] if resume else []))


def steps_logged(workdir) -> int:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return 0
    with open(path) as f:
        return sum(1 for line in f if '"type":"step"' in line)


def kill_after(config, workdir, steps_seen, resume, sig=signal.SIGKILL):
    """Starts a run and sends `sig` once metrics.jsonl holds `steps_seen` step records in total."""
    process = subprocess.Popen(command(config, workdir, resume), cwd=REPO, stdout=subprocess.DEVNULL,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while process.poll() is None and steps_logged(workdir) < steps_seen and time.time() < deadline:
        time.sleep(0.05)
    if process.poll() is None:
        process.send_signal(sig)
    _, err = process.communicate(timeout=300)
    return process.returncode, err


def kill_at_point(config, workdir, point, resume):
    """Runs with JAXTREE_LORA_KILL_AT=point: the process SIGKILLs itself there."""
    env = dict(os.environ, JAXTREE_LORA_KILL_AT=point)
    done = subprocess.run(command(config, workdir, resume), cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    return done.returncode, done.stderr


def final_adapters(workdir, tmp_path, name):
    out = tmp_path / f"export-{name}"
    done = subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "export", "--workdir", workdir, "--out", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    from safetensors.numpy import load_file

    return load_file(str(out / "adapter_model.safetensors"))


def run_with_kills(tmp_path, kill_points):
    """`kill_points`: step counts (SIGKILL once that many steps are logged), "POINT:N" (the named fault
    point), or ("SIGTERM", steps). Returns how many of them stopped the run as intended."""
    config = write_config(tmp_path)
    reference = str(tmp_path / "reference")
    done = subprocess.run(command(config, reference), cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    killed = str(tmp_path / "killed")
    survived = 0
    for index, point in enumerate(kill_points):
        if isinstance(point, str):
            status, err = kill_at_point(config, killed, point, resume=index > 0)
        elif isinstance(point, tuple):
            status, err = kill_after(config, killed, point[1], resume=index > 0, sig=signal.SIGTERM)
            if status == 143:
                assert "SIGTERM: saved a checkpoint" in err and "Traceback" not in err, err
                survived += 1
            continue
        else:
            status, err = kill_after(config, killed, point, resume=index > 0)
        assert "Traceback" not in err, err[-2000:]
        survived += status == -signal.SIGKILL
    done = subprocess.run(command(config, killed, resume=True), cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, f"the resumed run failed: {done.stderr[-2000:]}"
    assert "Traceback" not in done.stderr
    whole = json.load(open(os.path.join(reference, "results.json")))
    resumed = json.load(open(os.path.join(killed, "results.json")))
    assert resumed["accuracy_matrix"] == whole["accuracy_matrix"], "the killed-and-resumed run scored differently"
    expected, got = final_adapters(reference, tmp_path, "reference"), final_adapters(killed, tmp_path, "killed")
    assert sorted(expected) == sorted(got)
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"adapter {name} differs after the kills")
    return survived


def test_kills_inside_a_step_an_evaluation_and_a_checkpoint_write_then_sigterm_lose_nothing(tmp_path):
    # 2 tasks x 2 epochs x 4 steps, one evaluation batch per task seen. Each process counts afresh:
    # step:3 -> killed in step 3 (checkpoints 1, 2 on disk); evaluation:1 -> resumed at step 2, killed
    # scoring task 0 after step 8; checkpoint:3 -> task 0's end save, then killed writing step 10's;
    # SIGTERM once 13 steps are logged -> a clean save and exit 143; the last resume finishes.
    points = ["step:3", "evaluation:1", "checkpoint:3", ("SIGTERM", 13)]
    assert run_with_kills(tmp_path, points) == 4, "a kill did not land where it was aimed"


@pytest.mark.slow
def test_sigkills_at_many_points_then_resume_equals_an_uninterrupted_run(tmp_path):
    # 2 tasks x 2 epochs x 4 steps: kill in epoch 1, at the end of task 1 (evaluation and the
    # task-end checkpoint follow step 8), early in task 2 and near the very end.
    survived = run_with_kills(tmp_path, [2, 8, 10, 15])
    assert survived >= 3, f"only {survived} of 4 kills landed before the run finished"
