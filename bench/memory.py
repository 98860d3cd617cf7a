"""Benchmark memory: the peak resident memory of one pass over the train split, as the demo dataset grows.

    python bench/memory.py [--side 224] [--factors 1 4 16]

For each factor, builds the demo dataset (params.yaml's datasets.demo with per_class times the factor, images
of `side` px) with the project's own generator, clean and split steps in a temporary folder, then measures,
each in a fresh process, the peak resident memory (VmHWM, else ru_maxrss) of a pass over the train split
computing a mean per batch of 64 images:
  before    the split stacked in memory as load_splits did (np.stack over memory-mapped shards)
  asarray   the split materialised from data.Rows (np.asarray(subset.images))
  after     data.Rows read 64 images at a time
`start` is the peak after imports and load_splits, before any pixel is read. Changes nothing in the workspace.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

import cxr
from cxr import atomic, clean, data, demo, params, sources
from cxr import split as splitting

BATCH = 64
WAYS = ("before", "asarray", "after")


def peak_mb() -> float:
    """This process's peak resident memory so far, MB (10^6 bytes)."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024 / 1e6
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024) / 1e6


def measure(way: str, clean_dir: Path, split_csv: Path, classes: list[str]) -> dict:
    """One pass over the train split the given way; the peak memory before and after reading."""
    images = data.load_splits(classes, clean_dir, split_csv, only=("train",), masks=False)["train"].images
    start = peak_mb()
    if way == "before":
        shards = [np.load(f, mmap_mode="r") for f in images.files]
        images = np.stack([shards[s][i] for s, i in zip(images.shard, images.index)])
    elif way == "asarray":
        images = np.asarray(images)
    means = [float(images[a : a + BATCH].mean()) for a in range(0, len(images), BATCH)]
    return {"start": start, "peak": peak_mb(), "mean": float(np.mean(means))}


def build(root: Path, ds: dict, p: dict, factor: int, side: int) -> tuple[Path, Path, int]:
    """The demo dataset at `factor` times its size, cleaned and split under root: (clean dir, split.csv, images)."""
    raw, clean_dir, split_csv = root / "raw", root / "clean", root / "split.csv"
    demo.generate(raw, per_class=ds["per_class"] * factor, size=side, seed=ds["seed"], bad_files=ds["bad_files"])
    records, drops = sources.load("demo", raw, ds)
    clean_dir.mkdir()
    clean.run(raw, clean_dir, records, drops, ds["classes"], {**p["clean"], "image_size": side})
    manifest = splitting.read_manifest(clean_dir / "manifest.csv")
    cfg = p["split"]
    atomic.write_csv(split_csv, splitting.make_split(manifest, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"],
                                                     cfg["group_distance"]))
    return clean_dir, split_csv, len(manifest)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--side", type=int, default=224, help="image side, px")
    ap.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16], help="multiples of the demo dataset's size")
    ap.add_argument("--measure", nargs=3, metavar=("WAY", "CLEAN", "SPLIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = params.load(sources=sources.SOURCES)
    ds = {"name": "demo", **p["datasets"]["demo"]}
    if args.measure:
        way, clean_dir, split_csv = args.measure
        print(json.dumps(measure(way, Path(clean_dir), Path(split_csv), ds["classes"])))
        return
    here = [str(Path(cxr.__file__).parents[1]), os.environ.get("PYTHONPATH")]   # the children import this cxr
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, here))}
    print(f"demo dataset ({ds['per_class']} images per class) x {args.factors} at {args.side} px; a mean per batch of "
          f"{BATCH} over the train split; peak resident memory (MB) of a fresh process each way", flush=True)
    rows = []
    for factor in args.factors:
        with tempfile.TemporaryDirectory(prefix="cxr-bench-memory-") as tmp:
            t0 = time.perf_counter()
            clean_dir, split_csv, n = build(Path(tmp), ds, p, factor, args.side)
            built = time.perf_counter() - t0
            got = {}
            for way in WAYS:
                out = subprocess.run([sys.executable, __file__, "--measure", way, str(clean_dir), str(split_csv)],
                                     env=env, check=True, capture_output=True, text=True).stdout
                got[way] = json.loads(out.strip().splitlines()[-1])
            if len({round(g["mean"], 6) for g in got.values()}) != 1:
                raise AssertionError(f"the ways read different pixels: {got}")
            train = int(pd.read_csv(split_csv)["split"].eq("train").sum())
            rows.append((factor, n, train, train * args.side**2 / 1e6, got["after"]["start"],
                         *(got[w]["peak"] for w in WAYS)))
            print(f"  x{factor}: {n} images built in {built:.0f}s, measured", flush=True)
    print()
    print("| size | images | train | train split MB | start | before | asarray | after |")
    print("|---|---|---|---|---|---|---|---|")
    for factor, n, train, mb, start, *peaks in rows:
        print(f"| x{factor} | {n} | {train} | {mb:.0f} | {start:.0f} | " + " | ".join(f"{v:.0f}" for v in peaks) + " |")


if __name__ == "__main__":
    main()
