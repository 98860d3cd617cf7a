"""The data stages (download -> clean -> split) run as DVC runs them, on a hostile local copy, and params.yaml
checks made before any stage does work: unknown keys, class names the data can never provide, limits."""
from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from PIL import Image

from cxr import params, sources
from cxr.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
REAL = PROJECT / "params.yaml"
CURRENT = "COVID-19_Radiography_Dataset"


def _set(tree: dict, key: str, value) -> None:
    node = tree
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _workspace(tmp_path: Path, overrides: dict) -> Path:
    ws = tmp_path / "ws"
    ws.mkdir()
    tree = yaml.safe_load(REAL.read_text())
    for k, v in overrides.items():
        _set(tree, k, v)
    (ws / "params.yaml").write_text(yaml.safe_dump(tree, sort_keys=False))
    return ws


def _stage(ws: Path, name: str, data_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "CXR_DATA_DIR"}
    env["PYTHONPATH"] = str(PROJECT)
    if data_dir is not None:
        env["CXR_DATA_DIR"] = str(data_dir)
    return subprocess.run([sys.executable, str(PROJECT / "stages" / f"{name}.py")], cwd=ws, env=env,
                          capture_output=True, text=True, timeout=300)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    return errors[0]


def _smooth(seed: int, size=(48, 40)) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (8, 8), dtype=np.uint8), "L").resize(size, Image.Resampling.BILINEAR)


def _hostile_copy(store: Path, outside: Path) -> dict[str, str]:
    """A local covid-radiography copy: 8 good images per class (three named like missing values), a 1x1 image,
    a 40 x 200,000 one, and links and a pipe that must never be copied. Returns {name: expected drop reason}."""
    base = store / "covid-radiography" / CURRENT
    seed = 0
    for cls in ("COVID", "Normal", "Viral Pneumonia"):
        (base / cls / "images").mkdir(parents=True)
        for i in range(8):
            seed += 1
            _smooth(seed).save(base / cls / "images" / f"{cls}-{i}.png")
    for name in ("NA", "nan", "None"):
        seed += 1
        _smooth(seed).save(base / "COVID" / "images" / f"{name}.png")
    Image.new("L", (1, 1), 128).save(base / "Normal" / "images" / "dot.png")
    Image.new("L", (40, 200_000), 0).save(base / "Normal" / "images" / "line.png")
    outside.mkdir()
    (outside / "passwd").write_text("root:x:0:0\n")
    for i in range(3):
        _smooth(1000 + i).save(outside / f"o{i}.png")
    os.symlink(outside / "passwd", base / "COVID" / "images" / "x.png")
    os.symlink(outside, base / "COVID" / "images" / "elsewhere")
    os.symlink(base / "COVID" / "images", base / "COVID" / "images" / "loop")
    os.symlink(base / "missing.png", base / "COVID" / "images" / "dangling.png")
    os.mkfifo(base / "COVID" / "images" / "pipe.png")
    return {"x.png": "outside_dataset", "elsewhere": "outside_dataset", "loop": "link",
            "dangling.png": "broken_link", "pipe.png": "not_a_regular_file"}


SMALL = {"dataset": "covid-radiography", "clean.image_size": 32, "clean.workers": 1, "split.val_fraction": 0.25,
         "split.test_fraction": 0.25, "split.min_per_class": 1, "split.group_distance": -1}


def test_data_stages_on_a_hostile_local_copy(tmp_path):
    store, outside = tmp_path / "store", tmp_path / "outside"
    not_copied = _hostile_copy(store, outside)
    ws = _workspace(tmp_path, SMALL)
    # leftovers of runs killed mid-stage (SIGKILL leaves no chance to clean up)
    for stale in ("data/.raw.k1ll3d/partial.png", "data/.clean.k1ll3d/images-00000.npy", "data/.split.csv.x1.csv",
                  "reports/.download.json.x1.json", "reports/.clean.json.x1.json", "reports/.clean_dropped.csv.x1.csv"):
        (ws / stale).parent.mkdir(parents=True, exist_ok=True)
        (ws / stale).write_bytes(b"partial")

    proc = _stage(ws, "download", store)
    assert proc.returncode == 0, proc.stderr
    raw = ws / "data" / "raw"
    assert not any(p.is_symlink() for p in raw.rglob("*"))
    assert not any(p.name in ("passwd", "o0.png") for p in raw.rglob("*"))
    record = json.loads((ws / "reports" / "download.json").read_text())
    report = pd.read_csv(ws / "reports" / "download_dropped.csv", keep_default_na=False)
    assert {Path(f).name: r for f, r in zip(report["file"], report["reason"])} == not_copied
    assert record["dropped"] == len(report) == 5 and record["files"] == 3 * 8 + 3 + 2

    proc = _stage(ws, "clean")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((ws / "reports" / "clean.json").read_text())
    assert summary["seen"] == summary["kept"] + summary["dropped"]
    assert summary["dropped_by_reason"] == {"extreme_aspect_ratio": 1, "too_small": 1}
    dropped = pd.read_csv(ws / "reports" / "clean_dropped.csv", keep_default_na=False)
    assert len(dropped) == summary["dropped"]

    proc = _stage(ws, "split")
    assert proc.returncode == 0, proc.stderr
    table = pd.read_csv(ws / "data" / "split.csv", dtype=str, keep_default_na=False)
    sizes = json.loads((ws / "reports" / "split.json").read_text())["sizes"]
    assert summary["kept"] == len(table) == sum(s["total"] for s in sizes.values())
    assert {f"{CURRENT}/COVID/images/{n}.png" for n in ("NA", "nan", "None")} <= set(table["file"])
    assert set(table["split"]) == {"train", "val", "test"}

    left = sorted(p.relative_to(ws).as_posix() for d in ("data", "metrics", "reports") for p in (ws / d).glob(".*"))
    assert left == []


def test_split_refuses_an_empty_test_split(tmp_path):
    store = tmp_path / "store"
    _hostile_copy(store, tmp_path / "outside")
    ws = _workspace(tmp_path, {**SMALL, "split.test_fraction": 0.001})
    assert _stage(ws, "download", store).returncode == 0
    assert _stage(ws, "clean").returncode == 0
    line = _one_error_line(_stage(ws, "split"))
    assert "split.test_fraction" in line and "split.min_per_class=1" in line
    assert not (ws / "data" / "split.csv").exists()


def test_download_refuses_a_zip_bomb_in_one_line(tmp_path):
    store = tmp_path / "store"
    store.mkdir()
    with zipfile.ZipFile(store / "covid-radiography.zip", "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{CURRENT}/COVID/images/a.png", b"\0" * (40 * 2**20))
    ws = _workspace(tmp_path, SMALL)
    line = _one_error_line(_stage(ws, "download", store))
    assert "download.max_ratio=100" in line
    assert not (ws / "data" / "raw").exists()
    assert [p.name for p in (ws / "data").iterdir()] == []


def test_chestxray_traversal_never_reaches_clean(tmp_path):
    secret = tmp_path / "secret.png"
    _smooth(99).save(secret)
    store = tmp_path / "store"
    ds = store / "covid-chestxray"
    (ds / "images").mkdir(parents=True)
    rows = ["patientid,finding,view,modality,folder,filename"]
    for i in range(12):
        _smooth(i).save(ds / "images" / f"i{i}.png")
        rows.append(f"p{i},{'COVID-19' if i % 2 else 'Pneumonia'},PA,X-ray,images,i{i}.png")
    rows += ["x1,COVID-19,PA,X-ray,images,../../../../secret.png", f"x2,COVID-19,PA,X-ray,images,{secret}",
             f"x3,COVID-19,PA,X-ray,{tmp_path},secret.png"]
    (ds / "metadata.csv").write_text("\n".join(rows) + "\n")
    ws = _workspace(tmp_path, {**SMALL, "dataset": "covid-chestxray"})
    assert _stage(ws, "download", store).returncode == 0
    proc = _stage(ws, "clean")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((ws / "reports" / "clean.json").read_text())
    assert summary["dropped_by_reason"] == {"outside_dataset": 3}
    assert summary["seen"] == summary["kept"] + summary["dropped"] == 15
    manifest = pd.read_csv(ws / "data" / "clean" / "manifest.csv", dtype=str, keep_default_na=False)
    assert not any("secret" in f for f in manifest["file"])


# --- params.yaml: unknown keys, class names, new limits ---------------------------------------------

@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(REAL.read_text())


def _load(tmp_path: Path, tree: dict) -> dict:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tree, sort_keys=False))
    return params.load(p, sources=sources.SOURCES)


@pytest.mark.parametrize("path,typo,suggested", [
    (("train",), "epoch", "train.epochs"),
    ((), "trian", "train"),
    (("clean",), "max_pixel", "clean.max_pixels"),
    (("split",), "min_per_clas", "split.min_per_class"),
    (("download",), "maxbytes", "download.max_bytes"),
    (("datasets", "covid-radiography"), "clases", "datasets.covid-radiography.classes"),
])
def test_unknown_key_names_the_nearest_valid_one(tmp_path, base, path, typo, suggested):
    tree = copy.deepcopy(base)
    node = tree
    for part in path:
        node = node[part]
    node[typo] = 1
    with pytest.raises(UserError) as info:
        _load(tmp_path, tree)
    msg = str(info.value)
    assert f"unknown key {'.'.join((*path, typo))}" in msg and f"did you mean {suggested}?" in msg


def test_unknown_key_without_a_near_one_lists_the_valid_ones(tmp_path, base):
    tree = copy.deepcopy(base)
    tree["split"]["zzz"] = 1
    with pytest.raises(UserError, match=r"unknown key split\.zzz \(valid keys here: .*group_distance.*val_fraction"):
        _load(tmp_path, tree)


@pytest.mark.parametrize("key,value", [
    ("datasets.covid-radiography.classes", ["COVID", "Normal", "Pneumothorax"]),
    ("datasets.demo.classes", ["COVID", "Normal", "Lung_Opacity"]),
    ("datasets.covid-radiography.kaggle", "not a handle"),
    ("datasets.covid-radiography.kaggle", "owner/name/versions/latest"),
    ("download.max_ratio", 0.5),
    ("download.max_bytes", 0),
    ("clean.min_side", 0),
    ("clean.max_aspect_ratio", 0.9),
    ("split.min_per_class", 0),
])
def test_data_params_are_checked_before_any_stage_runs(tmp_path, base, key, value):
    tree = copy.deepcopy(base)
    _set(tree, key, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        _load(tmp_path, tree)


def test_a_kaggle_version_can_be_pinned(tmp_path, base):
    # owner/name/versions/N: a new Kaggle version is then a params change DVC sees (kagglehub fetches that one)
    tree = copy.deepcopy(base)
    tree["datasets"]["covid-radiography"]["kaggle"] = "tawsifurrahman/covid19-radiography-database/versions/5"
    _load(tmp_path, tree)


def test_radiography_class_names_compare_loosely(tmp_path, base):
    tree = copy.deepcopy(base)
    tree["datasets"]["covid-radiography"]["classes"] = ["COVID-19", "NORMAL", "Viral_Pneumonia", "Lung Opacity"]
    tree["datasets"]["covid-radiography"]["positive"] = "COVID-19"
    _load(tmp_path, tree)


def test_class_names_params_accepts_are_the_ones_the_adapters_know(tmp_path, base):
    from cxr import demo, sources

    tree = copy.deepcopy(base)
    tree["datasets"]["covid-radiography"]["classes"] = list(sources.RADIOGRAPHY_CLASSES)
    tree["datasets"]["demo"]["classes"] = list(demo.CLASSES)
    _load(tmp_path, tree)
