"""split: stratified train/val/test by patient and near-duplicate group -> data/split.csv."""
import logging
import time

import pandas as pd

from cxr import atomic, params, paths
from cxr import split as splitting
from cxr.errors import UserError, cli

log = logging.getLogger("split")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    cfg, classes = p["split"], params.dataset(p)["classes"]
    if not paths.CLEAN_MANIFEST.exists():
        raise UserError(f"{paths.CLEAN_MANIFEST} not found: run `dvc repro clean` first")
    manifest = pd.read_csv(paths.CLEAN_MANIFEST, dtype={"group": str, "phash": str})
    table = splitting.make_split(manifest, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"], cfg["group_distance"])
    leaks = splitting.leakage(table, manifest, cfg["group_distance"])
    if leaks["total"]:
        raise AssertionError(f"split leaks across train/val/test: {leaks}")
    atomic.write_csv(paths.SPLIT, table)
    atomic.write_json(paths.SPLIT_METRICS, {**splitting.summary(table, classes), "leakage": leaks})
    sizes = {s: v["total"] for s, v in splitting.summary(table, classes)["sizes"].items()}
    log.info("split %s in %d groups; leakage 0; %.1fs", sizes, table["group"].nunique(), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
