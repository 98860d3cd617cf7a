"""Benchmark training on the data the pipeline has prepared (data/clean + data/split.csv for params.yaml's
dataset): the baseline (train) stage with and without the feature cache, and fine-tuning with the activation
cache at `finetune.unfreeze_from` (views > 0) and without it (views = 0: every epoch runs the whole backbone on
freshly augmented images), as seconds per epoch, training images/s, the one-off caching pass, and end-to-end time.

    python bench/train.py [--epochs 3] [--set key=value ...]

Prints figures; changes nothing in the workspace (dvclive logs go to a temporary folder).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import yaml

from cxr import quiet

quiet.tensorflow()  # before cxr.training loads TensorFlow
from cxr import data, params, training  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override, e.g. model.weights=none")
    args = ap.parse_args()
    p = params.load()
    for item in args.set:
        key, value = item.split("=", 1)
        node = p
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = yaml.safe_load(value)
    params.validate(p)
    ds = params.dataset(p)
    t0 = time.perf_counter()
    splits = data.load_splits(ds["classes"], only=("train", "val"), masks=False)
    load_s = time.perf_counter() - t0
    n = len(splits["train"])
    print(f"dataset {ds['name']}: {n} train / {len(splits['val'])} val images at {splits['train'].images.shape[1]} px; "
          f"arch {p['model']['arch']} (weights {p['model']['weights']}); batch {p['train']['batch_size']}; loading {load_s:.1f}s")
    p["train"].update(epochs=args.epochs, patience=args.epochs + 1)
    for cache in (True, False):
        p["train"]["feature_cache"] = cache
        with tempfile.TemporaryDirectory() as tmp:
            from dvclive import Live

            live = Live(dir=tmp, dvcyaml=False, save_dvc_exp=False, report=None)
            t0 = time.perf_counter()
            model, summary = training.baseline(p, ds["classes"], splits, live)
            total = time.perf_counter() - t0
        per_epoch = summary["seconds_per_epoch"]
        extra = f"; one-off feature pass {summary['feature_cache_seconds']:.1f}s" if cache else " (augmentation on)"
        print(f"train, feature_cache={str(cache).lower():5}: {per_epoch:7.2f} s/epoch = {n / per_epoch:8.1f} train images/s{extra}; "
              f"{args.epochs} epochs end to end {total:.1f}s")
        if cache:
            baseline_model = model
    p["finetune"].update(epochs=args.epochs, patience=args.epochs + 1)
    views = p["finetune"]["views"] or 3
    with tempfile.TemporaryDirectory() as tmp:
        from dvclive import Live

        path = Path(tmp) / "baseline.keras"
        training.save(baseline_model, path, training.model_info(p, ds["classes"], ds["positive"]))
        for v in (views, 0):
            p["finetune"]["views"] = v
            live = Live(dir=f"{tmp}/live{v}", dvcyaml=False, save_dvc_exp=False, report=None)
            t0 = time.perf_counter()
            _, summary = training.finetune(p, ds["classes"], splits, path, live)
            total = time.perf_counter() - t0
            per_epoch = summary["seconds_per_epoch"]
            how = (f"cache of {v + 1} views at {p['finetune']['unfreeze_from']}: one-off pass {summary['cache_seconds']:.1f}s = "
                   f"{(v + 1) * n / summary['cache_seconds']:.1f} images/s" if v else "no cache, augmentation on the fly")
            print(f"finetune from {p['finetune']['unfreeze_from']}, views={v}: {per_epoch:7.2f} s/epoch = {n / per_epoch:8.1f} train images/s "
                  f"({how}); {args.epochs} epochs end to end {total:.1f}s")

if __name__ == "__main__":
    main()
