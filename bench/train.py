"""Training speed, two ways. Prints figures; changes nothing in the workspace.

Pipeline (default): the stages' own functions on the data the pipeline has prepared (data/clean + data/split.csv
for params.yaml's dataset): the baseline (train) stage with and without the feature cache, and fine-tuning with
the activation cache at `finetune.unfreeze_from` (views > 0) and without it (views = 0: every epoch runs the whole
backbone on freshly augmented images), as seconds per epoch, training images/s, the one-off caching pass, and
end-to-end time (dvclive logs go to a temporary folder).

    python bench/train.py [--epochs 3] [--set key=value ...]

Throughput (--throughput): a GPU box's figures on synthetic images, no prepared data, no weights download, no
TensorFlow needed under another backend. For each batch size, images/s of the frozen-feature pass (the baseline's
one-off pass), of fine-tuning (a fit step of the full model from `--unfreeze` up, with the in-model augmentation,
fed by data.batches from host memory as training is), with and without mixed precision, and of prediction
(inference.forward), each timed after a warm-up that compiles it.

    python bench/train.py --throughput --backend jax [--batch-sizes 64,128,256] [--image-size 224] [--steps 30]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _backend_first() -> None:
    """KERAS_BACKEND from --backend, before anything imports Keras (it reads the variable once)."""
    if "--backend" in sys.argv:
        os.environ["KERAS_BACKEND"] = sys.argv[sys.argv.index("--backend") + 1]


_backend_first()
import numpy as np  # noqa: E402
import yaml  # noqa: E402

from cxr import quiet  # noqa: E402

quiet.tensorflow()  # before cxr.training loads TensorFlow
from cxr import backend, data, inference, models, params, training  # noqa: E402


def throughput(args) -> None:
    """The --throughput figures (see the module's docstring)."""
    import keras

    size, steps = args.image_size, args.steps
    print(f"backend {backend.name()} (keras {keras.__version__}); devices: "
          f"{', '.join(str(d) for d in keras.distribution.list_devices()) if backend.name() == 'jax' else backend.Devices().kind}; "
          f"MobileNetV2 alpha 1.0 at {size} px, 3 classes, untrained weights; {steps} timed steps after a warm-up")
    rng = np.random.default_rng(0)
    for bs in args.batch_sizes:
        images = rng.integers(0, 256, (bs * steps, size, size), dtype=np.uint8)
        onehot = np.eye(3, dtype=np.float32)[rng.integers(0, 3, bs * steps)]
        row = []
        for mixed in (False, True):
            keras.mixed_precision.set_global_policy("mixed_float16" if mixed else "float32")
            model = models.build("mobilenetv2", 3, size, "none", 1.0, 0.2)
            tag = "mixed" if mixed else "fp32"
            features = backend.inference_function(models.feature_extractor(model))
            fwd = inference.forward(model)
            for name, fn in (("features", features), ("predict", fwd)):
                x = images[:bs] if name == "predict" else images[:bs].astype(np.float32)[..., None]
                fn(x)  # compile
                t0 = time.perf_counter()
                for i in range(steps):
                    chunk = images[i * bs : (i + 1) * bs]
                    fn(chunk if name == "predict" else chunk.astype(np.float32)[..., None])
                row.append(f"{name} {tag} {bs * steps / (time.perf_counter() - t0):8.0f}")
            models.unfreeze_from(model, args.unfreeze, freeze_batchnorm=True)
            trained = training.augmented(model, data.augmenter({"rotation": 0.03, "translation": 0.05, "zoom": 0.1, "flip": False}, 0))
            trained.compile(optimizer=keras.optimizers.AdamW(1e-4), loss="categorical_crossentropy",
                            **backend.compile_kwargs({"xla": args.xla}))
            feed = data.batches(images, onehot, bs, shuffle=True)
            trained.fit(data.batches(images[:bs], onehot[:bs], bs), epochs=1, verbose=0)  # compile
            t0 = time.perf_counter()
            trained.fit(feed, epochs=1, verbose=0)
            row.append(f"fine-tune {tag} {bs * steps / (time.perf_counter() - t0):8.0f}")
        print(f"batch {bs:4d}, images/s: " + "; ".join(row), flush=True)
    keras.mixed_precision.set_global_policy("float32")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="params override, e.g. model.weights=none")
    ap.add_argument("--backend", choices=backend.BACKENDS, help="the Keras backend (default: KERAS_BACKEND, else tensorflow)")
    ap.add_argument("--throughput", action="store_true", help="images/s on synthetic images (see above)")
    ap.add_argument("--batch-sizes", type=lambda v: [int(b) for b in v.split(",")], default=[64, 128, 256])
    ap.add_argument("--image-size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=30, help="timed batches per figure (--throughput)")
    ap.add_argument("--unfreeze", default="block_13", help="first block fine-tuning trains (--throughput); all: everything")
    ap.add_argument("--xla", action="store_true", help="XLA for the TensorFlow fit step (--throughput; JAX always compiles)")
    args = ap.parse_args()
    if args.throughput:
        return throughput(args)
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
