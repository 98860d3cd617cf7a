"""`python -m cxr predict` on real image files with a real (tiny, saved and reloaded) Keras model."""
import functools
import io
import json
import os
import shutil
import stat
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cxr import gradcam, images, predict  # light: the decoding workers import this module too (crashing_decoder)
from cxr.errors import UserError
from cxr.images import decode
from helpers import noise

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
SIZE = 32
HEADER = ["path", "argmax_class", "argmax_p", "p_COVID", "p_Normal", "p_Viral Pneumonia", "positive_p", "triage", "triage_rule",
          "error"]


def _picture(seed: int, shape=(40, 52)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (6, 6), dtype=np.uint8), "L")
    return np.asarray(small.resize(shape[::-1], Image.Resampling.BILINEAR))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _huge_png(path: Path, side: int = 30000) -> None:
    """A tiny file whose header claims side x side pixels (a decompression bomb)."""
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", zlib.compress(b"\0" * 64)) + _chunk(b"IEND", b""))


def _randomise(model, seed: int = 0) -> None:
    """He-normal kernels, unit BatchNorm scales: an untrained from-scratch MobileNetV2 gives nearly the same
    output for every image, which would hide rows mixed up between files."""
    import keras

    rng = np.random.default_rng(seed)
    for layer in model.get_layer("backbone").layers + [model.get_layer("predictions")]:
        w = layer.get_weights()
        if isinstance(layer, keras.layers.DepthwiseConv2D):
            w[0] = rng.normal(0, np.sqrt(2 / np.prod(w[0].shape[:2])), w[0].shape)
        elif isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense)):
            w[0] = rng.normal(0, np.sqrt(2 / np.prod(w[0].shape[:-1])), w[0].shape)
        elif isinstance(layer, keras.layers.BatchNormalization) and layer.scale:
            w[0] = np.ones_like(w[0])  # gamma (whatever from-scratch init build chose)
        else:
            continue
        layer.set_weights(w)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """Images (good, bad, nested), a saved model with its info and operating point sidecars."""
    from cxr import inference, modelinfo, models

    root = tmp_path_factory.mktemp("predict")
    scans = root / "scans"
    (scans / "nested" / "deeper").mkdir(parents=True)
    (scans / ".cache").mkdir()
    Image.fromarray(_picture(1), "L").save(scans / "p1.png")
    Image.fromarray(_picture(2), "L").convert("RGB").save(scans / "p2.jpg", quality=90)
    Image.fromarray(_picture(3), "L").save(scans / "nested" / "p1.png")          # same name, other folder
    Image.fromarray(_picture(4, (60, 30)), "L").save(scans / "nested" / "deeper" / "p4.PNG")
    wide = (_picture(5).astype(np.uint16) * 257 // 4)                              # 16-bit, 0..16383
    Image.fromarray(wide).save(scans / "nested" / "p16.png")                   # mode I;16
    (scans / "notes.txt").write_text("not an image, skipped in folders")
    Image.fromarray(_picture(6), "L").save(scans / ".hidden.png")                # hidden: skipped
    Image.fromarray(_picture(7), "L").save(scans / ".cache" / "c.png")           # hidden folder: skipped
    bad = root / "bad"
    bad.mkdir()
    (bad / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + np.random.default_rng(0).bytes(2000))
    buf = io.BytesIO()
    Image.fromarray(_picture(8, (200, 200)), "L").save(buf, "PNG")
    (bad / "truncated.png").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    (bad / "text.png").write_text("hello, I am text")
    _huge_png(bad / "huge.png")
    odd = root / "scan.data"                                                       # a PNG, named explicitly
    Image.fromarray(_picture(9), "L").save(odd, format="PNG")

    model = models.build("mobilenetv2", len(CLASSES), SIZE, "none", alpha=0.35)
    _randomise(model)
    path = root / "models" / "m.keras"
    info = {"classes": CLASSES, "positive": "COVID", "image_size": SIZE, "resize": "pad", "arch": "mobilenetv2", "dataset": "demo"}
    modelinfo.save(model, path, info)
    model = models.load(path)
    good = [scans / "nested" / "deeper" / "p4.PNG", scans / "nested" / "p1.png", scans / "nested" / "p16.png",
            scans / "p1.png", scans / "p2.jpg", odd]
    proba = inference.probabilities(model, np.stack([decode(f, SIZE, "pad") for f in good]))
    threshold = float(np.median(proba[:, 0]))  # some files on each side
    (path.parent / "m.operating_point.json").write_text(json.dumps({"class": "COVID", "threshold": threshold, "by": "sensitivity", "target": 0.95}))
    return {"root": root, "scans": scans, "bad": bad, "odd": odd, "model_path": path, "model": model,
            "good": good, "threshold": threshold}


def _cli(*args, cwd) -> subprocess.CompletedProcess:
    """`python -m cxr ARGS`, stderr not a terminal (no progress bar), TensorFlow's log level left to the command."""
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    env["PYTHONPATH"] = str(PROJECT)
    return subprocess.run([sys.executable, "-m", "cxr", *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def _read(text_or_path):
    import pandas as pd

    src = io.StringIO(text_or_path) if isinstance(text_or_path, str) else text_or_path
    return pd.read_csv(src, keep_default_na=False, dtype=str)


# --- pure parts ----------------------------------------------------------------------------------

def test_collect_inputs_sorted_recursive_filtered(world):
    scans, odd = world["scans"], world["odd"]
    files = images.find_images([odd, scans, scans / "p1.png"])  # duplicates collapse
    assert files == sorted(files)
    assert set(files) == set(world["good"])   # .txt, hidden file and hidden folder skipped; scan.data kept
    assert images.find_images([scans / "notes.txt"]) == [scans / "notes.txt"]  # named: always tried
    with pytest.raises(UserError, match="no such file"):
        images.find_images([scans, world["root"] / "missing.png"])
    (world["root"] / "empty").mkdir(exist_ok=True)
    with pytest.raises(UserError, match="no image files"):
        images.find_images([world["root"] / "empty"])


def test_gradcam_names_unique_and_readable():
    files = [Path("a/x.png"), Path("b/x.png"), Path("b/x.jpg"), Path("b/y.png"), Path("b/c/z.tif")]
    names = gradcam.overlay_names(files)
    assert len(set(names)) == len(names)
    assert names[3] == "y.png" and names[4] == "z.png"
    assert names[0] == "a__x.png" and names[1] == "b__x_png.png" and names[2] == "b__x_jpg.png"


def _why(item):
    return None if item.error is None else (item.error.reason, item.error.detail)


def test_decode_many_parallel_equals_serial_in_order(world):
    files = world["good"] + sorted(world["bad"].iterdir())
    fn = functools.partial(decode, size=SIZE, mode="pad")
    serial = list(images.decode_many(fn, files, workers=1))
    parallel = list(images.decode_many(fn, files, workers=2, ahead=2, chunk=1))
    assert [it.index for it in parallel] == list(range(len(files)))
    for s, p in zip(serial, parallel):
        assert s.job == p.job and _why(s) == _why(p)
        assert (s.value is None and p.value is None) or np.array_equal(s.value, p.value)
    assert sum(it.error is not None for it in parallel) == 4
    small = list(images.decode_many(functools.partial(decode, size=SIZE, max_pixels=1000), world["good"][:2], workers=2))
    assert all(it.error.reason == "decompression_bomb" for it in small)


def crashing_decoder(path):
    """A decoder that kills its process on one file (as a decoder crash or the OOM killer would)."""
    if Path(path).name == "p2.jpg":
        os._exit(1)
    return decode(path, SIZE)


def test_decode_many_survives_a_dying_worker(world):
    files = world["good"]
    items = list(images.decode_many(crashing_decoder, files, workers=2, chunk=2))
    assert [it.job for it in items] == files
    for it in items:
        if it.job.name == "p2.jpg":
            assert it.value is None and it.error is images.CRASHED and it.error.reason == "decoder_crashed"
        else:
            assert it.error is None and np.array_equal(it.value, decode(it.job, SIZE))


# --- the command ---------------------------------------------------------------------------------

def test_cli_predicts_good_files_and_reports_bad_ones(world, tmp_path):
    from cxr import inference

    out, cams = tmp_path / "preds.csv", tmp_path / "cams"
    proc = _cli("predict", world["scans"], world["bad"], world["odd"], "--model", world["model_path"],
                "--out", out, "--gradcam", cams, "--batch-size", "4", "--workers", "2", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    # TensorFlow ran a model on a CPU-only machine: no `E0000 ... failed call to cuInit`, no bar (not a terminal)
    assert noise(proc.stderr) == [], proc.stderr
    assert out.read_text().splitlines()[0] == ",".join(HEADER)
    table = _read(out)
    assert list(table.columns) == HEADER
    expected = sorted(world["good"] + [world["bad"] / n for n in ("corrupt.jpg", "huge.png", "text.png", "truncated.png")])
    assert table["path"].tolist() == [str(p) for p in expected]
    rows = table.set_index("path")

    errors = rows.loc[rows["error"] != "", "error"].to_dict()
    bad = world["bad"]
    assert set(errors) == {str(bad / n) for n in ("corrupt.jpg", "huge.png", "text.png", "truncated.png")}
    assert errors[str(bad / "huge.png")].startswith("decompression_bomb: ")
    assert errors[str(bad / "text.png")].startswith("not_an_image: ")
    assert errors[str(bad / "corrupt.jpg")].split(":")[0] in ("not_an_image", "unreadable")
    assert errors[str(bad / "truncated.png")].startswith("unreadable: ")
    failed = rows.loc[list(errors)]
    assert (failed[HEADER[1:-1]] == "").all().all()

    good = rows.loc[[str(p) for p in world["good"]]]           # the 16-bit PNG among them
    assert (good["error"] == "").all()
    proba = good[["p_COVID", "p_Normal", "p_Viral Pneumonia"]].astype(float).to_numpy()
    reference = inference.probabilities(world["model"], np.stack([decode(p, SIZE, "pad") for p in world["good"]]))
    np.testing.assert_allclose(proba, reference, atol=1e-6, rtol=0)
    assert good["argmax_class"].tolist() == [CLASSES[k] for k in reference.argmax(axis=1)]
    np.testing.assert_allclose(good["argmax_p"].astype(float), reference.max(axis=1), atol=1e-6, rtol=0)
    assert (good["positive_p"] == good["p_COVID"]).all()                 # COVID is the operating point's class
    called = np.where(proba[:, 0] >= world["threshold"], "COVID suspected", "COVID not suspected")
    assert good["triage"].tolist() == called.tolist()
    assert {"COVID suspected", "COVID not suspected"} <= set(called)
    rule = f"COVID suspected when positive_p >= {world['threshold']:.6g} (threshold chosen on the validation split for sensitivity 0.95)"
    assert (good["triage_rule"] == rule).all()

    pngs = sorted(cams.iterdir())
    assert len(pngs) == len(world["good"])                    # one per predicted image, unique names
    assert {p.name for p in pngs} == {"p4.png", "p16.png", "scan.png", "p2.png", "scans__nested__p1.png", "scans__p1.png"}
    for p in pngs:
        with Image.open(p) as img:
            img.load()
            assert img.format == "PNG" and img.mode == "RGB" and min(img.size) >= 256


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_outputs_follow_the_umask_and_rows_are_sorted_by_path(world, tmp_path, umask):
    """The CSV, the Grad-CAM folder and its PNGs get the user's usual mode (not the 0600 of a temporary file);
    rows come sorted by path, each file once, whatever the order of the arguments."""
    scans = world["scans"]
    inputs = [scans / "p2.jpg", world["odd"], scans / "nested", scans / "p1.png", scans / "p2.jpg"]
    out, cams = tmp_path / "out" / "preds.csv", tmp_path / "cams"
    old = os.umask(umask)
    try:
        code = predict.main([*map(str, inputs), "--model", str(world["model_path"]), "--out", str(out), "--gradcam", str(cams)])
    finally:
        os.umask(old)
    assert code == 0
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(out) == 0o666 & ~umask
    assert mode(cams) == 0o777 & ~umask
    pngs = sorted(cams.iterdir())
    assert len(pngs) == 6 and {mode(p) for p in pngs} == {0o666 & ~umask}
    expected = sorted({world["odd"], scans / "p1.png", scans / "p2.jpg", *(p for p in world["good"] if "nested" in p.parts)})
    assert _read(out)["path"].tolist() == [str(p) for p in expected]


def test_cli_all_good_to_stdout_without_operating_point(world, tmp_path):
    model = tmp_path / "copy.keras"
    shutil.copy(world["model_path"], model)
    shutil.copy(world["model_path"].with_name("m.info.json"), tmp_path / "copy.info.json")
    proc = _cli("predict", world["scans"], "--model", model, "--out", "-", "--batch-size", "32", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert noise(proc.stderr) == [], proc.stderr
    table = _read(proc.stdout)
    assert list(table.columns) == HEADER
    assert len(table) == 5 and (table["error"] == "").all() and (table["argmax_class"] != "").all()
    assert (table[["positive_p", "triage", "triage_rule"]] == "").all().all()
    assert proc.stderr.count("operating_point.json not found") == 1
    assert not (tmp_path / predict.DEFAULT_OUT).exists()


def test_cli_usage_errors_exit_2_with_one_line(world, tmp_path):
    (world["root"] / "empty").mkdir(exist_ok=True)
    for args in (["predict", world["scans"], "--model", tmp_path / "nope.keras"],
                 ["predict", tmp_path / "missing-folder", "--model", world["model_path"]],
                 ["predict", world["root"] / "empty", "--model", world["model_path"]]):
        proc = _cli(*args, cwd=tmp_path)
        assert proc.returncode == 2, proc.stderr
        assert "Traceback" not in proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "nope.keras not found" in _cli("predict", world["scans"], "--model", tmp_path / "nope.keras", cwd=tmp_path).stderr
    assert not (tmp_path / predict.DEFAULT_OUT).exists()


def test_wrong_model_file_is_one_clear_error(world, tmp_path, capsys):
    fake = tmp_path / "fake.keras"
    fake.write_text("not a model")
    shutil.copy(world["model_path"].with_name("m.info.json"), tmp_path / "fake.info.json")
    with pytest.raises(SystemExit) as exc:
        predict.main([str(world["scans"]), "--model", str(fake), "--out", str(tmp_path / "p.csv")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "error: " in err and "fake.keras is not a Keras model file" in err
    assert not (tmp_path / "p.csv").exists()


def test_help(tmp_path):
    top = _cli("--help", cwd=tmp_path)
    assert top.returncode == 0 and "predict" in top.stdout
    sub = _cli("predict", "--help", cwd=tmp_path)
    assert sub.returncode == 0
    for option in ("--model", "--out", "--gradcam", "--batch-size", "--workers", "--max-pixels", "triage"):
        assert option in sub.stdout
