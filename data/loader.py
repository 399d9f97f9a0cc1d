"""Stream (input, target) batches from token shards, split over data-parallel ranks."""

from pathlib import Path

import numpy as np
import torch

from data.shards import ShardError, load_tokens, read_header


class DataError(ValueError):
    """A data directory or split that cannot feed the requested batches."""


def find_shards(data_dir, split):
    """Return the sorted shard paths of `split` ("train" or "val") in `data_dir`.

    Any prefix works (fineweb_, finewebedu_, shakespeare_...): files are matched as *_{split}_*.bin.
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"data_dir {data_dir} does not exist")
    paths = sorted(data_dir.glob(f"*_{split}_*.bin"))
    if not paths:
        raise DataError(f"data_dir {data_dir} has no {split} shards (*_{split}_*.bin)")
    return paths


def checked_tokens(path, vocab_size):
    """The tokens of the shard at `path`, every id checked against the tokenizer's `vocab_size`
    (None: unchecked): a shard of another tokenizer fails here, not deep inside the embedding."""
    tokens = load_tokens(path)
    if vocab_size is not None and (largest := int(tokens.max())) >= vocab_size:
        raise ShardError(
            f"shard {path} holds token id {largest}, outside the tokenizer's {vocab_size} ids: "
            "set `tokenizer` to the one its data was made with"
        )
    return tokens


def _to_batch(tokens, batch_size, sequence_length, device):
    # One int32 copy (half int64's bytes) for inputs and targets, widened on the device. On CUDA
    # it leaves pinned memory: from pageable memory the driver stages a non-blocking copy and
    # may wait for it.
    buf = torch.from_numpy(tokens.astype(np.int32))
    if torch.device(device).type == "cuda":
        buf = buf.pin_memory()
    buf = buf.to(device, non_blocking=True).long()
    return buf[:-1].view(batch_size, sequence_length), buf[1:].view(batch_size, sequence_length)


class TokenLoader:
    """Walks the shards in order and wraps. Each call returns this rank's slice of the next
    global batch of `world_size * batch_size` sequences; `state_dict()` is the position of the
    next batch, so a run restored from it continues with exactly that batch."""

    def __init__(
        self, paths, batch_size, sequence_length, rank=0, world_size=1, device="cpu", vocab_size=None
    ):
        self.paths = list(paths)
        self.vocab_size = vocab_size
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.rank, self.world_size, self.device = rank, world_size, device
        self.local_tokens = batch_size * sequence_length
        # One extra token so that the targets of the last sequence exist.
        self.global_tokens = world_size * self.local_tokens + 1
        for path in self.paths:
            ntok = read_header(path)
            if ntok < self.global_tokens:
                raise DataError(
                    f"shard {path} has {ntok} tokens, fewer than one global batch "
                    f"({self.global_tokens} = world_size {world_size} x device_batch_size "
                    f"{batch_size} x sequence_length {sequence_length} + 1)"
                )
        self.shard, self.pos = 0, 0
        self.tokens = checked_tokens(self.paths[0], vocab_size)

    def state_dict(self):
        """The position of the next batch."""
        return {"shard": self.shard, "pos": self.pos}

    def load_state_dict(self, state):
        """Continue from a position saved by `state_dict()`."""
        if not 0 <= state["shard"] < len(self.paths):
            raise DataError(
                f"loader state names shard {state['shard']}, but only {len(self.paths)} shards exist"
            )
        self.shard, self.pos = state["shard"], state["pos"]
        self.tokens = checked_tokens(self.paths[self.shard], self.vocab_size)

    def next_batch(self):
        """Return this rank's (input, target) pair, each batch_size x sequence_length int64."""
        if self.pos + self.global_tokens > len(self.tokens):
            self.shard = (self.shard + 1) % len(self.paths)
            self.pos = 0
            self.tokens = checked_tokens(self.paths[self.shard], self.vocab_size)
        start = self.pos + self.rank * self.local_tokens
        chunk = self.tokens[start : start + self.local_tokens + 1]
        self.pos += self.global_tokens - 1
        return _to_batch(chunk, self.batch_size, self.sequence_length, self.device)


class ValidationData:
    """The first `val_tokens` tokens of the val shards, the same fixed prefix every time,
    split over the ranks. Iterating yields this rank's (input, target) batches."""

    def __init__(
        self,
        paths,
        val_tokens,
        batch_size,
        sequence_length,
        rank=0,
        world_size=1,
        device="cpu",
        vocab_size=None,
    ):
        step_tokens = world_size * batch_size * sequence_length
        if val_tokens <= 0 or val_tokens % step_tokens:
            raise DataError(
                f"val_tokens {val_tokens} must be a positive multiple of world_size x "
                f"device_batch_size x sequence_length = {step_tokens}"
            )
        available = sum(read_header(p) for p in paths)
        if available < val_tokens + 1:
            raise DataError(f"val_tokens {val_tokens} exceeds the {available} tokens of the val shards")
        parts, missing = [], val_tokens + 1
        for path in paths:
            parts.append(np.array(checked_tokens(path, vocab_size)[:missing]))
            missing -= len(parts[-1])
            if missing == 0:
                break
        self.tokens = np.concatenate(parts)
        self.val_tokens, self.step_tokens = val_tokens, step_tokens
        self.batch_size, self.sequence_length = batch_size, sequence_length
        self.rank, self.device = rank, device

    def __len__(self):
        return self.val_tokens // self.step_tokens

    def __iter__(self):
        local = self.batch_size * self.sequence_length
        for step_start in range(0, self.val_tokens, self.step_tokens):
            start = step_start + self.rank * local
            chunk = self.tokens[start : start + local + 1]
            yield _to_batch(chunk, self.batch_size, self.sequence_length, self.device)


class RandomTokens:
    """Batches of uniformly random ids drawn on `device` once, then replayed in turn: the data
    of a benchmark or a check, which times the model and not the shards."""

    def __init__(self, batch_size, sequence_length, vocab_size, device, seed, count):
        generator = torch.Generator(device).manual_seed(seed)
        shape = (batch_size, sequence_length + 1)
        # Drawn on the generator's device: a CUDA generator drawing on the CPU is an error.
        self.batches = [
            torch.randint(0, vocab_size, shape, device=device, generator=generator) for _ in range(count)
        ]
        self.calls = 0

    def next_batch(self):
        """(input, target) of the next batch, as TokenLoader.next_batch gives them."""
        tokens = self.batches[self.calls % len(self.batches)]
        self.calls += 1
        return tokens[:, :-1], tokens[:, 1:]
