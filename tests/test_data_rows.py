"""cxr.data.Rows and load_splits on real shard files (np.save, and the clean step on a generated demo set):
every way the code base indexes a split gives what np.stack of the rows would, and reading a split batch by
batch never holds it whole."""
from __future__ import annotations

import dataclasses
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from numpy.lib import format as npy

from cxr import clean, data, demo, sources
from helpers import PROJECT

CLASSES = list(demo.CLASSES)
SIZE = 32


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """Three np.save shards of different lengths, and rows drawn out of order from all of them."""
    folder = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (k, 6, 5), dtype=np.uint8) for k in (4, 5, 3)]
    files = []
    for s, a in enumerate(arrays):
        files.append(folder / f"images-{s:05d}.npy")
        np.save(files[-1], a)
    pos = [(1, 0), (1, 1), (0, 3), (2, 0), (0, 0), (0, 1), (1, 4), (2, 2), (1, 2), (0, 2), (2, 1)]
    stacked = np.stack([arrays[s][i] for s, i in pos])
    return data.Rows(files, [s for s, _ in pos], [i for _, i in pos]), stacked


def _keys(stacked):
    """The ways the code base indexes a split (images[i], [a:b], [idx], [a:b, ..., None], ...): n >= 9 rows."""
    n = len(stacked)
    return [0, 3, -1, -n, np.int64(4), np.uint8(2), np.array(2),
            slice(None), slice(2, 7), slice(None, None, -1), slice(1, 9, 3), slice(-3, None), slice(20, 30),
            [1, 5, 2], [], np.array([8, 0, 8, 3]), np.array([[1, 2], [3, 4]]), np.array([-1, -n]),
            stacked[:, 0, 0] > 100, [True] * n, np.zeros(n, bool),
            (slice(0, 4), ..., None), (slice(3, 3 + 64), ..., None), (slice(0, 4), 1), (3, 2, 1), (0, ...),
            (np.array([1, 2]), np.array([0, 3])), (stacked[:, 0, 0] > 50, slice(1, 3)),
            (np.array([1, 4]), slice(None), [0, 2]), (1, slice(None), np.array([1, 3])),
            ..., (..., None), None, (), stacked > 100]


def test_every_index_gives_what_the_stacked_array_gives(shards):
    rows, stacked = shards
    assert (len(rows), rows.shape, rows.dtype, rows.ndim, rows.size) == (len(stacked), stacked.shape, stacked.dtype,
                                                                          stacked.ndim, stacked.size)
    for key in _keys(stacked):
        got, want = rows[key], stacked[key]
        assert type(got) is type(want) and got.dtype == want.dtype and got.shape == want.shape, key
        assert np.array_equal(got, want), key
    assert np.array_equal(np.asarray(rows), stacked) and np.asarray(rows, dtype=bool).dtype == bool
    assert np.array_equal(np.stack([rows[i] for i in range(len(rows))]), stacked)
    assert np.array_equal(np.stack(list(rows)), stacked)
    assert np.array_equal(np.concatenate([rows[a : a + 4] for a in range(0, len(rows), 4)]), stacked)


def test_any_reduces_batch_by_batch_as_ndarray_any(shards, monkeypatch):
    rows, stacked = shards
    monkeypatch.setattr(rows, "BATCH", 4)
    for axis in (None, 0, 1, 2, -1, (1, 2), (0, 2), (0, 1, 2)):
        got, want = rows.any(axis=axis), stacked.any(axis=axis)
        assert type(got) is type(want) and np.array_equal(got, want), axis


def test_bad_indices_raise_index_error_as_numpy_does(shards):
    rows, stacked = shards
    n = len(stacked)
    for key in (n, -n - 1, [n], np.array([0, -n - 1]), [True] * 3, np.array([1.5])):
        with pytest.raises(IndexError) as numpy_error:
            stacked[key]
        with pytest.raises(IndexError) as rows_error:
            rows[key]
        assert str(rows_error.value) == str(numpy_error.value)


def test_rows_the_files_do_not_hold_are_refused(tmp_path):
    np.save(tmp_path / "a.npy", np.zeros((3, 4, 4), np.uint8))
    np.save(tmp_path / "b.npy", np.zeros((3, 4, 5), np.uint8))
    with pytest.raises(ValueError, match="holds 3 rows, row 3 is asked for"):
        data.Rows([tmp_path / "a.npy"], [0, 0], [1, 3])
    with pytest.raises(ValueError, match=r"holds rows \(4, 5\)"):
        data.Rows([tmp_path / "a.npy", tmp_path / "b.npy"], [0, 1], [0, 0])
    rows = data.Rows([tmp_path / "a.npy"], [0, 0, 0], [0, 1, 2])
    with open(tmp_path / "a.npy", "r+b") as f:   # cut short after the header was read
        f.truncate(os.path.getsize(tmp_path / "a.npy") - 8)
    assert rows[0].shape == (4, 4)
    with pytest.raises(ValueError, match="cut short"):
        rows[2]


def _cleaned(tmp_path: Path, keep=("mask", "lungs")) -> tuple[Path, Path]:
    """A small generated demo set through the real clean step into shards of 5 images, with the masks named in
    `keep`, and a split.csv that lists its files shuffled: splits draw rows from every shard, out of order, and
    each has at least the 9 rows _keys indexes."""
    raw = tmp_path / "raw"
    demo.generate(raw, per_class=12, size=SIZE, bad_files=False)
    records, _ = sources.demo(raw, CLASSES)
    records = [dataclasses.replace(r, **{k: None for k in ("mask", "lungs") if k not in keep}) for r in records]
    out = tmp_path / "clean"
    out.mkdir()
    cfg = {"image_size": SIZE, "resize": "pad", "max_pixels": 10_000_000, "near_duplicate_distance": -1,
           "shard_size": 5, "workers": 1}
    clean.run(raw, out, records, [], CLASSES, cfg)
    files = pd.read_csv(out / "manifest.csv")["file"].sample(frac=1, random_state=0).tolist()
    split = tmp_path / "split.csv"
    pd.DataFrame({"file": files, "split": [("train", "train", "val", "test")[i % 4] for i in range(len(files))]}
                 ).to_csv(split, index=False)
    return out, split


def _stacked(out: Path, split: Path, kind: str, name: str) -> np.ndarray:
    """What load_splits gave before Rows: the split's rows of every shard, np.stack'ed in split.csv's order."""
    table = pd.read_csv(split).merge(pd.read_csv(out / "manifest.csv"), on="file")
    part = table[table["split"] == name]
    return np.stack([np.load(out / f"{kind}-{s:05d}.npy")[i] for s, i in zip(part["shard"], part["index"])])


def test_load_splits_reads_the_clean_steps_shards_as_np_stack_did(tmp_path):
    out, split = _cleaned(tmp_path)
    assert len(list(out.glob("images-*.npy"))) >= 3
    parts = data.load_splits(CLASSES, out, split)
    for name, sub in parts.items():
        assert len(np.unique(sub.images.shard)) > 1
        for kind in ("images", "masks", "lungs"):
            rows, want = getattr(sub, kind), _stacked(out, split, kind, name)
            assert isinstance(rows, data.Rows) and rows.shape == want.shape and rows.dtype == want.dtype
            for key in _keys(want):
                got = rows[key]
                assert type(got) is type(want[key]) and got.shape == want[key].shape and np.array_equal(got, want[key]), key
            assert np.array_equal(rows.any(axis=(1, 2)), want.any(axis=(1, 2)))
        assert sub.images.dtype == np.uint8 and sub.masks.dtype == sub.lungs.dtype == bool
        assert sub.masks.any() and sub.lungs.any()
    lean = data.load_splits(CLASSES, out, split, only=("val",), masks=False)["val"]
    assert lean.masks is None and lean.lungs is None and np.array_equal(lean.images[...], _stacked(out, split, "images", "val"))


@pytest.mark.parametrize("keep", [(), ("lungs",)])
def test_masks_the_shards_lack_are_none(tmp_path, keep):
    out, split = _cleaned(tmp_path, keep)
    test = data.load_splits(CLASSES, out, split, only=("test",))["test"]
    assert test.masks is None
    assert (test.lungs is None) == (not keep)
    if keep:
        assert np.array_equal(np.asarray(test.lungs), _stacked(out, split, "lungs", "test"))


def test_an_empty_split_is_an_empty_array(tmp_path):
    out, split = _cleaned(tmp_path)
    pd.read_csv(split).assign(split="train").to_csv(split, index=False)
    val = data.load_splits(CLASSES, out, split, only=("val",))["val"]
    assert len(val) == len(val.images) == 0 and val.masks is None and val.lungs is None


def test_rows_hold_no_pixels_and_no_open_files_and_pickle(tmp_path):
    out, split = _cleaned(tmp_path)
    rows = data.load_splits(CLASSES, out, split, only=("train",))["train"].images
    held = sum(v.nbytes for v in vars(rows).values() if isinstance(v, np.ndarray))
    assert held <= 2 * len(rows) * np.dtype(np.intp).itemsize < rows.size // 50
    fds = len(os.listdir("/proc/self/fd")) if Path("/proc/self/fd").is_dir() else None
    for start in range(0, len(rows), 4):
        rows[start : start + 4]
    assert fds is None or len(os.listdir("/proc/self/fd")) == fds
    assert np.array_equal(pickle.loads(pickle.dumps(rows))[2:7], rows[2:7])   # e.g. to a data loader's worker


PEAK = """
import sys
import numpy as np
from cxr.data import Rows

how, path, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
rows = Rows([path], np.zeros(n, int), np.arange(n))
if how == "whole":
    np.asarray(rows).mean(axis=(1, 2))
elif how == "batches":
    for start in range(0, n, 64):
        rows[start : start + 64].mean(axis=(1, 2))
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads VmHWM from /proc")
def test_a_pass_in_batches_keeps_peak_memory_flat(tmp_path):
    """A 250 MB shard: read whole, the process's peak resident memory grows by its size; read 64 rows at a time,
    by little more than a batch."""
    n, side = 5000, 224
    path = tmp_path / "images-00000.npy"
    with open(path, "wb") as f:   # written in chunks: this process never holds it either
        npy.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (n, side, side)})
        chunk = (np.arange(500 * side * side) % 251).astype(np.uint8).tobytes()
        for _ in range(n // 500):
            f.write(chunk)
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    peak = {how: int(subprocess.run([sys.executable, "-c", PEAK, how, str(path), str(n)], env=env, check=True,
                                    capture_output=True, text=True).stdout) / 1024
            for how in ("whole", "batches", "nothing")}   # MiB
    assert peak["whole"] - peak["nothing"] > 0.9 * n * side * side / 2**20, peak
    assert peak["batches"] - peak["nothing"] < 20, peak
