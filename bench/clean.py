"""Benchmark the clean stage's decoding: images/s with one process and with all cores.

    CXR_DATA_DIR=/data/cxr python bench/clean.py [--dataset covid-radiography] [--size 224] [--limit N]

Reads the dataset from CXR_DATA_DIR (or data/raw when it holds that dataset); prints figures.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

from cxr import clean, images, params, sources
from cxr.download import find_local


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default=None, help="default: params.yaml's dataset")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--limit", type=int, default=0, help="decode at most N images")
    args = ap.parse_args()
    p = params.load(sources=sources.SOURCES)
    name = args.dataset or p["dataset"]
    ds = {"name": name, **p["datasets"][name]}
    raw = find_local(name, os.environ.get("CXR_DATA_DIR")) or Path("data/raw")
    records, _ = sources.load(name, raw, ds)
    if args.limit:
        records = records[: args.limit]
    cores = os.cpu_count() or 1
    print(f"{name}: {len(records)} images from {raw}, to {args.size} px; {cores} cores")
    for workers in sorted({1, cores}):
        t0 = time.perf_counter()
        out = clean.decode_all(raw, records, args.size, "pad", images.DEFAULT_MAX_PIXELS, workers)
        dt = time.perf_counter() - t0
        ok = sum(d.error is None for d in out)
        print(f"workers={workers}: {len(records) / dt:7.1f} images/s ({ok} decoded + hashed in {dt:.1f}s)")


if __name__ == "__main__":
    main()
