"""Every path the pipeline reads or writes, named once. dvc.yaml uses the same strings."""
from pathlib import Path

PARAMS = Path("params.yaml")

SOURCE = Path("data/source.json")    # source: where the dataset comes from, fingerprinted
INIT = Path("data/init.json")        # source: the model `model.init` starts from, fingerprinted
RAW = Path("data/raw")                 # download: the dataset as published
CLEAN = Path("data/clean")             # clean: image shards + manifest.csv
CLEAN_MANIFEST = CLEAN / "manifest.csv"
SPLIT = Path("data/split.csv")         # split: file, label, group, split
# Per-pixel masks stored beside the image shards: Decoded field -> (shard file prefix, manifest column)
MASK_SHARDS = {"mask": ("masks", "has_mask"), "lungs": ("lungs", "has_lungs")}

MODELS = Path("models")
BASELINE = MODELS / "baseline.keras"
FINETUNED = MODELS / "finetuned.keras"

METRICS = Path("metrics")
PLOTS = Path("plots")
REPORTS = Path("reports")

# metrics/ holds only the figures a reviewer compares (`dvc metrics diff`, `dvc exp show`); counts, records
# and training logs are reports.
DOWNLOAD_RECORD = REPORTS / "download.json"
CLEAN_REPORT = REPORTS / "clean.json"
CLEAN_DROPPED = REPORTS / "clean_dropped.csv"
SPLIT_REPORT = REPORTS / "split.json"
TEST_PREDICTIONS = REPORTS / "test_predictions.csv"   # evaluate: the fine-tuned model on every test image
EXTERNAL_SOURCE = Path("data/external.json")     # source: where each external set comes from, fingerprinted
EXTERNAL_METRICS = METRICS / "external"          # external: <set>.json and probes.json
EXTERNAL_PLOTS = PLOTS / "external"              # external: <set>.json, ROC points
EXTERNAL_REPORTS = REPORTS / "external"          # external: <set>.json and probes.json, with counts and CIs


def sidecar(model_path: Path, kind: str) -> Path:
    """Metadata stored beside a model: `models/finetuned.keras` -> `models/finetuned.<kind>.json`."""
    model_path = Path(model_path)
    return model_path.with_name(f"{model_path.stem}.{kind}.json")
