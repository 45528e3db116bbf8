"""Meshes on 8 forced CPU devices: every layout of (data, fsdp, tensor) trains the same loss trajectory
as one device, and the frozen backbone is sharded as the rules say. Each layout runs in a subprocess
(the device count is fixed when jax starts).

Tolerance: relative 2e-4 on every logged loss. The layouts compute the same float32 function but
split reductions (batch means over data x fsdp, matmul contractions over tensor) across devices, so
the summation order and therefore the last bits differ; over a dozen Adam steps such differences stay
orders of magnitude below 2e-4, while any real error (a wrong shard, a missing all-reduce) changes the
loss at the first step by far more."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

SCRIPT = r'''
import json, sys
sys.path.insert(0, "tests")
import jax
from test_loop import make_run, tiny_config
results = {}
for shape in json.loads(sys.argv[1]):
    config = tiny_config("treelora", batch_size=8, log_every=1, epochs=1, mesh=shape, fsdp_min_size=1)
    records = []
    run = make_run(config, f"{sys.argv[2]}/{'x'.join(map(str, shape))}", logger=records.append)
    run.fit()
    specs = {jax.tree_util.keystr(path): list(leaf.sharding.spec)
             for path, leaf in jax.tree_util.tree_flatten_with_path(run.frozen)[0]}
    results["x".join(map(str, shape))] = {"losses": [r["loss"] for r in records if r["type"] == "step"],
                                          "specs": specs, "devices": len(jax.devices())}
print("RESULT " + json.dumps(results))
'''


def run_layouts(shapes, devices, workdir):
    env = {**os.environ, "JAX_PLATFORMS": "cpu",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    done = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(shapes), str(workdir)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    line = [l for l in done.stdout.splitlines() if l.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def check(layouts, reference):
    assert len(reference["losses"]) >= 6
    for name, result in layouts.items():
        assert result["devices"] == 8
        np.testing.assert_allclose(result["losses"], reference["losses"], rtol=2e-4,
                                   err_msg=f"mesh {name} trains a different loss trajectory")


def test_data_fsdp_tensor_mesh_trains_like_one_device_and_shards_by_the_rules(tmp_path):
    reference = run_layouts([[1, 1, 1]], 1, tmp_path)["1x1x1"]
    layouts = run_layouts([[2, 2, 2]], 8, tmp_path)
    check(layouts, reference)
    specs = layouts["2x2x2"]["specs"]
    assert specs["['layers']['query'].value"] == [None, "fsdp", "tensor"], \
        "q kernels: column-parallel over tensor, FSDP on d_in"
    assert specs["['layers']['output'].value"] == [None, "tensor", "fsdp"], "MLP down kernels: row-parallel"
    assert specs["['word_embeddings'].value"] == ["fsdp", None], "embeddings FSDP-sharded on the vocabulary"


@pytest.mark.slow
def test_every_mesh_layout_trains_like_one_device(tmp_path):
    reference = run_layouts([[1, 1, 1]], 1, tmp_path)["1x1x1"]
    check(run_layouts([[8, 1, 1], [1, 8, 1], [1, 1, 8], [1, 2, 4]], 8, tmp_path), reference)
