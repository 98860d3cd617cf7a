"""Hostile or odd input to the data stages' library code and to `predict`, refused or counted, never a traceback.

Path traversal, links, archive bombs, corrupt archives and tables, extreme images, names pandas would
read as missing, bad sidecars. Every case is refused with one clear line or counted as a drop with its reason; none is a traceback."""
import functools
import io
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tarfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from cxr import atomic, clean, download, images, inference, modelinfo, predict, sources
from cxr import split as splitting
from cxr.errors import UserError, cli
from cxr.sources import Drop, Record

CX_CLASSES = ["COVID-19", "non-COVID"]
VIEWS = ["PA", "AP"]
CX = {"classes": CX_CLASSES, "positive": "COVID-19", "views": VIEWS, "kaggle": "bachrr/covid-chest-xray"}


def _smooth(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").resize(size, Image.Resampling.BILINEAR)


def _png(path: Path, seed: int = 0, size=(48, 40)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _smooth(seed, size).save(path)
    return path


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _gray_png_bytes(width: int, height: int) -> bytes:
    """A valid 8-bit grayscale PNG of black pixels, compressed (a 1 x 50,000,000 one is about 50 KB)."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    row = b"\0" * (width + 1)
    data = zlib.compress(row * height, 9)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", data) + _chunk(b"IEND", b"")


def _chestxray(root: Path, rows: list[tuple[str, str, str]]) -> Path:
    """metadata.csv (patientid, finding, view, modality, folder, filename) and the images it names that lie inside."""
    base = root / "covid-chestxray-dataset"
    base.mkdir(parents=True, exist_ok=True)
    lines = ["patientid,finding,view,modality,folder,filename"]
    for pid, folder, fname in rows:
        lines.append(f"{pid},COVID-19,PA,X-ray,{folder},{fname}")
    (base / "metadata.csv").write_text("\n".join(lines) + "\n")
    return base


def _accounted(records, drops) -> list[str]:
    return [r.file for r in records] + [d.file for d in drops]


# --- path traversal in metadata (covid-chestxray, demo) ---------------------------------------------

def test_chestxray_metadata_cannot_reach_outside_the_dataset(tmp_path):
    secret = _png(tmp_path / "secret.png", 1)                     # outside data/raw: must never be read
    raw = tmp_path / "raw"
    base = _chestxray(raw, [
        ("1", "images", "ok.png"),
        ("2", "images", "../../../secret.png"),
        ("3", "../..", "secret.png"),
        ("4", "images", str(secret)),                             # absolute file name
        ("5", str(tmp_path), "secret.png"),                       # absolute folder
        ("6", "images", "sub/../ok2.png"),                        # inside, once normalised
    ])
    _png(base / "images" / "ok.png", 2)
    _png(base / "images" / "ok2.png", 3)
    records, drops = sources.load("covid-chestxray", raw, CX)
    assert sorted(r.file for r in records) == ["covid-chestxray-dataset/images/ok.png", "covid-chestxray-dataset/images/ok2.png"]
    refused = [d for d in drops if d.reason == "outside_dataset"]
    assert len(refused) == 4 and all("refused" in d.detail for d in refused)
    # ok2.png is a record, not also an 'unlabeled' drop: each file counted once
    assert len(_accounted(records, drops)) == len(set(_accounted(records, drops)))
    assert not any("secret" in r.file for r in records)


def test_chestxray_traversal_counts_add_up_through_clean(tmp_path):
    _png(tmp_path / "secret.png", 1)
    raw = tmp_path / "raw"
    base = _chestxray(raw, [("1", "images", "ok.png"), ("2", "images", "../../../secret.png")])
    _png(base / "images" / "ok.png", 2)
    records, drops = sources.load("covid-chestxray", raw, CX)
    out = tmp_path / "out"
    out.mkdir()
    summary, dropped = clean.run(raw, out, records, drops, CX_CLASSES, {"image_size": 32, "resize": "pad",
                                 "max_pixels": 10_000_000, "near_duplicate_distance": 12, "shard_size": 8, "workers": 1})
    assert summary["seen"] == summary["kept"] + summary["dropped"] == 2
    assert summary["dropped_by_reason"] == {"outside_dataset": 1}


def test_demo_metadata_cannot_reach_outside_the_dataset(tmp_path):
    _png(tmp_path / "secret.png", 1)
    raw = tmp_path / "raw"
    _png(raw / "images" / "a.png", 2)
    (raw / "metadata.csv").write_text("file,label,patientid,mask\n"
                                      "images/a.png,COVID,p1,\n"
                                      "../secret.png,COVID,p2,\n"
                                      f"{tmp_path / 'secret.png'},Normal,p3,\n"
                                      "images/a.png,COVID,p4,../secret.png\n")
    records, drops = sources.demo(raw, ["COVID", "Normal"])
    assert [r.file for r in records] == ["images/a.png"]
    assert [d.reason for d in drops] == ["outside_dataset"] * 3


def test_links_in_the_raw_folder_that_leave_it_are_drops(tmp_path):
    outside = tmp_path / "elsewhere"
    _png(outside / "x.png", 1)
    raw = tmp_path / "raw"
    base = raw / "COVID-19_Radiography_Dataset"
    for cls, seed in (("COVID", 2), ("Normal", 3)):
        _png(base / cls / "images" / f"{cls}-1.png", seed)
    os.symlink(outside / "x.png", base / "COVID" / "images" / "COVID-2.png")      # a file elsewhere
    os.symlink(outside, base / "Normal" / "images" / "more")                       # a folder elsewhere
    os.symlink(base / "nowhere.png", base / "COVID" / "images" / "COVID-3.png")   # dangling
    os.symlink(base / "COVID" / "images" / "COVID-1.png", base / "COVID" / "images" / "COVID-4.png")  # inside: fine
    records, drops = sources.radiography(raw, ["COVID", "Normal"])
    assert sorted(r.file.rsplit("/", 1)[1] for r in records) == ["COVID-1.png", "COVID-4.png", "Normal-1.png"]
    assert {d.file.rsplit("/", 1)[1]: d.reason for d in drops} == {
        "COVID-2.png": "outside_dataset", "more": "link", "COVID-3.png": "broken_link"}


def test_a_link_named_in_metadata_is_dropped_once(tmp_path):
    _png(tmp_path / "secret.png", 1)
    raw = tmp_path / "raw"
    base = _chestxray(raw, [("1", "images", "ok.png"), ("2", "images", "link.png"), ("3", "images", "dangling.png")])
    _png(base / "images" / "ok.png", 2)
    os.symlink(tmp_path / "secret.png", base / "images" / "link.png")
    os.symlink(base / "images" / "gone.png", base / "images" / "dangling.png")
    records, drops = sources.load("covid-chestxray", raw, CX)
    assert [r.file for r in records] == ["covid-chestxray-dataset/images/ok.png"]
    assert sorted((d.file, d.reason) for d in drops) == [("covid-chestxray-dataset/images/dangling.png", "broken_link"),
                                                         ("covid-chestxray-dataset/images/link.png", "outside_dataset")]


# --- local copies: links, special files --------------------------------------------------------------

def test_local_copy_never_follows_links_out_of_the_dataset(tmp_path, monkeypatch):
    store = tmp_path / "store"
    ds = store / "covid-chestxray"
    _png(ds / "images" / "a.png", 1)
    (ds / "metadata.csv").write_text("patientid,finding\n")
    elsewhere = tmp_path / "elsewhere"
    for i in range(3):
        _png(elsewhere / f"e{i}.png", 10 + i)
    secret = tmp_path / "passwd"
    secret.write_text("root:x:0:0\n")
    os.symlink(secret, ds / "images" / "x.png")                  # a file outside
    os.symlink(elsewhere, ds / "images" / "linked")              # a folder outside
    os.symlink(ds / "images", ds / "images" / "loop")            # a folder inside (a loop if followed)
    os.symlink(ds / "gone.png", ds / "images" / "dangling.png")
    os.symlink("self.png", ds / "images" / "self.png")           # a link to itself
    os.symlink(ds / "images" / "a.png", ds / "images" / "alias.png")  # a file inside: copied as a file
    os.mkfifo(ds / "images" / "pipe.png")                        # copying a pipe would block forever
    monkeypatch.setenv(download.ENV, str(store))
    dest = tmp_path / "data" / "raw"
    rec = download.fetch("covid-chestxray", CX, dest)
    copied = sorted(p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file())
    assert copied == ["images/a.png", "images/alias.png", "metadata.csv"]
    assert not any(p.is_symlink() for p in dest.rglob("*"))
    assert (dest / "images" / "alias.png").read_bytes() == (ds / "images" / "a.png").read_bytes()
    reasons = {d.file: d.reason for d in rec["drops"]}
    assert reasons == {"images/x.png": "outside_dataset", "images/linked": "outside_dataset", "images/loop": "link",
                       "images/dangling.png": "broken_link", "images/self.png": "broken_link", "images/pipe.png": "not_a_regular_file"}
    assert rec["files"] == 3 and rec["dropped"] == 6
    assert rec["dropped_by_reason"] == {"broken_link": 2, "link": 1, "not_a_regular_file": 1, "outside_dataset": 2}


def test_local_copy_may_itself_be_a_link(tmp_path, monkeypatch):
    real = tmp_path / "disk" / "covid-chestxray"
    _png(real / "images" / "a.png", 1)
    store = tmp_path / "store"
    store.mkdir()
    os.symlink(real, store / "covid-chestxray")
    monkeypatch.setenv(download.ENV, str(store))
    rec = download.fetch("covid-chestxray", CX, tmp_path / "raw")
    assert rec["files"] == 1 and rec["dropped"] == 0


def test_local_copy_where_a_folder_is_expected_is_one_line(tmp_path):
    (tmp_path / "covid-chestxray").write_text("not a folder")
    with pytest.raises(UserError, match="is a file"):
        download.find_local("covid-chestxray", str(tmp_path))
    f = tmp_path / "plain-file"
    f.write_text("x")
    with pytest.raises(UserError, match="is a file"):
        download.find_local("covid-chestxray", str(f))
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "covid-chestxray.zip").mkdir()
    with pytest.raises(UserError, match="not a file"):
        download.find_local("covid-chestxray", str(tmp_path / "d"))


# --- archives: bombs, corrupt, encrypted -------------------------------------------------------------

def _archive(arc: Path, kind: str, members: list[tuple[str, bytes]]) -> Path:
    """A zip or tar.gz of (name, data) members, written as given (names not normalised)."""
    if kind == "zip":
        with zipfile.ZipFile(arc, "w") as zf:
            for name, data in members:
                zf.writestr(zipfile.ZipInfo(name), data)
    else:
        with tarfile.open(arc, "w:gz") as tf:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return arc


def _refused_whole(arc: Path, match: str, **limits) -> str:
    """safe_extract refuses `arc` with one UserError matching `match` and writes nothing into an empty target
    (`out` beside the archive); the message."""
    target = arc.parent / "out"
    target.mkdir()
    with pytest.raises(UserError, match=match) as info:
        download.safe_extract(arc, target, **limits)
    assert list(target.iterdir()) == []
    return str(info.value)


def test_zip_bomb_is_refused_before_anything_is_written(tmp_path):
    arc = tmp_path / "bomb.zip"
    with zipfile.ZipFile(arc, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ds/ok.txt", b"ok")
        zf.writestr("ds/zeros.bin", b"\0" * (20 * 2**20))          # 20 MiB in ~20 KB
    msg = _refused_whole(arc, "")
    assert "download.max_ratio=100" in msg and "\n" not in msg
    target = tmp_path / "out"
    download.safe_extract(arc, target, max_ratio=10_000)             # allowed when the user says so
    assert (target / "ds" / "zeros.bin").stat().st_size == 20 * 2**20


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_over_max_bytes_is_refused(tmp_path, kind):
    arc = _archive(tmp_path / f"big.{kind}", kind, [("ds/a.bin", os.urandom(3000))])
    _refused_whole(arc, r"download\.max_bytes=1,000", max_bytes=1000)


def test_tar_gz_bomb_is_refused(tmp_path):
    arc = tmp_path / "bomb.tar.gz"
    with tarfile.open(arc, "w:gz") as tf:
        info = tarfile.TarInfo("ds/zeros.bin")
        info.size = 20 * 2**20
        tf.addfile(info, io.BytesIO(b"\0" * info.size))
    _refused_whole(arc, "max_ratio")


@pytest.mark.parametrize("fmt", ["gnu", "pax", "bz2"])
def test_a_huge_tar_long_name_is_refused_before_tarfile_reads_it(tmp_path, fmt):
    # tarfile would read a long name or pax record whole into memory: a few KB of headers claiming gigabytes
    arc = tmp_path / ("bomb.tar.bz2" if fmt == "bz2" else "bomb.tar.gz")
    with tarfile.open(arc, "w:bz2" if fmt == "bz2" else "w:gz",
                      format=tarfile.PAX_FORMAT if fmt == "pax" else tarfile.GNU_FORMAT) as tf:
        tf.addfile(tarfile.TarInfo("ds/ok.txt"))
        tf.addfile(tarfile.TarInfo("ds/" + "a" * (download.MAX_TAR_HEADER + 1)))
    assert arc.stat().st_size < 20_000
    assert len(_refused_whole(arc, "an extended header .* over 1,048,576")) < 400
    target = tmp_path / "out"
    ok = tmp_path / "long-ok.tar.gz"  # a long name under the limit is an ordinary member
    with tarfile.open(ok, "w:gz", format=tarfile.GNU_FORMAT) as tf:
        info = tarfile.TarInfo("ds/" + "b" * 150 + ".txt")
        info.size = 2
        tf.addfile(info, io.BytesIO(b"ok"))
    download.safe_extract(ok, target)
    assert (target / "ds" / ("b" * 150 + ".txt")).read_bytes() == b"ok"


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_of_too_many_members_is_refused(tmp_path, monkeypatch, kind):
    monkeypatch.setattr(download, "MAX_MEMBERS", 5)  # the real cap, 500,000, takes too long to build here
    _refused_whole(_archive(tmp_path / f"many.{kind}", kind, [(f"ds/{i}.png", b"") for i in range(6)]), "more than 5 members")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_an_archive_listing_a_file_twice_is_refused_not_silently_merged(tmp_path, kind):
    arc = _archive(tmp_path / f"twice.{kind}", kind, [("ds/a.png", b"first"), ("ds/b.png", b"b"), ("./ds//a.png", b"second")])
    _refused_whole(arc, "'./ds//a.png' is listed twice")


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_a_file_and_a_folder_of_one_name_are_one_clear_error(tmp_path, kind):
    arc = _archive(tmp_path / f"clash.{kind}", kind, [("ds/a", b"a file"), ("ds/a/b.png", b"below it")])
    # found while extracting, so part may be written: fetch extracts into a temporary folder it then discards
    with pytest.raises(UserError, match="a file and a folder of the same name"):
        download.safe_extract(arc, tmp_path / "out")


def test_only_raster_formats_are_decoded_whatever_the_name_says(tmp_path):
    # Pillow also opens e.g. PPM, ICO or EPS (the last through Ghostscript); a radiograph is none of them
    ppm = tmp_path / "scan.png"
    Image.new("L", (64, 64), 128).save(ppm, format="PPM")
    with pytest.raises(images.DecodeError) as info:
        images.decode(ppm, 32)
    assert info.value.reason == "not_an_image" and "PNG, JPEG" in str(info.value)
    Image.new("L", (64, 64), 128).save(tmp_path / "scan.tif", format="TIFF")
    assert images.decode(tmp_path / "scan.tif", 32).shape == (32, 32)


def _encrypted_zip(path: Path) -> Path:
    """A zip whose member is flagged as encrypted (Python cannot write real ZipCrypto; reading it asks for a password)."""
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("ds/a.txt", b"hello")
    data = bytearray(path.read_bytes())
    for sig, off in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = data.find(sig)
        data[i + off] |= 0x1
    path.write_bytes(bytes(data))
    return path


def _good_zip_bytes() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("ds/a.bin", os.urandom(50_000))
        zf.writestr("ds/b.bin", os.urandom(50_000))
    return buf.getvalue()


def _good_tgz_bytes() -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tf:
        data = os.urandom(50_000)
        info = tarfile.TarInfo("ds/a.bin")
        info.size = len(data)
        tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("case", ["random.zip", "truncated.zip", "corrupt-member.zip", "encrypted.zip", "random.tar.gz",
                                  "truncated.tar.gz", "not-gzip.tgz", "empty.zip"])
def test_corrupt_archives_are_one_clear_line(tmp_path, case):
    arc = tmp_path / case
    if case.startswith("random"):
        arc.write_bytes(np.random.default_rng(0).bytes(5000))
    elif case == "truncated.zip":
        good = _good_zip_bytes()
        arc.write_bytes(good[: len(good) // 2])
    elif case == "corrupt-member.zip":
        good = bytearray(_good_zip_bytes())
        good[200:400] = bytes(200)                                  # inside the first member's deflate data
        arc.write_bytes(bytes(good))
    elif case == "encrypted.zip":
        _encrypted_zip(arc)
    elif case == "truncated.tar.gz":
        good = _good_tgz_bytes()
        arc.write_bytes(good[: len(good) // 2])
    elif case == "not-gzip.tgz":
        arc.write_bytes(b"\x1f\x8b" + bytes(100))
    else:
        arc.write_bytes(b"")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UserError) as info:
        download.safe_extract(arc, target)
    msg = str(info.value)
    assert str(arc) in msg and "\n" not in msg
    if case == "encrypted.zip":
        assert "encrypted" in msg


def test_fingerprint_reads_in_chunks(tmp_path, monkeypatch):
    (tmp_path / "a.bin").write_bytes(b"x" * (3 * download.CHUNK + 5))
    expected = download.fingerprint(tmp_path)
    monkeypatch.setattr(Path, "read_bytes", lambda self: (_ for _ in ()).throw(AssertionError("whole file read")))
    assert download.fingerprint(tmp_path) == expected
    assert expected["bytes"] == 3 * download.CHUNK + 5


# --- metadata tables -----------------------------------------------------------------------------------

@pytest.mark.parametrize("content,match", [
    ("patientid,finding,view,modality,filename\n1,Pneumonía,PA,X-ray,a.png\n".encode("latin-1"), "not UTF-8"),
    (b"", "empty"),
    (b"\n\n  \n", "empty"),
    (b"patientid,finding,view,modality,filename\n1,COVID-19,PA,X-ray,a.png,extra,fields,here\n", "well-formed"),
    (b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR" + bytes(64), "binary"),
    (b"patientid;finding;view;modality;filename\n1;COVID-19;PA;X-ray;a.png\n", "missing columns"),
])
def test_bad_metadata_csv_is_one_clear_line(tmp_path, content, match):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    (raw / "metadata.csv").write_bytes(content)
    with pytest.raises(UserError, match=match) as info:
        sources.load("covid-chestxray", raw, CX)
    assert "\n" not in str(info.value)


def _deeper_than_the_path_limit(root: Path) -> None:
    """root/a.png, and 20 nested 250-character folder names (past Linux's 4,096-byte path limit) with a file
    at the bottom, made relative to open folders as only such a tree can be."""
    (root / "a.png").write_bytes(b"a")
    fd = os.open(root, os.O_RDONLY)
    for _ in range(20):
        os.mkdir("d" * 250, dir_fd=fd)
        inner = os.open("d" * 250, os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = inner
    os.close(os.open("x.png", os.O_CREAT | os.O_WRONLY, dir_fd=fd))
    os.close(fd)


def test_a_folder_tree_past_the_path_limit_is_a_counted_drop_not_an_error(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    _deeper_than_the_path_limit(raw)
    files, drops = sources.scan(raw)
    assert files == [raw / "a.png"]
    assert [(d.reason, d.detail) for d in drops] == [("unreadable", "a folder that cannot be read: File name too long")]
    copied = download.copy_tree(raw, tmp_path / "copy")
    assert (tmp_path / "copy" / "a.png").read_bytes() == b"a"
    assert [(d.reason, d.detail) for d in copied] == [("unreadable", "a path too long for this system: File name too long")]
    assert download.stat_fingerprint(raw)["files"] == 1  # the source stage's look at a local copy: no error either


def test_an_oversized_metadata_csv_is_refused_before_it_is_read(tmp_path):
    raw = tmp_path / "raw"
    (raw / "images").mkdir(parents=True)
    row = b"1,COVID-19,PA,X-ray,a.png\n"
    with open(raw / "metadata.csv", "wb") as f:
        f.write(b"patientid,finding,view,modality,filename\n")
        f.write(row * (sources.MAX_TABLE_BYTES // len(row) + 1))
    with pytest.raises(UserError, match=r"too large for a metadata table \(at most 67,108,864\)"):
        sources.load("covid-chestxray", raw, CX)


def test_short_metadata_rows_and_na_names_are_read_as_written(tmp_path):
    raw = tmp_path / "raw"
    for name in ("NA.png", "nan.png", "None.png"):
        _png(raw / "images" / name, hash(name) % 1000)
    (raw / "metadata.csv").write_text("patientid,finding,view,modality,filename,notes\n"
                                      "NA,COVID-19,PA,X-ray,NA.png\n"           # short row: notes missing
                                      "nan,COVID-19,PA,X-ray,nan.png,\n"
                                      "None,Pneumonia,PA,X-ray,None.png,x\n")
    records, drops = sources.load("covid-chestxray", raw, CX)
    assert [(r.file, r.group) for r in records] == [
        ("images/NA.png", "patient-NA"), ("images/nan.png", "patient-nan"), ("images/None.png", "patient-None")]
    assert drops == []


def test_images_without_a_patient_id_are_not_grouped_together(tmp_path):
    raw = tmp_path / "raw"
    for name in ("a.png", "b.png"):
        _png(raw / "images" / name, len(name) + ord(name[0]))
    (raw / "metadata.csv").write_text("patientid,finding,view,modality,filename\n,COVID-19,PA,X-ray,a.png\n ,COVID-19,PA,X-ray,b.png\n")
    records, _ = sources.load("covid-chestxray", raw, CX)
    assert [r.group for r in records] == ["image-images/a.png", "image-images/b.png"]


# --- images: extreme shapes, bombs ---------------------------------------------------------------------

def test_extreme_aspect_ratio_is_refused_from_the_header(tmp_path):
    p = tmp_path / "line.png"
    p.write_bytes(_gray_png_bytes(50_000_000, 1))                 # 1 x 50,000,000: padding it would need petabytes
    assert p.stat().st_size < 100_000
    with pytest.raises(images.DecodeError) as info:
        images.decode(p, 32, "pad", max_pixels=60_000_000)
    assert info.value.reason == "extreme_aspect_ratio" and "clean.max_aspect_ratio=4" in info.value.detail
    with pytest.raises(images.DecodeError):
        images.decode(p, 32, "crop", max_pixels=60_000_000)


def test_extreme_aspect_ratio_is_a_counted_drop_in_clean(tmp_path):
    raw = tmp_path / "raw"
    (raw / "COVID").mkdir(parents=True)
    (raw / "COVID" / "line.png").write_bytes(_gray_png_bytes(20, 100_000))
    _png(raw / "COVID" / "ok.png", 1)
    _png(raw / "Normal" / "ok.png", 2)
    (raw / "Normal" / "dot.png").write_bytes(_gray_png_bytes(1, 1))
    recs = [Record(f, f.split("/")[0], group=f) for f in ("COVID/line.png", "COVID/ok.png", "Normal/ok.png", "Normal/dot.png")]
    out = tmp_path / "out"
    out.mkdir()
    cfg = {"image_size": 32, "resize": "pad", "max_pixels": 60_000_000, "max_aspect_ratio": 4, "min_side": 16,
           "near_duplicate_distance": 12, "shard_size": 8, "workers": 1}
    summary, dropped = clean.run(raw, out, recs, [], ["COVID", "Normal"], cfg)
    assert summary["seen"] == summary["kept"] + summary["dropped"] == 4
    assert dict(zip(dropped["file"], dropped["reason"])) == {"COVID/line.png": "extreme_aspect_ratio", "Normal/dot.png": "too_small"}


def test_one_pixel_image_is_too_small(tmp_path):
    p = tmp_path / "dot.png"
    Image.new("L", (1, 1), 200).save(p)
    with pytest.raises(images.DecodeError) as info:
        images.decode(p, 32, min_side=32)
    assert info.value.reason == "too_small" and "clean.min_side=32" in info.value.detail
    assert images.decode(p, 32).shape == (32, 32)                 # the library default takes it; clean's params do not


def test_bomb_message_quotes_our_limit_not_pillows_doubled_one(tmp_path):
    p = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 0).save(p)                        # 9,000,000 pixels: over twice the limit below
    with pytest.raises(images.DecodeError) as info:
        images.decode(p, 32, max_pixels=1_000_000)
    msg = str(info.value)
    assert "9000000 pixels" in msg and "clean.max_pixels=1000000" in msg
    assert "2000000" not in msg


# --- manifests and splits: names pandas would call missing ---------------------------------------------

def test_na_named_files_stay_in_the_split(tmp_path):
    raw = tmp_path / "raw"
    recs = []
    for i, name in enumerate(["NA", "nan", "None", "null", "N/A", "a", "b", "c", "d", "e", "f", "g"]):
        label = "COVID" if i % 2 else "Normal"
        rel = f"{label}/{name.replace('/', '_') if name == 'N/A' else name}.png"
        _png(raw / rel, 100 + i)
        recs.append(Record(rel, label, group=Path(rel).stem))
    out = tmp_path / "clean"
    out.mkdir()
    cfg = {"image_size": 32, "resize": "pad", "max_pixels": 10_000_000, "near_duplicate_distance": 12, "shard_size": 8, "workers": 1}
    summary, _ = clean.run(raw, out, recs, [], ["COVID", "Normal"], cfg)
    manifest = splitting.read_manifest(out / "manifest.csv")
    assert summary["kept"] == len(manifest) == 12
    assert {"NA", "nan", "None", "null"} <= set(manifest["group"])
    assert manifest["group"].map(type).eq(str).all()
    table = splitting.make_split(manifest, 0.25, 0.25, seed=0, group_distance=64)  # everything near: one merged group
    splitting.check_result(table, manifest, ["COVID", "Normal"], min_per_class=0)
    assert table["split"].notna().all() and len(table) == 12
    table = splitting.make_split(manifest, 0.25, 0.25, seed=0, group_distance=-1)
    splitting.check_result(table, manifest, ["COVID", "Normal"], min_per_class=1)
    assert set(table["file"]) == set(manifest["file"])


def test_split_refuses_too_few_images_per_class_up_front():
    labels = pd.Series(["COVID"] * 40 + ["Normal"] * 100)
    splitting.check_expected(labels, splitting.fractions(0.15, 0.15), 5)
    with pytest.raises(UserError) as info:
        splitting.check_expected(labels, splitting.fractions(0.15, 0.001), 1)
    msg = str(info.value)
    assert "split.test_fraction" in msg and "'COVID'" in msg and "split.min_per_class=1" in msg


def test_split_refuses_a_class_missing_from_a_split_after_grouping():
    manifest = pd.DataFrame({"file": [f"f{i}" for i in range(12)], "label": ["COVID"] * 6 + ["Normal"] * 6})
    table = manifest.assign(group="g", split=["train"] * 6 + ["val", "test"] * 3)   # no COVID in val or test
    with pytest.raises(UserError, match=r"the (train|val|test) split has 0 image\(s\) of class"):
        splitting.check_result(table, manifest, ["COVID", "Normal"], 1)
    with pytest.raises(AssertionError, match="do not add up"):
        splitting.check_result(table.iloc[:-1], manifest, ["COVID", "Normal"], 0)


# --- interrupted runs ------------------------------------------------------------------------------------

def test_remove_stale_deletes_only_temporary_siblings(tmp_path):
    data = tmp_path / "data"
    (data / "raw").mkdir(parents=True)
    (data / ".raw.x1y2z3").mkdir()
    (data / ".raw.x1y2z3" / "partial.png").write_bytes(b"x" * 100)
    (data / ".raw.old.123").mkdir()
    (data / ".clean.abc").mkdir()
    (data / ".split.csv.k3j4.csv").write_text("partial")
    (data / ".rawfile").write_text("not ours")
    (data / "raw.csv").write_text("not ours")
    removed = atomic.remove_stale(data / "raw", data / "split.csv", tmp_path / "absent" / "x.json")
    assert sorted(p.name for p in removed) == [".raw.old.123", ".raw.x1y2z3", ".split.csv.k3j4.csv"]
    assert sorted(p.name for p in data.iterdir()) == [".clean.abc", ".rawfile", "raw", "raw.csv"]


# --- exit codes ------------------------------------------------------------------------------------------

def test_cli_exit_codes_tell_user_errors_from_crashes(capsys):
    @cli
    def user():
        raise UserError("bad thing")

    @cli
    def disk():
        raise PermissionError(13, "Permission denied", "/some/where")

    @cli
    def bug():
        raise ValueError("oops")

    for fn, code in ((user, 2), (disk, 2), (bug, 3)):
        with pytest.raises(SystemExit) as exc:
            fn()
        assert exc.value.code == code
    err = capsys.readouterr().err
    assert "error: bad thing" in err and "error: /some/where: Permission denied" in err
    assert "ValueError: oops" in err and "internal error" in err


def test_a_warning_in_a_stage_is_one_log_line():
    code = ("import warnings\nfrom cxr.errors import cli\n@cli\ndef main():\n"
            "    warnings.warn('the validation split has 18 positive cases: sensitivity 0.95 needs 19')\nmain()\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, lines   # no second line quoting the source
    assert re.fullmatch(r"\d\d:\d\d:\d\d py\.warnings: UserWarning: the validation split has 18 positive cases: "
                        r"sensitivity 0\.95 needs 19 \(<string>:5\)", lines[0]), lines[0]


# --- predict: sidecars, model file, output ---------------------------------------------------------------

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def _fake_model(folder: Path, info: dict | None = None, op: dict | None = None, name: str = "m.keras") -> Path:
    """A file that looks like a .keras archive (a zip) and its sidecars; enough for the checks made before loading."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
    base = {"classes": CLASSES, "positive": "COVID", "image_size": 32, "resize": "pad"}
    (folder / f"{path.stem}.info.json").write_text(json.dumps(base if info is None else info))
    if op is not None:
        (folder / f"{path.stem}.operating_point.json").write_text(json.dumps(op))
    return path


@pytest.mark.parametrize("threshold", [float("nan"), float("inf"), -0.1, 1.5, "0.5", True, None])
def test_operating_point_threshold_is_validated(tmp_path, threshold):
    model = _fake_model(tmp_path, op={"class": "COVID", "threshold": threshold})
    text = json.dumps({"class": "COVID", "threshold": threshold})    # NaN and Infinity as Python's json writes them
    (tmp_path / "m.operating_point.json").write_text(text)
    with pytest.raises(UserError, match="threshold"):
        modelinfo.read_operating_point(model, CLASSES)


def test_operating_point_in_range_is_accepted(tmp_path):
    model = _fake_model(tmp_path, op={"class": "COVID", "threshold": 0.25})
    assert modelinfo.read_operating_point(model, CLASSES)["threshold"] == 0.25


@pytest.mark.parametrize("info,match", [
    ({"classes": "COVID", "image_size": 32, "resize": "pad"}, "classes"),
    ({"classes": ["COVID", "COVID", "Normal"], "image_size": 32, "resize": "pad"}, "classes"),
    ({"classes": ["COVID"], "image_size": 32, "resize": "pad"}, "classes"),
    ({"classes": ["COVID", ""], "image_size": 32, "resize": "pad"}, "classes"),
    ({"classes": CLASSES, "image_size": 32.5, "resize": "pad"}, "image_size"),
    ({"classes": CLASSES, "image_size": True, "resize": "pad"}, "image_size"),
    ({"classes": CLASSES, "image_size": 32, "resize": "stretch"}, "resize"),
    ({"classes": CLASSES, "image_size": 32, "resize": "pad", "positive": "Pneumothorax"}, "positive"),
    (["not", "an", "object"], "JSON object"),
])
def test_model_info_sidecar_is_validated(tmp_path, info, match):
    model = _fake_model(tmp_path, info=info)
    with pytest.raises(UserError, match=match):
        modelinfo.read_info(model)


def test_text_file_as_model_says_what_is_wrong(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("just some notes")
    (tmp_path / "notes.info.json").write_text(json.dumps({"classes": CLASSES, "image_size": 32, "resize": "pad"}))
    with pytest.raises(UserError) as info:
        modelinfo.read_info(notes)
    assert "is not a Keras model file" in str(info.value) and "not found" not in str(info.value).lower()


def test_non_finite_model_output_is_an_error_row_not_a_triage_call():
    items = [images.Item(i, Path(f"x{i}.png"), np.zeros((32, 32), np.uint8), None) for i in range(3)]

    def forward(x):
        out = np.full((len(x), 3), 1 / 3, np.float32)
        out[1] = np.nan
        return out

    proba, errors = inference.predict_stream(items, forward, len(CLASSES))
    table = inference.prediction_table([str(it.job) for it in items], proba, CLASSES, {"class": "COVID", "threshold": 0.2}, errors=errors)
    assert table["triage"].tolist() == ["COVID suspected", "", "COVID suspected"]
    assert table["error"].iloc[1].startswith("non_finite_output: ") and table["argmax_class"].iloc[1] == ""


def test_predict_error_rows_name_the_command_line_limits(tmp_path):
    big = tmp_path / "big.png"
    Image.new("L", (3000, 3000), 0).save(big)
    line = tmp_path / "line.png"
    line.write_bytes(_gray_png_bytes(1000, 1))
    decode = functools.partial(images.decode, size=32, mode="pad", max_pixels=1_000_000, style="cli")
    proba, errors = inference.predict_stream(images.decode_many(decode, [big, line], workers=1), None, len(CLASSES))
    assert "--max-pixels=1000000" in errors[0] and "clean." not in errors[0]
    assert errors[1].startswith("extreme_aspect_ratio: ") and "--max-aspect-ratio=4" in errors[1]


@pytest.mark.parametrize("where", ["under-a-file", "unwritable"])
def test_unwritable_out_fails_before_any_image_is_decoded(tmp_path, capsys, monkeypatch, where):
    model = _fake_model(tmp_path / "models")
    _png(tmp_path / "scans" / "a.png", 1)
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "afile" / "preds.csv" if where == "under-a-file" else Path("/sys/cxr-test/preds.csv")
    decoded = []
    monkeypatch.setattr(images, "decode_many", lambda *a, **k: decoded.append(a) or iter(()))
    with pytest.raises(SystemExit) as exc:
        predict.main([str(tmp_path / "scans"), "--model", str(model), "--out", str(out)])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: --out ") and "Traceback" not in err[0]
    assert decoded == []


def test_atomic_outputs_get_the_users_usual_mode_not_private(tmp_path):
    """mkstemp/mkdtemp make private (0600/0700) temporaries; what is renamed into place follows the umask."""
    old = os.umask(0o022)
    try:
        atomic.write_text(tmp_path / "a.txt", "x")
        with atomic.atomic_dir(tmp_path / "folder") as d:
            (d / "inside.txt").write_text("y")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o644
        assert (tmp_path / "folder").stat().st_mode & 0o777 == 0o755
        os.umask(0o077)
        atomic.write_text(tmp_path / "a.txt", "z")
        assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o600
    finally:
        os.umask(old)
