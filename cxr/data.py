"""Reading the cleaned shards back, per split, and feeding them to Keras in batches (keras.utils.PyDataset)."""
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
    """Light, anatomy-preserving augmentation (params train.augment) as one Keras layer, augment.RandomAffine
    (identity outside training), or None when every setting is off."""
    from .augment import RandomAffine

    if not (cfg["rotation"] or cfg["translation"] or cfg["zoom"] or cfg["flip"]):
        return None
    return RandomAffine(cfg["rotation"], cfg["translation"], cfg["zoom"], bool(cfg["flip"]), seed=seed, name="augment")


def batches(images, labels: np.ndarray | None = None, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0,
            sample_weights: np.ndarray | None = None):
    """A keras.utils.PyDataset (any Keras backend, no TensorFlow needed) of float32 raw pixels (B, S, S, 1), with
    `labels` (and `sample_weights`) where given: read from `images` (uint8 (N, S, S), an array or a split's rows)
    one batch at a time, so only the batch is converted to float. In order, or with `shuffle` in a new order
    every epoch drawn from (seed, epoch), so a run is reproducible. Augmentation is not done here: it is part of
    the model being trained (see training.augmented), where it runs on the accelerator."""
    import keras

    n = len(images)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.epoch = 0
            self.order = np.random.default_rng([seed, 0]).permutation(n) if shuffle else None

        def __len__(self):
            return -(-n // batch_size)

        def on_epoch_end(self):
            self.epoch += 1
            if shuffle:
                self.order = np.random.default_rng([seed, self.epoch]).permutation(n)

        def __getitem__(self, i):
            idx = slice(i * batch_size, min(n, (i + 1) * batch_size))
            if shuffle:  # sorted within the batch: neighbouring rows are read together
                idx = np.sort(self.order[idx])
            x = np.asarray(images[idx], dtype=np.float32)[..., None]
            if labels is None:
                return (x,)
            return (x, labels[idx]) if sample_weights is None else (x, labels[idx], sample_weights[idx])

    return Batches()
