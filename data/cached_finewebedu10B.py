"""Download the FineWeb edu10B shards: `python data/cached_finewebedu10B.py N` (see cached_fineweb10B.py)."""

from data.cached_fineweb10B import main

if __name__ == "__main__":
    main(variant="edu10B")
