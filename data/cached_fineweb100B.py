"""Download the FineWeb 100B shards: `python data/cached_fineweb100B.py N` (see cached_fineweb10B.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.cached_fineweb10B import main

if __name__ == "__main__":
    main(variant="100B")
