"""The FineWeb download script, against a fake hub: skipping, validation, offline errors."""

import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from data.cached_fineweb10B import DownloadError, fetch, shard_names
from data.loader import find_shards
from data.shards import write_shard
from tests.conftest import REPO


@pytest.fixture
def hub(tmp_path):
    """A folder standing in for the hub, and a download function that records its calls."""
    folder = tmp_path / "hub"
    for name in shard_names("finewebedu", 3):
        write_shard(folder / name, np.arange(2000))
    calls = []

    def download(repo_id, filename, local_dir):
        assert repo_id == "kjj0/finewebedu10B-gpt2"
        calls.append(filename)
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(folder / filename, target)
        return str(target)

    return folder, download, calls


@pytest.fixture
def online(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)


def test_downloads_then_skips_valid_files(tmp_path, hub, online):
    _, download, calls = hub
    local = tmp_path / "edu"
    fetch("edu10B", 2, local, download)
    assert calls == [
        "finewebedu_val_000000.bin",
        "finewebedu_train_000001.bin",
        "finewebedu_train_000002.bin",
    ]
    assert [p.name for p in find_shards(local, "train")] == calls[1:]  # train.py finds edu names
    (local / "finewebedu_train_000002.bin").write_bytes(b"garbage")  # corrupt: fetched again
    calls.clear()
    fetch("edu10B", 3, local, download)
    assert calls == ["finewebedu_train_000002.bin", "finewebedu_train_000003.bin"]


def test_corrupt_download_is_removed_and_reported(tmp_path, hub, online):
    folder, download, _ = hub
    bad = folder / "finewebedu_train_000001.bin"
    bad.write_bytes(bad.read_bytes()[:-1])
    with pytest.raises(DownloadError, match="corrupt and was removed: .*truncated"):
        fetch("edu10B", 1, tmp_path / "edu", download)
    assert not (tmp_path / "edu" / "finewebedu_train_000001.bin").exists()


def test_hub_errors_become_one_line(tmp_path, online):
    def unreachable(repo_id, filename, local_dir):
        raise ConnectionError("Name or service not known\nmore detail")

    with pytest.raises(
        DownloadError,
        match=r"could not download fineweb_val_000000.bin .*ConnectionError: "
        r"Name or service not known\); are you offline\?$",
    ):
        fetch("10B", 1, tmp_path, unreachable)


def test_offline_mode_is_a_clear_error(tmp_path):
    result = subprocess.run(
        [sys.executable, "data/cached_fineweb10B.py", "2", "--local_dir", str(tmp_path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        env={"HF_HUB_OFFLINE": "1", "PATH": ""},
        timeout=60,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: HF_HUB_OFFLINE is set, so the 3 missing shards cannot be downloaded "
        f"(first: fineweb_val_000000.bin); unset it or copy the files into {tmp_path}"
    ]


def test_nothing_to_do_needs_no_network(tmp_path):
    for name in shard_names("fineweb", 1):
        write_shard(tmp_path / name, np.arange(10))
    assert [p.name for p in fetch("10B", 1, tmp_path)] == shard_names("fineweb", 1)
