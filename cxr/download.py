"""Getting a dataset into data/raw: a local copy (folder or archive) under CXR_DATA_DIR, else Kaggle, or generated.

Downloads happen here and nowhere else in the project (beside Keras' own download of ImageNet weights);
cxr.network says why one failed and probes whether a server can be reached.
"""
from __future__ import annotations

import bz2
import errno
import gzip
import hashlib
import logging
import lzma
import os
import shutil
import stat
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from . import network, sources
from .atomic import atomic_dir
from .errors import UserError
from .sources import Drop

log = logging.getLogger("download")
ENV = "CXR_DATA_DIR"
DROPPED_REPORT = Path("reports/download_dropped.csv")   # files of a local copy that were not copied, with reasons
ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
# Limits on what an archive may unpack to (params: download.max_bytes, download.max_ratio).
DEFAULT_MAX_BYTES = 20_000_000_000
DEFAULT_MAX_RATIO = 100.0
RATIO_FLOOR = 16 * 2**20   # below this many bytes unpacked, a high compression ratio is harmless (text, blank images)
CHUNK = 2**20
MAX_MEMBERS = 500_000        # members an archive may hold (the full radiography database has ~42k files)
MAX_TAR_HEADER = 2**20       # bytes of a tar member's long name or pax record
EXTENDED_HEADERS = (b"L", b"K", b"x", b"g", b"X")  # GNU long name / link name, pax local and global, Solaris pax


def _unsafe_member(name: str) -> bool:
    p = PurePosixPath(name.replace("\\", "/"))
    return p.is_absolute() or ".." in p.parts or (len(name) > 1 and name[1] == ":")


def _too_big(archive: Path, what: str, size: int, limit: int | float, key: str) -> UserError:
    return UserError(f"{archive}: refusing to extract, {what} {size:,} exceeds download.{key}={limit:,} "
                     f"(a decompression bomb, or raise download.{key})")


def _check_totals(archive: Path, total: int, max_bytes: int, max_ratio: float) -> None:
    if total > max_bytes:
        raise _too_big(archive, "uncompressed size", total, max_bytes, "max_bytes")
    packed = max(archive.stat().st_size, 1)
    if total > RATIO_FLOOR and total > max_ratio * packed:
        raise UserError(f"{archive}: refusing to extract, it unpacks {total / packed:,.0f} times its size "
                        f"(over download.max_ratio={max_ratio:g}): a decompression bomb, or raise download.max_ratio")


def _extract_zip(archive: Path, target: Path, max_bytes: int, max_ratio: float) -> None:
    with zipfile.ZipFile(archive) as zf:
        infos = zf.infolist()
        if len(infos) > MAX_MEMBERS:
            raise _too_many(archive)
        total = 0
        for info in infos:
            is_link = (info.external_attr >> 16) & 0o170000 == 0o120000
            if _unsafe_member(info.filename) or is_link:
                raise UserError(f"{archive}: refusing unsafe archive member {info.filename!r} (path escapes the target)")
            if info.flag_bits & 0x1:
                raise UserError(f"{archive}: member {info.filename!r} is encrypted; give an unencrypted archive or the extracted folder")
            total += info.file_size
            if info.file_size > RATIO_FLOOR and info.file_size > max_ratio * max(info.compress_size, 1):
                raise UserError(f"{archive}: refusing to extract, member {info.filename!r} unpacks "
                                f"{info.file_size / max(info.compress_size, 1):,.0f} times its size (over "
                                f"download.max_ratio={max_ratio:g}): a decompression bomb, or raise download.max_ratio")
        _check_totals(archive, total, max_bytes, max_ratio)
        seen: set[tuple[str, ...]] = set()
        for info in infos:
            if not info.is_dir():
                _once(archive, info.filename, seen)
        written = 0
        for info in infos:
            parts = _member_parts(info.filename)
            if not parts:
                continue
            dest = target.joinpath(*parts)
            if info.is_dir():
                dest.mkdir(parents=True, exist_ok=True)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            with zf.open(info) as src, open(dest, "wb") as out:
                n = 0
                while chunk := src.read(CHUNK):
                    n += len(chunk)
                    written += len(chunk)
                    if n > info.file_size:  # the header understates the member: stop at what it declared
                        raise UserError(f"{archive}: member {info.filename!r} holds more than its declared size; corrupt archive")
                    if written > max_bytes:
                        raise _too_big(archive, "uncompressed size", written, max_bytes, "max_bytes")
                    out.write(chunk)


def _member_parts(name: str) -> tuple[str, ...]:
    """A member's path as it lands in the target: separators unified, '' and '.' parts dropped."""
    return tuple(q for q in PurePosixPath(name.replace("\\", "/")).parts if q not in ("", "."))


def _once(archive: Path, name: str, seen: set[tuple[str, ...]]) -> None:
    """Note a file member's landing path in `seen`; an archive listing one twice is refused (one copy would
    silently replace the other)."""
    key = _member_parts(name)
    if key in seen:
        raise UserError(f"{archive}: member {name[:200]!r} is listed twice (one copy would silently replace the other); "
                        "repack the archive")
    seen.add(key)


def _too_many(archive: Path) -> UserError:
    return UserError(f"{archive}: refusing to extract, more than {MAX_MEMBERS:,} members")


def _open_stream(archive: Path):
    """The archive's bytes, decompressed as they are read (gzip, bzip2, xz or none, by its magic number)."""
    with open(archive, "rb") as f:
        magic = f.read(6)
    if magic.startswith(b"\x1f\x8b"):
        return gzip.open(archive, "rb")
    if magic.startswith(b"BZh"):
        return bz2.open(archive, "rb")
    if magic.startswith(b"\xfd7zXZ\x00"):
        return lzma.open(archive, "rb")
    return open(archive, "rb")


def _tar_number(field: bytes) -> int | None:
    """A tar header's numeric field: octal digits, or GNU base-256 (high bit set); None when malformed."""
    if field[:1] == b"\x80":
        return int.from_bytes(field[1:], "big")
    digits = field.split(b"\0", 1)[0].strip()
    try:
        return int(digits or b"0", 8)
    except ValueError:
        return None


def _scan_tar_headers(archive: Path) -> None:
    """Read the tar's raw 512-byte headers, skipping member data, before tarfile sees them: tarfile reads a GNU
    long name or a pax header whole into memory and keeps one object per member, so a few kilobytes of compressed
    headers could otherwise claim gigabytes. Refuse extended headers over MAX_TAR_HEADER bytes and archives of
    more than MAX_MEMBERS members; malformed headers are left to tarfile to report."""
    members = 0
    with _open_stream(archive) as f:
        while len(block := f.read(512)) == 512 and block.strip(b"\0"):
            size = _tar_number(block[124:136])
            if size is None:
                return
            members += 1
            if members > MAX_MEMBERS:
                raise _too_many(archive)
            if block[156:157] in EXTENDED_HEADERS and size > MAX_TAR_HEADER:
                raise UserError(f"{archive}: refusing to extract, an extended header (long name or pax record) of "
                                f"{size:,} bytes, over {MAX_TAR_HEADER:,}: a malformed or malicious archive")
            f.seek(-(-size // 512) * 512, os.SEEK_CUR)


def _extract_tar(archive: Path, target: Path, max_bytes: int, max_ratio: float) -> None:
    _scan_tar_headers(archive)
    with tarfile.open(archive) as tf:
        total, seen = 0, set()
        for m in tf:  # lazily: a bomb is refused before its data is read
            if _unsafe_member(m.name) or not (m.isfile() or m.isdir()):
                raise UserError(f"{archive}: refusing unsafe archive member {m.name[:200]!r} (path escapes the target, "
                                f"or a link, device or pipe)")
            if m.isfile():
                _once(archive, m.name, seen)
            total += m.size
            if total > max_bytes:
                raise _too_big(archive, "uncompressed size", total, max_bytes, "max_bytes")
        _check_totals(archive, total, max_bytes, max_ratio)
        tf.extractall(target, filter="data")


def safe_extract(archive: Path, target: Path, max_bytes: int = DEFAULT_MAX_BYTES, max_ratio: float = DEFAULT_MAX_RATIO) -> None:
    """Extract a zip or tar archive into target. The whole archive is refused (UserError, one line) if any member
    would land outside target or is a link or special file, if it is encrypted, corrupt or truncated, or if it
    unpacks to more than max_bytes or more than max_ratio times its own size."""
    archive, target = Path(archive), Path(target)
    try:
        if archive.name.lower().endswith(".zip"):
            _extract_zip(archive, target, max_bytes, max_ratio)
        else:
            _extract_tar(archive, target, max_bytes, max_ratio)
    except UserError:
        raise
    except (zipfile.BadZipFile, zipfile.LargeZipFile, tarfile.TarError, EOFError, zlib.error, lzma.LZMAError,
            gzip.BadGzipFile, NotImplementedError, RuntimeError, ValueError) as err:
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise UserError(f"{archive}: corrupt, truncated or unsupported archive ({detail})") from None
    except OSError as err:
        if err.errno == errno.ENAMETOOLONG:
            raise UserError(f"{archive}: a member's name is too long for this file system; repack the archive") from None
        if err.errno in (errno.EEXIST, errno.ENOTDIR, errno.EISDIR):
            raise UserError(f"{archive}: a file and a folder of the same name among its members; repack the archive") from None
        if err.errno is None:  # raised by the decompressor (bad data), not by the file system
            raise UserError(f"{archive}: corrupt or truncated archive ({' '.join(str(err).split())[:200]})") from None
        raise


def copy_tree(src: Path, dst: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> list[Drop]:
    """Copy the regular files below src into dst without ever leaving src: a link to a file inside src is
    copied as that file; links that leave src, lead nowhere or loop, links to folders (not followed), and
    pipes, sockets and devices are not copied but returned as drops (file relative to src, reason)."""
    root = Path(src).resolve()
    drops: list[Drop] = []
    copied = 0

    def too_long(err: OSError, rel: PurePosixPath) -> None:
        """A path longer than the system allows is a drop; any other error (a full disk, say) is an error."""
        if err.errno != errno.ENAMETOOLONG:
            raise err
        drops.append(Drop(rel.as_posix(), "unreadable", f"a path too long for this system: {err.strerror}"))

    def copy(from_path: str | Path, rel: PurePosixPath) -> None:
        nonlocal copied
        out = dst.joinpath(*rel.parts)
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            with open(from_path, "rb") as f_in, open(out, "wb") as f_out:
                while chunk := f_in.read(CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise UserError(f"{src}: holds more than download.max_bytes={max_bytes:,} bytes; raise it if that is right")
                    f_out.write(chunk)
        except PermissionError as err:
            out.unlink(missing_ok=True)
            drops.append(Drop(rel.as_posix(), "unreadable", err.strerror or "permission denied"))
        except OSError as err:
            too_long(err, rel)

    def walk(folder: Path, rel: PurePosixPath) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as err:
            drops.append(Drop(rel.as_posix() or ".", "unreadable", err.strerror or str(err)))
            return
        for e in entries:
            r = rel / e.name
            if e.is_symlink():
                try:
                    target = Path(os.path.realpath(e.path, strict=True))
                except OSError as err:
                    loop = err.errno == errno.ELOOP
                    drops.append(Drop(r.as_posix(), "broken_link", "a link that loops" if loop else "a link to nothing"))
                    continue
                if not target.is_relative_to(root):
                    drops.append(Drop(r.as_posix(), "outside_dataset", "a link to something outside the dataset folder"))
                elif target.is_dir():
                    drops.append(Drop(r.as_posix(), "link", "a linked folder: not followed"))
                elif stat.S_ISREG(target.stat().st_mode):
                    copy(target, r)
                else:
                    drops.append(Drop(r.as_posix(), "not_a_regular_file", "a link to a pipe, socket or device"))
            elif e.is_dir(follow_symlinks=False):
                try:
                    dst.joinpath(*r.parts).mkdir(parents=True, exist_ok=True)
                except OSError as err:
                    too_long(err, r)
                    continue
                walk(Path(e.path), r)
            elif e.is_file(follow_symlinks=False):
                copy(e.path, r)
            else:
                drops.append(Drop(r.as_posix(), "not_a_regular_file", "a pipe, socket or device"))

    walk(root, PurePosixPath())
    return drops


def find_local(name: str, data_dir: str | None) -> Path | None:
    """`<data_dir>/<name>/` or `<data_dir>/<name>.zip|.tar|.tar.gz|.tgz`; None when CXR_DATA_DIR is unset."""
    if not data_dir:
        return None
    base = Path(data_dir).expanduser()
    if base.exists() and not base.is_dir():
        raise UserError(f"{ENV}={data_dir} is a file; it must be a folder holding {name}/ or {name}.zip")
    folder = base / name
    if folder.exists() and not folder.is_dir():
        raise UserError(f"{folder} is a file, expected the extracted dataset folder (an archive is named {name}.zip or {name}.tar.gz)")
    if folder.is_dir():
        return folder
    for c in (base / f"{name}{s}" for s in ARCHIVE_SUFFIXES):
        if c.exists():
            if not c.is_file():
                raise UserError(f"{c} is not a file; an archive of the dataset was expected there")
            return c
    raise UserError(f"{ENV}={data_dir} holds neither {name}/ nor {name}.zip; put the dataset there or unset {ENV} to download it")


# --- Kaggle ------------------------------------------------------------------------------------------

DEMO_COMMAND = "dvc exp run --temp -S dataset=demo -S model.weights=none"


def dataset_fixes(name: str) -> str:
    """The ways to get dataset `name` (a Kaggle one) onto this machine, as one sentence: network (and
    credentials where the dataset needs them), a local copy under CXR_DATA_DIR, or the generated demo."""
    return (f"Either connect to the internet (public datasets need no Kaggle account; otherwise set KAGGLE_USERNAME "
            f"and KAGGLE_KEY, or put kaggle.json in ~/.kaggle/), or put a copy of the dataset in a folder, as {name}/ "
            f"(extracted, Kaggle layout) or {name}.zip, and set {ENV} to that folder, or run offline on the generated "
            f"demo dataset instead: `{DEMO_COMMAND}` (params.yaml stays as it is; README: Offline, or a first run in minutes)")


def _kaggle(handle: str, name: str) -> Path:
    try:
        import kagglehub
    except ImportError:  # pragma: no cover - kagglehub is in requirements.txt
        raise UserError("kagglehub is not installed: pip install -r requirements.txt") from None
    log.info("downloading Kaggle dataset %s (public; credentials from KAGGLE_USERNAME/KAGGLE_KEY or kaggle.json if present)", handle)
    try:
        return Path(kagglehub.dataset_download(handle))
    except Exception as err:  # kagglehub raises requests/HTTP errors of many kinds
        why = network.reason(err)
        why += f" (is datasets.{name}.kaggle right?)" if "HTTP 404" in why else ""
        raise UserError(f"cannot download dataset {name} from Kaggle ({handle}): {why}. {dataset_fixes(name)}") from None


def fingerprint(root: Path) -> dict:
    """File count, bytes and one sha256 over every file's path and content (read in chunks)."""
    h, n, size = hashlib.sha256(), 0, 0
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        with open(p, "rb") as f:
            digest = hashlib.file_digest(f, "sha256").digest()
        h.update(p.relative_to(root).as_posix().encode() + b"\0" + digest)
        n, size = n + 1, size + p.stat().st_size
    return {"files": n, "bytes": size, "sha256": h.hexdigest()}


def stat_fingerprint(path: Path) -> dict:
    """A cheap identity of a local copy: file count, bytes, and one sha256 over every file's relative path, size
    and modification time (stat only, links not followed), so an edited, added or removed file changes it."""
    h, n, size = hashlib.sha256(), 0, 0
    if path.is_file():
        entries = [path]
    else:  # os.walk, not rglob: a folder it cannot list (a path too long, say) is left out, not an error
        entries = sorted(Path(d) / name for d, dirs, files in os.walk(path)
                         for name in files + [x for x in dirs if os.path.islink(os.path.join(d, x))])
    for q in entries:
        rel = q.name if q == path else q.relative_to(path).as_posix()
        try:
            st = q.lstat()
        except OSError:  # named, but beyond what the system can stat: its name still counts
            h.update(f"{rel}\0unreadable\0".encode("utf-8", "surrogateescape"))
            continue
        h.update(f"{rel}\0{st.st_size}\0{st.st_mtime_ns}\0".encode("utf-8", "surrogateescape"))
        n, size = n + 1, size + st.st_size
    return {"files": n, "bytes": size, "stat_sha256": h.hexdigest()}


def origin(name: str, ds: dict) -> dict:
    """Where `download` takes dataset `name` from, as the `source` stage records it: generated (demo), a Kaggle
    handle, or a local copy under CXR_DATA_DIR with its resolved path and stat fingerprint. DVC cannot see an
    environment variable or files outside the project; this record is what it can see."""
    if sources.get(name).generated:
        return {"dataset": name, "origin": "generated"}
    local = find_local(name, os.environ.get(ENV))
    if local is None:
        return {"dataset": name, "origin": f"kaggle:{ds['kaggle']}"}
    return {"dataset": name, "origin": "local copy", "path": str(local.resolve()), **stat_fingerprint(local)}


def external_origin(entry: dict) -> dict:
    """Where an external set (an entry of params `external.sets`) is read from, as the `source` stage records it:
    generated (with its settings), or a local copy under CXR_DATA_DIR (as for `download`) or a `folder` set's
    path, with its resolved path and stat fingerprint; `missing` with the reason when the data is not there."""
    src = entry["source"]
    if src == "folder":
        path = Path(entry["path"]).expanduser()
        if not path.is_dir():
            return {"source": src, "missing": f"{path} is not a folder"}
    elif sources.get(src).generated:
        return {"source": src, "origin": "generated", **{k: entry[k] for k in ("seed", "per_class", "size")}}
    else:
        try:
            path = find_local(src, os.environ.get(ENV))
        except UserError as err:
            return {"source": src, "missing": str(err)}
        if path is None:
            return {"source": src, "missing": f"{ENV} is not set: put {src}/ or {src}.zip in a folder and set {ENV} to it"}
    return {"source": src, "origin": "local copy", "path": str(path.resolve()), **stat_fingerprint(path)}


def summarize_drops(drops: list[Drop]) -> dict:
    reasons: dict[str, int] = {}
    for d in drops:
        reasons[d.reason] = reasons.get(d.reason, 0) + 1
    return {"dropped": len(drops), "dropped_by_reason": dict(sorted(reasons.items()))}


def fetch(name: str, ds: dict, dest: Path, limits: dict | None = None) -> dict:
    """Put dataset `name` at dest (atomically) and return a record of where it came from, with the files
    not copied (links leaving the copy, special files) as `drops` (a list of Drop). `limits`: the
    `download` params (max_bytes, max_ratio)."""
    limits = limits or {}
    max_bytes = limits.get("max_bytes", DEFAULT_MAX_BYTES)
    max_ratio = limits.get("max_ratio", DEFAULT_MAX_RATIO)
    source = sources.get(name)
    if source.generated:
        with atomic_dir(dest) as tmp:
            record = {"source": "generated", "version": source.generate(tmp, ds)}
            record.update(fingerprint(tmp))
            record.update(summarize_drops([]), drops=[])
        return record

    local = find_local(name, os.environ.get(ENV))
    if local is not None:
        source, version = f"local:{local.name}", "local copy"
    else:
        local = _kaggle(ds["kaggle"], name)
        source = f"kaggle:{ds['kaggle']}"
        version = local.name if local.parent.name == "versions" else "unknown"
    with atomic_dir(dest) as tmp:
        drops: list[Drop] = []
        if local.is_dir():
            log.info("copying %s", local)
            drops = copy_tree(local, tmp, max_bytes)
        else:
            log.info("extracting %s", local)
            safe_extract(local, tmp, max_bytes, max_ratio)
        record = {"source": source, "version": version}
        record.update(fingerprint(tmp))
        if record["files"] == 0:
            raise UserError(f"{local} is empty" + (f" (apart from {len(drops)} link(s) or special file(s) not copied)" if drops else ""))
        for d in drops:
            log.warning("not copied: %s (%s: %s)", d.file, d.reason, d.detail)
        record.update(summarize_drops(drops), drops=drops)
    return record
