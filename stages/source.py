"""source: where the dataset comes from (Kaggle handle, generated demo, or the local copy under CXR_DATA_DIR with
a fingerprint of its files) -> data/source.json. It runs on every `dvc repro` (always_changed: DVC cannot see an
environment variable or files outside the project); `download` depends on the record, so it reruns only when the
origin or the local copy changed. Likewise for the external validation sets (params `external.sets`):
data/external.json records where each one's data is, and `external` depends on it; and for the files params
`model` names (the model `model.init` starts from, a local `model.weights` file): data/init.json fingerprints
them, and `train` depends on that."""
import logging

from cxr import atomic, modelinfo, params, paths, sources
from cxr.download import external_origin, origin
from cxr.errors import cli

log = logging.getLogger("source")


@cli
def main() -> None:
    p = params.load(sources=sources.SOURCES)  # each datasets.<name> block checked by its source
    ds = params.dataset(p)
    record = origin(ds["name"], ds)
    atomic.write_json(paths.SOURCE, record)
    atomic.write_json(paths.INIT, modelinfo.fingerprint(p["model"]["init"], p["model"]["weights"]))
    atomic.write_json(paths.EXTERNAL_SOURCE, {e["name"]: external_origin(e) for e in p["external"]["sets"]})
    log.info("%s: %s%s", ds["name"], record["origin"], f" {record['path']} ({record['files']} files)" if "path" in record else "")


if __name__ == "__main__":
    main()
