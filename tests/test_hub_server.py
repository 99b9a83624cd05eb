"""Tests of `tests/hubserver.py` through the real `huggingface_hub` client (no mocks)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import torch
from huggingface_hub import HfApi, hf_hub_download, snapshot_download
from huggingface_hub.errors import EntryNotFoundError, HfHubHTTPError, RepositoryNotFoundError
from safetensors.torch import save_file

try:  # rootdir-relative import when `tests/` is a package, plain import when pytest puts `tests/` on sys.path
    from tests.hubserver import LocalHub, client_env, configure_client
except ImportError:
    from hubserver import LocalHub, client_env, configure_client

TOKEN, USER = "hf_test_token", "testuser"
OTHER_TOKEN, OTHER_USER = "hf_other_token", "otheruser"


@pytest.fixture(autouse=True)
def loopback_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail loudly if anything in this process tries to reach a non-loopback address (e.g. huggingface.co)."""
    real_connect = socket.socket.connect

    def connect(sock: socket.socket, address: object) -> object:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):  # type: ignore[index]
            raise OSError(f"network access outside 127.0.0.1 attempted: {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", connect)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    with LocalHub(tmp_path / "hub", tokens={TOKEN: USER, OTHER_TOKEN: OTHER_USER}) as local_hub:
        configure_client(monkeypatch, local_hub.endpoint, tmp_path / "hf_home")
        yield local_hub


def _make_folder(root: Path) -> dict[str, bytes]:
    """A small adapter-like folder: JSON config, safetensors weights, raw binary, nested file."""
    root.mkdir(parents=True)
    save_file({"lora_A": torch.arange(12, dtype=torch.float32).reshape(3, 4)}, str(root / "adapter_model.safetensors"))
    (root / "adapter_config.json").write_text(json.dumps({"peft_type": "MITP", "r": 4}))
    (root / "blob.bin").write_bytes(bytes(range(256)) * 4 + b"\x00\xff\x00")
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "sub" / "deeper" / "notes.txt").write_text("nested file\n")
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _read_tree(root: str | Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}


@pytest.mark.parametrize("disable_xet", [False, True], ids=["hf_xet-pipeline", "legacy-create_commit"])
def test_upload_folder_then_snapshot_download_round_trips_byte_identical_files(
    hub: LocalHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, disable_xet: bool
) -> None:
    # upload_folder takes a different code path depending on whether hf_xet is usable: cover both.
    configure_client(monkeypatch, hub.endpoint, tmp_path / "hf_home", disable_xet=disable_xet)
    api = HfApi(token=TOKEN)
    repo_url = api.create_repo("testuser/adapter")
    assert repo_url.repo_id == "testuser/adapter"
    local = _make_folder(tmp_path / "src")

    commit = api.upload_folder(repo_id="testuser/adapter", folder_path=tmp_path / "src", commit_message="add adapter")

    assert hub.files("testuser/adapter") == sorted([".gitattributes", *local])
    assert all(hub.read_file("testuser/adapter", path) == data for path, data in local.items())
    assert len(commit.oid) == 40 and int(commit.oid, 16) >= 0
    assert api.model_info("testuser/adapter").sha == commit.oid == hub.head("testuser/adapter")
    assert sorted(api.list_repo_files("testuser/adapter")) == sorted([".gitattributes", *local])
    top_level = {entry.path: type(entry).__name__ for entry in api.list_repo_tree("testuser/adapter")}
    assert top_level["sub"] == "RepoFolder" and top_level["blob.bin"] == "RepoFile"

    downloaded = _read_tree(snapshot_download("testuser/adapter"))
    downloaded.pop(".gitattributes")
    assert downloaded == local
    single = hf_hub_download("testuser/adapter", "adapter_model.safetensors")
    assert Path(single).read_bytes() == local["adapter_model.safetensors"]


def test_pushing_again_updates_the_file_and_creates_a_new_commit(hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("testuser/model")
    first = api.upload_file(path_or_fileobj=b"v1", path_in_repo="weights.bin", repo_id="testuser/model")
    second = api.upload_file(path_or_fileobj=b"version 2", path_in_repo="weights.bin", repo_id="testuser/model")

    assert second.oid != first.oid
    assert api.model_info("testuser/model").sha == second.oid
    assert hub.read_file("testuser/model", "weights.bin") == b"version 2"
    assert Path(hf_hub_download("testuser/model", "weights.bin")).read_bytes() == b"version 2"
    # Older commits stay addressable by sha, as on the Hub.
    assert Path(hf_hub_download("testuser/model", "weights.bin", revision=first.oid)).read_bytes() == b"v1"
    # `create_repo(exist_ok=True)` on an existing repo keeps its content.
    api.create_repo("testuser/model", exist_ok=True)
    assert hub.head("testuser/model") == second.oid


def test_create_repo_twice_without_exist_ok_is_a_409_conflict(hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("testuser/twice")
    with pytest.raises(HfHubHTTPError) as excinfo:
        api.create_repo("testuser/twice")
    assert excinfo.value.response.status_code == 409


def test_push_without_token_raises_401_mentioning_authorization(hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("testuser/locked")
    anonymous = HfApi(token=False)

    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="testuser/locked")
    assert excinfo.value.response.status_code == 401
    assert "401" in str(excinfo.value) and "authorization" in str(excinfo.value).lower()

    with pytest.raises(HfHubHTTPError) as excinfo:
        anonymous.create_repo("testuser/other")
    assert excinfo.value.response.status_code == 401
    assert excinfo.value.response.json()["error"]

    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token="hf_wrong").upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="testuser/locked")
    assert excinfo.value.response.status_code == 401
    assert "x.txt" not in hub.files("testuser/locked")


def test_push_to_another_users_namespace_is_forbidden(hub: LocalHub) -> None:
    HfApi(token=TOKEN).create_repo("testuser/mine")
    with pytest.raises(HfHubHTTPError) as excinfo:
        HfApi(token=OTHER_TOKEN).upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="testuser/mine")
    assert excinfo.value.response.status_code == 403


def test_private_repo_is_not_downloadable_without_token_but_is_with_it(hub: LocalHub) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("testuser/secret", private=True)
    api.upload_file(path_or_fileobj=b"secret bytes", path_in_repo="secret.bin", repo_id="testuser/secret")
    assert api.model_info("testuser/secret").private is True

    with pytest.raises(RepositoryNotFoundError) as excinfo:
        hf_hub_download("testuser/secret", "secret.bin", token=False)
    assert excinfo.value.response.status_code == 401
    with pytest.raises(HfHubHTTPError):
        snapshot_download("testuser/secret", token=False)
    with pytest.raises(RepositoryNotFoundError) as excinfo:  # another user sees a 404, as on the Hub
        HfApi(token=OTHER_TOKEN).model_info("testuser/secret")
    assert excinfo.value.response.status_code == 404

    assert Path(hf_hub_download("testuser/secret", "secret.bin", token=TOKEN)).read_bytes() == b"secret bytes"
    assert (Path(snapshot_download("testuser/secret", token=TOKEN)) / "secret.bin").read_bytes() == b"secret bytes"


def test_hf_hub_download_of_missing_file_raises_entry_not_found(hub: LocalHub) -> None:
    HfApi(token=TOKEN).create_repo("testuser/sparse")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("testuser/sparse", "does_not_exist.json", token=TOKEN)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("testuser/no_such_repo", "config.json", token=TOKEN)


def test_module_level_helpers_and_whoami_target_the_local_hub(hub: LocalHub) -> None:
    # `huggingface_hub.upload_file` & co. are bound to a module-level HfApi built at import time.
    assert huggingface_hub.whoami(token=TOKEN)["name"] == USER
    huggingface_hub.create_repo("testuser/helpers", token=TOKEN)
    huggingface_hub.upload_file(
        path_or_fileobj=b"{}", path_in_repo="config.json", repo_id="testuser/helpers", token=TOKEN
    )
    assert hub.files("testuser/helpers") == [".gitattributes", "config.json"]
    with pytest.raises(HfHubHTTPError):
        huggingface_hub.whoami(token="hf_wrong")


def test_fresh_subprocess_with_hf_endpoint_and_hf_token_can_snapshot_download(hub: LocalHub, tmp_path: Path) -> None:
    api = HfApi(token=TOKEN)
    api.create_repo("testuser/shared", private=True)
    local = _make_folder(tmp_path / "src")
    api.upload_folder(repo_id="testuser/shared", folder_path=tmp_path / "src")

    script = (
        "import hashlib, json, pathlib, huggingface_hub\n"
        "root = pathlib.Path(huggingface_hub.snapshot_download('testuser/shared'))\n"
        "print(json.dumps({p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()"
        " for p in root.rglob('*') if p.is_file()}))\n"
    )
    env = client_env(hub.endpoint, tmp_path / "subprocess_hf_home", token=TOKEN)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=60)

    assert result.returncode == 0, result.stderr
    hashes = json.loads(result.stdout.strip().splitlines()[-1])
    hashes.pop(".gitattributes")
    assert hashes == {path: hashlib.sha256(data).hexdigest() for path, data in local.items()}
    assert os.listdir(tmp_path / "subprocess_hf_home" / "hub")  # it used the cache it was given
