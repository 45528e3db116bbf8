"""Several processes (jax.distributed on localhost, CPU collectives through gloo): two processes with one
device each train two tasks of a tiny Llama on a TRACE directory, each loading only its own half of
every batch, and end with exactly the results of one process driving the same two-device mesh.

Why bitwise: both runs compile the same SPMD program for a (2, 1, 1) mesh; the only cross-device
reductions sum two partial values, which gives the same float whatever carries them (gloo between
processes, or XLA's in-process all-reduce). A process loading the wrong rows, or both loading the same
rows, would change the gradients and the scores."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from jaxtree_lora.data import batching

from test_faults import final_adapters, write_config
from test_cli_compare import REPO


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def base_env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "JAX_PLATFORMS", "JAXTREE_LORA_KILL_AT")}
    env.update(JAX_PLATFORMS="cpu", **extra)
    return env


def run_command(config, workdir, *extra):
    return [sys.executable, "-m", "jaxtree_lora.cli", "run", "--config", config, "--workdir", workdir,
            "--no-progress", "--config.train.checkpoint_every=3", *extra]


def test_batch_shards_of_processes_are_disjoint_and_make_the_batch():
    arrays = {"x": np.arange(10) * 10}
    whole = list(batching.batches(arrays, 4, seed=3, task=1, epoch=2))
    halves = [list(batching.batches(arrays, 4, seed=3, task=1, epoch=2, take=np.asarray(rows)))
              for rows in ([0, 1], [2, 3])]
    for number, batch in enumerate(whole):
        joined = np.concatenate([halves[0][number]["x"], halves[1][number]["x"]])
        np.testing.assert_array_equal(joined, batch["x"], err_msg=f"batch {number}: the shards do not make the batch")
        np.testing.assert_array_equal(np.concatenate([halves[0][number]["weight"], halves[1][number]["weight"]]),
                                      batch["weight"])


@pytest.mark.slow  # two CLI processes joined through jax.distributed, then one alone (~60 s)
def test_two_processes_end_with_the_results_of_one(tmp_path):
    config = write_config(tmp_path)
    single = str(tmp_path / "single")
    done = subprocess.run(run_command(config, single), cwd=REPO, capture_output=True, text=True, timeout=600,
                          env=base_env(XLA_FLAGS="--xla_force_host_platform_device_count=2"))
    assert done.returncode == 0, done.stderr[-3000:]

    shared = str(tmp_path / "two")
    port = free_port()
    processes = [subprocess.Popen(run_command(config, shared, "--coordinator", f"127.0.0.1:{port}",
                                              "--num_processes", "2", "--process_id", str(rank)),
                                  cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=base_env())
                 for rank in (0, 1)]
    outputs = []
    for process in processes:
        try:
            outputs.append(process.communicate(timeout=600))
        finally:
            if process.poll() is None:
                process.kill()
    for rank, (process, (_, err)) in enumerate(zip(processes, outputs)):
        assert process.returncode == 0, f"process {rank} failed: {err[-3000:]}"
    assert "wrote" in outputs[0][0] and "wrote" not in outputs[1][0], "only process 0 reports and writes results"

    one = json.load(open(os.path.join(single, "results.json")))
    two = json.load(open(os.path.join(shared, "results.json")))
    assert two["accuracy_matrix"] == one["accuracy_matrix"], "two processes scored differently from one"
    losses = [[json.loads(line)["loss"] for line in open(os.path.join(d, "metrics.jsonl")) if '"type":"step"' in line]
              for d in (single, shared)]
    assert losses[1] == losses[0], "the loss trajectories differ"
    expected, got = final_adapters(single, tmp_path, "single"), final_adapters(shared, tmp_path, "two")
    for name in expected:
        np.testing.assert_array_equal(got[name], expected[name], err_msg=f"adapter {name} differs")


def cli_in_child(argv, **environment):
    """`jaxtree-lora run` in a child process whose environment names no cluster (plus `environment`)."""
    clean = {key: value for key, value in os.environ.items()
             if not key.startswith(("SLURM_", "OMPI_", "PMI_", "TPU_", "CLOUD_TPU", "MEGASCALE"))}
    return subprocess.run([sys.executable, "-m", "jaxtree_lora.cli", "run", *argv], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env={**clean, "JAX_PLATFORMS": "cpu", **environment})


def test_coordinator_auto_without_a_cluster_is_one_line_naming_the_fix(tmp_path):
    """--coordinator auto on a machine whose environment names no processes (no TPU pod, SLURM or MPI):
    one line naming what to do instead, exit 2, nothing written; not jax's traceback."""
    out = cli_in_child(["--coordinator", "auto", "--workdir", str(tmp_path / "run")])
    assert out.returncode == 2, f"exit {out.returncode}\n{out.stderr[-2000:]}"
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in out.stderr, out.stderr[-2000:]
    assert "--coordinator auto found no cluster environment" in lines[0] and "leave --coordinator out" in lines[0]
    assert not (tmp_path / "run").exists()


def test_coordinator_auto_joins_the_processes_a_cluster_environment_names(tmp_path):
    """Under a (one-task) SLURM allocation, auto takes the processes from the environment and the run
    goes on past the join: here to the next check, a model path that does not exist."""
    slurm = dict(SLURM_JOB_ID="1", SLURM_NTASKS="1", SLURM_PROCID="0", SLURM_LOCALID="0",
                 SLURM_STEP_NODELIST="localhost")
    out = cli_in_child(["--coordinator", "auto", "--workdir", str(tmp_path / "run"), "--config.model.name=hf",
                        f"--config.model.path={tmp_path / 'absent'}"], **slurm)
    assert out.returncode == 2 and "found no cluster environment" not in out.stderr, out.stderr[-2000:]
    assert "does not exist: set --config.model.path" in out.stderr, "the run stopped before its model check"
