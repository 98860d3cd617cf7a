"""The download stage's logic: a local copy (folder or archive) when CXR_DATA_DIR has one, else Kaggle.

Network access happens here and nowhere else in the project.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tarfile
import zipfile
from pathlib import Path, PurePosixPath

from .atomic import atomic_dir
from .errors import UserError

log = logging.getLogger("download")
ENV = "CXR_DATA_DIR"
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def safe_extract(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into target; refuse the whole archive if any member would land outside it."""
    if archive.name.endswith(".zip"):
        with zipfile.ZipFile(archive) as zf:
            for info in zf.infolist():
                is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
                if _unsafe_member(info.filename) or is_link:
                    raise UserError(f"{archive}: refusing unsafe archive member {info.filename!r} (path escapes the target)")
            zf.extractall(target)
    else:
        with tarfile.open(archive) as tf:
            for m in tf.getmembers():
                if _unsafe_member(m.name) or m.issym() or m.islnk() or m.isdev():
                    raise UserError(f"{archive}: refusing unsafe archive member {m.name!r} (path escapes the target)")
            tf.extractall(target, filter="data")


def find_local(name: str, data_dir: str | None) -> Path | None:
    """`<data_dir>/<name>/` or `<data_dir>/<name>.zip|.tar.gz`; None when CXR_DATA_DIR is unset."""
    if not data_dir:
        return None
    base = Path(data_dir).expanduser()
    candidates = [base / name] + [base / f"{name}{s}" for s in ARCHIVE_SUFFIXES]
    for c in candidates:
        if c.exists():
            return c
    raise UserError(f"{ENV}={data_dir} holds neither {name}/ nor {name}.zip; put the dataset there or unset {ENV} to download it")


def _kaggle(handle: str, name: str) -> Path:
    try:
        import kagglehub
    except ImportError:  # pragma: no cover - kagglehub is in requirements.txt
        raise UserError("kagglehub is not installed: pip install -r requirements.txt") from None
    log.info("downloading Kaggle dataset %s (public; credentials from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json if present)", handle)
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises requests/HTTP errors of many kinds
        first = str(err).splitlines()[0][:200] if str(err) else type(err).__name__
        raise UserError(
            f"cannot download {handle} from Kaggle ({first}). Either connect to the internet "
            f"(Kaggle credentials only if the dataset needs them), or set {ENV} to a folder holding {name}/ or {name}.zip"
        ) from None


def fingerprint(root: Path) -> dict:
    """File count, bytes and one sha256 over every file's path and content."""
    h, n, size = hashlib.sha256(), 0, 0
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        data = p.read_bytes()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + hashlib.sha256(data).digest())
        n, size = n + 1, size + len(data)
    return {"files": n, "bytes": size, "sha256": h.hexdigest()}


def fetch(name: str, ds: dict, dest: Path) -> dict:
    """Put dataset `name` at dest (atomically) and return a record of where it came from."""
    if name == "demo":
        from . import demo

        with atomic_dir(dest) as tmp:
            demo.generate(tmp, per_class=ds["per_class"], size=ds["size"], seed=ds["seed"], bad_files=ds["bad_files"])
            record = {"source": "generated", "version": f"seed {ds['seed']}"}
            record.update(fingerprint(tmp))
        return record

    local = find_local(name, os.environ.get(ENV))
    if local is not None:
        source, version = f"local:{local.name}", "local copy"
    else:
        local = _kaggle(ds["kaggle"], name)
        source = f"kaggle:{ds['kaggle']}"
        version = local.name if local.parent.name == "versions" else "unknown"
    with atomic_dir(dest) as tmp:
        if local.is_dir():
            log.info("copying %s", local)
            shutil.copytree(local, tmp, dirs_exist_ok=True, symlinks=False)
        else:
            log.info("extracting %s", local)
            safe_extract(local, tmp)
        record = {"source": source, "version": version}
        record.update(fingerprint(tmp))
        if record["files"] == 0:
            raise UserError(f"{local} is empty")
    return record
