"""External validation: the fine-tuned model, unchanged, on other labelled sets (params `external.sets`).

    set -> its data (locate: a local copy under CXR_DATA_DIR as download finds it, a folder, or generated)
        -> records (the source's adapter, or class folders) -> labels mapped to the model's classes or `rest`
           (labels the map leaves out are dropped and counted) -> a seeded subsample of `external.max_images`
        -> images.decode at the model's own image_size/resize -> inference.predict_stream
        -> positive-vs-rest figures at the saved triage threshold, with bootstrap CIs (metrics/external/<set>.json)

The `source` stage records download.external_origin() of every set in data/external.json (DVC cannot see
CXR_DATA_DIR or a folder outside the project), so `external` reruns exactly when a set's data changes.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from . import atomic, clean, download, evaluation, images, inference, metrics, modelinfo, paths, probes, progress, sources
from .errors import UserError

log = logging.getLogger("external")

REST = "rest"        # a map target: not the model's positive class
POSITIVE = "positive"  # a map target: the model's positive class, whatever the dataset calls it
REST_INDEX = -1      # its label index: no model class, so it counts as "other" for every positive-vs-rest figure


class Missing(Exception):
    """A set whose data is not there (the reason is the message)."""


# --- where a set's data is ------------------------------------------------------------------------

@contextlib.contextmanager
def opened(entry: dict, limits: dict | None = None) -> Iterator[Path]:
    """The set's data as a folder: a local folder in place; an archive extracted (within `limits`, params
    `download`: max_bytes, max_ratio), or the demo generated, into a temporary folder removed afterwards.
    Missing if the data is not there."""
    record = download.external_origin(entry)
    if "missing" in record:
        raise Missing(record["missing"])
    if record["origin"] == "local copy" and Path(record["path"]).is_dir():
        yield Path(record["path"])
        return
    with tempfile.TemporaryDirectory(prefix="cxr-external-") as tmp:
        root = Path(tmp) / "data"
        if record["origin"] == "generated":
            sources.get(entry["source"]).generate(root, {**{k: entry[k] for k in ("seed", "per_class", "size")},
                                                         "bad_files": False, "shortcut": "none"})
        else:
            root.mkdir()
            download.safe_extract(Path(record["path"]), root, **{k: limits[k] for k in ("max_bytes", "max_ratio")}
                                  if limits else {})
        yield root


def records(entry: dict, root: Path) -> tuple[list[sources.Record], list[sources.Drop]]:
    """The set's records (sorted by file) and the files its layout rejects."""
    if entry["source"] == "folder":
        recs, drops = sources.class_folders(root)
    else:
        source = sources.get(entry["source"])
        recs, drops = source.records(root, source.as_external())
    return sorted(recs, key=lambda r: r.file), drops


# --- labels ---------------------------------------------------------------------------------------

def map_labels(recs: list, mapping: dict[str, str], classes: list[str], where: str = "external.sets[].map",
               positive: str | None = None) -> tuple[list, np.ndarray, dict[str, int]]:
    """Each record's target: the index of the model class its label maps to (`positive`: the model's positive
    class), or REST_INDEX for `rest`. Records whose label the map leaves out are dropped and counted per label
    (never silently). Returns (kept records, targets, {unmapped label: count})."""
    if positive is not None:
        mapping = {label: positive if t == POSITIVE else t for label, t in mapping.items()}
    bad = sorted({t for t in mapping.values() if t != REST and t not in classes})
    if bad:
        raise UserError(f"params.yaml: {where} maps to {bad[0]!r}, neither one of the model's classes "
                        f"({', '.join(classes)}) nor {POSITIVE} or {REST}")
    kept, targets, unmapped = [], [], {}
    for r in recs:
        target = mapping.get(r.label)
        if target is None:
            unmapped[r.label] = unmapped.get(r.label, 0) + 1
            continue
        kept.append(r)
        targets.append(REST_INDEX if target == REST else classes.index(target))
    return kept, np.array(targets, dtype=int), dict(sorted(unmapped.items()))


def subsample(n: int, cap: int, seed: int) -> np.ndarray:
    """Indices (sorted) of at most `cap` of `n` items: all of them, or a seeded sample without replacement."""
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=cap, replace=False))


# --- figures --------------------------------------------------------------------------------------

def positive_figures(targets: np.ndarray, proba: np.ndarray, pos: int, threshold: float, ev: dict) -> dict:
    """Class `pos` against the rest: ROC-AUC of its probability, sensitivity/specificity/PPV/NPV at the triage
    `threshold`, and the fixed-rate readings of `evaluate` (ev: params `evaluate`), with bootstrap CIs."""
    stats = {"roc_auc": metrics.positive_roc_auc(pos),
             **{k: f for k, f in metrics.standard_statistics(pos, threshold).items() if k in ("sensitivity", "specificity")},
             **metrics.fixed_rate_statistics(pos, ev["sensitivity_at_specificity"], ev["specificity_at_sensitivity"])}
    at = metrics.operating_point(targets == pos, proba[:, pos], threshold)
    out = {"threshold": round(threshold, 6), "roc_auc": metrics._clean(stats["roc_auc"](targets, proba)),
           **{k: at[k] for k in ("sensitivity", "specificity", "ppv", "npv")},
           **{k: metrics._clean(stats[k](targets, proba)) for k in stats if k not in ("roc_auc", "sensitivity", "specificity")}}
    boot = ev["bootstrap"]
    if boot["resamples"] and len(targets):
        out["ci"] = metrics.bootstrap_ci(targets, proba, stats, resamples=boot["resamples"], seed=boot["seed"], level=boot["level"])
    return out


def summary(targets: np.ndarray, proba: np.ndarray, classes: list[str], positive: str, threshold: float, ev: dict) -> dict:
    """The metrics of one set: `positive` (see positive_figures), and `multiclass` (accuracy, balanced accuracy,
    macro ROC-AUC over the model's classes) when every label maps to a class, none to rest."""
    pos = classes.index(positive)
    out = {"positive": {"class": positive, **positive_figures(targets, proba, pos, threshold, ev)}}
    if len(targets) and (targets != REST_INDEX).all():
        rep = metrics.report(targets, proba, classes)
        out["multiclass"] = metrics.headline(rep)
    return out


# --- the stage ------------------------------------------------------------------------------------

def score_set(entry: dict, forward_fn, info: dict, op: dict, cfg: dict, ev: dict, clean_cfg: dict,
              download_cfg: dict | None = None) -> tuple[dict, list[dict]]:
    """One set through the model: (its metrics with counts that add up, ROC points of the positive class);
    an archive is extracted within `download_cfg`'s limits (params `download`)."""
    classes = info["classes"]
    if entry["source"] == info.get("dataset") and not sources.get(entry["source"]).generated:
        log.warning("%s: the model was trained on %s; its images are not external to it", entry["name"], entry["source"])
    with opened(entry, download_cfg) as root:
        recs, drops = records(entry, root)
        kept, targets, unmapped = map_labels(recs, entry["map"], classes, f"external.sets ({entry['name']}).map", op["class"])
        absent = sorted(set(entry["map"]) - {r.label for r in recs})
        if absent:
            log.warning("%s: the map names label(s) the set does not have: %s", entry["name"], ", ".join(absent))
        pick = subsample(len(kept), cfg["max_images"], cfg["seed"])
        files = [root / kept[i].file for i in pick]
        decode = functools.partial(images.decode, size=info["image_size"], mode=info["resize"], **clean.limits(clean_cfg))
        workers = images.workers_for(len(files), clean_cfg["workers"])
        with images.decode_many(decode, files, workers) as items:
            proba, errors = inference.predict_stream(progress.bar(items, len(files), entry["name"]), forward_fn, len(classes))
    ok = np.array([e == "" for e in errors], dtype=bool)
    targets, proba = targets[pick][ok], proba[ok].astype(np.float64)
    pos = classes.index(op["class"])
    counts = {"records": len(recs), "layout_dropped": len(drops), "unmapped": sum(unmapped.values()),
              "unmapped_by_label": unmapped, "mapped": len(kept), "not_sampled": len(kept) - len(pick),
              "undecodable": int((~ok).sum()), "scored": int(ok.sum()),
              "positive": int((targets == pos).sum()), "other": int((targets != pos).sum())}
    if not (counts["records"] == counts["unmapped"] + counts["mapped"]
            and counts["mapped"] == counts["not_sampled"] + counts["undecodable"] + counts["scored"]
            and counts["scored"] == counts["positive"] + counts["other"]):
        raise AssertionError(f"external counts do not add up: {counts}")
    result = {"source": entry["source"], "counts": counts,
              **summary(targets, proba, classes, op["class"], op["threshold"], ev)}
    roc, _ = evaluation.curves(proba, targets, classes)
    return result, [{"set": entry["name"], **r} for r in roc if r["class"] == op["class"]]


BOOKKEEPING = ("source", "counts", "class", "threshold", "ci", "n", "box", "fill", "region", "chance")


def headline(result: dict) -> dict:
    """A set's or the probes' figures without their bookkeeping (counts, CIs, the class and threshold used,
    the probes' region and chance): what `dvc metrics diff` compares. The whole record is the report."""
    if not isinstance(result, dict):
        return result
    return {k: headline(v) for k, v in result.items()
            if k not in BOOKKEEPING and (k == "skipped" or not isinstance(v, str))}


def own_data(entry: dict, dataset: str | None) -> str | None:
    """Why a set is not external to a model trained on `dataset`, or None: a downloaded source that is that
    dataset holds the very images the model was trained, chosen and tested on (a generated one is checked up
    front, by params, to use another seed)."""
    if dataset is None or entry["source"] != dataset or sources.get(dataset).generated:
        return None
    return (f"its images come from {dataset}, the dataset this model was trained and validated on, so it is not "
            f"external (name a set from another source in external.sets)")


def run(cfg: dict, ev: dict, clean_cfg: dict, classes: list[str], model_path: Path = paths.FINETUNED,
        out: Path = paths.EXTERNAL_METRICS, plots_out: Path = paths.EXTERNAL_PLOTS,
        reports_out: Path = paths.EXTERNAL_REPORTS, dataset: str | None = None,
        download_cfg: dict | None = None) -> dict[str, dict]:
    """The external stage (`cfg`: params `external`; `ev`: `evaluate`, for its fixed rates and bootstrap;
    `clean_cfg`: `clean`, for the decoding limits and workers; `download_cfg`: `download`, for an archive's
    limits): every set -> its figures in out/<name>.json, the
    whole record (counts that add up, bootstrap CIs, class and threshold) in reports_out/<name>.json, ROC points
    in plots_out/<name>.json; the shortcut probes on the test split -> out/probes.json (and reports_out/). A set
    whose data is missing is skipped (`{"skipped": reason}`) or, with `external.missing: error`, an error; a set
    from `dataset` itself (the model's own training data) is always skipped, with that reason."""
    info = modelinfo.read_info(model_path)
    if info["classes"] != classes:
        raise UserError(f"{model_path} was trained on classes {info['classes']}, the data has {classes}: rerun `dvc repro`")
    op = modelinfo.read_operating_point(model_path, classes)
    if op is None:
        raise UserError(f"{modelinfo.operating_point_path(model_path)} not found: run `dvc repro evaluate` first")
    model = inference.load_model(model_path, info)
    forward_fn = inference.forward(model)
    results: dict[str, dict] = {}
    with atomic.atomic_dir(out) as tmp, atomic.atomic_dir(plots_out) as plots_tmp, atomic.atomic_dir(reports_out) as rep_tmp:
        for entry in cfg["sets"]:
            name = entry["name"]
            skipped = own_data(entry, dataset)  # skipped whatever external.missing says
            if skipped is None:
                try:
                    result, roc = score_set(entry, forward_fn, info, op, cfg, ev, clean_cfg, download_cfg)
                except Missing as why:
                    if cfg["missing"] == "error":
                        raise UserError(f"external set {name}: {why}") from None
                    skipped = str(why)
            if skipped:
                log.warning("external set %s skipped: %s", name, skipped)
                result, roc = {"skipped": skipped}, []
            else:
                p = result["positive"]
                log.info("%s: %d images scored; %s ROC-AUC %s, sensitivity/specificity %s/%s at threshold %.4f",
                         name, result["counts"]["scored"], p["class"], p["roc_auc"], p["sensitivity"], p["specificity"], op["threshold"])
            atomic.write_json(tmp / f"{name}.json", headline(result))
            atomic.write_json(rep_tmp / f"{name}.json", result)
            if roc:
                atomic.write_json(plots_tmp / f"{name}.json", roc)
            results[name] = result
        results["probes"] = probes.run(model, forward_fn, classes, op["class"], cfg["probes"])
        atomic.write_json(tmp / "probes.json", headline(results["probes"]))
        atomic.write_json(rep_tmp / "probes.json", results["probes"])
    return results
