"""download: the dataset named by `dataset` in params.yaml into data/raw/, with a record of its source.

Offline: CXR_DATA_DIR=<folder holding <dataset>/ or <dataset>.zip>. `demo` is generated, never downloaded.
"""
import logging
import time

from cxr import atomic, params, paths
from cxr.download import fetch
from cxr.errors import cli

log = logging.getLogger("download")


@cli
def main() -> None:
    t0 = time.perf_counter()
    p = params.load()
    ds = params.dataset(p)
    record = fetch(ds["name"], ds, paths.RAW)
    atomic.write_json(paths.DOWNLOAD_RECORD, {"dataset": ds["name"], **record})
    log.info("%s: %d files (%.1f MB) from %s in %.1fs", ds["name"], record["files"], record["bytes"] / 1e6, record["source"], time.perf_counter() - t0)


if __name__ == "__main__":
    main()
