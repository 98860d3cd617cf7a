"""cxr.split on a synthetic manifest: grouping, near-duplicate merging, stratification, determinism, leakage."""
import hashlib

import numpy as np
import pandas as pd
import pytest

from cxr import atomic
from cxr.split import leakage, make_split, merge_groups, summary

CLASSES = {"Normal": 300, "COVID": 200, "Viral Pneumonia": 100}
VAL, TEST, DIST = 0.15, 0.15, 8


def _manifest(seed=0, near_pairs=10) -> pd.DataFrame:
    """~600 rows; patients of 1-3 images of one class; random (far apart) phashes; `near_pairs` pairs of
    images from different patients made 3 bits apart."""
    rng = np.random.default_rng(seed)
    rows, pid = [], 0
    for label, n in CLASSES.items():
        left = n
        while left:
            k = int(min(left, rng.integers(1, 4)))
            for j in range(k):
                rows.append({"file": f"{label}/p{pid:04d}_{j}.png", "label": label, "group": f"p{pid:04d}"})
            left -= k
            pid += 1
    m = pd.DataFrame(rows)
    hashes = rng.integers(0, 2**63, len(m), dtype=np.int64).astype(np.uint64) | (
        rng.integers(0, 2, len(m)).astype(np.uint64) << np.uint64(63))
    # pairs from different patients that are near-duplicates of each other
    singles = m.groupby("group")["file"].transform("size").to_numpy() == 1
    idx = np.flatnonzero(singles)
    for a, b in zip(idx[: 2 * near_pairs : 2], idx[1 : 2 * near_pairs : 2]):
        hashes[b] = hashes[a] ^ np.uint64(0b10101)
    m["phash"] = [f"{int(h):016x}" for h in hashes]
    m["sha256"] = [hashlib.sha256(f.encode()).hexdigest() for f in m["file"]]
    m.attrs["near_pairs"] = list(zip(m["file"].iloc[idx[: 2 * near_pairs : 2]], m["file"].iloc[idx[1 : 2 * near_pairs : 2]]))
    return m


@pytest.fixture(scope="module")
def manifest():
    return _manifest()


@pytest.fixture(scope="module")
def table(manifest):
    return make_split(manifest, VAL, TEST, seed=42, group_distance=DIST)


def test_shape_and_order(manifest, table):
    assert list(table.columns) == ["file", "label", "group", "split"]
    assert list(table["file"]) == list(manifest["file"])
    assert set(table["split"]) == {"train", "val", "test"}
    assert table["split"].notna().all()


def test_no_patient_in_two_splits(manifest, table):
    per_patient = table.assign(patient=manifest["group"]).groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()
    assert (manifest.groupby("group").size() > 1).sum() > 50      # the check had multi-image patients to split


def test_near_duplicates_of_different_patients_share_a_split(manifest, table):
    pairs = manifest.attrs["near_pairs"]
    assert len(pairs) == 10
    where = dict(zip(table["file"], table["split"]))
    group = dict(zip(table["file"], table["group"]))
    src = dict(zip(manifest["file"], manifest["group"]))
    for a, b in pairs:
        assert src[a] != src[b]
        assert where[a] == where[b], (a, b)
        assert group[a] == group[b] == min(src[a], src[b])


def test_merge_is_transitive_and_respects_distance():
    m = pd.DataFrame({
        "file": ["a", "b", "c", "d", "e"],
        "group": ["g1", "g2", "g3", "g4", "g4"],
        "phash": [f"{h:016x}" for h in (0x0, 0x3F, 0x3F3F, 0xFFFF0000, 0xFFFFFFFF00000000)],
    })
    # a-b 6 bits, b-c 6 bits (a-c 12): one cluster at 8; d and e share a patient
    assert list(merge_groups(m, 8)) == ["g1", "g1", "g1", "g4", "g4"]
    assert list(merge_groups(m, 5)) == ["g1", "g2", "g3", "g4", "g4"]
    assert list(merge_groups(m, -1)) == ["g1", "g2", "g3", "g4", "g4"]


def test_near_duplicate_pulls_in_the_whole_patient():
    # b and c belong to patient g2; c is a near-duplicate of g1's only image: all three are one group
    m = pd.DataFrame({"file": ["a", "b", "c"], "group": ["g1", "g2", "g2"],
                      "phash": [f"{h:016x}" for h in (0xF0F0, 0xFFFFFFFF00000000, 0xF0F1)]})
    assert list(merge_groups(m, 8)) == ["g1", "g1", "g1"]


def test_bridged_patients_stay_together_in_the_split():
    m = _manifest(seed=3, near_pairs=0)
    sizes = m.groupby("group")["file"].transform("size").to_numpy()
    multi = np.flatnonzero(sizes > 1)
    hashes = [int(h, 16) for h in m["phash"]]
    bridged = []
    for k in range(10):                      # member of a later multi-image patient ~ image of an earlier patient
        i, j = multi[-1 - 3 * k], 5 * k
        assert m["group"].iat[j] < m["group"].iat[i]
        hashes[i] = hashes[j] ^ 0b11
        bridged.append((m["group"].iat[i], m["group"].iat[j]))
    m["phash"] = [f"{h:016x}" for h in hashes]
    t = make_split(m, VAL, TEST, seed=1, group_distance=DIST)
    by_patient = t.assign(patient=m["group"]).groupby("patient")["split"].agg(set)
    for p, q in bridged:
        assert len(by_patient[p]) == 1 and by_patient[p] == by_patient[q], (p, q)
    assert leakage(t, m, DIST)["total"] == 0


def test_stratified_fractions(table):
    target = {"train": 1 - VAL - TEST, "val": VAL, "test": TEST}
    for label, n in CLASSES.items():
        part = table[table["label"] == label]
        assert len(part) == n
        for s, frac in target.items():
            got = (part["split"] == s).mean()
            assert abs(got - frac) <= 0.03, f"{label} {s}: {got:.3f} vs {frac}"
    sizes = table["split"].value_counts(normalize=True)
    for s, frac in target.items():
        assert abs(sizes[s] - frac) <= 0.02


def test_summary_counts(table):
    out = summary(table, list(CLASSES))
    assert sum(v["total"] for v in out["sizes"].values()) == len(table)
    for s, v in out["sizes"].items():
        assert v["total"] == sum(v[c] for c in CLASSES)
    assert out["groups"] == table["group"].nunique()


def test_deterministic_for_a_seed(manifest, table, tmp_path):
    again = make_split(manifest.copy(), VAL, TEST, seed=42, group_distance=DIST)
    pd.testing.assert_frame_equal(table, again)
    atomic.write_csv(tmp_path / "a.csv", table)
    atomic.write_csv(tmp_path / "b.csv", again)
    assert (tmp_path / "a.csv").read_bytes() == (tmp_path / "b.csv").read_bytes()
    other = make_split(manifest, VAL, TEST, seed=7, group_distance=DIST)
    assert not other["split"].equals(table["split"])
    assert (other["split"] != table["split"]).mean() > 0.1


def test_leakage_zero_for_the_real_split(manifest, table):
    leaks = leakage(table, manifest, DIST)
    assert leaks["total"] == 0
    assert leaks["near_duplicate_pairs_across_splits"] == 0
    assert set(leaks) == {"train_val", "train_test", "val_test", "near_duplicate_pairs_across_splits", "total"}


def _move_one(table, files):
    moved = table.copy()
    i = moved.index[moved["file"] == files][0]
    moved.loc[i, "split"] = {"train": "test", "val": "train", "test": "train"}[moved.loc[i, "split"]]
    return moved, moved.loc[i, "split"]


def test_leakage_detects_a_split_patient(manifest, table):
    multi = manifest.groupby("group").size()
    patient = multi[multi > 1].index[0]
    member = manifest.loc[manifest["group"] == patient, "file"].iloc[0]
    moved, _ = _move_one(table, member)
    leaks = leakage(moved, manifest, DIST)
    assert leaks["total"] > 0
    assert sum(leaks[k]["groups"] for k in ("train_val", "train_test", "val_test")) == 1


def test_leakage_detects_split_near_duplicates_and_identical_content(manifest, table):
    a, b = manifest.attrs["near_pairs"][0]
    moved, _ = _move_one(table, b)
    leaks = leakage(moved, manifest, DIST)
    assert leaks["near_duplicate_pairs_across_splits"] == 1 and leaks["total"] >= 1

    same = manifest.copy()
    same.loc[same["file"] == b, "sha256"] = same.loc[same["file"] == a, "sha256"].iloc[0]
    leaks = leakage(moved, same, DIST)
    assert sum(leaks[k]["identical"] for k in ("train_val", "train_test", "val_test")) == 1
