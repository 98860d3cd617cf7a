"""The dataset registry: one adapter per source (how it is fetched, its `datasets.<name>` params, its records).

Everything after `clean` sees only `Record(file, label, group, mask, lungs)`; nothing downstream knows the source.
Every file in the raw folder ends up either in a record (an image, or a mask read with one) or as a
`Drop(file, reason)`, so counts add up.
A new source is one `Source` subclass in SOURCES and one `datasets.<name>` block in params.yaml.
"""
from __future__ import annotations

import configparser
import errno
import functools
import io
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from . import params
from .errors import UserError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp"}


@dataclass(frozen=True)
class Record:
    file: str            # path relative to the raw folder, forward slashes
    label: str
    group: str           # patient (or image) id: never split across train/val/test
    mask: str | None = None   # lesion mask, where the source has one
    lungs: str | None = None  # lung-field mask, where the source has one (the radiography archive's masks/)


@dataclass(frozen=True)
class Drop:
    file: str
    reason: str
    detail: str = ""


def _rel(path: Path, root: Path) -> str:
    return path.relative_to(root).as_posix()


def _config_cache_dir(dvc_dir: Path) -> str | None:
    """`cache.dir` as set in `.dvc/config.local` (which wins) or `.dvc/config`; None where neither sets it or
    a file cannot be read or parsed (then DVC's default applies)."""
    for name in ("config.local", "config"):
        parser = configparser.ConfigParser(strict=False, interpolation=None)
        try:
            parser.read(dvc_dir / name, encoding="utf-8")
        except (configparser.Error, OSError, UnicodeDecodeError):
            continue
        value = parser.get("cache", "dir", fallback="").strip().strip("\"'")
        if value:
            return value
    return None


@functools.lru_cache(maxsize=None)
def dvc_cache_dir(start: str) -> Path | None:
    """The real DVC cache folder of the project holding `start` (stages run from the repository root): the
    nearest folder with a `.dvc` folder, upwards; its `.dvc/cache`, or `cache.dir` from its config (a relative
    one is relative to `.dvc`, as DVC reads it). None outside any DVC project. Cached: read once per process."""
    here = Path(start).resolve()
    for folder in (here, *here.parents):
        dvc_dir = folder / ".dvc"
        if dvc_dir.is_dir():
            configured = _config_cache_dir(dvc_dir)
            return (dvc_dir / os.path.expanduser(configured) if configured else dvc_dir / "cache").resolve()
    return None


def _in_dvc_cache(target: Path) -> bool:
    """A file of this project's DVC cache (`<cache>/.../ab/cdef0123...`): DVC's symlink and hardlink cache types
    link outputs there. The name alone is not enough: a link to any such name elsewhere would leave the dataset."""
    hexdigits = set("0123456789abcdef")
    shaped = len(target.parent.name) == 2 and set(target.parent.name) <= hexdigits and len(target.name) >= 30 \
        and set(target.name.split(".")[0]) <= hexdigits
    if not shaped:
        return False
    try:
        cache = dvc_cache_dir(os.getcwd())
    except OSError:  # the working directory is gone: no project, no cache
        return False
    return cache is not None and target.is_relative_to(cache)


def outside(path: Path, root: Path) -> str | None:
    """Why `path` is not a file of the dataset folder `root` (None when it is one): it leaves `root` by name
    (`..`, an absolute path), through a linked folder, or as a link to a file elsewhere (except into DVC's cache)."""
    lexical = Path(os.path.normpath(path))
    if not lexical.is_relative_to(os.path.normpath(root)):
        return "the path leaves the dataset folder"
    try:
        real_root = root.resolve()
        if not lexical.parent.resolve().is_relative_to(real_root):
            return "a linked folder leads outside the dataset folder"
        if lexical.is_symlink():
            target = lexical.resolve()
            if not (target.is_relative_to(real_root) or _in_dvc_cache(target)):
                return "a link to a file outside the dataset folder"
    except RuntimeError:  # a link loop
        return "a link that loops"
    except OSError as err:
        if err.errno == errno.ELOOP:
            return "a link that loops"
    return None


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # e.g. a name too long for the file system
        return False


def scan(root: Path) -> tuple[list[Path], list[Drop]]:
    """Every regular file below root, sorted, and a drop for everything else found there: links that leave
    root or lead nowhere, linked folders (never entered), special files (pipes, sockets, devices), and what
    cannot be read at all (a folder that cannot be listed, a path too long for the system: `unreadable`)."""
    files, drops = [], []

    def unreadable(path: Path, err: OSError, what: str) -> None:
        drops.append(Drop(_rel(path, root) if path != root else ".", "unreadable", f"{what}: {err.strerror or err}"))

    # followlinks=False: linked folders are listed, not entered
    for dirpath, dirnames, filenames in os.walk(root, onerror=lambda err: unreadable(Path(err.filename or root), err,
                                                                     "a folder that cannot be listed")):
        here = Path(dirpath)
        for name in list(dirnames):
            try:
                linked = (here / name).is_symlink()
            except OSError as err:  # e.g. the path is longer than the system allows
                dirnames.remove(name)
                unreadable(here / name, err, "a folder that cannot be read")
                continue
            if linked:
                drops.append(Drop(_rel(here / name, root), "link", "a linked folder: not followed"))
        for name in filenames:
            path = here / name
            try:
                why = outside(path, root) if path.is_symlink() else None
                if why:
                    drops.append(Drop(_rel(path, root), "outside_dataset", why))
                elif not path.exists():
                    drops.append(Drop(_rel(path, root), "broken_link", "a link to nothing"))
                elif not path.is_file():
                    drops.append(Drop(_rel(path, root), "not_a_regular_file", "a pipe, socket or device"))
                else:
                    files.append(path)
            except OSError as err:
                unreadable(path, err, "a file that cannot be read")
    return sorted(files), sorted(drops, key=lambda d: d.file)


def _all_files(root: Path) -> list[Path]:
    return scan(root)[0]


# pandas holds a table in ~16 times its bytes: 64 MiB (ieee8023's metadata.csv is under 1 MB) bounds it near 1 GB
MAX_TABLE_BYTES = 64 * 2**20


def read_table(path: Path, required: set[str]) -> pd.DataFrame:
    """A metadata CSV as strings, exactly as written: no value becomes NaN ('NA', 'None', 'nan' are names),
    missing fields are ''. Anything that is not a UTF-8 CSV table with the required columns is a UserError."""
    try:
        size = path.stat().st_size
        if size > MAX_TABLE_BYTES:
            raise UserError(f"{path}: {size:,} bytes is too large for a metadata table (at most {MAX_TABLE_BYTES:,})")
        data = path.read_bytes()
    except OSError as err:
        raise UserError(f"{path}: cannot read it ({err.strerror or err})") from None
    if b"\0" in data:
        raise UserError(f"{path}: binary data, not a CSV table")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise UserError(f"{path}: not UTF-8 text (byte {data[err.start]:#04x} at offset {err.start}); save it as UTF-8") from None
    if not text.strip():
        raise UserError(f"{path}: empty, expected a CSV table with columns {', '.join(sorted(required))}")
    try:
        with warnings.catch_warnings():  # a row longer than the header would silently shift every column
            warnings.simplefilter("error", pd.errors.ParserWarning)
            table = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False, na_filter=False, index_col=False)
    except (pd.errors.ParserError, pd.errors.ParserWarning, pd.errors.EmptyDataError, ValueError) as err:
        first = " ".join(str(err).split())[:200]
        raise UserError(f"{path}: not a well-formed CSV table ({first})") from None
    table.columns = [str(c).strip() for c in table.columns]
    missing = required - set(table.columns)
    if missing:
        raise UserError(f"{path}: missing columns {', '.join(sorted(missing))}")
    return table.fillna("").astype(str)


def _named(raw: Path, base: Path, *parts: str) -> tuple[Path, str | None]:
    """A file named in a metadata table (relative to base), normalised; and why it is refused, if it is."""
    path = Path(os.path.normpath(os.path.join(base, *parts)))
    return path, outside(path, raw)


def _already_dropped(path: Path, raw: Path, drops: list[Drop]) -> bool:
    """A file scan() has dropped already (a link leaving raw, a dangling link): one drop per file, not two."""
    return path.is_relative_to(raw) and _rel(path, raw) in {d.file for d in drops}


def _norm(name: str) -> str:
    """Folder/class names compared loosely: 'Viral Pneumonia' == 'VIRAL_PNEUMONIA'; 'COVID-19' == 'COVID'."""
    key = re.sub(r"[^a-z0-9]", "", name.lower())
    return "covid" if key == "covid19" else key


# --- COVID-19 Radiography Database -------------------------------------------------------------

RADIOGRAPHY_CLASSES = ("COVID", "Normal", "Viral Pneumonia", "Lung_Opacity")


def _real_folders(raw: Path) -> list[Path]:
    """raw and every folder inside it, sorted; never a linked folder nor one reached through it (scan() drops
    those), so a link to class folders elsewhere cannot pass for the dataset."""
    found = []
    for dirpath, dirnames, _ in os.walk(raw):  # followlinks=False
        here = Path(dirpath)
        dirnames[:] = [n for n in dirnames if not (here / n).is_symlink()]
        found.extend(here / n for n in dirnames)
    return [raw] + sorted(found)


def _radiography_root(raw: Path) -> Path:
    """The folder holding the class folders, in the current or the older archive layout; only real folders
    count, as only their files become records."""
    known = {_norm(c) for c in RADIOGRAPHY_CLASSES}
    for d in _real_folders(raw):
        subdirs = {_norm(p.name) for p in d.iterdir() if p.is_dir() and not p.is_symlink()}
        if len(subdirs & known) >= 2:
            return d
    raise UserError(
        f"{raw}: no COVID-19 Radiography Database found (expected COVID-19_Radiography_Dataset/<class>/images/*.png "
        "or 'COVID-19 Radiography Database/<CLASS>/*.png')"
    )


def radiography(raw: Path, classes: list[str]) -> tuple[list[Record], list[Drop]]:
    """Both archive layouts: `<class>/images/*.png` and the older `<CLASS>/*.png`. The current archive's
    `<class>/masks/<name>` is the lung-field mask of `<class>/images/<name>`: it goes with that record (a mask
    with no such record is an auxiliary file)."""
    raw = Path(os.path.normpath(raw))
    root = _radiography_root(raw)
    wanted = {_norm(c): c for c in classes}
    known = {_norm(c) for c in RADIOGRAPHY_CLASSES}
    unknown = [c for c in classes if _norm(c) not in known]
    if unknown:
        raise UserError(f"datasets.covid-radiography.classes: unknown class {unknown[0]!r}; the archive has {', '.join(RADIOGRAPHY_CLASSES)}")
    files, drops = scan(raw)
    present = set(files)
    records = []
    for path in files:
        rel = _rel(path, raw)
        parts = path.relative_to(root).parts if path.is_relative_to(root) else ()
        cls = _norm(parts[0]) if len(parts) >= 2 else None
        inner = parts[1:-1]
        if cls in wanted and inner in ((), ("images",)):
            lungs = path.parent.parent / "masks" / path.name if inner else None
            records.append(Record(rel, wanted[cls], group=path.stem, lungs=_rel(lungs, raw) if lungs in present else None))
        elif cls in wanted and inner == ("masks",) and path.parent.parent / "images" / path.name in present:
            continue  # the lung mask of a record, read with it
        elif cls in wanted and inner and inner[0] == "masks":
            drops.append(Drop(rel, "auxiliary_file", "a lung mask of no image of the class"))
        elif cls in known and cls not in wanted:
            drops.append(Drop(rel, "class_not_selected", f"class folder {parts[0]!r} is not in datasets.covid-radiography.classes"))
        elif path.suffix.lower() not in IMAGE_SUFFIXES:
            drops.append(Drop(rel, "auxiliary_file", "not an image file (metadata, readme)"))
        else:
            drops.append(Drop(rel, "unlabeled", "not inside a class folder"))
    return records, drops


# --- ieee8023 covid-chestxray-dataset -----------------------------------------------------------

def _find_file(raw: Path, name: str, files: list[Path] | None = None) -> Path:
    """The shallowest file called `name` among `files` (default: scan(raw)), so a link never stands in for it."""
    hits = sorted((p for p in (scan(raw)[0] if files is None else files) if p.name == name), key=lambda p: (len(p.parts), p))
    if not hits:
        raise UserError(f"{raw}: no {name} found; is this the right dataset?")
    return hits[0]


def is_covid_finding(finding: str) -> bool:
    """'COVID-19', 'COVID-19, ARDS', 'Pneumonia/Viral/COVID-19' are COVID; 'SARS', 'Pneumonia' are not."""
    return any(_norm(tok) == "covid" for tok in re.split(r"[,/;]", finding))


def chestxray(raw: Path, classes: list[str], positive: str, views: list[str]) -> tuple[list[Record], list[Drop]]:
    """Binary COVID-19 vs non-COVID, frontal X-rays only, grouped by patient."""
    raw = Path(os.path.normpath(raw))
    files, drops = scan(raw)
    scan_drops = list(drops)
    meta_path = _find_file(raw, "metadata.csv", files)
    base = meta_path.parent
    meta = read_table(meta_path, {"patientid", "finding", "view", "modality", "filename"})
    negative = next(c for c in classes if c != positive)
    frontal = {v.strip().lower() for v in views}
    records, referenced = [], set()
    for row in meta.itertuples(index=False):
        folder = getattr(row, "folder", "") or "images"
        path, refused = _named(raw, base, folder, row.filename)
        if _already_dropped(path, raw, scan_drops):
            continue
        if refused or not row.filename:
            named = f"{folder}/{row.filename}"
            drops.append(Drop(named, "outside_dataset", f"named in metadata.csv: {refused}; refused") if refused
                         else Drop(named, "missing_file", "metadata.csv names no file"))
            continue
        rel = _rel(path, raw)
        referenced.add(path)
        finding = row.finding.strip()
        if row.modality.strip().lower() != "x-ray":
            drops.append(Drop(rel, "not_xray", f"modality {row.modality!r}"))
        elif row.view.strip().lower() not in frontal:
            drops.append(Drop(rel, "view_excluded", f"view {row.view!r} is not in datasets.covid-chestxray.views"))
        elif finding.lower() in ("", "todo", "unknown"):
            drops.append(Drop(rel, "unknown_finding", f"finding {finding!r}"))
        elif not _is_file(path):
            drops.append(Drop(rel, "missing_file", "named in metadata.csv but not present"))
        else:
            label = positive if is_covid_finding(finding) else negative
            pid = row.patientid.strip()  # no patient id: the image is its own group, not one with every other such image
            records.append(Record(rel, label, group=f"patient-{pid}" if pid else f"image-{rel}"))
    for path in files:
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
    """The generated demo set: metadata.csv (file, label, patientid, mask[, lungs]), images/, masks/, lungs/."""
    raw = Path(os.path.normpath(raw))
    meta_path = raw / "metadata.csv"
    if not meta_path.is_file() or outside(meta_path, raw):
        raise UserError(f"{raw}: no metadata.csv; run the download stage with dataset: demo")
    meta = read_table(meta_path, {"file", "label", "patientid", "mask"})
    files, drops = scan(raw)
    scan_drops = list(drops)
    records, referenced = [], {meta_path}
    for row in meta.itertuples(index=False):
        path, refused = _named(raw, raw, row.file)
        if _already_dropped(path, raw, scan_drops):
            continue
        mask, mask_refused = _named(raw, raw, row.mask) if row.mask else (None, None)
        named_lungs = getattr(row, "lungs", "")
        lungs, lungs_refused = _named(raw, raw, named_lungs) if named_lungs else (None, None)
        refusal = refused or mask_refused or lungs_refused
        if not row.file:
            drops.append(Drop(row.file, "missing_file", "metadata.csv names no file"))
            continue
        if refusal:
            if not refused:  # its own image is in the dataset: this is its one drop, not a second 'unlabeled'
                referenced.add(path)
            drops.append(Drop(row.file if refused else _rel(path, raw), "outside_dataset",
                              f"named in metadata.csv: {refusal}; refused"))
            continue
        rel = _rel(path, raw)
        referenced.add(path)
        referenced.update(p for p in (mask, lungs) if p is not None)
        if row.label not in classes:
            drops.append(Drop(rel, "class_not_selected", f"label {row.label!r}"))
        elif not _is_file(path):
            drops.append(Drop(rel, "missing_file", "named in metadata.csv but not present"))
        else:
            records.append(Record(rel, row.label, group=row.patientid or f"image-{rel}",
                                  mask=_rel(mask, raw) if mask is not None else None,
                                  lungs=_rel(lungs, raw) if lungs is not None else None))
    for path in files:
        if path not in referenced:
            reason = "unlabeled" if path.suffix.lower() in IMAGE_SUFFIXES else "auxiliary_file"
            drops.append(Drop(_rel(path, raw), reason, "not named in metadata.csv"))
    return records, drops


# --- any folder of class folders (external sets) --------------------------------------------------

def class_folders(raw: Path) -> tuple[list[Record], list[Drop]]:
    """`<label>/**/<image>`: the label is the top folder's name, each image its own group; files at the top
    and non-image files are drops."""
    raw = Path(os.path.normpath(raw))
    files, drops = scan(raw)
    records = []
    for path in files:
        rel = _rel(path, raw)
        parts = path.relative_to(raw).parts
        if path.suffix.lower() not in IMAGE_SUFFIXES or path.name.startswith("."):
            drops.append(Drop(rel, "auxiliary_file", "not an image file"))
        elif len(parts) < 2:
            drops.append(Drop(rel, "unlabeled", "not inside a class folder"))
        else:
            records.append(Record(rel, parts[0], group=f"image-{rel}"))
    return records, drops


# --- the registry -------------------------------------------------------------------------------

# owner/name (Kaggle's latest version, which DVC cannot see change), or owner/name/versions/N (pinned)
KAGGLE_HANDLE = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*(/versions/[1-9][0-9]*)?")


class Source:
    """A dataset source. `generated` sources are made by `generate` (never downloaded); the others come from the
    Kaggle handle in their block's `kaggle` key, or from a local copy under CXR_DATA_DIR (cxr.download)."""

    name: str
    generated = False

    def check(self, p: dict, key: str) -> None:
        """Validate the source's own keys of the block at `key` (classes and positive are checked already),
        reading each with cxr.params' helpers so that any other key is reported as unknown."""
        if not self.generated:
            handle = params.get(p, f"{key}.kaggle")
            if not isinstance(handle, str) or not KAGGLE_HANDLE.fullmatch(handle):
                params.fail(f"{key}.kaggle", "a Kaggle dataset handle owner/name or owner/name/versions/N", handle)

    def records(self, raw: Path, ds: dict) -> tuple[list[Record], list[Drop]]:
        """Records and drops for the files in `raw` (`ds`: the source's params block)."""
        raise NotImplementedError

    def generate(self, dest: Path, ds: dict) -> str:
        """Generated sources: write the dataset into the empty folder `dest`; return its version."""
        raise NotImplementedError

    def as_external(self) -> dict:
        """How the source is read as an external set (cxr.external): every label it has, the set's map picks.
        Independent of `datasets.<name>`, which configures training on the source."""
        raise NotImplementedError


def _known_classes(p: dict, key: str, known, same) -> None:
    """Class names the data can never provide fail while params are checked, before download runs."""
    for c in params.get(p, f"{key}.classes"):
        if same(c) not in {same(k) for k in known}:
            params.fail(f"{key}.classes", f"names from {', '.join(known)}", c)


class Radiography(Source):
    name = "covid-radiography"

    def check(self, p: dict, key: str) -> None:
        super().check(p, key)
        _known_classes(p, key, RADIOGRAPHY_CLASSES, _norm)  # class folders compare loosely, as radiography() does

    def records(self, raw, ds):
        return radiography(raw, ds["classes"])

    def as_external(self):
        return {"classes": list(RADIOGRAPHY_CLASSES)}


class ChestXray(Source):
    name = "covid-chestxray"

    def check(self, p: dict, key: str) -> None:
        super().check(p, key)
        params.names(p, f"{key}.views")
        if len(params.get(p, f"{key}.classes")) != 2:
            params.fail(f"{key}.classes", "two names (COVID, non-COVID)", params.get(p, f"{key}.classes"))

    def records(self, raw, ds):
        return chestxray(raw, ds["classes"], ds["positive"], ds["views"])

    def as_external(self):
        return {"classes": ["COVID-19", "non-COVID"], "positive": "COVID-19", "views": ["PA", "AP", "AP Supine"]}  # frontal views


class Demo(Source):
    name = "demo"
    generated = True

    def check(self, p: dict, key: str) -> None:
        from . import demo as generator

        _known_classes(p, key, generator.CLASSES, str)  # labels compare exactly, as demo() does
        params.integer(p, f"{key}.per_class", 4)
        params.integer(p, f"{key}.size", 32, 2048)
        params.integer(p, f"{key}.seed", 0)
        params.boolean(p, f"{key}.bad_files")
        shortcut = params.get(p, f"{key}.shortcut")
        if shortcut != "none" and shortcut not in generator.CLASSES:
            params.fail(f"{key}.shortcut", f"none or one of {', '.join(generator.CLASSES)}", shortcut)

    def records(self, raw, ds):
        return demo(raw, ds["classes"])

    def as_external(self):
        from . import demo as generator

        return {"classes": list(generator.CLASSES)}

    def generate(self, dest, ds):
        from . import demo as generator

        shortcut = None if ds["shortcut"] == "none" else ds["shortcut"]
        generator.generate(dest, per_class=ds["per_class"], size=ds["size"], seed=ds["seed"], bad_files=ds["bad_files"],
                           shortcut=shortcut)
        return f"seed {ds['seed']}" + (f", {shortcut} marked" if shortcut else "")


SOURCES: dict[str, Source] = {s.name: s for s in (Radiography(), ChestXray(), Demo())}


def get(name: str) -> Source:
    """The registered source called `name`; anything else is one clear error, never a fallback."""
    if name not in SOURCES:
        raise UserError(f"unknown dataset {name!r}: the registered sources are {', '.join(sorted(SOURCES))}")
    return SOURCES[name]


def load(name: str, raw: Path, ds: dict) -> tuple[list[Record], list[Drop]]:
    """Records and drops for the dataset named in params (`ds` is its params section)."""
    source = get(name)
    if not raw.is_dir():
        raise UserError(f"{raw} not found: run `dvc repro download` first")
    return source.records(raw, ds)
