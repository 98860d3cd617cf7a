"""cxr.clean.run on a small tree of real images: drops with reasons, duplicates, shards, parallel == serial."""
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr import clean, data, images
from cxr.clean import UnionFind, close_pairs, hamming
from cxr.images import decode
from cxr.sources import Drop, Record

SIZE = 32
CLASSES = ["COVID", "Normal"]


def _cfg(**over):
    cfg = {"image_size": SIZE, "resize": "pad", "max_pixels": 10_000_000, "near_duplicate_distance": 12,
           "shard_size": 4, "workers": 1}
    cfg.update(over)
    return cfg


def _smooth(seed: int, size=(64, 48)) -> Image.Image:
    """A distinct, smooth grayscale picture (random 8x8 field scaled up): robust perceptual hash."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").resize(size, Image.Resampling.BILINEAR)


def _put(raw: Path, rel: str, img: Image.Image, **kw) -> str:
    (raw / rel).parent.mkdir(parents=True, exist_ok=True)
    img.save(raw / rel, **kw)
    return rel


@pytest.fixture
def tree(tmp_path):
    """raw/ with distinct images plus every kind of problem; returns (raw, records, source_drops, expected drops)."""
    raw = tmp_path / "raw"
    recs, expected = [], {}

    def add(rel, label):
        recs.append(Record(rel, label, group=Path(rel).stem))

    for i in range(4):
        add(_put(raw, f"COVID/c{i}.png", _smooth(100 + i)), "COVID")
        add(_put(raw, f"Normal/n{i}.png", _smooth(200 + i)), "Normal")
    # exact duplicate, same label: the later file name goes
    shutil.copy(raw / "Normal/n0.png", raw / "Normal/n0_copy.png")
    add("Normal/n0_copy.png", "Normal")
    expected["Normal/n0_copy.png"] = "exact_duplicate"
    # exact duplicate, different label: both go
    _put(raw, "COVID/x.png", _smooth(300))
    shutil.copy(raw / "COVID/x.png", raw / "Normal/x_too.png")
    add("COVID/x.png", "COVID")
    add("Normal/x_too.png", "Normal")
    expected["COVID/x.png"] = expected["Normal/x_too.png"] = "conflicting_labels"
    # near duplicates: JPEG re-save, and one pixel changed
    add(_put(raw, "COVID/c1_resaved.jpg", _smooth(101), quality=98), "COVID")
    expected["COVID/c1_resaved.jpg"] = "near_duplicate"
    px = np.array(_smooth(201))
    px[10, 10] ^= 0xFF
    add(_put(raw, "Normal/n1_pixel.png", Image.fromarray(px)), "Normal")
    expected["Normal/n1_pixel.png"] = "near_duplicate"
    # unusable files
    good = (raw / "COVID/c2.png").read_bytes()
    (raw / "COVID/truncated.png").write_bytes(good[: len(good) // 2])
    add("COVID/truncated.png", "COVID")
    expected["COVID/truncated.png"] = "unreadable"
    (raw / "Normal/empty.png").write_bytes(b"")
    add("Normal/empty.png", "Normal")
    expected["Normal/empty.png"] = "empty_file"
    (raw / "Normal/notes.png").write_text("not a picture")
    add("Normal/notes.png", "Normal")
    expected["Normal/notes.png"] = "not_an_image"
    source_drops = [Drop("README.txt", "auxiliary_file", "readme"), Drop("stray.png", "unlabeled")]
    expected.update({d.file: d.reason for d in source_drops})
    return raw, recs, source_drops, expected


def _run(tmp_path, tree, name="out", **cfg):
    raw, recs, source_drops, _ = tree
    out = tmp_path / name
    out.mkdir()
    summary, dropped = clean.run(raw, out, recs, source_drops, CLASSES, _cfg(**cfg))
    manifest = pd.read_csv(out / "manifest.csv", dtype={"phash": str, "group": str})
    return out, summary, dropped, manifest


def test_run_drops_with_reasons(tmp_path, tree):
    raw, recs, source_drops, expected = tree
    out, summary, dropped, manifest = _run(tmp_path, tree)

    assert dict(zip(dropped["file"], dropped["reason"])) == expected
    assert len(dropped) == len(expected)
    assert summary["seen"] == len(recs) + len(source_drops)
    assert summary["seen"] == summary["kept"] + summary["dropped"]
    assert summary["dropped"] == len(dropped)
    assert summary["dropped_by_reason"] == dropped["reason"].value_counts().sort_index().to_dict()
    kept = {r.file for r in recs} - set(expected)
    assert set(manifest["file"]) == kept and summary["kept"] == len(kept) == 8
    assert summary["kept_by_class"] == {"COVID": 4, "Normal": 4}
    # the first (by name) of a duplicate pair is the one kept
    assert {"Normal/n0.png", "COVID/c1.png", "Normal/n1.png"} <= kept


def test_shards_match_manifest(tmp_path, tree):
    raw = tree[0]
    out, summary, _, manifest = _run(tmp_path, tree)
    shards = sorted(out.glob("images-*.npy"))
    assert [p.name for p in shards] == ["images-00000.npy", "images-00001.npy"]       # 8 kept, shard_size 4
    arrays = [np.load(p) for p in shards]
    for a in arrays:
        assert a.dtype == np.uint8 and a.shape[1:] == (SIZE, SIZE)
    assert sum(len(a) for a in arrays) == len(manifest) == summary["kept"]
    assert list(manifest["file"]) == sorted(manifest["file"])
    assert list(manifest.columns) == ["file", "label", "group", "sha256", "phash", "shard", "index", "has_mask", "has_lungs"]
    for row in manifest.itertuples():
        np.testing.assert_array_equal(arrays[row.shard][row.index], decode(raw / row.file, SIZE))
        assert len(row.phash) == 64  # 256-bit hash, hex
    assert manifest["sha256"].is_unique
    assert not manifest["has_mask"].any() and not manifest["has_lungs"].any()
    assert not list(out.glob("masks-*.npy")) and not list(out.glob("lungs-*.npy"))


def test_near_duplicates_kept_when_threshold_negative(tmp_path, tree):
    _, _, dropped, manifest = _run(tmp_path, tree, near_duplicate_distance=-1)
    assert "near_duplicate" not in set(dropped["reason"])
    assert {"COVID/c1_resaved.jpg", "Normal/n1_pixel.png"} <= set(manifest["file"])
    # exact duplicates and conflicts do not depend on the threshold
    assert set(dropped.loc[dropped["reason"] == "exact_duplicate", "file"]) == {"Normal/n0_copy.png"}
    assert set(dropped.loc[dropped["reason"] == "conflicting_labels", "file"]) == {"COVID/x.png", "Normal/x_too.png"}


def test_near_duplicate_with_other_label_drops_both(tmp_path):
    raw = tmp_path / "raw"
    _put(raw, "a.png", _smooth(1))
    px = np.array(_smooth(1))
    px[5, 5] ^= 0x07
    _put(raw, "b.png", Image.fromarray(px))
    _put(raw, "c.png", _smooth(2))
    recs = [Record("a.png", "COVID", "a"), Record("b.png", "Normal", "b"), Record("c.png", "Normal", "c")]
    out = tmp_path / "out"
    out.mkdir()
    summary, dropped = clean.run(raw, out, recs, [], CLASSES, _cfg())
    assert dict(zip(dropped["file"], dropped["reason"])) == {"a.png": "conflicting_labels", "b.png": "conflicting_labels"}
    assert summary["kept_by_class"] == {"COVID": 0, "Normal": 1}


@pytest.mark.parametrize("field,prefix,column,other", [("mask", "masks", "has_mask", "lungs"),
                                                      ("lungs", "lungs", "has_lungs", "masks")])
def test_masks_are_stored_beside_images_and_read_back_per_split(tmp_path, field, prefix, column, other):
    """Lesion masks (masks-*.npy) and lung masks (lungs-*.npy), resized as their images were."""
    raw = tmp_path / "raw"
    _put(raw, "a.png", _smooth(1))
    _put(raw, "b.png", _smooth(2))
    mask = np.zeros((48, 64), np.uint8)
    mask[:, :32] = 255
    _put(raw, "a_mask.png", Image.fromarray(mask))
    recs = [Record("a.png", "COVID", "a", **{field: "a_mask.png"}), Record("b.png", "Normal", "b")]
    out = tmp_path / "out"
    out.mkdir()
    clean.run(raw, out, recs, [], CLASSES, _cfg())
    masks = np.load(out / f"{prefix}-00000.npy")
    assert masks.dtype == bool and masks.shape == (2, SIZE, SIZE) and not list(out.glob(f"{other}-*.npy"))
    assert masks[0][:, : SIZE // 2 - 1][8:24].all() and not masks[0][:, SIZE // 2 + 1 :].any()
    assert not masks[1].any()
    manifest = pd.read_csv(out / "manifest.csv")
    assert list(manifest[column]) == [True, False]
    split = tmp_path / "split.csv"
    pd.DataFrame({"file": ["a.png", "b.png"], "split": ["test", "train"]}).to_csv(split, index=False)
    parts = data.load_splits(CLASSES, out, split)
    attr, none = ("masks", "lungs") if field == "mask" else ("lungs", "masks")
    assert np.array_equal(getattr(parts["test"], attr), masks[:1]) and getattr(parts["test"], none) is None
    assert np.array_equal(getattr(parts["train"], attr), masks[1:]) and getattr(parts["val"], attr) is None
    # a stage asks for what it uses: only those splits, masks only when wanted
    lean = data.load_splits(CLASSES, out, split, only=("test",), masks=False)
    assert list(lean) == ["test"] and lean["test"].files == ["a.png"] and lean["test"].masks is lean["test"].lungs is None


def test_an_undecodable_lung_mask_drops_its_image_with_the_reason(tmp_path):
    raw = tmp_path / "raw"
    _put(raw, "a.png", _smooth(1))
    (raw / "a_lungs.png").write_bytes(b"not a png")
    out = tmp_path / "out"
    out.mkdir()
    summary, dropped = clean.run(raw, out, [Record("a.png", "COVID", "a", lungs="a_lungs.png")], [], CLASSES, _cfg())
    assert summary["kept"] == 0 and summary["dropped"] == 1 and list(dropped["file"]) == ["a.png"]
    assert "lung mask a_lungs.png" in dropped["detail"][0]


def test_parallel_equals_serial(tmp_path):
    raw = tmp_path / "raw"
    recs = []
    for i in range(70):
        label = CLASSES[i % 2]
        recs.append(Record(_put(raw, f"{label}/{i:03d}.png", _smooth(1000 + i)), label, f"p{i // 3}"))
    shutil.copy(raw / "COVID/000.png", raw / "COVID/000_dup.png")
    recs.append(Record("COVID/000_dup.png", "COVID", "p0"))
    recs.append(Record(_put(raw, "Normal/001_q90.jpg", _smooth(1001), quality=98), "Normal", "p0"))
    (raw / "COVID/bad.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    recs.append(Record("COVID/bad.png", "COVID", "bad"))
    assert len(recs) > 64

    results = {}
    for workers in (1, 2):
        out = tmp_path / f"out{workers}"
        out.mkdir()
        summary, dropped = clean.run(raw, out, recs, [], CLASSES, _cfg(workers=workers, shard_size=32))
        results[workers] = (out, summary, dropped)
    (o1, s1, d1), (o2, s2, d2) = results[1], results[2]
    assert s1 == s2
    assert s1["kept"] == 70 and s1["dropped_by_reason"] == {"exact_duplicate": 1, "near_duplicate": 1, "unreadable": 1}
    pd.testing.assert_frame_equal(d1, d2)
    assert (o1 / "manifest.csv").read_bytes() == (o2 / "manifest.csv").read_bytes()
    names = sorted(p.name for p in o1.iterdir())
    assert names == sorted(p.name for p in o2.iterdir()) == ["images-00000.npy", "images-00001.npy", "images-00002.npy", "manifest.csv"]
    for n in names[:-1]:
        np.testing.assert_array_equal(np.load(o1 / n), np.load(o2 / n))


def test_decode_all_parallel_keeps_input_order(tmp_path):
    raw = tmp_path / "raw"
    recs = [Record(_put(raw, f"{i:03d}.png", Image.new("L", (8, 8), i)), "COVID", str(i)) for i in range(80)]
    decoded = clean.decode_all(raw, recs, 8, "pad", 10_000, workers=2)
    assert [d.record for d in decoded] == recs
    assert [int(d.pixels[0, 0]) for d in decoded] == list(range(80))


def crashing_decode(path, size, mode="pad", **limits):
    """images.decode, except that it kills its process on one file, as a decoder crash or the OOM killer would."""
    if Path(path).name == "crash.png":
        os._exit(1)
    return decode(path, size, mode, **limits)


def test_a_file_that_kills_its_decoding_worker_is_dropped_and_counted(tmp_path):
    raw = tmp_path / "raw"
    recs = [Record(_put(raw, f"{cls}/{i:03d}.png", _smooth(10 * i + (cls == "COVID"))), cls, f"{cls}{i}")
            for i in range(35) for cls in CLASSES]
    recs.append(Record(_put(raw, "COVID/crash.png", _smooth(999)), "COVID", "crash"))
    assert len(recs) >= images.SERIAL_BELOW
    out = tmp_path / "out"
    out.mkdir()
    summary, dropped = clean.run(raw, out, recs, [], CLASSES, _cfg(workers=2, near_duplicate_distance=-1, shard_size=128),
                                 decode=crashing_decode)
    assert summary["seen"] == 71 and summary["kept"] == 70 and summary["dropped_by_reason"] == {"decoder_crashed": 1}
    assert dropped["file"].tolist() == ["COVID/crash.png"] and dropped["reason"].tolist() == ["decoder_crashed"]
    kept = pd.read_csv(out / "manifest.csv")["file"].tolist()
    assert kept == sorted(r.file for r in recs[:-1])
    pixels = np.load(out / "images-00000.npy")
    np.testing.assert_array_equal(pixels[0], decode(raw / kept[0], SIZE, "pad"))


# --- hashes --------------------------------------------------------------------------------------

def test_hamming_hand_made():
    a = np.array([0, 0xFFFFFFFFFFFFFFFF, 0b1011], dtype=np.uint64)
    b = np.array([0, 1 << 63, 0b0001], dtype=np.uint64)
    d = hamming(a, b)
    assert d.shape == (3, 3)
    np.testing.assert_array_equal(d, [[0, 1, 1], [64, 63, 63], [3, 4, 2]])


@pytest.mark.parametrize("block", [1, 2, 2048])
def test_close_pairs_hand_made(block):
    h = np.array([0b0000, 0b0001, 0b0011, 0xFF00, 0b0000, 0xFFFFFFFF00000000], dtype=np.uint64)
    assert sorted(close_pairs(h, 0, block)) == [(0, 4, 0)]
    assert sorted(close_pairs(h, 1, block)) == [(0, 1, 1), (0, 4, 0), (1, 2, 1), (1, 4, 1)]
    assert sorted(close_pairs(h, 2, block)) == [(0, 1, 1), (0, 2, 2), (0, 4, 0), (1, 2, 1), (1, 4, 1), (2, 4, 2)]
    assert list(close_pairs(h, -1, block)) == []
    assert list(close_pairs(np.array([], dtype=np.uint64), 5, block)) == []
    assert len(list(close_pairs(h, 64, block))) == 15              # every pair, each once with i < j


def test_union_find_groups():
    uf = UnionFind(6)
    uf.union(4, 1)
    uf.union(1, 3)
    uf.union(5, 2)
    groups = sorted(sorted(g) for g in uf.groups().values())
    assert groups == [[0], [1, 3, 4], [2, 5]]


def test_a_file_listed_twice_is_not_a_duplicate_of_itself(tmp_path):
    raw = tmp_path / "raw"
    _put(raw, "a.png", _smooth(1))
    _put(raw, "c.png", _smooth(2))
    recs = [Record("a.png", "COVID", "a"), Record("a.png", "COVID", "a"), Record("c.png", "Normal", "c")]
    out = tmp_path / "out"
    out.mkdir()
    summary, dropped = clean.run(raw, out, recs, [], CLASSES, _cfg())
    assert list(zip(dropped["file"], dropped["reason"])) == [("a.png", "listed_twice")]
    assert "more than once" in dropped["detail"][0]
    assert summary["kept_by_class"] == {"COVID": 1, "Normal": 1}
