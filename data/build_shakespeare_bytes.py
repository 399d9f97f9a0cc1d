"""Rebuild data/shakespeare_bytes/, the byte-level data of the CPU reproduction, from the
embedded GPT-2 shards of data/shakespeare/, offline:

    python data/build_shakespeare_bytes.py

Each play is decoded back to its text and written as UTF-8 bytes (`tokenizer: bytes`). The val
plays are those of data/shakespeare; train keeps the first whole train plays that reach
TRAIN_BYTES, more than a run of configs/repro_cpu.yaml reads, so no batch repeats in a run.
"""

from pathlib import Path

import numpy as np

from data.loader import find_shards
from data.shards import EOT_TOKEN, load_tokens
from data.tokenize_text import write_dataset
from data.tokenizer import encode_bytes, gpt2_encoding

SOURCE_DIR = Path(__file__).with_name("shakespeare")
OUT_DIR = Path(__file__).with_name("shakespeare_bytes")
TRAIN_BYTES = 2**20


def plays_as_bytes(split, encoding):
    """The documents of `split` in data/shakespeare, each re-encoded as byte ids."""
    tokens = np.concatenate([np.asarray(load_tokens(p)) for p in find_shards(SOURCE_DIR, split)])
    starts = np.flatnonzero(tokens == EOT_TOKEN)
    documents = np.split(tokens, starts[1:])
    return [np.array(encode_bytes(encoding.decode(d[1:].tolist())), dtype=np.uint16) for d in documents]


def main():
    """Write the byte shards."""
    encoding, source = gpt2_encoding()
    print(f"GPT-2 ranks from {source}")
    train_plays, size = [], 0
    for play in plays_as_bytes("train", encoding):
        if size >= TRAIN_BYTES:
            break
        train_plays.append(play)
        size += len(play)
    train, val = np.concatenate(train_plays), np.concatenate(plays_as_bytes("val", encoding))
    for path in write_dataset(OUT_DIR, "shakespeare_bytes", train, val, shard_tokens=len(train)):
        print(f"wrote {path}")
    print(f"{len(train_plays)} train plays, {len(train):,} train bytes, {len(val):,} val bytes")


if __name__ == "__main__":
    main()
