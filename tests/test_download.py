"""cxr.download: archive safety, finding a local copy, fetch() from a folder or an archive, and offline failure;
cxr.network: network failures in words."""
import io
import socket
import stat
import tarfile
import time
import urllib.error
import zipfile
from pathlib import Path

import pytest

from cxr import download, network
from cxr.download import ENV, fetch, find_local, safe_extract
from cxr.errors import UserError


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _zip(path: Path, members: dict) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in members.items():
            zf.writestr(zipfile.ZipInfo(name), data)
    return path


# --- safe_extract --------------------------------------------------------------------------------

def test_extracts_a_good_zip(tmp_path):
    arc = _zip(tmp_path / "good.zip", {"ds/metadata.csv": b"a,b\n", "ds/images/x.png": b"\x89PNG..."})
    target = tmp_path / "out"
    safe_extract(arc, target)
    assert _tree(target) == {"ds/metadata.csv": b"a,b\n", "ds/images/x.png": b"\x89PNG..."}


@pytest.mark.parametrize("evil", ["../evil.txt", "ds/../../evil.txt", "/tmp/evil-abs.txt", "C:/evil.txt", "..\\evil.txt"])
def test_zip_with_escaping_member_is_refused(tmp_path, evil):
    arc = _zip(tmp_path / "bad.zip", {"ds/ok.txt": b"ok", evil: b"pwned"})
    target = tmp_path / "sandbox" / "out"
    target.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(UserError, match="unsafe"):
        safe_extract(arc, target)
    assert _tree(tmp_path) == before, "nothing may be written, not even the safe members"
    assert not Path("/tmp/evil-abs.txt").exists()


def test_zip_with_symlink_member_is_refused(tmp_path):
    arc = tmp_path / "link.zip"
    with zipfile.ZipFile(arc, "w") as zf:
        zf.writestr("ds/ok.txt", b"ok")
        info = zipfile.ZipInfo("ds/link")
        info.external_attr = (stat.S_IFLNK | 0o777) << 16
        zf.writestr(info, "/etc/passwd")
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(UserError, match="unsafe"):
        safe_extract(arc, target)
    assert list(target.iterdir()) == []


def _tar(path: Path, members: list[tarfile.TarInfo | tuple[str, bytes]]) -> Path:
    with tarfile.open(path, "w:gz") as tf:
        for m in members:
            if isinstance(m, tarfile.TarInfo):
                tf.addfile(m)
            else:
                info = tarfile.TarInfo(m[0])
                info.size = len(m[1])
                tf.addfile(info, io.BytesIO(m[1]))
    return path


def test_extracts_a_good_tar_gz(tmp_path):
    arc = _tar(tmp_path / "good.tar.gz", [("ds/a.txt", b"A"), ("ds/sub/b.txt", b"BB")])
    target = tmp_path / "out"
    safe_extract(arc, target)
    assert _tree(target) == {"ds/a.txt": b"A", "ds/sub/b.txt": b"BB"}


def _symlink(name, to):
    info = tarfile.TarInfo(name)
    info.type = tarfile.SYMTYPE
    info.linkname = to
    return info


@pytest.mark.parametrize("bad", [("../evil.txt", b"x"), ("/tmp/evil-abs-tar.txt", b"x"), _symlink("ds/link", "/etc/passwd")],
                         ids=["dotdot", "absolute", "symlink"])
def test_tar_gz_with_unsafe_member_is_refused(tmp_path, bad):
    arc = _tar(tmp_path / "bad.tar.gz", [("ds/ok.txt", b"ok"), bad])
    target = tmp_path / "sandbox" / "out"
    target.mkdir(parents=True)
    before = _tree(tmp_path)
    with pytest.raises(UserError, match="unsafe"):
        safe_extract(arc, target)
    assert _tree(tmp_path) == before
    assert not Path("/tmp/evil-abs-tar.txt").exists()


# --- find_local ----------------------------------------------------------------------------------

def test_find_local_none_without_env():
    assert find_local("covid-chestxray", None) is None
    assert find_local("covid-chestxray", "") is None


def test_find_local_folder_and_zip(tmp_path):
    (tmp_path / "covid-chestxray").mkdir()
    _zip(tmp_path / "covid-radiography.zip", {"a.txt": b"a"})
    assert find_local("covid-chestxray", str(tmp_path)) == tmp_path / "covid-chestxray"
    assert find_local("covid-radiography", str(tmp_path)) == tmp_path / "covid-radiography.zip"


def test_find_local_folder_lacking_dataset(tmp_path):
    (tmp_path / "something-else").mkdir()
    with pytest.raises(UserError) as info:
        find_local("covid-chestxray", str(tmp_path))
    assert "covid-chestxray" in str(info.value) and ENV in str(info.value)


# --- fetch ---------------------------------------------------------------------------------------

DS = {"kaggle": "bachrr/covid-chest-xray", "classes": ["COVID-19", "non-COVID"], "positive": "COVID-19", "views": ["PA"]}
CONTENT = {"metadata.csv": b"patientid,finding\n", "images/a.png": b"\x89PNG-a", "images/b.png": b"\x89PNG-b"}


def _write(root: Path, files: dict):
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)


def _only_dest_beside(dest: Path):
    assert sorted(p.name for p in dest.parent.iterdir()) == [dest.name], "temporary folders left beside dest"


def test_fetch_from_local_folder_replaces_dest_atomically(tmp_path, monkeypatch):
    store = tmp_path / "store"
    _write(store / "covid-chestxray", CONTENT)
    monkeypatch.setenv(ENV, str(store))
    dest = tmp_path / "data" / "raw"
    _write(dest, {"stale.txt": b"old run"})

    rec = fetch("covid-chestxray", DS, dest)
    assert _tree(dest) == CONTENT                    # old content gone, new content whole
    assert rec["files"] == 3 and rec["bytes"] == sum(map(len, CONTENT.values()))
    assert rec["source"] == "local:covid-chestxray"
    assert len(rec["sha256"]) == 64 and rec["sha256"] == download.fingerprint(dest)["sha256"]
    _only_dest_beside(dest)


def test_fetch_from_local_zip(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    _zip(store / "covid-chestxray.zip", {k: v for k, v in CONTENT.items()})
    monkeypatch.setenv(ENV, str(store))
    dest = tmp_path / "data" / "raw"
    rec = fetch("covid-chestxray", DS, dest)
    assert _tree(dest) == CONTENT
    assert rec["files"] == 3 and rec["source"] == "local:covid-chestxray.zip"
    _only_dest_beside(dest)
    # same content from a folder gives the same fingerprint
    _write(tmp_path / "store2" / "covid-chestxray", CONTENT)
    monkeypatch.setenv(ENV, str(tmp_path / "store2"))
    assert fetch("covid-chestxray", DS, tmp_path / "other" / "raw")["sha256"] == rec["sha256"]


def test_fetch_from_local_tar_gz(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    _tar(store / "covid-chestxray.tar.gz", list(CONTENT.items()))
    monkeypatch.setenv(ENV, str(store))
    dest = tmp_path / "data" / "raw"
    rec = fetch("covid-chestxray", DS, dest)
    assert _tree(dest) == CONTENT and rec["files"] == 3
    _only_dest_beside(dest)


def test_fetch_unsafe_zip_leaves_existing_dest_untouched(tmp_path, monkeypatch):
    store = tmp_path / "store"
    store.mkdir()
    _zip(store / "covid-chestxray.zip", {"metadata.csv": b"x", "../escape.txt": b"x"})
    monkeypatch.setenv(ENV, str(store))
    dest = tmp_path / "data" / "raw"
    _write(dest, {"previous.txt": b"previous run"})
    with pytest.raises(UserError):
        fetch("covid-chestxray", DS, dest)
    assert _tree(dest) == {"previous.txt": b"previous run"}
    _only_dest_beside(dest)
    assert not (tmp_path / "data" / "escape.txt").exists()


def test_fetch_empty_local_copy_is_user_error(tmp_path, monkeypatch):
    (tmp_path / "store" / "covid-chestxray").mkdir(parents=True)
    monkeypatch.setenv(ENV, str(tmp_path / "store"))
    dest = tmp_path / "data" / "raw"
    with pytest.raises(UserError, match="empty"):
        fetch("covid-chestxray", DS, dest)
    assert not dest.exists()
    assert list(dest.parent.iterdir()) == []


def test_fetch_offline_without_local_copy_names_both_ways_out(tmp_path, monkeypatch):
    """This machine has no network: kagglehub fails (fast) and the error says what to do."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setenv("KAGGLEHUB_CACHE", str(tmp_path / "kagglehub-cache"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))            # no real kaggle.json / credentials
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN", "NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    # a dead proxy: fails fast (and never downloads gigabytes) even on a machine that does have a network
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    dest = tmp_path / "data" / "raw"
    t0 = time.monotonic()
    with pytest.raises(UserError) as info:
        fetch("covid-chestxray", DS, dest)
    msg = str(info.value)
    # one complete line: the dataset, why (in words, not a cut-off exception text), and every way out
    assert "\n" not in msg
    assert msg.startswith("cannot download dataset covid-chestxray from Kaggle (bachrr/covid-chest-xray): connection refused")
    assert "internet" in msg.lower() and "KAGGLE_USERNAME" in msg
    assert f"covid-chestxray/ (extracted, Kaggle layout) or covid-chestxray.zip, and set {ENV} to that folder" in msg
    assert f"`{download.DEMO_COMMAND}`" in msg and download.DEMO_COMMAND == "dvc exp run --temp -S dataset=demo -S model.weights=none"
    assert msg.endswith("(params.yaml stays as it is; README: Offline, or a first run in minutes)")
    assert "HTTPSConnectionPool" not in msg and "Max retries" not in msg
    assert not dest.exists()
    assert not dest.parent.exists() or list(dest.parent.iterdir()) == []
    print(f"offline download failed in {time.monotonic() - t0:.2f}s")


# --- network failures in words ------------------------------------------------------------------------

def _raised(*chain: BaseException) -> BaseException:
    """The first exception, raised from the next, and so on (as requests wraps urllib3 wraps socket)."""
    for outer, inner in zip(chain, chain[1:]):
        outer.__cause__ = inner
    return chain[0]


class _Response:
    def __init__(self, status):
        self.status_code = status


class _HTTPError(Exception):
    def __init__(self, status):
        super().__init__(f"{status} Client Error")
        self.response = _Response(status)


@pytest.mark.parametrize("err, phrase", [
    (_raised(ConnectionError("HTTPSConnectionPool(host='api.kaggle.com', port=443): Max retries exceeded"),
             socket.gaierror(-2, "Name or service not known")), "no network (the server's name does not resolve)"),
    (urllib.error.URLError(ConnectionRefusedError(111, "Connection refused")), "connection refused"),
    (_raised(OSError("read"), TimeoutError("timed out")), "no answer in time"),
    (_HTTPError(403), "access refused (HTTP 403): credentials missing or wrong"),
    (_HTTPError(404), "not found there (HTTP 404)"),
])
def test_network_failures_read_as_what_to_do(err, phrase):
    assert network.reason(err).startswith(phrase)


def test_an_unknown_failure_is_cut_at_a_word_never_inside_one():
    text = network.reason(RuntimeError("word " * 100))
    assert len(text) <= 170 and text.endswith("word ...") and "  " not in text


def test_a_dead_proxy_is_refused_at_once(monkeypatch):
    for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(var, raising=False)
    assert network.reachable("https://api.kaggle.com", timeout=5).startswith("connection refused")
