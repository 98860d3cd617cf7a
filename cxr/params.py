"""params.yaml: loading and validating every key up front, so a bad value fails before any work with one clear line.

Each `datasets.<name>` block beyond classes and positive is checked by its source's adapter (cxr.sources).
"""
from __future__ import annotations

import difflib
import math
import numbers
import re
from pathlib import Path

import yaml

from . import paths
from .errors import UserError

ARCHS = ("mobilenetv2", "efficientnetb0", "resnet50", "densenet121")
# Width multipliers for which ImageNet MobileNetV2 weights are published.
MOBILENETV2_IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# Smallest input side each keras.applications backbone accepts.
MIN_SIZE = {"mobilenetv2": 32, "efficientnetb0": 32, "resnet50": 32, "densenet121": 32}


def _fail(key: str, want: str, got) -> None:
    raise UserError(f"params.yaml: {key} must be {want}, got {got!r}")


_READ: set[tuple[str, ...]] | None = None  # key paths _get read during validate(): whatever else is in the file is unknown


def _get(tree: dict, key: str):
    node = tree
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise UserError(f"params.yaml: missing key {key}")
        node = node[part]
    if _READ is not None:
        _READ.add(tuple(key.split(".")))
    return node


def _check_unknown_keys(tree: dict, read: set[tuple[str, ...]]) -> None:
    """Every key in the file must be one validate() read (or lie inside a value it read whole): a typo such as
    `train.epoch` or `trian:` is an error naming the nearest valid key, not a setting silently ignored."""
    def walk(node: dict, path: tuple[str, ...]) -> None:
        for key, value in node.items():
            here = (*path, str(key))
            if here in read:
                continue
            if isinstance(value, dict) and any(r[: len(here)] == here for r in read):
                walk(value, here)
                continue
            valid = sorted({r[len(path)] for r in read if r[: len(path)] == path and len(r) > len(path)})
            near = difflib.get_close_matches(str(key), valid, n=1, cutoff=0.6)
            hint = f"did you mean {'.'.join((*path, near[0]))}?" if near else f"valid keys here: {', '.join(valid)}"
            raise UserError(f"params.yaml: unknown key {'.'.join(here)} ({hint})")

    walk(tree, ())


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


def _box(tree, key) -> list[float]:
    box = _get(tree, key)
    if not (isinstance(box, list) and len(box) == 4 and all(isinstance(v, numbers.Real) and not isinstance(v, bool)
                                                            and 0 <= v <= 1 for v in box)
            and box[0] < box[2] and box[1] < box[3]):
        _fail(key, "[x0, y0, x1, y1], fractions of the image with x0 < x1 and y0 < y1", box)
    return box


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


def validate(p: dict, sources: dict | None = None) -> dict:
    """Check every section; return the same dict. Raises UserError on the first bad value or unknown key.

    `sources`: the dataset registry (cxr.sources.SOURCES). With it, `dataset` must name a registered source and
    each `datasets.<name>` block is checked in full by its adapter; without it (stages that never touch a source),
    only what every block has (classes, positive) is checked and the rest of each block is left to its source."""
    global _READ
    if not isinstance(p, dict):
        raise UserError("params.yaml: expected a mapping of sections")
    _READ = set()
    try:
        _validate(p, sources)
        _check_unknown_keys(p, _READ)
    finally:
        _READ = None
    return p


def _check_datasets(p: dict, sources: dict | None) -> str:
    """The `datasets` blocks and the active `dataset`; returns its name."""
    # Read without _get, which would mark every block read whole: each block's keys are read one by one.
    blocks = p.get("datasets")
    if not isinstance(blocks, dict) or not blocks:
        _fail("datasets", "a mapping of dataset name -> its settings", blocks)
    ds = _choice(p, "dataset", sorted(blocks if sources is None else sources))
    if ds not in blocks:
        raise UserError(f"params.yaml: missing key datasets.{ds}")
    for name in blocks:
        if sources is not None and name not in sources:
            continue  # not read: the unknown-key check names it, with the registered sources
        key = f"datasets.{name}"
        classes = _str_list(p, f"{key}.classes", min_len=2)
        if _get(p, f"{key}.positive") not in classes:
            _fail(f"{key}.positive", "one of that dataset's classes", _get(p, f"{key}.positive"))
        if sources is None:
            _READ.add(("datasets", str(name)))  # the rest of the block is its source's: checked where it is used
        else:
            sources[name].check(p, key)
    return ds


def _validate(p: dict, sources: dict | None) -> None:
    ds = _check_datasets(p, sources)

    size = _int(p, "clean.image_size", 32, 1024)
    _choice(p, "clean.resize", ("pad", "crop"))
    _int(p, "clean.near_duplicate_distance", -1, 64)
    _int(p, "clean.max_pixels", 1)
    _int(p, "clean.shard_size", 1)
    _int(p, "clean.workers", 0)
    _float(p, "clean.max_aspect_ratio", 1, 1e6)
    _int(p, "clean.min_side", 1, 4096)
    _int(p, "download.max_bytes", 1)
    _float(p, "download.max_ratio", 1, 1e9)

    val = _float(p, "split.val_fraction", 0, 1, lo_open=True, hi_open=True)
    test = _float(p, "split.test_fraction", 0, 1, lo_open=True, hi_open=True)
    if val + test >= 1:
        raise UserError(f"params.yaml: split.val_fraction + split.test_fraction must be < 1, got {val + test:g}")
    _int(p, "split.seed", 0)
    _int(p, "split.group_distance", -1, 64)
    _int(p, "split.min_per_class", 1)

    arch = _choice(p, "model.arch", ARCHS)
    if size < MIN_SIZE[arch]:
        _fail("clean.image_size", f">= {MIN_SIZE[arch]} for {arch}", size)
    w = _get(p, "model.weights")
    if not isinstance(w, str) or not w:
        _fail("model.weights", "imagenet, none, or a path to a weights file", w)
    if w not in ("imagenet", "none") and not Path(w).expanduser().is_file():
        _fail("model.weights", f"imagenet, none, or an existing {arch} weights file (include_top=False)", w)
    alpha = _float(p, "model.alpha", 0, 2, lo_open=True)
    if arch == "mobilenetv2" and w == "imagenet" and alpha not in MOBILENETV2_IMAGENET_ALPHAS:
        _fail("model.alpha", f"one of {', '.join(map(str, MOBILENETV2_IMAGENET_ALPHAS))} with model.weights=imagenet "
              "(or model.weights=none)", alpha)
    _float(p, "model.dropout", 0, 1, hi_open=True)
    init = _get(p, "model.init")
    if not isinstance(init, str) or not init or (init != "none" and not Path(init).expanduser().is_file()):
        _fail("model.init", "none, or an existing .keras model saved by this project (e.g. another dataset's models/finetuned.keras)", init)

    for stage in ("train", "finetune"):
        _int(p, f"{stage}.seed", 0)
        _int(p, f"{stage}.epochs", 1)
        _int(p, f"{stage}.batch_size", 1)
        _float(p, f"{stage}.learning_rate", 0, 1, lo_open=True)
        _int(p, f"{stage}.patience", 1)
    _float(p, "train.l2", 0, 1)
    _choice(p, "train.class_weight", ("balanced", "none"))
    _bool(p, "train.feature_cache")
    _float(p, "train.augment.rotation", 0, 0.5)
    _float(p, "train.augment.translation", 0, 0.5)
    _float(p, "train.augment.zoom", 0, 0.9)
    _bool(p, "train.augment.flip")
    _float(p, "train.augment.brightness", 0, 0.5)
    _float(p, "train.augment.contrast", 0, 0.9)
    _float(p, "train.augment.outside_lungs", 0, 1)
    _box(p, "train.augment.lung_box")
    _bool(p, "runtime.mixed_precision")
    _bool(p, "runtime.xla")
    _choice(p, "runtime.distribute", ("auto", "all", "none"))
    start = _get(p, "finetune.unfreeze_from")
    if not isinstance(start, str) or not start.strip():
        _fail("finetune.unfreeze_from", "a backbone block or layer name (e.g. block_13) or all", start)
    _int(p, "finetune.views", 0, 32)
    _int(p, "finetune.members", 1, 16)
    epochs = _int(p, "finetune.epochs", 1)
    _int(p, "finetune.warmup_epochs", 0, epochs - 1)
    _float(p, "finetune.weight_decay", 0, 1)
    _float(p, "finetune.label_smoothing", 0, 1, hi_open=True)
    if _float(p, "finetune.mixup", 0, 10) and not _get(p, "finetune.views"):
        _fail("finetune.mixup", "0 when finetune.views is 0 (mixup mixes the cached activations)", _get(p, "finetune.mixup"))
    ema = _float(p, "finetune.ema_epochs", 0, 100)
    if 0 < ema < 0.1:
        _fail("finetune.ema_epochs", "0 (off) or at least 0.1 (epochs)", ema)
    _choice(p, "finetune.select", ("last", "best"))
    _choice(p, "finetune.monitor", ("macro_roc_auc", "sensitivity_at_specificity", "balanced_accuracy", "loss"))
    _float(p, "finetune.monitor_specificity", 0, 1, lo_open=True)
    _bool(p, "finetune.temperature_scaling")

    _choice(p, "evaluate.operating_point.by", ("sensitivity", "specificity"))
    _float(p, "evaluate.operating_point.target", 0, 1, lo_open=True)
    _choice(p, "evaluate.operating_point.rule", ("conformal", "validation"))
    for kind in ("sensitivity_at_specificity", "specificity_at_sensitivity"):
        rates = _get(p, f"evaluate.{kind}")
        if not isinstance(rates, list) or len(set(map(str, rates))) != len(rates):
            _fail(f"evaluate.{kind}", "a list of distinct rates in (0, 1)", rates)
        for r in rates:
            if isinstance(r, bool) or not isinstance(r, numbers.Real) or not 0 < r < 1:
                _fail(f"evaluate.{kind}", "a list of distinct rates in (0, 1)", rates)
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

    _check_external(p, ds, sources)


SET_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
SET_KEYS = {"folder": {"path"}, "demo": {"seed", "per_class", "size"}}   # beyond name, source and map


def _check_external(p: dict, ds: str, sources: dict | None) -> None:
    """The `external` section: the external sets (each checked whole, naming `external.sets[i].<key>`), the
    subsample cap and the probes' box."""
    _choice(p, "external.missing", ("skip", "error"))
    _int(p, "external.max_images", 1)
    _int(p, "external.seed", 0)
    sets = _get(p, "external.sets")
    if not isinstance(sets, list):
        _fail("external.sets", "a list of sets (name, source, map)", sets)
    names = set()
    for i, entry in enumerate(sets):
        key = f"external.sets[{i}]"
        if not isinstance(entry, dict):
            _fail(key, "a mapping with name, source and map", entry)
        for k in ("name", "source", "map"):
            if k not in entry:
                raise UserError(f"params.yaml: missing key {key}.{k}")
        name, source, mapping = entry["name"], entry["source"], entry["map"]
        if not isinstance(name, str) or not SET_NAME.fullmatch(name) or name == "probes":
            _fail(f"{key}.name", "a file name of letters, digits, '_', '.', '-' (not 'probes')", name)
        if name in names:
            _fail(f"{key}.name", "a name no other set has", name)
        names.add(name)
        known = ["folder", *sorted(sources)] if sources is not None else None
        if not isinstance(source, str) or not source or (known is not None and source not in known):
            _fail(f"{key}.source", "folder or a registered dataset" + (f" ({', '.join(known)})" if known else ""), source)
        if not isinstance(mapping, dict) or not mapping or not all(
                isinstance(a, str) and a and isinstance(b, str) and b for a, b in mapping.items()):
            _fail(f"{key}.map", "a mapping of the set's labels to the model's classes or rest", mapping)
        model_classes = _get(p, f"datasets.{ds}.classes")
        for label, target in mapping.items():  # checked up front: a bad map never waits for training to fail
            if target not in ("positive", "rest") and target not in model_classes:
                _fail(f"{key}.map.{label}", f"positive, rest or one of the model's classes ({', '.join(model_classes)})", target)
        extra = SET_KEYS.get(source, set())
        for k in sorted(set(entry) - {"name", "source", "map"} - extra):
            raise UserError(f"params.yaml: unknown key {key}.{k} (a {source} set has name, source, map"
                            + "".join(f", {e}" for e in sorted(extra)) + ")")
        for k in sorted(extra - set(entry)):
            raise UserError(f"params.yaml: missing key {key}.{k}")
        if source == "folder" and (not isinstance(entry["path"], str) or not entry["path"]):
            _fail(f"{key}.path", "a folder holding one folder per label", entry["path"])
        if source == "demo":
            for k, lo, hi in (("seed", 0, None), ("per_class", 1, None), ("size", 32, 2048)):
                v = entry[k]
                if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < lo or (hi is not None and v > hi):
                    _fail(f"{key}.{k}", f"an integer in [{lo}, {hi}]" if hi is not None else f"an integer >= {lo}", v)
            if ds == "demo" and entry["seed"] == _get(p, "datasets.demo.seed"):
                _fail(f"{key}.seed", "a seed other than datasets.demo.seed (the training data's)", entry["seed"])
    _box(p, "external.probes.box")
    fill = _get(p, "external.probes.fill")
    if fill != "mean" and (isinstance(fill, bool) or not isinstance(fill, numbers.Integral) or not 0 <= fill <= 255):
        _fail("external.probes.fill", "mean or a gray level in [0, 255]", fill)


def load(path: str | Path = paths.PARAMS, sources: dict | None = None) -> dict:
    """Read and validate params.yaml (`sources`: see validate)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found: run from the project's root folder")
    try:
        tree = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    return validate(tree, sources)


def dataset(p: dict) -> dict:
    """The active dataset's section, with its name under 'name'."""
    return {"name": p["dataset"], **p["datasets"][p["dataset"]]}


# For the source adapters (cxr.sources), which check the rest of their own `datasets.<name>` block.
get, fail, integer, boolean, choice, names = _get, _fail, _int, _bool, _choice, _str_list
