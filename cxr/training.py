"""Training: the frozen-backbone baseline (optionally on cached features) and fine-tuning."""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import numpy as np

from . import atomic, data, models, paths

log = logging.getLogger("training")


def set_determinism(seed: int, ops: bool = True) -> None:
    """Seeds everything; with `ops`, deterministic TensorFlow ops too (same params and data -> same
    weights). Keras runs XLA only without op determinism, so runtime.xla trades it away."""
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(seed)
    if ops:
        tf.config.experimental.enable_op_determinism()
    else:
        from tensorflow.python.framework import config  # the public API can only switch it on

        config.disable_op_determinism()
        log.info("XLA on: deterministic ops off, results may vary slightly between runs")


def configure_runtime(runtime: dict):
    """Mixed precision and the distribution strategy; returns the strategy."""
    import keras
    import tensorflow as tf

    keras.mixed_precision.set_global_policy("mixed_float16" if runtime["mixed_precision"] else "float32")
    gpus = tf.config.list_logical_devices("GPU")
    if runtime["distribute"] == "auto" and len(gpus) > 1:
        strategy = tf.distribute.MirroredStrategy()
    else:
        strategy = tf.distribute.get_strategy()
    log.info("devices: %d GPU(s); strategy %s; replicas %d; mixed precision %s; XLA %s", len(gpus),
             type(strategy).__name__, strategy.num_replicas_in_sync, runtime["mixed_precision"], runtime["xla"])
    return strategy


def class_weights(labels: np.ndarray, n_classes: int, mode: str) -> dict[int, float] | None:
    """sklearn's 'balanced' weights (n / (k * count)), or None."""
    if mode == "none":
        return None
    from sklearn.utils.class_weight import compute_class_weight

    present = np.unique(labels)
    w = compute_class_weight("balanced", classes=present, y=labels)
    return {int(c): float(x) for c, x in zip(present, w)} | {c: 1.0 for c in range(n_classes) if c not in present}


def live(stage: str):
    from dvclive import Live

    return Live(dir=str(paths.METRICS / stage), dvcyaml=False, save_dvc_exp=False, report=None)


def fit(model, train_ds, val_ds, *, epochs: int, patience: int, lr: float, weights, logger, xla: bool, keep_start: bool = False) -> dict:
    """Adam, sparse cross-entropy, early stopping on val loss with the best weights restored, dvclive per epoch.
    With keep_start, the starting weights are kept when no epoch beats their validation loss."""
    import keras
    from dvclive.keras import DVCLiveCallback

    model.compile(optimizer=keras.optimizers.Adam(lr), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"], jit_compile=xla)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=patience, restore_best_weights=True)
    start_loss, start_weights = None, None
    if keep_start:
        start_loss = float(model.evaluate(val_ds, verbose=0)[0])
        start_weights = model.get_weights()
    t0 = time.perf_counter()
    hist = model.fit(train_ds, validation_data=val_ds, epochs=epochs, class_weight=weights, shuffle=False,
                     callbacks=[stop, DVCLiveCallback(live=logger)], verbose=2)
    seconds = time.perf_counter() - t0
    val_loss = hist.history["val_loss"]
    best = int(np.argmin(val_loss))
    out = {"epochs_run": len(val_loss), "best_epoch": best + 1, "val_loss": float(val_loss[best]),
           "val_accuracy": float(hist.history["val_accuracy"][best]), "seconds_per_epoch": seconds / len(val_loss)}
    if start_loss is not None and start_loss <= out["val_loss"]:
        log.warning("no epoch beat the starting validation loss %.4f: keeping the starting weights", start_loss)
        model.set_weights(start_weights)
        out.update(best_epoch=0, val_loss=start_loss, val_accuracy=float(model.evaluate(val_ds, verbose=0)[1]))
    return out


def baseline(p: dict, classes: list[str], splits: dict[str, data.Subset], logger) -> tuple[object, dict]:
    """Build the frozen-backbone model and train its head. With train.feature_cache the backbone runs
    once over train and val (no augmentation), and the head trains on the cached pooled features."""
    cfg, runtime = p["train"], p["runtime"]
    set_determinism(cfg["seed"], ops=not runtime["xla"])
    strategy = configure_runtime(runtime)
    bs = cfg["batch_size"] * strategy.num_replicas_in_sync
    size = splits["train"].images.shape[1]
    with strategy.scope():
        model = models.build(p["model"]["arch"], len(classes), size, p["model"]["weights"], p["model"]["alpha"], p["model"]["dropout"])
    weights = class_weights(splits["train"].labels, len(classes), cfg["class_weight"])
    tr, va = splits["train"], splits["val"]
    if cfg["feature_cache"]:
        t0 = time.perf_counter()
        extractor = models.feature_extractor(model)
        feats = {k: extractor.predict(data.dataset(s.images, None, bs, cache=False), verbose=0) for k, s in (("train", tr), ("val", va))}
        cache_s = time.perf_counter() - t0
        log.info("cached backbone features for %d images in %.1fs", len(tr) + len(va), cache_s)
        import tensorflow as tf

        def feat_ds(f, y, shuffle):
            ds = tf.data.Dataset.from_tensor_slices((f, y))
            ds = ds.shuffle(len(f), seed=cfg["seed"]) if shuffle else ds
            return ds.batch(bs).prefetch(tf.data.AUTOTUNE)

        with strategy.scope():
            head = models.head(model)
        summary = fit(head, feat_ds(feats["train"], tr.labels, True), feat_ds(feats["val"], va.labels, False),
                      epochs=cfg["epochs"], patience=cfg["patience"], lr=cfg["learning_rate"], weights=weights,
                      logger=logger, xla=runtime["xla"])
        summary["feature_cache_seconds"] = cache_s
    else:
        aug = data.augmenter(cfg["augment"], cfg["seed"])
        summary = fit(model, data.dataset(tr.images, tr.labels, bs, shuffle=True, seed=cfg["seed"], augment=aug),
                      data.dataset(va.images, va.labels, bs), epochs=cfg["epochs"], patience=cfg["patience"],
                      lr=cfg["learning_rate"], weights=weights, logger=logger, xla=runtime["xla"])
    return model, summary


def finetune(p: dict, classes: list[str], splits: dict[str, data.Subset], base_model_path: Path, logger) -> tuple[object, dict]:
    """Unfreeze the top `finetune.unfreeze` backbone layers (BatchNorm stays frozen) and train on,
    with a lower learning rate, augmentation and its own early stopping."""
    cfg, runtime = p["finetune"], p["runtime"]
    set_determinism(cfg["seed"], ops=not runtime["xla"])
    strategy = configure_runtime(runtime)
    bs = cfg["batch_size"] * strategy.num_replicas_in_sync
    with strategy.scope():
        model = models.load(base_model_path)
        n = models.unfreeze_top(model, cfg["unfreeze"], freeze_batchnorm=p["model"]["weights"] != "none")
    log.info("fine-tuning %d backbone layers with weights", n)
    tr, va = splits["train"], splits["val"]
    aug = data.augmenter(p["train"]["augment"], cfg["seed"])
    weights = class_weights(tr.labels, len(classes), p["train"]["class_weight"])
    summary = fit(model, data.dataset(tr.images, tr.labels, bs, shuffle=True, seed=cfg["seed"], augment=aug),
                  data.dataset(va.images, va.labels, bs), epochs=cfg["epochs"], patience=cfg["patience"],
                  lr=cfg["learning_rate"], weights=weights, logger=logger, xla=runtime["xla"], keep_start=True)
    summary["trainable_layers"] = n
    return model, summary


def model_info(p: dict, classes: list[str], positive: str) -> dict:
    """What prediction needs to feed a model the same pixels and read its outputs."""
    return {"classes": classes, "positive": positive, "image_size": p["clean"]["image_size"],
            "resize": p["clean"]["resize"], "arch": p["model"]["arch"], "dataset": p["dataset"]}


def save(model, path: Path, info: dict) -> None:
    """The .keras file and its `.info.json` sidecar, each written atomically."""
    with atomic.atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    atomic.write_json(paths.sidecar(path, "info"), info)


def read_info(model_path: Path) -> dict:
    from .errors import UserError

    p = paths.sidecar(model_path, "info")
    if not p.is_file():
        raise UserError(f"{p} not found: the model's class names and image size are stored there by train/finetune")
    return json.loads(p.read_text())


def run_stage(stage: str) -> None:
    """The train or finetune stage: params -> model file + sidecar, dvclive curves and summary."""
    from . import params

    t0 = time.perf_counter()
    p = params.load()
    ds = params.dataset(p)
    splits = data.load_splits(ds["classes"])
    logger = live(stage)
    if stage == "train":
        model, summary = baseline(p, ds["classes"], splits, logger)
        out = paths.BASELINE
    else:
        model, summary = finetune(p, ds["classes"], splits, paths.BASELINE, logger)
        out = paths.FINETUNED
    save(model, out, model_info(p, ds["classes"], ds["positive"]))
    timing = {k: round(summary.pop(k), 2) for k in list(summary) if "seconds" in k}
    logger.summary["epochs_run"] = summary.pop("epochs_run")
    logger.summary["best"] = {"epoch": summary.pop("best_epoch"), **summary}
    logger.make_summary()
    log.info("%s: %s; %s; stage %.1fs", stage, summary, timing, time.perf_counter() - t0)
