"""Reading the cleaned shards back, per split, and feeding them to Keras through tf.data."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from . import paths
from .errors import UserError


@dataclass
class Subset:
    files: list[str]
    images: np.ndarray          # uint8 (N, S, S), raw 0..255 grayscale
    labels: np.ndarray          # int (N,), index into the class list
    masks: np.ndarray | None    # bool (N, S, S) lesion masks where the source has them
    lungs: np.ndarray | None = None  # bool (N, S, S) lung-field masks where the source has them (all False: none)

    def __len__(self) -> int:
        return len(self.files)


SPLITS = ("train", "val", "test")


def load_splits(classes: list[str], clean_dir: Path = paths.CLEAN, split_csv: Path = paths.SPLIT, *,
                only: tuple[str, ...] = SPLITS, masks: bool = True) -> dict[str, Subset]:
    """{"train": Subset, "val": ..., "test": ...} from data/clean shards and data/split.csv: the splits named in
    `only`, with their lesion and lung masks unless `masks` is False. Only what is asked for is read into memory
    (the shards are memory-mapped), so a stage that scores the test split never holds the training images."""
    for p in (clean_dir / "manifest.csv", split_csv):
        if not Path(p).exists():
            raise UserError(f"{p} not found: run `dvc repro split` first")
    manifest = pd.read_csv(clean_dir / "manifest.csv", dtype={"group": str})
    split = pd.read_csv(split_csv, dtype={"group": str})
    table = split[["file", "split"]].merge(manifest, on="file", how="left", validate="one_to_one")
    if table["shard"].isna().any():
        raise UserError(f"{split_csv} names files that {clean_dir} does not hold: rerun `dvc repro split`")
    unknown = sorted(set(table["label"]) - set(classes))
    if unknown:
        raise UserError(f"{split_csv} has label {unknown[0]!r}, not among the dataset's classes {classes}")
    shards = {int(s): np.load(clean_dir / f"images-{int(s):05d}.npy", mmap_mode="r") for s in table["shard"].unique()}
    # masks-*.npy (lesions) and lungs-*.npy exist where any image has one (manifests of older runs lack has_lungs)
    extra = {kind: {s: np.load(clean_dir / f"{kind}-{s:05d}.npy", mmap_mode="r") for s in shards}
             for kind, col in (("masks", "has_mask"), ("lungs", "has_lungs")) if masks and col in table and table[col].any()}
    out = {}
    for name in only:
        part = table[table["split"] == name]
        pos = list(zip(part["shard"].astype(int), part["index"].astype(int)))
        imgs = np.stack([shards[s][i] for s, i in pos]) if pos else np.zeros((0, 1, 1), np.uint8)
        masks, lungs = (np.stack([extra[kind][s][i] for s, i in pos]) if (pos and kind in extra) else None
                        for kind in ("masks", "lungs"))
        labels = np.array([classes.index(c) for c in part["label"]], dtype=np.int32)
        out[name] = Subset(part["file"].tolist(), imgs, labels, masks, lungs)
    return out


def augmenter(cfg: dict, seed: int):
    """Light, anatomy-preserving augmentation as Keras layers (identity outside training)."""
    import keras

    layers = []
    if cfg["rotation"]:
        layers.append(keras.layers.RandomRotation(cfg["rotation"], fill_mode="constant", seed=seed))
    if cfg["translation"]:
        layers.append(keras.layers.RandomTranslation(cfg["translation"], cfg["translation"], fill_mode="constant", seed=seed + 1))
    if cfg["zoom"]:
        layers.append(keras.layers.RandomZoom(cfg["zoom"], fill_mode="constant", seed=seed + 2))
    if cfg["flip"]:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed + 3))
    return keras.Sequential(layers, name="augment") if layers else None


def batches(images: np.ndarray, labels: np.ndarray | None, batch_size: int, *, shuffle: bool = False, seed: int = 0, augment=None, cache: bool = True):
    """A tf.data pipeline of (float32 raw pixels (B, S, S, 1), labels): shuffled, batched, augmented in
    parallel, prefetched. The uint8 arrays stay in memory; only batches are converted to float."""
    import tensorflow as tf

    x = images[..., None]
    ds = tf.data.Dataset.from_tensor_slices((x, labels) if labels is not None else x)
    if cache:
        ds = ds.cache()
    if shuffle:
        ds = ds.shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def to_float(x, *y):
        x = tf.cast(x, tf.float32)
        if augment is not None:
            x = augment(x, training=True)
        return (x, *y) if y else x

    return ds.map(to_float, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
