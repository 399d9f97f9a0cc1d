"""Tokenize local text files into train/val shards with the GPT-2 tokenizer, fully offline.

    python data/tokenize_text.py --out_dir data/mytext --name mytext a.txt b.txt ...

Each file is one document; every document is preceded by the end-of-text token. Whole
documents (from the end of the sorted list) go to validation until `--val_fraction` of the
tokens is reached, so no document is split between train and val.
"""

import argparse
import sys
from pathlib import Path

import numpy as np

from data.shards import EOT_TOKEN, write_shard
from data.tokenizer import gpt2_encoding


def encode_documents(texts, encoding):
    """Encode each text as one document: [EOT] + its tokens. Returns a list of uint16 arrays."""
    return [np.array([EOT_TOKEN, *encoding.encode_ordinary(text)], dtype=np.uint16) for text in texts]


def split_documents(documents, val_fraction):
    """Split documents into (train, val) token arrays, giving whole documents from the end to val."""
    if not 0 < val_fraction < 1:
        raise ValueError(f"val_fraction must lie in (0, 1), got {val_fraction}")
    if len(documents) < 2:
        raise ValueError(f"need at least 2 documents to split into train and val, got {len(documents)}")
    total = sum(len(d) for d in documents)
    n_val, val_tokens = 0, 0
    while val_tokens < val_fraction * total and n_val < len(documents) - 1:
        n_val += 1
        val_tokens += len(documents[-n_val])
    return np.concatenate(documents[:-n_val]), np.concatenate(documents[-n_val:])


def write_dataset(out_dir, name, train, val, shard_tokens):
    """Write `{name}_val_000000.bin` and `{name}_train_000001.bin`, ... into `out_dir`."""
    out_dir = Path(out_dir)
    paths = [out_dir / f"{name}_val_000000.bin"]
    write_shard(paths[0], val)
    for i, start in enumerate(range(0, len(train), shard_tokens), start=1):
        paths.append(out_dir / f"{name}_train_{i:06d}.bin")
        write_shard(paths[-1], train[start : start + shard_tokens])
    return paths


def main(argv=None):
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="+", type=Path, help="text files, one document each")
    parser.add_argument("--out_dir", type=Path, required=True)
    parser.add_argument("--name", required=True, help="shard file prefix")
    parser.add_argument("--val_fraction", type=float, default=0.05)
    parser.add_argument("--shard_tokens", type=int, default=100_000_000)
    parser.add_argument("--ranks", type=Path, default=None, help="a local gpt2.tiktoken file")
    args = parser.parse_args(argv)
    missing = [str(f) for f in args.files if not f.is_file()]
    if missing:
        sys.exit(f"error: input file(s) not found: {', '.join(missing)}")
    encoding, source = gpt2_encoding(args.ranks)
    print(f"GPT-2 ranks from {source}")
    texts = [f.read_text(encoding="utf-8") for f in sorted(args.files)]
    train, val = split_documents(encode_documents(texts, encoding), args.val_fraction)
    for path in write_dataset(args.out_dir, args.name, train, val, args.shard_tokens):
        print(f"wrote {path}")
    print(f"{len(train):,} train tokens, {len(val):,} val tokens")


if __name__ == "__main__":
    main()
