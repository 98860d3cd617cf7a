"""Models and training on real (tiny) Keras models: runtime options, determinism, guards, errors."""
from __future__ import annotations

import os

import keras
import numpy as np
import pytest

from cxr import data, models, params, training
from cxr.errors import UserError

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]


def _splits(n=24, size=32, seed=0):
    rng = np.random.default_rng(seed)
    out = {}
    for name in ("train", "val", "test"):
        labels = np.arange(n) % 3
        images = rng.integers(0, 60, (n, size, size), dtype=np.uint8)
        images[labels == 0, : size // 2] += 150  # a learnable difference
        out[name] = data.Subset([f"{name}{i}.png" for i in range(n)], images, labels.astype(np.int32), None)
    return out


def _params(**over):
    p = params.load(os.path.join(os.path.dirname(__file__), "..", "params.yaml"))
    p["dataset"] = "demo"
    p["clean"]["image_size"] = 32
    p["model"].update(weights="none", alpha=0.35)
    p["train"].update(epochs=2, batch_size=8, patience=2)
    p["finetune"].update(epochs=2, batch_size=8, patience=2, unfreeze=200, learning_rate=0.003)
    for key, value in over.items():
        section, leaf = key.split(".")
        p[section][leaf] = value
    return p


def _live(tmp):
    from dvclive import Live

    return Live(dir=str(tmp), dvcyaml=False, save_dvc_exp=False, report=None)


@pytest.fixture(autouse=True)
def _float32_policy():
    yield
    keras.mixed_precision.set_global_policy("float32")


def test_class_weights_balanced():
    w = training.class_weights(np.array([0, 0, 0, 1]), 3, "balanced")
    assert w[0] == pytest.approx(4 / (2 * 3)) and w[1] == pytest.approx(4 / (2 * 1)) and w[2] == 1.0
    assert training.class_weights(np.array([0, 1]), 2, "none") is None


def test_baseline_is_deterministic(tmp_path):
    s = _splits()
    runs = []
    for i in range(2):
        model, summary = training.baseline(_params(), CLASSES, s, _live(tmp_path / str(i)))
        runs.append((summary["val_loss"], model.get_layer("predictions").get_weights()[0]))
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-6)


def test_baseline_without_feature_cache_and_with_mixed_precision_and_xla(tmp_path):
    p = _params(**{"train.feature_cache": False})
    p["runtime"].update(mixed_precision=True, xla=True)
    model, summary = training.baseline(p, CLASSES, _splits(), _live(tmp_path))
    assert summary["epochs_run"] == 2
    assert model.jit_compile  # XLA really on (Keras silently drops it under op determinism)
    assert model.output.dtype == "float32"  # the softmax stays float32 under mixed precision
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"


def test_finetune_keeps_start_when_no_epoch_improves(tmp_path):
    s = _splits()
    p = _params()
    model, _ = training.baseline(p, CLASSES, s, _live(tmp_path / "a"))
    path = tmp_path / "baseline.keras"
    training.save(model, path, training.model_info(p, CLASSES, "COVID"))
    p["finetune"]["learning_rate"] = 0.9  # far too large: no epoch can beat the start
    tuned, summary = training.finetune(p, CLASSES, s, path, _live(tmp_path / "b"))
    assert summary["best_epoch"] == 0
    for a, b in zip(model.get_weights(), tuned.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_unfreeze_keeps_batchnorm_frozen_for_pretrained_weights():
    m = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    n = models.unfreeze_top(m, 20, freeze_batchnorm=True)
    net = m.get_layer("backbone")
    assert n > 0
    assert not any(l.trainable for l in net.layers if isinstance(l, keras.layers.BatchNormalization))
    assert all(not l.trainable for l in net.layers[:-20])


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnetb0", "resnet50", "densenet121"])
def test_every_arch_builds_saves_and_loads_safely(arch, tmp_path):
    m = models.build(arch, 2, 32, "none", alpha=0.35 if arch == "mobilenetv2" else 1.0)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype("float32")
    path = tmp_path / "m.keras"
    m.save(path)
    again = models.load(path)
    np.testing.assert_allclose(m.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)


def test_bad_weights_and_model_files_are_one_clear_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match="is not a file"):
        models.build("mobilenetv2", 3, 32, str(tmp_path / "missing.h5"))
    with pytest.raises(UserError, match="not found"):
        models.load(tmp_path / "none.keras")
    (tmp_path / "junk.keras").write_text("not a model")
    with pytest.raises(UserError, match="not a loadable Keras model"):
        models.load(tmp_path / "junk.keras")
    # ImageNet weights that cannot be downloaded: say how to point at a local file
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras"))
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    with pytest.raises(UserError, match="model.weights"):
        models.build("efficientnetb0", 3, 32, "imagenet")
