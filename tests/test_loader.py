"""The rank-aware streaming loader, its resume state, and the validation prefix."""

import numpy as np
import pytest
import torch

from data.loader import DataError, TokenLoader, ValidationData, find_shards
from data.shards import write_shard
from tests.conftest import make_shards

B, T = 2, 8


@pytest.fixture
def data(tmp_path):
    # A val shard, then three train shards of different lengths.
    return tmp_path, make_shards(tmp_path, "fineweb", [500, 300, 200, 250])


def batches(loader, n):
    return [loader.next_batch() for _ in range(n)]


def test_finds_any_prefix(tmp_path):
    make_shards(tmp_path, "finewebedu", [100, 100, 100])
    assert [p.name for p in find_shards(tmp_path, "train")] == [
        "finewebedu_train_000001.bin",
        "finewebedu_train_000002.bin",
    ]
    assert [p.name for p in find_shards(tmp_path, "val")] == ["finewebedu_val_000000.bin"]


def test_missing_dir_and_split(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        find_shards(tmp_path / "nope", "train")
    with pytest.raises(DataError, match="no train shards"):
        find_shards(tmp_path, "train")


def test_targets_are_inputs_shifted(data):
    folder, tokens = data
    x, y = TokenLoader(find_shards(folder, "train"), B, T).next_batch()
    assert x.shape == y.shape == (B, T) and x.dtype == torch.int64
    flat = torch.from_numpy(tokens[1][: B * T + 1])
    assert torch.equal(x.flatten(), flat[:-1]) and torch.equal(y.flatten(), flat[1:])


def test_ranks_split_the_single_process_batch(data):
    """Two ranks of B sequences see exactly what one process of 2B sequences sees."""
    folder, _ = data
    paths = find_shards(folder, "train")
    single = batches(TokenLoader(paths, 2 * B, T), 10)
    ranks = [batches(TokenLoader(paths, B, T, rank=r, world_size=2), 10) for r in range(2)]
    for step, (x, y) in enumerate(single):
        assert torch.equal(x, torch.cat([ranks[0][step][0], ranks[1][step][0]]))
        assert torch.equal(y, torch.cat([ranks[0][step][1], ranks[1][step][1]]))


def test_walks_shards_in_order_and_wraps(data):
    folder, tokens = data
    loader = TokenLoader(find_shards(folder, "train"), B, T)
    per_batch = B * T
    fits = [(len(tokens[i]) - 1) // per_batch for i in (1, 2, 3)]
    first_of_each = []
    for shard, count in enumerate(fits):
        for i in range(count):
            x, _ = loader.next_batch()
            if i == 0:
                first_of_each.append(x.flatten()[:4].tolist())
            assert loader.shard == shard
    for i in (1, 2, 3):
        assert first_of_each[i - 1] == tokens[i][:4].tolist()
    x, _ = loader.next_batch()  # wraps to the first train shard
    assert loader.shard == 0 and x.flatten()[:4].tolist() == tokens[1][:4].tolist()


def test_state_resumes_with_the_next_batch(data):
    folder, _ = data
    paths = find_shards(folder, "train")
    reference = TokenLoader(paths, B, T)
    expected = batches(reference, 40)
    first = TokenLoader(paths, B, T)
    batches(first, 17)
    resumed = TokenLoader(paths, B, T)
    resumed.load_state_dict(first.state_dict())
    for (x, y), (ex, ey) in zip(batches(resumed, 23), expected[17:], strict=True):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_bad_state_is_an_error(data):
    folder, _ = data
    loader = TokenLoader(find_shards(folder, "train"), B, T)
    with pytest.raises(DataError, match="names shard 9"):
        loader.load_state_dict({"shard": 9, "pos": 0})


def test_shard_shorter_than_a_global_batch(tmp_path):
    write_shard(tmp_path / "x_train_000001.bin", np.arange(10))
    with pytest.raises(DataError, match="fewer than one global batch"):
        TokenLoader(find_shards(tmp_path, "train"), B, T, world_size=2)


def test_validation_is_a_fixed_prefix_split_over_ranks(data):
    folder, tokens = data
    paths = find_shards(folder, "val")
    val = ValidationData(paths, 64, B, T)
    first, second = list(val), list(val)
    assert len(first) == 4
    for (x1, y1), (x2, y2) in zip(first, second, strict=True):
        assert torch.equal(x1, x2) and torch.equal(y1, y2)
    seen = torch.cat([x.flatten() for x, _ in first])
    assert seen.tolist() == tokens[0][:64].tolist()
    ranks = [list(ValidationData(paths, 64, B, T, rank=r, world_size=2)) for r in range(2)]
    both = torch.cat([torch.cat([ranks[0][i][0], ranks[1][i][0]]).flatten() for i in range(2)])
    assert torch.equal(both, seen)


def test_validation_spans_several_val_shards(tmp_path):
    write_shard(tmp_path / "x_val_000000.bin", np.arange(40))
    write_shard(tmp_path / "x_val_000001.bin", np.arange(100, 140))
    ((x, y),) = list(ValidationData(find_shards(tmp_path, "val"), 64, 4, 16))
    assert x.flatten().tolist() == list(range(40)) + list(range(100, 124))
    assert y.flatten()[-1].item() == 124


def test_validation_size_errors(data):
    folder, _ = data
    paths = find_shards(folder, "val")
    with pytest.raises(DataError, match="positive multiple of .* = 16"):
        ValidationData(paths, 50, B, T)
    with pytest.raises(DataError, match="exceeds the 500 tokens"):
        ValidationData(paths, 512, B, T)
