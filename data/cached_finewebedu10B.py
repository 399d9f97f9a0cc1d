"""Download the FineWeb edu10B shards: `python data/cached_finewebedu10B.py N` (see cached_fineweb10B.py)."""

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from data.cached_fineweb10B import main

if __name__ == "__main__":
    main(variant="edu10B")
