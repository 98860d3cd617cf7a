"""split: stratified train/val/test by patient and near-duplicate group -> data/split.csv."""
import logging
import time

from cxr import atomic, params, paths
from cxr import split as splitting
from cxr.errors import UserError, cli

log = logging.getLogger("split")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    atomic.remove_stale(paths.SPLIT, paths.SPLIT_REPORT)  # left by a killed run
    cfg, classes = p["split"], params.dataset(p)["classes"]
    if not paths.CLEAN_MANIFEST.exists():
        raise UserError(f"{paths.CLEAN_MANIFEST} not found: run `dvc repro clean` first")
    manifest = splitting.read_manifest(paths.CLEAN_MANIFEST)
    splitting.check_expected(manifest["label"], splitting.fractions(cfg["val_fraction"], cfg["test_fraction"]), cfg.get("min_per_class", 1))
    table = splitting.make_split(manifest, cfg["val_fraction"], cfg["test_fraction"], cfg["seed"], cfg["group_distance"])
    splitting.check_result(table, manifest, classes, cfg.get("min_per_class", 1))
    leaks = splitting.leakage(table, manifest, cfg["group_distance"])
    if leaks["total"]:
        raise AssertionError(f"split leaks across train/val/test: {leaks}")
    atomic.write_csv(paths.SPLIT, table)
    atomic.write_json(paths.SPLIT_REPORT, {**splitting.summary(table, classes), "leakage": leaks})
    sizes = {s: v["total"] for s, v in splitting.summary(table, classes)["sizes"].items()}
    log.info("split %s in %d groups; leakage 0; %.1fs", sizes, table["group"].nunique(), time.perf_counter() - t0)


if __name__ == "__main__":
    main()
