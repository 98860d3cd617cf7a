"""clean: decode, grayscale, resize and deduplicate data/raw/ into a few shards in data/clean/.

Every dropped file is listed with its reason in reports/clean_dropped.csv; counts in reports/clean.json.
"""
import logging
import time

from cxr import atomic, clean, params, paths, sources
from cxr.errors import UserError, cli

log = logging.getLogger("clean")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load(sources=sources.SOURCES)  # each datasets.<name> block checked by its source
    atomic.remove_stale(paths.CLEAN, paths.CLEAN_DROPPED, paths.CLEAN_REPORT)  # left by a killed run
    ds = params.dataset(p)
    records, source_drops = sources.load(ds["name"], paths.RAW, ds)
    log.info("%s: %d labelled images, %d files set aside by the layout", ds["name"], len(records), len(source_drops))
    with atomic.atomic_dir(paths.CLEAN) as tmp:
        summary, dropped = clean.run(paths.RAW, tmp, records, source_drops, ds["classes"], p["clean"])
        empty = [c for c, n in summary["kept_by_class"].items() if n == 0]
        if empty:
            raise UserError(f"no usable images of class {empty[0]!r} in {paths.RAW} (see the drops in {paths.CLEAN_DROPPED})")
    atomic.write_csv(paths.CLEAN_DROPPED, dropped)
    atomic.write_json(paths.CLEAN_REPORT, summary)
    log.info("kept %d of %d (%s); dropped %s; %.1fs", summary["kept"], summary["seen"], summary["kept_by_class"],
             summary["dropped_by_reason"], time.perf_counter() - t0)


if __name__ == "__main__":
    main()
