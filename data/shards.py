"""The llm.c / modded-nanogpt token shard format: a 1024-byte int32 header, then uint16 tokens."""

import os
import tempfile
from pathlib import Path

import numpy as np

MAGIC = 20240520
VERSION = 1
LLAMA3_MAGIC = 20240801
HEADER_INTS = 256
HEADER_BYTES = HEADER_INTS * 4
TOKEN_BYTES = 2
EOT_TOKEN = 50256


class ShardError(ValueError):
    """A shard file that is missing, truncated or not in the expected format."""


def read_header(path):
    """Validate the shard at `path` and return its token count."""
    path = Path(path)
    if not path.is_file():
        raise ShardError(f"shard {path} does not exist")
    size = path.stat().st_size
    if size < HEADER_BYTES:
        raise ShardError(f"shard {path} is {size} bytes, smaller than the {HEADER_BYTES}-byte header")
    header = np.fromfile(path, dtype="<i4", count=HEADER_INTS)
    magic, version, ntok = (int(x) for x in header[:3])
    if magic == LLAMA3_MAGIC:
        raise ShardError(
            f"shard {path} is in the llama-3 uint32 format (magic {LLAMA3_MAGIC}); "
            f"only GPT-2 uint16 shards (magic {MAGIC}) are supported"
        )
    if magic != MAGIC:
        raise ShardError(f"shard {path} has magic {magic}, expected {MAGIC}")
    if version != VERSION:
        raise ShardError(f"shard {path} has version {version}, expected {VERSION}")
    if ntok <= 0:
        raise ShardError(f"shard {path} declares {ntok} tokens, expected more than 0")
    expected = HEADER_BYTES + TOKEN_BYTES * ntok
    if size != expected:
        raise ShardError(
            f"shard {path} is {size} bytes but its header declares {ntok} tokens "
            f"({expected} bytes): the file is truncated or has trailing bytes"
        )
    return ntok


def load_tokens(path):
    """Validate the shard at `path` and memory-map its tokens as a read-only uint16 array."""
    ntok = read_header(path)
    return np.memmap(path, dtype="<u2", mode="r", offset=HEADER_BYTES, shape=(ntok,))


def write_shard(path, tokens):
    """Write `tokens` as a shard at `path`, atomically: a killed job never leaves half a file."""
    path = Path(path)
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or tokens.size == 0:
        raise ShardError(f"a shard needs a non-empty 1-D token array, got shape {tokens.shape}")
    if tokens.min() < 0 or tokens.max() >= 2**16:
        raise ShardError(
            f"token ids must lie in [0, 65535] for a uint16 shard, got [{tokens.min()}, {tokens.max()}]"
        )
    header = np.zeros(HEADER_INTS, dtype="<i4")
    header[:3] = (MAGIC, VERSION, tokens.size)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(header.tobytes())
            f.write(tokens.astype("<u2").tobytes())
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; shards are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
