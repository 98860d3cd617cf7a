"""Reading the cleaned shards back, per split, and feeding them to Keras in batches (keras.utils.PyDataset)."""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from numpy.lib import format as npy

from . import paths
from .backend import to_numpy
from .errors import UserError


def _npy_header(path: Path) -> tuple[int, tuple[int, ...], np.dtype]:
    """(data offset, shape, dtype) of a C-order .npy file, from its header alone."""
    with open(path, "rb") as f:
        version = npy.read_magic(f)
        read = {(1, 0): npy.read_array_header_1_0, (2, 0): npy.read_array_header_2_0}.get(version)
        if read is None:
            raise ValueError(f"{path}: .npy format version {version[0]}.{version[1]} is not supported")
        shape, fortran_order, dtype = read(f)
        if (fortran_order and len(shape) > 1) or dtype.hasobject or not shape:
            raise ValueError(f"{path}: not a C-order array of rows of plain values")
        return f.tell(), shape, dtype


class Rows:
    """The rows (shard, index) of .npy shard files, as one array (N, *row) read on demand.

    Indexed like the stacked ndarray (an int, a slice, an int or bool array, each optionally followed by further
    indices; `...` or np.asarray for everything); each index reads only the rows it names, with plain file reads
    (a memory map would keep every page it touched resident) into a fresh ndarray, consecutive rows of a shard
    in one read. Holds no pixels and no open files, so a pass over a split batch by batch stays flat in memory."""

    BATCH = 64   # rows per read when iterating or reducing over all rows

    def __init__(self, files: Sequence[Path], shard, index):
        self.files = tuple(Path(f) for f in files)
        self.shard = np.asarray(shard, dtype=np.intp).reshape(-1)   # row -> position in files
        self.index = np.asarray(index, dtype=np.intp).reshape(-1)   # row -> row within that file
        if len(self.shard) != len(self.index):
            raise ValueError(f"{len(self.shard)} shard numbers for {len(self.index)} row indices")
        headers = [_npy_header(f) for f in self.files]
        if not headers:
            raise ValueError("Rows needs at least one shard file")
        self._offsets = [h[0] for h in headers]
        _, (_, *row), self.dtype = headers[0]
        self._row = tuple(row)
        if len(self.shard) and (self.shard.min() < 0 or self.shard.max() >= len(self.files)):
            raise ValueError(f"shard positions must be in 0..{len(self.files) - 1}")
        for k, (f, (_, (n, *r), dtype)) in enumerate(zip(self.files, headers)):
            if tuple(r) != self._row or dtype != self.dtype:
                raise ValueError(f"{f} holds rows {tuple(r)} {dtype}, {self.files[0]} rows {self._row} {self.dtype}")
            outside = self.index[(self.shard == k) & ((self.index < 0) | (self.index >= n))]
            if len(outside):
                raise ValueError(f"{f} holds {n} rows, row {int(outside[0])} is asked for")

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.index), *self._row)

    @property
    def ndim(self) -> int:
        return 1 + len(self._row)

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    def __len__(self) -> int:
        return len(self.index)

    def __repr__(self) -> str:
        return f"Rows(shape={self.shape}, dtype={self.dtype}, shards={len(self.files)})"

    def read(self, rows) -> np.ndarray:
        """The rows at positions `rows` (ints in 0..N-1, any order), stacked into a new array."""
        rows = np.asarray(rows, dtype=np.intp).reshape(-1)
        out = np.empty((len(rows), *self._row), self.dtype)
        if not len(rows) or not out.nbytes:
            return out
        step = out.nbytes // len(rows)
        buf = memoryview(out.reshape(-1).view(np.uint8))
        shard, index = self.shard[rows], self.index[rows]
        cut = np.flatnonzero((np.diff(shard) != 0) | (np.diff(index) != 1)) + 1
        starts, ends = np.r_[0, cut], np.r_[cut, len(rows)]
        for s in np.unique(shard[starts]):   # one file open at a time
            with open(self.files[s], "rb", buffering=0) as f:
                for a, b in zip(starts[shard[starts] == s], ends[shard[starts] == s]):
                    _read_into(f, buf[a * step : b * step], self._offsets[s] + int(index[a]) * step)
        return out

    def __getitem__(self, key):
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) and key else (key, None)
        n = len(self)
        if isinstance(first, slice):
            block, first = self.read(np.arange(n)[first]), slice(None)
        elif isinstance(first, (int, np.integer)) and not isinstance(first, (bool, np.bool_)):
            if not -n <= first < n:
                raise IndexError(f"index {first} is out of bounds for axis 0 with size {n}")
            block, first = self.read([first % n]), 0
        elif first is Ellipsis or first is None or isinstance(first, tuple):
            return self.read(np.arange(n))[key]
        else:
            arr = np.asarray(first)
            if arr.dtype == bool and arr.ndim == 1:
                if len(arr) != n:
                    raise IndexError(f"boolean index did not match indexed array along axis 0; size of axis is {n} "
                                     f"but size of corresponding boolean axis is {len(arr)}")
                arr = np.flatnonzero(arr)
            elif arr.size == 0 and arr.dtype != bool:
                arr = arr.astype(np.intp)
            if arr.dtype.kind in "bO":   # a bool array over more than rows, or objects: numpy decides, on everything
                return self.read(np.arange(n))[key]
            if arr.dtype.kind not in "iu":
                raise IndexError("arrays used as indices must be of integer (or boolean) type")
            if arr.size and (arr.min() < -n or arr.max() >= n):
                bad = arr.min() if arr.min() < -n else arr.max()
                raise IndexError(f"index {bad} is out of bounds for axis 0 with size {n}")
            wanted, first = np.unique(arr.reshape(-1) % max(n, 1), return_inverse=True)
            block, first = self.read(wanted), first.reshape(arr.shape)
        return block[first] if rest is None else block[(first, *rest)]

    def __array__(self, dtype=None, copy=None):
        if copy is False:
            raise ValueError("Rows are read from files: an array of them is always a new copy")
        out = self.read(np.arange(len(self)))
        return out if dtype is None else out.astype(dtype, copy=False)

    def __iter__(self):
        for start in range(0, len(self), self.BATCH):
            yield from self[start : start + self.BATCH]

    def any(self, axis=None):
        """ndarray.any, read BATCH rows at a time."""
        none = self.read([]).any(axis=axis)   # checks `axis` as numpy does; the answer when there are no rows
        parts = [self[a : a + self.BATCH].any(axis=axis) for a in range(0, len(self), self.BATCH)]
        if not parts:
            return none
        if axis is not None and 0 not in {a % self.ndim for a in np.atleast_1d(axis)}:
            return np.concatenate(parts)
        return np.logical_or.reduce(parts)


def _read_into(f, buf: memoryview, offset: int) -> None:
    """Fill buf from an unbuffered file at offset, however many reads it takes."""
    f.seek(offset)
    while len(buf):
        got = f.readinto(buf)
        if not got:
            raise ValueError(f"{f.name} ends before offset {offset + len(buf)}: a shard was cut short")
        buf = buf[got:]


@dataclass
class Subset:
    files: list[str]
    images: Rows | np.ndarray          # uint8 (N, S, S), raw 0..255 grayscale, read on demand (Rows)
    labels: np.ndarray                 # int (N,), index into the class list
    masks: Rows | np.ndarray | None    # bool (N, S, S) lesion masks where the source has them
    lungs: Rows | np.ndarray | None = None  # bool (N, S, S) lung-field masks where the source has them (all False: none)

    def __len__(self) -> int:
        return len(self.files)


SPLITS = ("train", "val", "test")


def load_splits(classes: list[str], clean_dir: Path = paths.CLEAN, split_csv: Path = paths.SPLIT, *,
                only: tuple[str, ...] = SPLITS, masks: bool = True) -> dict[str, Subset]:
    """{"train": Subset, "val": ..., "test": ...} from data/clean shards and data/split.csv: the splits named in
    `only`, with their lesion and lung masks unless `masks` is False. Images and masks are Rows, read from the
    shards only when indexed, so a stage holds the batches it reads, never a whole split unless it asks for one."""
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
    # masks-*.npy (lesions) and lungs-*.npy exist where any image has one (manifests of older runs lack has_lungs)
    kinds = ["images"] + [kind for kind, col in paths.MASK_SHARDS.values()
                          if masks and col in table and table[col].any()]
    out = {}
    for name in only:
        part = table[table["split"] == name]
        shard, index = part["shard"].to_numpy(int), part["index"].to_numpy(int)
        used = np.unique(shard)
        rows = {kind: Rows([clean_dir / f"{kind}-{s:05d}.npy" for s in used], np.searchsorted(used, shard), index)
                for kind in kinds} if len(part) else {}
        labels = np.array([classes.index(c) for c in part["label"]], dtype=np.int32)
        out[name] = Subset(part["file"].tolist(), rows.get("images", np.zeros((0, 1, 1), np.uint8)), labels,
                           rows.get("masks"), rows.get("lungs"))
    return out


def outside_fill_rate(share: float, views: int = 0) -> float:
    """The share of the augmented images whose surround is filled so that `share` of all training samples
    have it filled (params train.augment.outside_lungs): all of them are augmented on the fly (views 0), but
    with cached views one view in views + 1 is the un-augmented image, so the rate is share * (views + 1) /
    views, at most 1 (every augmented view: views / (views + 1) of the samples)."""
    return min(1.0, share * (views + 1) / views) if views else share


def augmenter(cfg: dict, seed: int, views: int = 0):
    """Light, anatomy-preserving augmentation (params train.augment) as one Keras layer, or None when every
    setting is off: augment.OutsideFill first (the surround of the lung box filled on the share of training
    samples `outside_lungs`; `views`: the cached augmented views per image, see outside_fill_rate), then the
    exposure changes (Keras' RandomBrightness and RandomContrast on 0..255, clipped), then
    augment.RandomAffine; identity outside training."""
    import keras

    from .augment import OutsideFill, RandomAffine

    layers = []
    if cfg.get("outside_lungs"):
        layers.append(OutsideFill(outside_fill_rate(cfg["outside_lungs"], views), cfg["lung_box"], seed=seed + 3,
                                  name="outside_lungs"))
    if cfg.get("brightness"):
        layers.append(keras.layers.RandomBrightness(cfg["brightness"], value_range=(0, 255), seed=seed + 1, name="brightness"))
    if cfg.get("contrast"):
        # a pair: Keras 3.15 reads a single number c as [1, 1 + c] (contrast only ever raised), a pair (c, c) as [1 - c, 1 + c]
        c = float(cfg["contrast"])
        layers.append(keras.layers.RandomContrast((c, c), value_range=(0, 255), seed=seed + 2, name="contrast"))
    if cfg["rotation"] or cfg["translation"] or cfg["zoom"] or cfg["flip"]:
        layers.append(RandomAffine(cfg["rotation"], cfg["translation"], cfg["zoom"], bool(cfg["flip"]), seed=seed,
                                   name="affine" if layers else "augment"))
    if len(layers) > 1:
        return keras.Sequential(layers, name="augment")
    return layers[0] if layers else None


def even(n: int, multiple_of: int) -> int:
    """How many of n training rows an epoch uses so that every batch splits evenly over `multiple_of` devices:
    n cut to a multiple of it (at most multiple_of - 1 left out)."""
    return n - n % multiple_of


def batches(images, labels: np.ndarray | None = None, batch_size: int = 64, *, shuffle: bool = False, seed: int = 0,
            sample_weights: np.ndarray | None = None, multiple_of: int = 1, augment=None):
    """A keras.utils.PyDataset (any Keras backend, no TensorFlow needed) of float32 rows of `images` (uint8
    (N, S, S) pixels get their channel axis: (B, S, S, 1); other arrays, e.g. cached features, keep their shape),
    with `labels` (and `sample_weights`) where given; read one batch at a time (from an array or a split's Rows),
    so only the batch is converted to float. In order, or with `shuffle` in a new order every epoch drawn from
    (seed, epoch), so a run is reproducible. Augmentation is part of the model being trained (training.augmented),
    where it runs on the accelerator; `augment` (a layer) applies it here instead, to each batch as it is read.

    With data parallelism every batch must split evenly over `multiple_of` devices: a training batch (labels
    given) is then cut to a multiple of it (the last one of an epoch drops at most multiple_of - 1 images, other
    ones each epoch when shuffled); a prediction batch is padded with zeros, and the caller keeps the first
    `.n` rows of the predictions."""
    import keras

    n = len(images)
    full = even(n, multiple_of) if labels is not None else n
    steps = -(-full // batch_size)

    class Batches(keras.utils.PyDataset):
        def __init__(self):
            super().__init__()
            self.n, self.epoch = n, 0
            self.order = np.random.default_rng([seed, 0]).permutation(n) if shuffle else None

        def __len__(self):
            return steps

        def on_epoch_end(self):
            self.epoch += 1
            if shuffle:
                self.order = np.random.default_rng([seed, self.epoch]).permutation(n)

        def __getitem__(self, i):
            idx = slice(i * batch_size, min(full, (i + 1) * batch_size))
            if shuffle:  # sorted within the batch: neighbouring rows are read together
                idx = np.sort(self.order[idx])
            x = np.asarray(images[idx], dtype=np.float32)
            x = x[..., None] if x.ndim == 3 else x
            if augment is not None:
                x = to_numpy(augment(x, training=True))
            if labels is None:
                pad = -len(x) % multiple_of
                return (np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)]) if pad else x,)
            return (x, labels[idx]) if sample_weights is None else (x, labels[idx], sample_weights[idx])

    return Batches()
