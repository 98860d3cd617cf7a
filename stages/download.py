"""download: the dataset named by `dataset` in params.yaml into data/raw/, with a record of its source.

Offline: CXR_DATA_DIR=<folder holding <dataset>/ or <dataset>.zip>. `demo` is generated, never downloaded.
Files of a local copy that are not copied (links leaving it, special files) are listed in
reports/download_dropped.csv and counted in reports/download.json.
"""
import logging
import time

import pandas as pd

from cxr import atomic, params, paths, sources
from cxr.download import DROPPED_REPORT, fetch
from cxr.errors import cli

log = logging.getLogger("download")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load(sources=sources.SOURCES)  # each datasets.<name> block checked by its source
    atomic.remove_stale(paths.RAW, paths.DOWNLOAD_RECORD, DROPPED_REPORT)  # left by a killed run
    ds = params.dataset(p)
    record = fetch(ds["name"], ds, paths.RAW, p.get("download"))
    drops = record.pop("drops")
    atomic.write_csv(DROPPED_REPORT, pd.DataFrame([vars(d) for d in drops], columns=["file", "reason", "detail"]))
    atomic.write_json(paths.DOWNLOAD_RECORD, {"dataset": ds["name"], **record})
    log.info("%s: %d files (%.1f MB) from %s in %.1fs%s", ds["name"], record["files"], record["bytes"] / 1e6, record["source"],
             time.perf_counter() - t0, f"; {len(drops)} not copied, see {DROPPED_REPORT}" if drops else "")


if __name__ == "__main__":
    main()
