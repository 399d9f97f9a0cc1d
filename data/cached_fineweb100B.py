"""Download the FineWeb 100B shards: `python data/cached_fineweb100B.py N` (see cached_fineweb10B.py)."""

from data.cached_fineweb10B import main

if __name__ == "__main__":
    main(variant="100B")
