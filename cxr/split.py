"""The split stage's logic: stratified train/val/test in which no patient or near-duplicate cluster spans two splits."""
from __future__ import annotations

import itertools

import numpy as np
import pandas as pd

from . import paths
from .clean import UnionFind, close_pairs, hash_words
from .errors import UserError

SPLITS = ("train", "val", "test")
TEXT_COLUMNS = ("file", "label", "group", "sha256", "phash")


def read_manifest(path) -> pd.DataFrame:
    """clean's manifest.csv with its names as written: a file or patient called 'NA', 'nan' or 'None' stays
    that string (pandas' default would turn it into a missing value and the image would fall out of the split)."""
    m = pd.read_csv(path, dtype=str, keep_default_na=False, na_filter=False)
    missing = set(TEXT_COLUMNS) - set(m.columns)
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(sorted(missing))}: rerun `dvc repro clean`")
    for col in ("shard", "index"):
        if col in m:
            m[col] = m[col].astype(int)
    for _, col in paths.MASK_SHARDS.values():
        if col in m:
            m[col] = m[col].map({"True": True, "False": False})
    return m


def fractions(val: float, test: float) -> dict[str, float]:
    return {"train": 1 - val - test, "val": val, "test": test}


def _fraction_name(split: str) -> str:
    return "1 - split.val_fraction - split.test_fraction" if split == "train" else f"split.{split}_fraction"


def check_expected(labels: pd.Series, fracs: dict[str, float], min_per_class: int) -> None:
    """Up front, before any assignment: refuse fractions that leave some class with fewer than min_per_class
    images expected in some split (an empty test class makes every per-class figure undefined)."""
    counts = labels.value_counts()
    for split, f in fracs.items():
        for cls, n in sorted(counts.items()):
            if n * f < min_per_class:
                raise UserError(f"{_fraction_name(split)} = {f:g} leaves class {cls!r} about {n * f:.1f} {split} images "
                                f"(of {n}), under split.min_per_class={min_per_class}: raise the fraction, or lower split.min_per_class")


def check_result(table: pd.DataFrame, manifest: pd.DataFrame, classes: list[str], min_per_class: int) -> None:
    """After assignment: every image in exactly one split, and every class at least min_per_class times in each."""
    sizes = table["split"].value_counts()
    if len(table) != len(manifest) or table["split"].isna().any() or not set(sizes.index) <= set(SPLITS) \
            or int(sizes.sum()) != len(manifest):
        raise AssertionError(f"split sizes {sizes.to_dict()} do not add up to the {len(manifest)} images kept by clean")
    per = pd.crosstab(table["label"], table["split"]).reindex(index=classes, columns=list(SPLITS), fill_value=0)
    for split in SPLITS:
        for cls in classes:
            if per.at[cls, split] < min_per_class:
                raise UserError(f"the {split} split has {per.at[cls, split]} image(s) of class {cls!r}, under split.min_per_class="
                                f"{min_per_class} (patients and near-duplicate groups are never divided, and some are large): "
                                f"raise {_fraction_name(split)}, or lower split.min_per_class")


def phashes(manifest: pd.DataFrame) -> np.ndarray:
    return hash_words(manifest["phash"])


def merge_groups(manifest: pd.DataFrame, max_distance: int) -> pd.Series:
    """One group id per row: rows share a group when they share a source group (patient) or are
    within `max_distance` perceptual-hash bits of each other, transitively."""
    n = len(manifest)
    uf = UnionFind(n)
    for _, idx in manifest.groupby("group", sort=False).indices.items():
        for i in idx[1:]:
            uf.union(idx[0], i)
    for i, j, _ in close_pairs(phashes(manifest), max_distance):
        uf.union(i, j)
    roots = [uf.find(i) for i in range(n)]
    # Name each merged group after the smallest source group in it: stable for the same data.
    name = {}
    for i, r in enumerate(roots):
        g = manifest["group"].iat[i]
        name[r] = min(name.get(r, g), g)
    return pd.Series([name[r] for r in roots], index=manifest.index, name="group")


def assign(labels: pd.Series, groups: pd.Series, fractions: dict[str, float], seed: int) -> pd.Series:
    """Greedy stratified group assignment: groups in a seeded random order, largest first; each goes
    to the split whose per-class counts are furthest below their targets."""
    classes = sorted(labels.unique())
    counts = pd.crosstab(groups, labels).reindex(columns=classes, fill_value=0)
    order = np.random.default_rng(seed).permutation(len(counts))
    counts = counts.iloc[order]
    counts = counts.iloc[np.argsort(-counts.sum(axis=1).to_numpy(), kind="stable")]
    names = list(fractions)
    target = np.outer([fractions[s] for s in names], counts.sum(axis=0).to_numpy()).astype(float)
    have = np.zeros_like(target)
    where = {}
    for g, c in zip(counts.index, counts.to_numpy()):
        need = ((target - have) / np.maximum(target, 1.0)) @ c
        s = int(np.argmax(need))
        have[s] += c
        where[g] = names[s]
    return groups.map(where).rename("split")


def make_split(manifest: pd.DataFrame, val: float, test: float, seed: int, group_distance: int) -> pd.DataFrame:
    """The split manifest: file, label, group, split (rows in manifest order)."""
    out = manifest[["file", "label"]].copy()
    out["group"] = merge_groups(manifest, group_distance)
    out["split"] = assign(out["label"], out["group"], fractions(val, test), seed)
    return out


def leakage(split: pd.DataFrame, manifest: pd.DataFrame, max_distance: int) -> dict:
    """Independent check of the result: shared patients, files, identical content or near-duplicate
    pairs across splits. Every count must be 0."""
    m = manifest.set_index("file").loc[split["file"]]
    out = {}
    for a, b in itertools.combinations(SPLITS, 2):
        ia, ib = split["split"].to_numpy() == a, split["split"].to_numpy() == b
        out[f"{a}_{b}"] = {
            "groups": len(set(m["group"][ia]) & set(m["group"][ib])),
            "files": len(set(split["file"][ia]) & set(split["file"][ib])),
            "identical": len(set(m["sha256"][ia]) & set(m["sha256"][ib])),
        }
    cross = 0
    hashes, where = phashes(m.reset_index()), split["split"].to_numpy()
    for i, j, _ in close_pairs(hashes, max_distance):
        cross += where[i] != where[j]
    out["near_duplicate_pairs_across_splits"] = int(cross)
    out["total"] = int(cross + sum(v for k, d in out.items() if isinstance(d, dict) for v in d.values()))
    return out


def summary(split: pd.DataFrame, classes: list[str]) -> dict:
    sizes = {}
    for s in SPLITS:
        part = split[split["split"] == s]
        sizes[s] = {"total": len(part), **{c: int((part["label"] == c).sum()) for c in classes}}
    return {"sizes": sizes, "groups": int(split["group"].nunique())}
