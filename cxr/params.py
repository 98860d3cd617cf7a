"""params.yaml: load and validate up front, so a bad value fails before any work with one clear line."""
from __future__ import annotations

import math
import numbers
from pathlib import Path

import yaml

from . import paths
from .errors import UserError

DATASETS = ("covid-radiography", "covid-chestxray", "demo")
ARCHS = ("mobilenetv2", "efficientnetb0", "resnet50", "densenet121")
# Smallest input side each keras.applications backbone accepts.
MIN_SIZE = {"mobilenetv2": 32, "efficientnetb0": 32, "resnet50": 32, "densenet121": 32}


def _fail(key: str, want: str, got) -> None:
    raise UserError(f"params.yaml: {key} must be {want}, got {got!r}")


def _get(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"params.yaml: missing key {key}")
        node = node[part]
    return node


def _int(tree, key, lo=None, hi=None) -> int:
    v = _get(tree, key)
    if isinstance(v, bool) or not isinstance(v, numbers.Integral) or (lo is not None and v < lo) or (hi is not None and v > hi):
        rng = f" in [{lo}, {hi}]" if hi is not None else (f" >= {lo}" if lo is not None else "")
        _fail(key, f"an integer{rng}", v)
    return int(v)


def _float(tree, key, lo=None, hi=None, lo_open=False, hi_open=False) -> float:
    v = _get(tree, key)
    bad = isinstance(v, bool) or not isinstance(v, numbers.Real)
    if not bad:
        v = float(v)
        bad = not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)) or (hi is not None and (v >= hi if hi_open else v > hi))
    if bad:
        lb, rb = ("(" if lo_open else "["), (")" if hi_open else "]")
        _fail(key, f"a number in {lb}{lo}, {hi}{rb}", v)
    return v


def _bool(tree, key) -> bool:
    v = _get(tree, key)
    if not isinstance(v, bool):
        _fail(key, "true or false", v)
    return v


def _choice(tree, key, choices) -> str:
    v = _get(tree, key)
    if v not in choices:
        _fail(key, "one of " + ", ".join(map(str, choices)), v)
    return v


def _str_list(tree, key, min_len=1) -> list[str]:
    v = _get(tree, key)
    if not isinstance(v, list) or len(v) < min_len or not all(isinstance(s, str) and s for s in v) or len(set(v)) != len(v):
        _fail(key, f"a list of at least {min_len} distinct names", v)
    return list(v)


def validate(p: dict) -> dict:
    """Check every section; return the same dict. Raises UserError on the first bad value."""
    if not isinstance(p, dict):
        raise UserError("params.yaml: expected a mapping of sections")
    ds = _choice(p, "dataset", DATASETS)
    for name in DATASETS:
        _str_list(p, f"datasets.{name}.classes", min_len=2)
        pos = _get(p, f"datasets.{name}.positive")
        if pos not in _get(p, f"datasets.{name}.classes"):
            _fail(f"datasets.{name}.positive", "one of that dataset's classes", pos)
    _str_list(p, "datasets.covid-chestxray.views")
    if _get(p, "datasets.covid-chestxray.classes").__len__() != 2:
        _fail("datasets.covid-chestxray.classes", "two names (COVID, non-COVID)", _get(p, "datasets.covid-chestxray.classes"))
    _int(p, "datasets.demo.per_class", 4)
    _int(p, "datasets.demo.size", 32, 2048)
    _int(p, "datasets.demo.seed", 0)
    _bool(p, "datasets.demo.bad_files")

    size = _int(p, "clean.image_size", 32, 1024)
    _choice(p, "clean.resize", ("pad", "crop"))
    _int(p, "clean.near_duplicate_distance", -1, 64)
    _int(p, "clean.max_pixels", 1)
    _int(p, "clean.shard_size", 1)
    _int(p, "clean.workers", 0)

    val = _float(p, "split.val_fraction", 0, 1, lo_open=True, hi_open=True)
    test = _float(p, "split.test_fraction", 0, 1, lo_open=True, hi_open=True)
    if val + test >= 1:
        raise UserError(f"params.yaml: split.val_fraction + split.test_fraction must be < 1, got {val + test:g}")
    _int(p, "split.seed", 0)
    _int(p, "split.group_distance", -1, 64)

    arch = _choice(p, "model.arch", ARCHS)
    if size < MIN_SIZE[arch]:
        _fail("clean.image_size", f">= {MIN_SIZE[arch]} for {arch}", size)
    w = _get(p, "model.weights")
    if not isinstance(w, str) or not w:
        _fail("model.weights", "imagenet, none, or a path to a weights file", w)
    _float(p, "model.alpha", 0, 2, lo_open=True)
    _float(p, "model.dropout", 0, 1, hi_open=True)

    for stage in ("train", "finetune"):
        _int(p, f"{stage}.seed", 0)
        _int(p, f"{stage}.epochs", 1)
        _int(p, f"{stage}.batch_size", 1)
        _float(p, f"{stage}.learning_rate", 0, 1, lo_open=True)
        _int(p, f"{stage}.patience", 1)
    _choice(p, "train.class_weight", ("balanced", "none"))
    _bool(p, "train.feature_cache")
    _float(p, "train.augment.rotation", 0, 0.5)
    _float(p, "train.augment.translation", 0, 0.5)
    _float(p, "train.augment.zoom", 0, 0.9)
    _bool(p, "train.augment.flip")
    _bool(p, "runtime.mixed_precision")
    _bool(p, "runtime.xla")
    _choice(p, "runtime.distribute", ("auto", "none"))
    _int(p, "finetune.unfreeze", 0)

    _float(p, "evaluate.target_sensitivity", 0, 1, lo_open=True)
    _int(p, "evaluate.bootstrap.resamples", 0)
    _int(p, "evaluate.bootstrap.seed", 0)
    _float(p, "evaluate.bootstrap.level", 0, 1, lo_open=True, hi_open=True)
    _int(p, "evaluate.ece_bins", 1)

    _int(p, "gradcam.per_class", 1, 64)
    gc = _get(p, "gradcam.class")
    if gc != "predicted" and gc not in _get(p, f"datasets.{ds}.classes"):
        _fail("gradcam.class", "predicted or one of the dataset's classes", gc)
    _float(p, "gradcam.alpha", 0, 1)
    _int(p, "gradcam.min_side", 1)
    return p


def load(path: str | Path = paths.PARAMS) -> dict:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project's root folder")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return validate(tree)


def dataset(p: dict) -> dict:
    """The active dataset's section, with its name under 'name'."""
    return {"name": p["dataset"], **p["datasets"][p["dataset"]]}
