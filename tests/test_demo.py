"""Tests for the synthetic demo dataset (cxr.demo)."""

import csv
import re
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, UnidentifiedImageError

from cxr import demo

PER_CLASS = 24
SIZE = 96


def _rows(root: Path) -> list[dict]:
    with (root / "metadata.csv").open(newline="") as f:
        return list(csv.DictReader(f))


def _good_rows(root: Path) -> list[dict]:
    return [r for r in _rows(root) if not Path(r["file"]).name.startswith("bad-")]


def _tree(root: Path) -> dict[str, bytes]:
    files = sorted(p for p in root.rglob("*") if p.is_file())
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in files}


def _array(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.array(im)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "data"
    counts = demo.generate(root, per_class=PER_CLASS, size=SIZE, seed=3)
    return root, counts


def test_generate_is_deterministic(tmp_path):
    kwargs = dict(per_class=4, size=48)
    for name, seed in (("a", 1), ("b", 1), ("c", 2)):
        demo.generate(tmp_path / name, seed=seed, **kwargs)
    first = _tree(tmp_path / "a")
    assert first == _tree(tmp_path / "b")
    other = _tree(tmp_path / "c")
    common = [k for k in first.keys() & other.keys() if "/demo-" in k]
    assert len(common) == 3 * 4 * len(demo.CLASSES)   # image, lesion mask, lung mask
    assert all(first[k] != other[k] for k in common if k.startswith("images/"))
    assert not [k for k in first if Path(k).name.startswith(".")]  # no temp files left


def test_render_is_pure_function_of_rng():
    a = demo.render(np.random.default_rng(7), "COVID", 64)
    b = demo.render(np.random.default_rng(7), "COVID", 64)
    assert a[0].dtype == np.uint8 and a[0].shape == (64, 64)
    assert a[1].dtype == bool and a[1].shape == (64, 64)
    assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
    with pytest.raises(ValueError):
        demo.render(np.random.default_rng(0), "Flu", 64)


def test_layout_and_metadata(dataset):
    root, counts = dataset
    with (root / "metadata.csv").open(newline="") as f:
        assert next(csv.reader(f)) == ["file", "label", "patientid", "mask", "lungs"]
    rows = _good_rows(root)
    assert counts["images"] == len(rows) == PER_CLASS * len(demo.CLASSES)
    assert Counter(r["label"] for r in rows) == {c: PER_CLASS for c in demo.CLASSES}
    assert counts["per_class"] == {c: PER_CLASS for c in demo.CLASSES}
    for r in rows:
        stem = f"demo-{demo.SLUGS[r['label']]}-\\d{{4}}"
        assert re.fullmatch(f"images/{r['label']}/{stem}\\.png", r["file"])
        assert r["mask"] == f"masks/{Path(r['file']).name}"
        assert r["lungs"] == f"lungs/{Path(r['file']).name}"
        assert re.fullmatch(r"demo-p\d{4}", r["patientid"])
        with Image.open(root / r["file"]) as im, Image.open(root / r["mask"]) as mk, Image.open(root / r["lungs"]) as lu:
            assert im.mode == "L" and im.size == (SIZE, SIZE)
            assert mk.mode == lu.mode == "L" and mk.size == lu.size == (SIZE, SIZE)
            assert set(np.unique(np.array(mk))) <= {0, 255} and set(np.unique(np.array(lu))) <= {0, 255}
            lesion, lungs = np.array(mk) > 0, np.array(lu) > 0
            assert 0.1 < lungs.mean() < 0.6 and not (lesion & ~lungs).any()   # lesions lie in the lung fields


def test_follow_up_studies_share_patient_and_label(dataset):
    root, counts = dataset
    by_patient = defaultdict(list)
    for r in _good_rows(root):
        by_patient[r["patientid"]].append(r["label"])
    sizes = Counter(len(v) for v in by_patient.values())
    assert set(sizes) == {1, 2} and sizes[2] == counts["follow_ups"] > 0
    assert counts["patients"] == len(by_patient)
    assert all(len(set(labels)) == 1 for labels in by_patient.values())


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_follow_up_fraction_keeps_per_class(tmp_path, fraction):
    counts = demo.generate(tmp_path / "d", per_class=5, size=32, follow_up_fraction=fraction,
                           bad_files=False)
    rows = _rows(tmp_path / "d")
    assert Counter(r["label"] for r in rows) == {c: 5 for c in demo.CLASSES}
    n_patients = len({r["patientid"] for r in rows})
    assert n_patients == counts["patients"] == 3 * int(np.ceil(5 / (1 + fraction)))


def test_masks_match_class_pattern(dataset):
    root, _ = dataset
    border = round(0.05 * SIZE)
    stats = defaultdict(list)
    for r in _good_rows(root):
        mask = _array(root / r["mask"]) > 0
        inner = np.zeros_like(mask)
        inner[border:-border, border:-border] = True
        assert not (mask & ~inner).any(), r["file"]
        left, right = mask[:, : SIZE // 2].any(), mask[:, SIZE // 2:].any()
        stats[r["label"]].append((mask.any(), left and right))
    normal, covid, viral = (np.array(stats[c]) for c in ("Normal", "COVID", "Viral Pneumonia"))
    assert not normal[:, 0].any()
    assert covid[:, 0].mean() >= 0.95 and viral[:, 0].mean() >= 0.95
    assert covid[:, 1].mean() >= 0.8  # bilateral
    assert viral[:, 1].mean() <= 0.2  # unilateral


@pytest.mark.parametrize("label", ["COVID", "Viral Pneumonia"])
def test_lesions_lie_inside_lungs(label):
    for seed in range(20):
        image, mask, lungs = demo.render_full(np.random.default_rng(seed), label, 96)
        assert mask.any()
        assert not (mask & ~lungs).any()
        assert 0.08 < lungs.mean() < 0.4
        assert image[mask].mean() > image[lungs & ~mask].mean()  # lesion is an opacity


def test_mean_brightness_is_a_poor_classifier():
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import cross_val_score

    seeds = np.random.SeedSequence(11).spawn(300)
    labels = np.arange(300) % 3
    means = np.array([demo.render(np.random.default_rng(s), demo.CLASSES[k], 64)[0].mean()
                      for s, k in zip(seeds, labels)])
    acc = cross_val_score(LogisticRegression(), means[:, None], labels, cv=5).mean()
    assert acc < 0.55  # chance is 1/3
    normal = labels == 1
    best_threshold = max(max(np.mean((means > t) == normal), np.mean((means <= t) == normal))
                         for t in np.unique(means))
    assert best_threshold < 0.75  # Normal vs abnormal; majority baseline is 2/3


def test_bad_files(dataset):
    root, counts = dataset
    listed = {Path(r["file"]).name: r for r in _rows(root)}
    listed = {name: r for name, r in listed.items() if name.startswith("bad-")}
    on_disk = {p.name: p for p in (root / "images").rglob("bad-*")}
    assert counts["bad_files"] == len(on_disk) == 5
    assert set(listed) == set(on_disk) - {"bad-unlabeled.png"}

    assert on_disk["bad-empty.png"].stat().st_size == 0
    with pytest.raises((OSError, SyntaxError)):
        with Image.open(on_disk["bad-truncated.png"]) as im:
            im.load()
    with pytest.raises(UnidentifiedImageError):
        Image.open(on_disk["bad-not-an-image.png"])

    dup = listed["bad-duplicate.png"]
    originals = [r for r in _good_rows(root)
                 if (root / r["file"]).read_bytes() == on_disk["bad-duplicate.png"].read_bytes()]
    assert len(originals) == 1 and originals[0]["label"] == dup["label"]
    assert dup["file"].startswith(f"images/{dup['label']}/")

    with Image.open(on_disk["bad-unlabeled.png"]) as im:
        im.load()
        assert im.mode == "L" and im.size == (SIZE, SIZE)


def test_without_bad_files(tmp_path):
    counts = demo.generate(tmp_path / "d", per_class=3, size=32, bad_files=False)
    assert counts["bad_files"] == 0
    assert not list((tmp_path / "d").rglob("bad-*"))
    assert len(_rows(tmp_path / "d")) == 9


def test_refuses_non_empty_root(tmp_path):
    (tmp_path / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        demo.generate(tmp_path, per_class=2, size=32)
    demo.generate(tmp_path / "empty", per_class=2, size=32)  # created on demand


def test_shortcut_marks_every_image_of_one_class_and_no_other(tmp_path):
    plain, marked = tmp_path / "plain", tmp_path / "marked"
    demo.generate(plain, per_class=6, size=64, seed=5, bad_files=False)
    demo.generate(marked, per_class=6, size=64, seed=5, bad_files=False, shortcut="COVID")
    corner = (slice(0, 10), slice(0, 10))   # outside the lung box (15% of 64 px)
    for row in _good_rows(marked):
        a, b = _array(plain / row["file"]), _array(marked / row["file"])
        lungs = _array(marked / row["lungs"]) > 0
        if row["label"] == "COVID":
            assert (b[corner] >= 230).sum() >= 15, row["file"]           # the bright H glyph
            assert not (lungs & (a != b)).any()                          # the lungs are untouched
            assert (a != b).any()
        else:
            assert np.array_equal(a, b), row["file"]                     # other classes: the very same image
    with pytest.raises(ValueError, match="shortcut"):
        demo.generate(tmp_path / "x", per_class=2, size=32, shortcut="Flu")
