"""Dataset adapters: one per source, each mapping its own layout and labels to common records.

Everything after `clean` sees only `Record(file, label, group, mask)`; nothing downstream knows the source.
Every file in the raw folder ends up either as a record or as a `Drop(file, reason)`, so counts add up.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass(frozen=True)
class Record:
    file: str            # path relative to the raw folder, forward slashes
    label: str
    group: str           # patient (or image) id: never split across train/val/test
    mask: str | None = None   # lesion mask, where the source has one


@dataclass(frozen=True)
class Drop:
    file: str
    reason: str
    detail: str = ""


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _all_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _norm(name: str) -> str:
    """Folder/class names compared loosely: 'Viral Pneumonia' == 'VIRAL_PNEUMONIA'; 'COVID-19' == 'COVID'."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return "covid" if key == "covid19" else key


# --- COVID-19 Radiography Database -------------------------------------------------------------

RADIOGRAPHY_CLASSES = ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity")


def _radiography_root(raw: Path) -> Path:
    """The folder holding the class folders, in the current or the older archive layout."""
    known = {_norm(c) for c in RADIOGRAPHY_CLASSES}
    candidates = [raw] + sorted(p for p in raw.rglob("*") if p.is_dir())
    for d in candidates:
        subdirs = {_norm(p.name) for p in d.iterdir() if p.is_dir()}
        if len(subdirs & known) >= 2:
            return d
    raise UserError(
        f"{raw}: no COVID-19 Radiography Database found (expected COVID-19_Radiography_Dataset/<class>/images/*.png "
        "or 'COVID-19 Radiography Database/<CLASS>/*.png')"
    )


def radiography(raw: Path, classes: list[str]) -> tuple[list[Record], list[Drop]]:
    """Both archive layouts: `<class>/images/*.png` (+ `masks/`) and the older `<CLASS>/*.png`."""
    root = _radiography_root(raw)
    wanted = {_norm(c): c for c in classes}
    known = {_norm(c) for c in RADIOGRAPHY_CLASSES}
    unknown = [c for c in classes if _norm(c) not in known]
    if unknown:
        raise UserError(f"datasets.covid-radiography.classes: unknown class {unknown[0]!r}; the archive has {', '.join(RADIOGRAPHY_CLASSES)}")
    records, drops = [], []
    for path in _all_files(raw):
        rel = _rel(path, raw)
        parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
        cls = _norm(parts[0]) if len(parts) >= 2 else None
        inner = parts[1:-1]
        if cls in wanted and inner in ((), ("images",)):
            records.append(Record(rel, wanted[cls], group=path.stem))
        elif cls in known and inner and inner[0] == "masks":
            drops.append(Drop(rel, "auxiliary_file", "lung mask, not used for training"))
        elif cls in known and cls not in wanted:
            drops.append(Drop(rel, "class_not_selected", f"class folder {parts[0]!r} is not in datasets.covid-radiography.classes"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            drops.append(Drop(rel, "auxiliary_file", "not an image file (metadata, readme)"))
        else:
            drops.append(Drop(rel, "unlabeled", "not inside a class folder"))
    return records, drops


# --- ieee8023 covid-chestxray-dataset -----------------------------------------------------------

def _find_file(raw: Path, name: str) -> Path:
    hits = sorted(raw.rglob(name), key=lambda p: len(p.parts))
    if not hits:
        raise UserError(f"{raw}: no {name} found; is this the right dataset?")
    return hits[0]


def is_covid_finding(finding: str) -> bool:
    """'COVID-19', 'COVID-19, ARDS', 'Pneumonia/Viral/COVID-19' are COVID; 'SARS', 'Pneumonia' are not."""
    return any(_norm(tok) == "covid" for tok in re.split(r"[,/;]", finding))


def chestxray(raw: Path, classes: list[str], positive: str, views: list[str]) -> tuple[list[Record], list[Drop]]:
    """Binary COVID-19 vs non-COVID, frontal X-rays only, grouped by patient."""
    meta_path = _find_file(raw, "metadata.csv")
    base = meta_path.parent
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    missing_cols = {"patientid", "finding", "view", "modality", "filename"} - set(meta.columns)
    if missing_cols:
        raise UserError(f"{meta_path}: missing columns {', '.join(sorted(missing_cols))}")
    negative = next(c for c in classes if c != positive)
    frontal = {v.strip().lower() for v in views}
    records, drops, referenced = [], [], set()
    for row in meta.itertuples(index=False):
        folder = getattr(row, "folder", "") or "images"
        path = base / folder / row.filename
        rel = _rel(path, raw)
        referenced.add(path)
        finding = row.finding.strip()
        if row.modality.strip().lower() != "x-ray":
            drops.append(Drop(rel, "not_xray", f"modality {row.modality!r}"))
        elif row.view.strip().lower() not in frontal:
            drops.append(Drop(rel, "view_excluded", f"view {row.view!r} is not in datasets.covid-chestxray.views"))
        elif finding.lower() in ("", "todo", "unknown"):
            drops.append(Drop(rel, "unknown_finding", f"finding {finding!r}"))
        elif not path.is_file():
            drops.append(Drop(rel, "missing_file", "named in metadata.csv but not present"))
        else:
            label = positive if is_covid_finding(finding) else negative
            records.append(Record(rel, label, group=f"patient-{row.patientid.strip()}"))
    for path in _all_files(raw):
        if path in referenced or path == meta_path:
            continue
        rel = _rel(path, raw)
        if path.suffix.lower() in IMAGE_SUFFIXES and path.parent == base / "images":
            drops.append(Drop(rel, "unlabeled", "not named in metadata.csv"))
        else:
            drops.append(Drop(rel, "auxiliary_file", "not an image of the collection"))
    return records, drops


# --- demo (generated by cxr.demo) ---------------------------------------------------------------

def demo(raw: Path, classes: list[str]) -> tuple[list[Record], list[Drop]]:
    """The generated demo set: metadata.csv (file, label, patientid, mask), images/, masks/."""
    meta_path = raw / "metadata.csv"
    if not meta_path.is_file():
        raise UserError(f"{raw}: no metadata.csv; run the download stage with dataset: demo")
    meta = pd.read_csv(meta_path, dtype=str, keep_default_na=False)
    records, drops, referenced = [], [], {meta_path}
    for row in meta.itertuples(index=False):
        path = raw / row.file
        referenced.add(path)
        if row.mask:
            referenced.add(raw / row.mask)
        if row.label not in classes:
            drops.append(Drop(row.file, "class_not_selected", f"label {row.label!r}"))
        elif not path.is_file():
            drops.append(Drop(row.file, "missing_file", "named in metadata.csv but not present"))
        else:
            records.append(Record(row.file, row.label, group=row.patientid, mask=row.mask or None))
    for path in _all_files(raw):
        if path not in referenced:
            reason = "unlabeled" if path.suffix.lower() in IMAGE_SUFFIXES else "auxiliary_file"
            drops.append(Drop(_rel(path, raw), reason, "not named in metadata.csv"))
    return records, drops


def load(name: str, raw: Path, ds: dict) -> tuple[list[Record], list[Drop]]:
    """Records and drops for the dataset named in params (`ds` is its params section)."""
    if not raw.is_dir():
        raise UserError(f"{raw} not found: run `dvc repro download` first")
    if name == "covid-radiography":
        return radiography(raw, ds["classes"])
    if name == "covid-chestxray":
        return chestxray(raw, ds["classes"], ds["positive"], ds["views"])
    return demo(raw, ds["classes"])
