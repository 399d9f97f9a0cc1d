"""The shard reader against every kind of corruption, and the atomic writer."""

import os

import numpy as np
import pytest

from data import shards
from data.shards import HEADER_BYTES, LLAMA3_MAGIC, ShardError, load_tokens, read_header, write_shard


@pytest.fixture
def shard(tmp_path):
    path = tmp_path / "x_train_000001.bin"
    write_shard(path, np.arange(1000) % 50257)
    return path


def rewrite_header(path, index, value):
    header = np.fromfile(path, dtype="<i4", count=256)
    header[index] = value
    data = path.read_bytes()
    path.write_bytes(header.tobytes() + data[HEADER_BYTES:])


def test_round_trip(shard):
    assert read_header(shard) == 1000
    tokens = load_tokens(shard)
    assert isinstance(tokens, np.memmap)
    np.testing.assert_array_equal(tokens, np.arange(1000))
    assert shard.stat().st_size == HEADER_BYTES + 2 * 1000
    assert oct(shard.stat().st_mode & 0o777) == oct(0o644)


def test_truncated(shard):
    shard.write_bytes(shard.read_bytes()[:-2])
    with pytest.raises(ShardError, match="truncated or has trailing bytes"):
        load_tokens(shard)


def test_trailing_bytes(shard):
    shard.write_bytes(shard.read_bytes() + b"\0\0")
    with pytest.raises(ShardError, match="truncated or has trailing bytes"):
        load_tokens(shard)


def test_bad_magic(shard):
    rewrite_header(shard, 0, 12345)
    with pytest.raises(ShardError, match="magic 12345, expected 20240520"):
        read_header(shard)


def test_llama3_magic_has_its_own_message(shard):
    rewrite_header(shard, 0, LLAMA3_MAGIC)
    with pytest.raises(ShardError, match="llama-3 uint32 format"):
        read_header(shard)


def test_bad_version(shard):
    rewrite_header(shard, 1, 7)
    with pytest.raises(ShardError, match="version 7, expected 1"):
        read_header(shard)


def test_empty_token_count(shard):
    rewrite_header(shard, 2, 0)
    shard.write_bytes(shard.read_bytes()[:HEADER_BYTES])
    with pytest.raises(ShardError, match="declares 0 tokens"):
        read_header(shard)


@pytest.mark.parametrize("size", [0, 10, HEADER_BYTES - 1])
def test_file_smaller_than_header(tmp_path, size):
    path = tmp_path / "tiny.bin"
    path.write_bytes(b"\1" * size)
    with pytest.raises(ShardError, match=f"is {size} bytes, smaller than"):
        read_header(path)


def test_missing(tmp_path):
    with pytest.raises(ShardError, match="does not exist"):
        read_header(tmp_path / "nope.bin")


def test_writer_rejects_bad_tokens(tmp_path):
    with pytest.raises(ShardError, match="non-empty"):
        write_shard(tmp_path / "a.bin", [])
    with pytest.raises(ShardError, match="65535"):
        write_shard(tmp_path / "a.bin", [1, 70000])


def test_killed_write_leaves_old_file_and_no_partial(shard, monkeypatch):
    before = shard.read_bytes()

    def crash(src, dst):
        raise KeyboardInterrupt  # as if the job died between writing and renaming

    monkeypatch.setattr(shards.os, "replace", crash)
    with pytest.raises(KeyboardInterrupt):
        write_shard(shard, np.arange(5))
    assert shard.read_bytes() == before
    assert os.listdir(shard.parent) == [shard.name]
