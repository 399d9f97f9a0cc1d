"""Download pretokenized FineWeb shards from the Hugging Face hub.

    python data/cached_fineweb10B.py N                    # val shard + first N train shards
    python data/cached_fineweb10B.py N --variant edu10B   # or: python data/cached_finewebedu10B.py N

Files that are already present and valid are skipped; every downloaded file is validated.
"""

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from data.shards import ShardError, read_header

DATA = Path(__file__).resolve().parent
# variant: (dataset on the hub, file prefix, default folder)
VARIANTS = {
    "10B": ("kjj0/fineweb10B-gpt2", "fineweb", DATA / "fineweb10B"),
    "100B": ("kjj0/fineweb100B-gpt2", "fineweb", DATA / "fineweb100B"),
    "edu10B": ("kjj0/finewebedu10B-gpt2", "finewebedu", DATA / "finewebedu10B"),
}


class DownloadError(RuntimeError):
    """A shard that could not be fetched, or arrived corrupt."""


def shard_names(prefix, num_train):
    """The val shard and the first `num_train` train shards of a variant."""
    return [f"{prefix}_val_000000.bin"] + [f"{prefix}_train_{i:06d}.bin" for i in range(1, num_train + 1)]


def _is_valid(path):
    try:
        read_header(path)
        return True
    except ShardError:
        return False


def _hub_download(repo_id, filename, local_dir):
    from huggingface_hub import hf_hub_download

    return hf_hub_download(repo_id=repo_id, filename=filename, repo_type="dataset", local_dir=local_dir)


def fetch(variant, num_train, local_dir=None, download=_hub_download):
    """Make sure the val shard and `num_train` train shards are in `local_dir`; return their paths."""
    repo_id, prefix, default_dir = VARIANTS[variant]
    local_dir = Path(local_dir or default_dir)
    names = shard_names(prefix, num_train)
    todo = [n for n in names if not _is_valid(local_dir / n)]
    print(f"{repo_id}: {len(names) - len(todo)} of {len(names)} shards already in {local_dir}")
    if todo:
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            raise DownloadError(
                f"HF_HUB_OFFLINE is set, so the {len(todo)} missing shards cannot be downloaded "
                f"(first: {todo[0]}); unset it or copy the files into {local_dir}"
            )
    for name in tqdm(todo, desc="shards", unit="file"):
        try:
            path = Path(download(repo_id, name, str(local_dir)))
        except Exception as e:  # the hub client raises many types: report each as one line
            raise DownloadError(
                f"could not download {name} from {repo_id} ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else 'no message'}); are you offline?"
            ) from None
        try:
            read_header(path)
        except ShardError as e:
            path.unlink(missing_ok=True)
            raise DownloadError(f"downloaded file is corrupt and was removed: {e}") from None
    return [local_dir / n for n in names]


def main(argv=None, variant=None):
    """Command-line entry point; the sibling scripts fix `variant`."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("num_train", type=int, help="number of train shards (100M tokens each)")
    if variant is None:
        parser.add_argument("--variant", choices=sorted(VARIANTS), default="10B")
    parser.add_argument("--local_dir", type=Path, default=None, help="default: data/fineweb<variant>/")
    args = parser.parse_args(argv)
    if args.num_train < 1:
        parser.error(f"num_train must be at least 1, got {args.num_train}")
    try:
        fetch(variant or args.variant, args.num_train, args.local_dir)
    except DownloadError as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
