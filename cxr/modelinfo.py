"""A model's metadata, kept beside it: its info and operating point sidecars, and the triage labels.

    models/finetuned.keras                    the Keras model (train/finetune)
    models/finetuned.info.json                classes, positive, image_size, resize, arch, dataset (train/finetune)
    models/finetuned.operating_point.json     class, threshold, by, target (evaluate)

The triage call is `<class> suspected` when the positive class's probability reaches the threshold, whatever
class has the highest probability (the argmax): with a threshold chosen for sensitivity 0.95 an image can be
`COVID suspected` while its argmax is `Normal`.

Every reader and writer of these files goes through this module. It does not import TensorFlow, so the
`predict` command checks its inputs (and prints `--help`) without loading it.
"""
from __future__ import annotations

import json
import logging
import math
import zipfile
from pathlib import Path

from . import atomic, paths
from .errors import UserError

log = logging.getLogger("modelinfo")


# --- the info sidecar -----------------------------------------------------------------------------

def model_info(p: dict, classes: list[str], positive: str) -> dict:
    """What prediction needs to feed a model the same pixels and read its outputs."""
    return {"classes": classes, "positive": positive, "image_size": p["clean"]["image_size"],
            "resize": p["clean"]["resize"], "arch": p["model"]["arch"], "dataset": p["dataset"]}


def info_path(model_path: Path) -> Path:
    return paths.sidecar(Path(model_path), "info")


def save(model, path: Path, info: dict) -> None:
    """The .keras file and its `.info.json` sidecar, each written atomically."""
    with atomic.atomic_path(path, suffix=".keras") as tmp:
        model.save(tmp)
    atomic.write_json(info_path(path), info)


def _sha256(*paths: Path) -> str:
    """One sha256 over the files' contents, read in chunks."""
    import hashlib

    digest = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fingerprint(init: str, weights: str = "imagenet") -> dict:
    """The record `train` depends on for the files params `model` names outside the project: `model.init`'s
    model (path, size and sha256 of it and its sidecar, so a changed source model reruns training, or none) and,
    where `model.weights` is a local file, that file's (so replacing it at the same path reruns training too;
    `imagenet` and `none` are params values that DVC sees already, and add nothing)."""
    if init == "none":
        record: dict = {"init": "none"}
    else:
        path = Path(init).expanduser()
        check_model_file(path)
        side = info_path(path)
        record = {"init": str(path), "bytes": path.stat().st_size,
                  "sha256": _sha256(path, *([side] if side.is_file() else []))}
    if weights not in ("imagenet", "none"):
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UserError(f"model.weights: {weights} is not a file (use imagenet, none, or a path to the backbone's "
                            "weights, include_top=False)")
        record["weights"] = {"path": str(path), "bytes": path.stat().st_size, "sha256": _sha256(path)}
    return record


def check_model_file(model_path: Path) -> None:
    """A model file that exists and is one: a .keras archive (a zip), or a legacy HDF5 .h5 file."""
    model_path = Path(model_path)
    if not model_path.is_file():
        raise UserError(f"model file {model_path} not found (run `dvc repro` or `dvc pull`, or pass --model)")
    if model_path.suffix.lower() == ".h5":
        with open(model_path, "rb") as f:
            ok = f.read(8) == b"\x89HDF\r\n\x1a\n"
    else:
        ok = zipfile.is_zipfile(model_path)
    if not ok:
        raise UserError(f"{model_path} is not a Keras model file (a .keras archive, as train and finetune write)")


def _sidecar_error(side: Path, what: str) -> UserError:
    return UserError(f"{side}: {what}; restore it with its model (`dvc pull`) or rerun the stage that wrote it")


def read_info(model_path: Path) -> dict:
    """The model's `.info.json` sidecar (classes, positive, image_size, resize), checked, after checking that
    the model file is one; UserError if either is unusable."""
    model_path = Path(model_path)
    check_model_file(model_path)
    side = info_path(model_path)
    if not side.is_file():
        raise UserError(f"{side} not found: the model's class names and image size are stored there by train/finetune")
    try:
        info = json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise _sidecar_error(side, f"not a valid model info file ({type(err).__name__}: {err})") from None
    if not isinstance(info, dict):
        raise _sidecar_error(side, "not a JSON object")
    classes, size, resize = info.get("classes"), info.get("image_size"), info.get("resize")
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) and c.strip() for c in classes) \
            or len(set(classes)) != len(classes):
        raise _sidecar_error(side, f"classes must be a list of two or more distinct names, got {classes!r}")
    if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= 4096:
        raise _sidecar_error(side, f"image_size must be an integer in [1, 4096], got {size!r}")
    if resize not in ("pad", "crop"):
        raise _sidecar_error(side, f"resize must be pad or crop, got {resize!r}")
    if "positive" in info and info["positive"] not in classes:
        raise _sidecar_error(side, f"positive {info['positive']!r} is not one of its classes {classes}")
    return info


# --- the operating point sidecar --------------------------------------------------------------------

def operating_point_path(model_path: Path) -> Path:
    return paths.sidecar(Path(model_path), "operating_point")


def write_operating_point(model_path: Path, positive: str, threshold: float, by: str, target: float, rule: str | None = None) -> None:
    """The triage threshold chosen by evaluate, beside its model, for `predict`."""
    atomic.write_json(operating_point_path(model_path), {"class": positive, "threshold": threshold, "by": by, "target": target, "rule": rule})


def read_operating_point(model_path: Path, classes: list[str]) -> dict | None:
    """The triage threshold saved by evaluate (`<stem>.operating_point.json`), checked, or None (with one warning)."""
    p = operating_point_path(model_path)
    if not p.is_file():
        log.warning("%s not found (written by `dvc repro evaluate`): the triage column stays empty", p)
        return None
    try:
        op = json.loads(p.read_text(encoding="utf-8"))
        op = {"class": op["class"], "threshold": op["threshold"], "by": op.get("by"), "target": op.get("target"), "rule": op.get("rule")}
    except Exception as err:
        raise UserError(f"{p} is not a valid operating point file ({type(err).__name__}: {err})") from None
    t = op["threshold"]
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 1:
        raise _sidecar_error(p, f"threshold must be a probability in [0, 1], got {t!r}")
    op["threshold"] = float(t)
    if not isinstance(op["class"], str) or op["class"] not in classes:
        raise UserError(f"{p} is for class {op['class']!r}, not one of the model's classes {classes}: rerun `dvc repro evaluate`")
    return op


def triage_labels(cls: str) -> tuple[str, str]:
    """The triage column's two values for positive class `cls`: (called positive, called negative)."""
    return f"{cls} suspected", f"{cls} not suspected"


def triage_rule(operating_point: dict) -> str:
    """The triage call in words, for the prediction tables' `triage_rule` column: the threshold on the
    positive class's probability (positive_p) and how evaluate chose it on the validation split."""
    rule = f"{operating_point['class']} suspected when positive_p >= {operating_point['threshold']:.6g}"
    if operating_point.get("by") and operating_point.get("target") is not None:
        on = " on new cases (conformal)" if operating_point.get("rule") == "conformal" else ""
        rule += f" (threshold chosen on the validation split for {operating_point['by']} {operating_point['target']:g}{on})"
    return rule
