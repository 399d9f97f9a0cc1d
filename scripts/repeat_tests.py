"""Run pytest on the same tests N times and count the runs that fail: a flaky test shows here.

    python scripts/repeat_tests.py tests/test_distributed_optimizers.py --runs 10 --load 1

`--load K` keeps K busy processes beside the tests, as a second job on a shared CI machine
would. The log of every failed run is kept under `--log_dir`, so its first error can be read.
"""

import argparse
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def burn():
    """Spin one core until killed."""
    x = 0
    while True:
        x = (x * 1103515245 + 12345) % 2**31


def main(argv=None):
    """Run the tests `--runs` times; print one line per run and the count of failures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pytest_args", nargs="+", help="what to pass to pytest (test files, -k, ...)")
    parser.add_argument("--runs", type=int, default=10, help="how many times to run them")
    parser.add_argument("--load", type=int, default=0, help="busy processes to keep beside the tests")
    parser.add_argument("--log_dir", default="runs/repeat_tests", help="where the failed runs' logs go")
    args = parser.parse_args(argv)
    if args.runs < 1 or args.load < 0:
        parser.error(f"--runs must be >= 1 and --load >= 0, got {args.runs} and {args.load}")
    log_dir = Path(args.log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    hogs = [mp.Process(target=burn, daemon=True) for _ in range(args.load)]
    for hog in hogs:
        hog.start()
    failures = 0
    try:
        for run in range(1, args.runs + 1):
            start = time.perf_counter()
            result = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args.pytest_args],
                cwd=REPO,
                capture_output=True,
                text=True,
            )
            summary = (result.stdout.strip().splitlines() or ["(no output)"])[-1]
            seconds = time.perf_counter() - start
            line = f"run {run}/{args.runs}: exit {result.returncode} in {seconds:.0f} s: {summary}"
            if result.returncode != 0:
                failures += 1
                log = log_dir / f"run_{run:03d}.log"
                log.write_text(result.stdout + "\n--- stderr ---\n" + result.stderr)
                line += f" (log: {log})"
            print(line, flush=True)
    finally:
        for hog in hogs:
            hog.terminate()
    print(f"{failures} of {args.runs} runs failed")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
