"""Benchmark the project's overhead on DVC: a no-op `dvc repro` of a finished pipeline against a bare
`dvc status` in an empty DVC repository.

    python bench/pipeline.py [REPO]      # REPO: a reproduced pipeline (default: this project)

Prints the median of 5 runs of each; changes nothing.
"""
from __future__ import annotations

import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def timed(cmd: list[str], cwd: Path, n: int = 5) -> float:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True)
        times.append(time.perf_counter() - t0)
        if proc.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed in {cwd}:\n{proc.stderr}")
    return statistics.median(times)


def main() -> None:
    repo = Path(sys.argv[1] if len(sys.argv) > 1 else ".").resolve()
    dvc = [sys.executable, "-m", "dvc"]
    status = subprocess.run(dvc + ["status"], cwd=repo, capture_output=True, text=True).stdout
    if "up to date" not in status:
        raise SystemExit(f"{repo}: pipeline not reproduced (dvc status: {status.strip()[:200]}); run `dvc repro` first")
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["git", "init", "-q"], cwd=tmp, check=True)
        subprocess.run(dvc + ["init", "-q"], cwd=tmp, check=True)
        empty = timed(dvc + ["status"], Path(tmp))
    noop = timed(dvc + ["repro"], repo)
    st = timed(dvc + ["status"], repo)
    print(f"bare `dvc status`, empty repository:   {empty:6.2f} s")
    print(f"`dvc status`, finished pipeline:         {st:6.2f} s")
    print(f"no-op `dvc repro`, finished pipeline:    {noop:6.2f} s  (overhead over the bare status: {noop - empty:+.2f} s)")


if __name__ == "__main__":
    main()
