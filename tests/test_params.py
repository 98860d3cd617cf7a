"""cxr.params: the real params.yaml validates; each bad value fails with a UserError naming its key."""
import copy
from pathlib import Path

import pytest
import yaml

from cxr import data, params, sources
from cxr.errors import UserError

REAL = Path(__file__).resolve().parent.parent / "params.yaml"


@pytest.fixture(scope="module")
def base() -> dict:
    return yaml.safe_load(REAL.read_text())


def _write(tmp_path, tree) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(tree, sort_keys=False))
    return p


def _set(tree, key, value):
    node = tree
    *parents, last = key.split(".")
    for part in parents:
        node = node[part]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value


_DELETE = object()


def test_real_params_yaml_is_valid():
    p = params.load(REAL)
    assert p["dataset"] in sources.SOURCES
    ds = params.dataset(p)
    assert ds["name"] == p["dataset"] and ds["positive"] in ds["classes"]


def test_round_trip_copy_is_valid(tmp_path, base):
    assert params.load(_write(tmp_path, base)) == base


@pytest.mark.parametrize("key,value,named", [
    ("model.arch", "vgg99", "model.arch"),
    ("train.epochs", -1, "train.epochs"),
    ("train.epochs", 2.5, "train.epochs"),
    ("train.epochs", True, "train.epochs"),
    ("split.val_fraction", 1.5, "split.val_fraction"),
    ("split.test_fraction", 0, "split.test_fraction"),
    ("split.val_fraction", "0.15", "split.val_fraction"),
    ("clean.image_size", 16, "clean.image_size"),
    ("clean.resize", "stretch", "clean.resize"),
    ("dataset", "foo", "dataset"),
    ("gradcam.class", "Pneumothorax", "gradcam.class"),
    ("train.learning_rate", 0, "train.learning_rate"),
    ("runtime.xla", "yes", "runtime.xla"),
    ("train.patience", _DELETE, "train.patience"),
    ("evaluate.bootstrap", _DELETE, "evaluate.bootstrap"),
    ("clean", _DELETE, "clean."),
    ("train.l2", -0.1, "train.l2"),
    ("train.augment.brightness", 0.6, "train.augment.brightness"),
    ("train.augment.contrast", -0.1, "train.augment.contrast"),
    ("train.augment.outside_lungs", 1.5, "train.augment.outside_lungs"),
    ("train.augment.outside_lungs", "yes", "train.augment.outside_lungs"),
    ("train.augment.lung_box", [0.8, 0.1, 0.2, 0.9], "train.augment.lung_box"),
    ("train.augment.lung_box", [0.1, 0.1, 0.9], "train.augment.lung_box"),
    ("train.augment.lung_box", _DELETE, "train.augment.lung_box"),
    ("finetune.unfreeze_from", 30, "finetune.unfreeze_from"),
    ("finetune.unfreeze_from", "", "finetune.unfreeze_from"),
    ("finetune.views", -1, "finetune.views"),
    ("finetune.select", "first", "finetune.select"),
    ("finetune.members", 0, "finetune.members"),
    ("finetune.warmup_epochs", 30, "finetune.warmup_epochs"),  # must be below finetune.epochs (30)
    ("finetune.label_smoothing", 1.0, "finetune.label_smoothing"),
    ("finetune.mixup", -0.1, "finetune.mixup"),
    ("finetune.mixup", "yes", "finetune.mixup"),
    ("finetune.ema_epochs", -1, "finetune.ema_epochs"),
    ("finetune.ema_epochs", 0.01, "finetune.ema_epochs"),
    ("finetune.ema_epochs", "yes", "finetune.ema_epochs"),
    ("finetune.monitor", "val_loss", "finetune.monitor"),
    ("finetune.monitor_specificity", 0, "finetune.monitor_specificity"),
    ("finetune.temperature_scaling", "yes", "finetune.temperature_scaling"),
    ("evaluate.operating_point.by", "ppv", "evaluate.operating_point.by"),
    ("evaluate.operating_point.target", 1.5, "evaluate.operating_point.target"),
    ("evaluate.operating_point.rule", "bootstrap", "evaluate.operating_point.rule"),
    ("evaluate.sensitivity_at_specificity", [0.95, 1.0], "evaluate.sensitivity_at_specificity"),
    ("evaluate.sensitivity_at_specificity", 0.95, "evaluate.sensitivity_at_specificity"),
    ("evaluate.specificity_at_sensitivity", [0.9, 0.9], "evaluate.specificity_at_sensitivity"),
    ("model.weights", "no/such/weights.h5", "model.weights"),
    ("model.alpha", 0.6, "model.alpha"),
    ("model.init", "no/such/model.keras", "model.init"),
    ("model.init", "", "model.init"),
])
def test_bad_value_names_its_key(tmp_path, base, key, value, named):
    tree = copy.deepcopy(base)
    _set(tree, key, value)
    with pytest.raises(UserError) as info:
        params.load(_write(tmp_path, tree))
    assert named in str(info.value)
    if value is _DELETE:
        assert "missing" in str(info.value)


def test_outside_lungs_is_a_share_of_training_samples_that_cached_views_cap():
    """The rate on the augmented images that fills the surround of `share` of all training samples: with cached
    views one view in views + 1 is the whole image, so at most views / (views + 1) of the samples (every
    augmented view; finetune logs it); augmented on the fly (views 0), the share itself."""
    assert data.outside_fill_rate(0.75, 3) == 1.0 and data.outside_fill_rate(0.5, 1) == 1.0
    assert data.outside_fill_rate(0.75, 2) == 1.0 and data.outside_fill_rate(1.0, 3) == 1.0   # capped
    assert data.outside_fill_rate(0.3, 2) == pytest.approx(0.45) and data.outside_fill_rate(0.3, 0) == 0.3
    assert data.outside_fill_rate(1.0, 0) == 1.0


def test_mixup_without_cached_views_is_refused_up_front(tmp_path, base):
    tree = copy.deepcopy(base)
    _set(tree, "finetune.mixup", 0.2)
    _set(tree, "finetune.views", 0)
    with pytest.raises(UserError, match=r"finetune\.mixup must be 0 when finetune\.views is 0"):
        params.load(_write(tmp_path, tree))
    _set(tree, "finetune.views", 2)
    assert params.load(_write(tmp_path, tree))["finetune"]["mixup"] == 0.2


@pytest.mark.parametrize("key", ["split.val_fraction", "train.learning_rate", "evaluate.bootstrap.level", "gradcam.alpha"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_non_finite_numbers_are_refused(tmp_path, base, key, value):
    # YAML `.nan` compares false with every bound, so a range check alone lets it through
    tree = copy.deepcopy(base)
    _set(tree, key, value)
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        params.load(_write(tmp_path, tree))


def test_val_plus_test_at_least_one(tmp_path, base):
    tree = copy.deepcopy(base)
    tree["split"]["val_fraction"] = 0.5
    tree["split"]["test_fraction"] = 0.5
    with pytest.raises(UserError) as info:
        params.load(_write(tmp_path, tree))
    assert "split.val_fraction" in str(info.value) and "split.test_fraction" in str(info.value)
    tree["split"]["test_fraction"] = 0.49
    params.load(_write(tmp_path, tree))


def test_gradcam_class_may_name_a_class_of_the_active_dataset(tmp_path, base):
    tree = copy.deepcopy(base)
    active = tree["datasets"][tree["dataset"]]
    tree["gradcam"]["class"] = active["classes"][0]
    params.load(_write(tmp_path, tree))
    tree["gradcam"]["class"] = "predicted"
    params.load(_write(tmp_path, tree))


def test_positive_must_be_a_class(tmp_path, base):
    tree = copy.deepcopy(base)
    tree["datasets"]["covid-radiography"]["positive"] = "Lung_Opacity"
    tree["datasets"]["covid-radiography"]["classes"] = ["COVID", "Normal"]
    with pytest.raises(UserError, match="datasets.covid-radiography.positive"):
        params.load(_write(tmp_path, tree))


def test_invalid_yaml(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("dataset: [covid-radiography\nclean: {image_size: 224\n")
    with pytest.raises(UserError, match="not valid YAML"):
        params.load(p)


def test_not_a_mapping_and_missing_file(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text("- just\n- a list\n")
    with pytest.raises(UserError, match="mapping"):
        params.load(p)
    with pytest.raises(UserError, match="not found"):
        params.load(tmp_path / "absent.yaml")
