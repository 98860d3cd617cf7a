"""External validation sets and shortcut probes: label maps, occlusion, the positive-vs-rest figures, where a
set's data comes from, and a whole run with a stand-in model (no TensorFlow)."""
from __future__ import annotations

import copy
import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from cxr import download, external, metrics, params, probes, sources
from cxr.errors import UserError
from cxr.sources import Record

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
REAL = Path(__file__).resolve().parent.parent / "params.yaml"
EV = {"sensitivity_at_specificity": [0.95], "specificity_at_sensitivity": [0.95],
      "bootstrap": {"resamples": 50, "seed": 0, "level": 0.95}}


# --- label maps ------------------------------------------------------------------------------------

def test_map_labels_to_binary_drops_and_counts_unmapped():
    recs = [Record(f"{i}.png", label, f"g{i}") for i, label in enumerate(["COVID-19", "non-COVID", "SARS", "COVID-19", "SARS", "x"])]
    kept, targets, unmapped = external.map_labels(recs, {"COVID-19": "COVID", "non-COVID": "rest"}, CLASSES)
    assert [r.file for r in kept] == ["0.png", "1.png", "3.png"]
    assert targets.tolist() == [0, external.REST_INDEX, 0]
    assert unmapped == {"SARS": 2, "x": 1}
    assert len(kept) + sum(unmapped.values()) == len(recs)


def test_map_labels_to_classes():
    recs = [Record("a", "Normal", "a"), Record("b", "Viral Pneumonia", "b")]
    _, targets, unmapped = external.map_labels(recs, {"Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}, CLASSES)
    assert targets.tolist() == [1, 2] and unmapped == {}


def test_map_to_positive_is_the_models_positive_class():
    recs = [Record("a", "COVID-19", "a"), Record("b", "non-COVID", "b")]
    _, targets, _ = external.map_labels(recs, {"COVID-19": "positive", "non-COVID": "rest"}, ["non-COVID", "COVID-19"],
                                        positive="COVID-19")
    assert targets.tolist() == [1, external.REST_INDEX]


def test_map_to_something_not_a_class_is_one_clear_error():
    with pytest.raises(UserError, match=r"maps to 'Pneumonia', neither one of the model's classes"):
        external.map_labels([], {"a": "Pneumonia"}, CLASSES, "external.sets[0].map")


def test_subsample_is_seeded_and_capped():
    assert external.subsample(5, 10, 0).tolist() == [0, 1, 2, 3, 4]
    a, b = external.subsample(100, 10, 3), external.subsample(100, 10, 3)
    assert a.tolist() == b.tolist() and len(set(a.tolist())) == 10 and a.tolist() == sorted(a.tolist())
    assert external.subsample(100, 10, 4).tolist() != a.tolist()


# --- occlusion ------------------------------------------------------------------------------------

def test_occlude_inside_changes_exactly_the_box():
    imgs = np.arange(2 * 10 * 10, dtype=np.uint8).reshape(2, 10, 10)
    out = probes.occlude(imgs, probes.box_mask((10, 10), [0.2, 0.3, 0.8, 0.9]), 7, "inside")
    changed = out != imgs
    box = np.zeros((10, 10), bool)
    box[3:9, 2:8] = True   # rows y 0.3..0.9, columns x 0.2..0.8
    assert (changed[:, ~box] == False).all()  # noqa: E712
    assert (out[:, box] == 7).all()
    assert out.dtype == np.uint8 and imgs[0, 3, 2] == 32   # the input is not modified


def test_occlude_outside_keeps_the_box_and_fills_with_each_images_mean():
    imgs = np.stack([np.full((8, 8), 10, np.uint8), np.full((8, 8), 200, np.uint8)])
    imgs[0, 0, 0] = 74      # mean of image 0: (63 * 10 + 74) / 64 = 11
    out = probes.occlude(imgs, probes.box_mask((8, 8), [0.25, 0.25, 0.75, 0.75]), "mean", "outside")
    rows, cols = probes.box_slices((8, 8), [0.25, 0.25, 0.75, 0.75])
    assert (rows, cols) == (slice(2, 6), slice(2, 6))
    assert (out[:, rows, cols] == imgs[:, rows, cols]).all()
    outside = np.ones((8, 8), bool)
    outside[rows, cols] = False
    assert (out[0][outside] == 11).all() and (out[1][outside] == 200).all()


def test_lungs_hidden_and_lungs_only_cover_the_image_between_them():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 20, 20), dtype=np.uint8)
    box = probes.box_mask((20, 20), [0.15, 0.15, 0.85, 0.85])
    a = probes.occlude(imgs, box, 0, "inside") != imgs
    b = probes.occlude(imgs, box, 0, "outside") != imgs
    assert not (a & b).any()


def test_lung_masks_are_the_region_where_present_and_the_box_elsewhere():
    lungs = np.zeros((3, 10, 10), bool)
    lungs[0, 2:5, 1:4] = True          # image 0 has a lung mask; images 1 and 2 do not (all False)
    regions, counts = probes.lung_regions((3, 10, 10), [0.5, 0.5, 1.0, 1.0], lungs)
    assert counts == {"lung_mask": 1, "box": 2}
    assert (regions[0] == lungs[0]).all()
    assert regions[1].sum() == regions[2].sum() == 25 and regions[1][5:, 5:].all()
    assert probes.lung_regions((2, 10, 10), [0.5, 0.5, 1.0, 1.0])[1] == {"lung_mask": 0, "box": 2}
    # each image is occluded by its own region
    imgs = np.full((3, 10, 10), 100, np.uint8)
    hidden = probes.occlude(imgs, regions, 0, "inside")
    assert ((hidden == 0) == regions).all()


def test_retained_skill():
    assert probes.retained(0.95, 0.95) == 1.0
    assert probes.retained(0.5, 0.9) == 0.0
    assert probes.retained(0.7, 0.9) == 0.5
    assert probes.retained(0.3, 0.9) == -0.5          # worse than chance: the probe inverts the model
    assert probes.retained(0.8, 0.5) is None and probes.retained(None, 0.9) is None


# --- figures --------------------------------------------------------------------------------------

def test_positive_roc_auc_counts_rest_as_other():
    y = np.array([0, 0, external.REST_INDEX, 1, 2])
    p = np.array([[0.9, 0.1, 0.0], [0.4, 0.3, 0.3], [0.6, 0.2, 0.2], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6]])
    # positives 0.9, 0.4; others 0.6, 0.1, 0.2: 5 of 6 pairs ordered right
    assert metrics.positive_roc_auc(0)(y, p) == pytest.approx(5 / 6)
    assert metrics.positive_roc_auc(0)(np.array([1, 2]), p[:2]) is None


def test_positive_figures_on_known_inputs():
    y = np.array([0, 0, 0, 0, -1, -1, -1, -1])
    score = np.array([0.9, 0.8, 0.7, 0.3, 0.6, 0.2, 0.1, 0.05])
    proba = np.stack([score, 1 - score, np.zeros_like(score)], axis=1)
    out = external.positive_figures(y, proba, 0, 0.5, EV)
    assert out["roc_auc"] == pytest.approx(0.9375)           # 15 of 16 pairs: only 0.3 < 0.6
    assert out["sensitivity"] == 0.75 and out["specificity"] == 0.75
    assert out["ppv"] == 0.75 and out["npv"] == 0.75 and out["threshold"] == 0.5
    assert out["sens_at_spec95"] == 0.75                     # above the highest negative (0.6): 0.9, 0.8, 0.7
    assert out["spec_at_sens95"] == 0.75                     # every positive called (>= 0.3): 0.2, 0.1, 0.05 below
    assert set(out["ci"]) == {"roc_auc", "sensitivity", "specificity", "sens_at_spec95", "spec_at_sens95"}
    assert out["ci"]["roc_auc"]["low"] <= out["roc_auc"] <= out["ci"]["roc_auc"]["high"]


def test_summary_has_multiclass_figures_only_without_rest():
    y = np.array([0, 1, 2, 0])
    proba = np.eye(3)[[0, 1, 2, 1]] * 0.8 + 0.2 / 3
    both = external.summary(y, proba, CLASSES, "COVID", 0.5, EV)
    assert both["multiclass"]["accuracy"] == 0.75 and both["positive"]["class"] == "COVID"
    assert "multiclass" not in external.summary(np.array([0, -1, -1, 0]), proba, CLASSES, "COVID", 0.5, EV)


# --- params ---------------------------------------------------------------------------------------

@pytest.fixture
def tree() -> dict:
    return copy.deepcopy(yaml.safe_load(REAL.read_text()))


def _check(tree):
    return params.validate(tree, sources.SOURCES)


def test_real_external_section_is_valid(tree):
    assert _check(tree)["external"]["sets"][0]["source"] == "covid-chestxray"


@pytest.mark.parametrize("change,named", [
    (lambda t: t["external"]["sets"][0].update(source="chexpert"), "external.sets[0].source"),
    (lambda t: t["external"]["sets"][0].update(map={}), "external.sets[0].map"),
    (lambda t: t["external"]["sets"][0].update(path="/x"), "external.sets[0].path"),
    (lambda t: t["external"]["sets"][0].update(name="probes"), "external.sets[0].name"),
    (lambda t: t["external"]["sets"].append(dict(t["external"]["sets"][0])), "external.sets[1].name"),
    (lambda t: t["external"]["sets"].append({"name": "f", "source": "folder", "map": {"a": "COVID"}}), "external.sets[1].path"),
    (lambda t: t["external"]["sets"].append({"name": "d", "source": "demo", "map": {"a": "COVID"}, "seed": 1,
                                             "per_class": 0, "size": 64}), "external.sets[1].per_class"),
    (lambda t: t["external"].update(max_images=0), "external.max_images"),
    (lambda t: t["external"].update(missing="ignore"), "external.missing"),
    (lambda t: t["external"]["probes"].update(box=[0.8, 0.1, 0.2, 0.9]), "external.probes.box"),
    (lambda t: t["external"]["probes"].update(fill=300), "external.probes.fill"),
    # checked against the dataset's (the model's) classes up front, before any stage runs
    (lambda t: t["external"]["sets"][0]["map"].update({"COVID-19": "COVID-19"}), "external.sets[0].map.COVID-19"),
])
def test_bad_external_values_fail_naming_the_key(tree, change, named):
    change(tree)
    with pytest.raises(UserError) as err:
        _check(tree)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_a_demo_set_must_not_use_the_training_seed(tree):
    tree["dataset"] = "demo"
    tree["external"]["sets"] = [{"name": "d", "source": "demo", "map": {"COVID": "COVID"}, "seed": 0, "per_class": 5, "size": 64}]
    with pytest.raises(UserError, match=r"external.sets\[0\].seed"):
        _check(tree)
    tree["external"]["sets"][0]["seed"] = 1
    _check(tree)


# --- where a set's data comes from ----------------------------------------------------------------

def test_unknown_source_is_one_clear_error():
    with pytest.raises(UserError, match="unknown dataset 'chexpert'"):
        download.external_origin({"name": "x", "source": "chexpert", "map": {}})


def test_a_missing_local_copy_is_recorded_and_skipped(monkeypatch, tmp_path):
    entry = {"name": "ieee8023", "source": "covid-chestxray", "map": {"COVID-19": "COVID"}}
    monkeypatch.delenv(download.ENV, raising=False)
    assert "CXR_DATA_DIR is not set" in download.external_origin(entry)["missing"]
    monkeypatch.setenv(download.ENV, str(tmp_path))
    why = download.external_origin(entry)["missing"]
    assert "holds neither covid-chestxray/" in why
    with pytest.raises(external.Missing, match="holds neither"):
        with external.opened(entry):
            pass


def test_an_archived_set_is_extracted_within_the_download_limits(monkeypatch, tmp_path):
    entry = {"name": "ieee8023", "source": "covid-chestxray", "map": {"COVID-19": "COVID"}}
    with zipfile.ZipFile(tmp_path / "covid-chestxray.zip", "w") as zf:
        zf.writestr("covid-chestxray/metadata.csv", b"x" * 3000)
    monkeypatch.setenv(download.ENV, str(tmp_path))
    with pytest.raises(UserError, match=r"download\.max_bytes=1,000"):
        with external.opened(entry, {"max_bytes": 1000, "max_ratio": 100}):
            pass
    with external.opened(entry, {"max_bytes": 10_000, "max_ratio": 100}) as root:
        assert (root / "covid-chestxray" / "metadata.csv").stat().st_size == 3000


def _folder_set(root: Path) -> Path:
    rng = np.random.default_rng(0)
    for label, n, level in (("covid", 6, 200), ("healthy", 6, 60), ("other", 2, 120)):
        (root / label / "sub").mkdir(parents=True)
        for i in range(n):
            arr = np.clip(rng.normal(level, 20, (40, 50)), 0, 255).astype(np.uint8)
            Image.fromarray(arr).save(root / label / ("sub" if i % 2 else "") / f"{i}.png")
    (root / "readme.txt").write_text("x")
    (root / "top.png").write_bytes((root / "covid" / "0.png").read_bytes())
    (root / "healthy" / "broken.png").write_bytes(b"not a png")
    return root


def test_class_folders(tmp_path):
    recs, drops = sources.class_folders(_folder_set(tmp_path / "set"))
    assert {r.label for r in recs} == {"covid", "healthy", "other"} and len(recs) == 15
    assert {(d.file, d.reason) for d in drops} == {("readme.txt", "auxiliary_file"), ("top.png", "unlabeled")}


def _fake_forward(batch: np.ndarray) -> np.ndarray:
    """A stand-in model: brighter images are more COVID."""
    b = batch.reshape(len(batch), -1).mean(axis=1) / 255.0
    p = np.stack([b, (1 - b) / 2, (1 - b) / 2], axis=1)
    return (p / p.sum(axis=1, keepdims=True)).astype(np.float32)


INFO = {"classes": CLASSES, "positive": "COVID", "image_size": 32, "resize": "pad"}
OP = {"class": "COVID", "threshold": 0.5}
CFG = {"max_images": 100, "seed": 0, "missing": "skip"}
CLEAN = {"max_pixels": 10**7, "max_aspect_ratio": 4, "min_side": 8, "workers": 1}


def test_folder_set_is_scored_with_counts_that_add_up(tmp_path):
    entry = {"name": "f", "source": "folder", "path": str(_folder_set(tmp_path / "set")),
             "map": {"covid": "COVID", "healthy": "rest"}}
    result, roc = external.score_set(entry, _fake_forward, INFO, OP, CFG, EV, CLEAN)
    c = result["counts"]
    assert c["records"] == 15 and c["unmapped_by_label"] == {"other": 2} and c["mapped"] == 13
    assert c["undecodable"] == 1 and c["scored"] == 12 and c["positive"] == 6 and c["other"] == 6
    assert c["layout_dropped"] == 2
    assert result["positive"]["roc_auc"] == 1.0 and result["positive"]["sensitivity"] == 1.0
    assert "multiclass" not in result
    assert roc and {r["class"] for r in roc} == {"COVID"} and all(0 <= r["fpr"] <= 1 for r in roc)
    capped, _ = external.score_set(entry, _fake_forward, INFO, OP, {**CFG, "max_images": 5}, EV, CLEAN)
    assert capped["counts"]["not_sampled"] == 8 and capped["counts"]["scored"] + capped["counts"]["undecodable"] == 5


def test_demo_set_is_generated_with_its_own_seed(tmp_path):
    entry = {"name": "d", "source": "demo", "seed": 3, "per_class": 4, "size": 32,
             "map": {"COVID": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}}
    assert download.external_origin(entry) == {"source": "demo", "origin": "generated", "seed": 3, "per_class": 4, "size": 32}
    result, _ = external.score_set(entry, _fake_forward, INFO, OP, CFG, EV, CLEAN)
    assert result["counts"]["scored"] == 12 and result["counts"]["unmapped"] == 0
    assert set(result["multiclass"]) == {"accuracy", "balanced_accuracy", "macro_roc_auc"}


@pytest.fixture
def stubbed_model(monkeypatch):
    """external.run with a stand-in model and operating point, and no probes: only the sets are under test."""
    monkeypatch.setattr(external.modelinfo, "read_info", lambda path: INFO)
    monkeypatch.setattr(external.modelinfo, "read_operating_point", lambda path, classes: OP)
    monkeypatch.setattr(external.inference, "load_model", lambda path, info: None)
    monkeypatch.setattr(external.inference, "forward", lambda model: _fake_forward)
    monkeypatch.setattr(external.probes, "run", lambda *a: {"n": 0})


def test_run_skips_or_fails_on_a_missing_set(monkeypatch, tmp_path, stubbed_model):
    monkeypatch.delenv(download.ENV, raising=False)
    entry = {"name": "ieee8023", "source": "covid-chestxray", "map": {"COVID-19": "COVID"}}
    cfg = {**CFG, "sets": [entry], "probes": {}}
    out, plots, reports = tmp_path / "m", tmp_path / "p", tmp_path / "r"
    external.run(cfg, EV, CLEAN, CLASSES, out=out, plots_out=plots, reports_out=reports)
    for folder in (out, reports):
        skipped = json.loads((folder / "ieee8023.json").read_text())
        assert list(skipped) == ["skipped"] and "CXR_DATA_DIR is not set" in skipped["skipped"]
    assert json.loads((reports / "probes.json").read_text()) == {"n": 0} and not list(plots.iterdir())
    assert json.loads((out / "probes.json").read_text()) == {}      # n is bookkeeping: the report's
    with pytest.raises(UserError, match="external set ieee8023: CXR_DATA_DIR is not set"):
        external.run({**cfg, "missing": "error"}, EV, CLEAN, CLASSES, out=out, plots_out=plots, reports_out=reports)


def test_a_set_from_the_models_own_dataset_is_skipped_not_scored(monkeypatch, tmp_path, stubbed_model):
    # `dvc exp run -S dataset=covid-chestxray` with the default external set (ieee8023, from covid-chestxray):
    # scoring it would score the model's own training images as if they were external
    monkeypatch.setattr(external, "score_set", lambda *a: pytest.fail("a set from the training dataset was scored"))
    entry = {"name": "ieee8023", "source": "covid-chestxray", "map": {"COVID-19": "COVID"}}
    cfg = {**CFG, "sets": [entry], "probes": {}, "missing": "error"}   # not an error: always skipped, with the reason
    out, plots, reports = tmp_path / "m", tmp_path / "p", tmp_path / "r"
    external.run(cfg, EV, CLEAN, CLASSES, out=out, plots_out=plots, reports_out=reports, dataset="covid-chestxray")
    skipped = json.loads((out / "ieee8023.json").read_text())
    assert list(skipped) == ["skipped"] and "trained and validated on" in skipped["skipped"]
    assert external.own_data(entry, "covid-radiography") is None and external.own_data(entry, None) is None
    # a generated set is another draw (params require another seed), so demo on demo is external
    assert external.own_data({"name": "d", "source": "demo", "map": {}}, "demo") is None


def test_headline_keeps_the_figures_and_leaves_the_bookkeeping_to_the_report():
    record = {"source": "demo", "counts": {"scored": 3},
              "positive": {"class": "COVID", "threshold": 0.4, "roc_auc": 0.8, "ci": {"roc_auc": {"low": 0.7, "high": 0.9}}},
              "multiclass": {"accuracy": 0.5}}
    assert external.headline(record) == {"positive": {"roc_auc": 0.8}, "multiclass": {"accuracy": 0.5}}
    probes_record = {"n": 9, "positive": "COVID", "box": [0, 0, 1, 1], "fill": "mean", "region": {"box": 9},
                     "chance": {"macro_roc_auc": 0.5}, "lungs_hidden": {"macro_roc_auc": 0.6, "retained": {"macro": 0.2}}}
    assert external.headline(probes_record) == {"lungs_hidden": {"macro_roc_auc": 0.6, "retained": {"macro": 0.2}}}
    assert external.headline({"skipped": "no copy"}) == {"skipped": "no copy"}
