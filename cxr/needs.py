"""What a run needs from outside the project, checked before any work: the dataset (its local copy under
CXR_DATA_DIR, or Kaggle) and the backbone's ImageNet weights (in Keras' cache, or their download), every
missing one named in one error, instead of the first one failing its stage minutes into a run.

The `check` stage runs this first in `dvc repro` and `dvc exp run` (see dvc.yaml), and `python -m cxr check`
any time. No TensorFlow: it takes a second (plus a network probe for what is not on this machine yet). It also
refuses a `finetune.unfreeze_from` the backbone does not have (another architecture's block), which params.yaml's
own checks cannot see without building the model.
"""
from __future__ import annotations

import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from . import download, network, params, paths, sources, weights
from .errors import UserError, cli

log = logging.getLogger("check")

KAGGLE_API = "https://api.kaggle.com"   # where kagglehub asks for a dataset


@dataclass(frozen=True)
class Need:
    what: str               # e.g. "dataset covid-radiography"
    found: str = ""         # where it is, or how the run will get it
    missing: str = ""       # why it cannot be had, and how to fix that ('' when found)


def _downloaded(name: str) -> bool:
    """data/raw holds dataset `name` already (reports/download.json says so): download will not fetch it again
    unless its origin changes, and then the download stage itself says what is wrong."""
    try:
        record = json.loads(paths.DOWNLOAD_RECORD.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("dataset") == name and paths.RAW.is_dir() and any(paths.RAW.iterdir())


def dataset_need(ds: dict) -> Need:
    """The active dataset (params.dataset(p)): generated, downloaded already, a local copy, or Kaggle reachable."""
    name = ds["name"]
    what = f"dataset {name}"
    if sources.get(name).generated:
        return Need(what, found="generated here, nothing to download")
    if _downloaded(name):
        return Need(what, found=f"in {paths.RAW} already ({paths.DOWNLOAD_RECORD})")
    try:
        local = download.find_local(name, os.environ.get(download.ENV))
    except UserError as err:
        return Need(what, missing=str(err))
    if local is not None:
        return Need(what, found=f"local copy {local}")
    why = network.reachable(KAGGLE_API)
    if why is None:
        return Need(what, found=f"Kaggle {ds['kaggle']} (reachable)")
    return Need(what, missing=f"no local copy ({download.ENV} is not set) and Kaggle ({ds['kaggle']}) cannot be reached: "
                              f"{why}. {download.dataset_fixes(name)}")


def weights_need(model: dict, image_size: int) -> Need | None:
    """The backbone's starting weights (params `model`): None when there are none to fetch (model.weights none,
    or model.init, whose file params.yaml's checks found already); a local file; or ImageNet's, cached by Keras
    or reachable."""
    arch, alpha, source = model["arch"], model["alpha"], model["weights"]
    if model["init"] != "none" or source == "none":
        return None
    what = f"backbone weights (model.weights={source})"
    if source != "imagenet":
        return Need(what, found="a local file")
    what = f"ImageNet weights for {weights.describe(arch, alpha, image_size)}"
    have = weights.cached(arch, alpha, image_size)
    if have is not None:
        return Need(what, found=str(have))
    url = weights.url(arch, alpha, image_size)
    why = network.reachable(url)
    if why is None:
        return Need(what, found=f"train downloads {weights.file_name(arch, alpha, image_size)} (reachable)")
    where = weights.cache_dirs()[0] / weights.file_name(arch, alpha, image_size)
    return Need(what, missing=f"{where} is not there and {urlsplit(url).hostname} cannot be reached: {why}. Connect to the "
                              f"internet, or put that file there (from {url}), or set model.weights to a local copy of "
                              f"it, or to none (train from scratch)")


def check(ds: dict, model: dict, image_size: int) -> list[Need]:
    """Every need of a run with these params, each logged; a UserError naming all the missing ones at once."""
    found = [n for n in (dataset_need(ds), weights_need(model, image_size)) if n is not None]
    for n in found:
        if not n.missing:
            log.info("%s: %s", n.what, n.found)
    missing = [n for n in found if n.missing]
    if missing:
        items = " ".join(f"({i}) {n.what}: {n.missing}." for i, n in enumerate(missing, 1))
        count = "1 thing this run needs is" if len(missing) == 1 else f"{len(missing)} things this run needs are"
        raise UserError(f"{count} missing, so nothing has run: {items}")
    return found


BACKBONE_LAYERS = Path(__file__).with_name("backbone_layers.json")  # every backbone's layer names, as Keras builds them
BLOCK = re.compile(r"(block_\d+|block\d+[a-z]|conv\d+_block\d+)_")    # MobileNetV2, EfficientNet, ResNet/DenseNet blocks


def unfreeze_problem(arch: str, start: str) -> str | None:
    """Why `finetune.unfreeze_from` names nothing in backbone `arch` (what models.first_trainable_layer looks for:
    a layer of that name, or a block whose layers start with it and `_`), or None. From the layer names in
    backbone_layers.json, so the default `block_13` (MobileNetV2's) is refused for another `model.arch` before
    train spends its time, not when finetune starts."""
    if start == "all":
        return None
    names = json.loads(BACKBONE_LAYERS.read_text(encoding="utf-8"))[arch]
    if any(n == start or n.startswith(start + "_") for n in names):
        return None
    blocks = list(dict.fromkeys(m.group(1) for m in map(BLOCK.match, names) if m))
    return (f"params.yaml: finetune.unfreeze_from={start} names no layer or block of model.arch={arch}; set it to one "
            f"of its blocks (the last ones are {', '.join(blocks[-5:])}) or a layer name, or to all")


def check_params() -> list[Need]:
    """check() for params.yaml (validated in full first, `finetune.unfreeze_from` against `model.arch` too)."""
    p = params.load(sources=sources.SOURCES)
    problem = unfreeze_problem(p["model"]["arch"], p["finetune"]["unfreeze_from"])
    if problem:
        raise UserError(problem)
    return check(params.dataset(p), p["model"], p["clean"]["image_size"])


# --- `python -m cxr check` ---------------------------------------------------------------------------

DESCRIPTION = ("Check what a run of the pipeline needs from outside the project (the dataset, the backbone's "
               "ImageNet weights) before starting it; every missing one is named at once, with the ways to fix it.")


def add_arguments(parser):
    return parser


@cli
def run(args=None) -> int:
    check_params()
    return 0
