"""The `jaxtree-lora` process never imports torch through transformers (cli.entry's finder).

transformers imports all of torch at its own import when torch is installed (2.1 s of a run's weights
line); the command only reads configs and tokenizers, so its process hides a not-yet-imported torch
while transformers is first imported, and nothing else. A fake torch package on PYTHONPATH (a
distribution that transformers accepts) tells whether it was imported.
"""
import os
import subprocess
import sys

from experiments.benchmarks.run_profile import write_tiny_bert

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def fake_torch(directory, body: str) -> str:
    """A `torch` package whose __init__ is `body`, with dist-info metadata (version 2.14.0)."""
    os.makedirs(os.path.join(directory, "torch"))
    os.makedirs(os.path.join(directory, "torch-2.14.0.dist-info"))
    with open(os.path.join(directory, "torch", "__init__.py"), "w") as file:
        file.write(body)
    with open(os.path.join(directory, "torch-2.14.0.dist-info", "METADATA"), "w") as file:
        file.write("Metadata-Version: 2.1\nName: torch\nVersion: 2.14.0\n")
    return str(directory)


def python(code_or_args, path: str, cwd: str):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([path, REPO]))
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=300)


def test_the_command_reads_a_checkpoint_without_importing_torch(tmp_path):
    """`python -m jaxtree_lora.cli plan` on a Hugging Face BERT directory reads its config through
    transformers; with a torch that fails on import, it succeeds only if torch was never imported.
    Plain `from transformers import AutoConfig` in the same environment does import it (the fixture is
    live)."""
    path = fake_torch(tmp_path / "site", 'raise ImportError("fake torch imported")\n')
    plain = python("from transformers import AutoConfig", path, str(tmp_path))
    assert plain.returncode != 0 and "fake torch imported" in plain.stderr, "transformers no longer imports torch: vacuous"
    checkpoint = write_tiny_bert(str(tmp_path / "bert"))
    command = python(["-m", "jaxtree_lora.cli", "plan", "--config.model.name=hf", "--config.model.kind=encoder",
                      f"--config.model.path={checkpoint}"], path, str(tmp_path))
    assert command.returncode == 0, f"the command imported torch (or failed): {command.stderr[-1500:]}"
    assert "total per device" in command.stdout


def test_torch_imports_as_usual_once_transformers_is_in(tmp_path):
    """Only transformers' first import is shielded: torch itself stays importable afterwards (a user's
    code in the same process may want it), and transformers has settled on running without it."""
    path = fake_torch(tmp_path / "site", "FAKE = True\n")
    code = ("import sys; from jaxtree_lora import cli; sys.meta_path.insert(0, cli._TransformersWithoutTorch()); "
            "import transformers; from transformers import AutoConfig; assert 'torch' not in sys.modules; "
            "from transformers.utils import is_torch_available; assert not is_torch_available(); "
            "import torch; assert torch.FAKE; print('ok')")
    result = python(code, path, str(tmp_path))
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-1500:]
