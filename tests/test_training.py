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
    p["finetune"].update(epochs=2, batch_size=8, patience=2, unfreeze_from="all", views=0, learning_rate=0.003, warmup_epochs=0,
                         members=1)
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
    assert training.kept_in_words(summary) == f"epoch {summary['best_epoch']} of {summary['epochs_run']}" and summary["best_epoch"] >= 1
    assert runs[0][0] == pytest.approx(runs[1][0], abs=1e-6)
    np.testing.assert_allclose(runs[0][1], runs[1][1], atol=1e-6)


@pytest.mark.slow  # trains for tens of seconds
def test_baseline_without_feature_cache_and_with_mixed_precision_and_xla(tmp_path):
    p = _params(**{"train.feature_cache": False})
    p["runtime"].update(mixed_precision=True, xla=True)
    model, summary = training.baseline(p, CLASSES, _splits(), _live(tmp_path))
    assert summary["epochs_run"] == 2
    assert model.jit_compile  # XLA really on (Keras silently drops it under op determinism)
    assert model.output.dtype == "float32"  # the softmax stays float32 under mixed precision
    assert model.get_layer("backbone").layers[1].compute_dtype == "float16"


@pytest.mark.slow  # trains for tens of seconds
def test_finetune_keeps_start_when_no_epoch_improves(tmp_path):
    s = _splits()
    p = _params()
    model, _ = training.baseline(p, CLASSES, s, _live(tmp_path / "a"))
    path = tmp_path / "baseline.keras"
    training.save(model, path, training.model_info(p, CLASSES, "COVID"))
    p["finetune"]["learning_rate"] = 0.9  # far too large: no epoch can beat the start
    p["finetune"]["temperature_scaling"] = False  # calibration would rescale the kept head (tested on its own)
    tuned, summary = training.finetune(p, CLASSES, s, path, _live(tmp_path / "b"))
    assert summary["best_epoch"] == 0
    assert training.kept_in_words(summary) == "the starting weights (the run did not beat them)"
    for a, b in zip(model.get_weights(), tuned.get_weights()):
        np.testing.assert_array_equal(a, b)


def test_model_init_copies_the_backbone_and_a_matching_head(tmp_path):
    from cxr import modelinfo

    p = _params()
    src = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    for w in src.get_layer("backbone").weights + src.get_layer("predictions").weights:
        w.assign(np.random.default_rng(len(w.name)).normal(0, 0.1, w.shape).astype(w.dtype))
    path = tmp_path / "src.keras"
    modelinfo.save(src, path, modelinfo.model_info(p, CLASSES, "COVID"))
    same = models.build("mobilenetv2", 3, 32, "imagenet", alpha=0.35, init=str(path))  # no download with init
    assert models.initialise_from(same, path, CLASSES, 0.35) == {"backbone": 1, "head": 1}
    for a, b in zip(src.get_weights(), same.get_weights()):
        np.testing.assert_array_equal(a, b)
    binary = models.build("mobilenetv2", 2, 32, "none", alpha=0.35, init=str(path))
    head = binary.get_layer("predictions").get_weights()
    assert models.initialise_from(binary, path, ["COVID-19", "non-COVID"], 0.35) == {"backbone": 1, "head": 0}
    for a, b in zip(src.get_layer("backbone").get_weights(), binary.get_layer("backbone").get_weights()):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(head[0], binary.get_layer("predictions").get_weights()[0])
    assert models.pretrained({"weights": "none", "init": str(path)})
    wider = models.build("mobilenetv2", 3, 32, "none", alpha=0.5)
    with pytest.raises(UserError) as err:
        models.initialise_from(wider, path, CLASSES, 0.5)
    msg = str(err.value)
    assert msg.startswith(f"model.init={path} does not fit model.arch=mobilenetv2, model.alpha=0.5, clean.image_size=32: "), msg
    assert "has shape" in msg and "\n" not in msg, msg   # the first weight that differs, on one line


def test_model_init_fingerprint_follows_the_file(tmp_path):
    from cxr import modelinfo

    assert modelinfo.fingerprint("none") == {"init": "none"}
    src = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    path = tmp_path / "src.keras"
    modelinfo.save(src, path, modelinfo.model_info(_params(), CLASSES, "COVID"))
    first = modelinfo.fingerprint(str(path))
    assert first["bytes"] == path.stat().st_size and modelinfo.fingerprint(str(path)) == first
    path.with_suffix(".info.json").write_text('{"classes": ["a", "b"]}')
    assert modelinfo.fingerprint(str(path))["sha256"] != first["sha256"]
    with pytest.raises(UserError):
        modelinfo.fingerprint(str(tmp_path / "missing.keras"))
    # a local model.weights file is fingerprinted beside it; imagenet and none are params values, nothing to add
    assert modelinfo.fingerprint("none", "imagenet") == modelinfo.fingerprint("none", "none") == {"init": "none"}
    weights = tmp_path / "backbone.weights.h5"
    models.backbone("mobilenetv2", 32, "none", alpha=0.35).save_weights(weights)
    record = modelinfo.fingerprint("none", str(weights))
    assert record["weights"]["bytes"] == weights.stat().st_size and record == modelinfo.fingerprint("none", str(weights))
    with open(weights, "r+b") as f:                    # the same size, other content
        f.seek(-1, 2)
        last = f.read(1)
        f.seek(-1, 2)
        f.write(bytes([last[0] ^ 1]))
    assert modelinfo.fingerprint("none", str(weights))["weights"]["sha256"] != record["weights"]["sha256"]
    with pytest.raises(UserError, match="model.weights"):
        modelinfo.fingerprint("none", str(tmp_path / "missing.weights.h5"))


def test_unfreeze_from_a_block_keeps_batchnorm_frozen_for_pretrained_weights():
    m = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    n = models.unfreeze_from(m, "block_15", freeze_batchnorm=True)
    net = m.get_layer("backbone")
    first = [l.name for l in net.layers].index("block_15_expand")
    assert n > 0
    assert not any(l.trainable for l in net.layers if isinstance(l, keras.layers.BatchNormalization))
    assert all(not l.trainable for l in net.layers[:first])
    assert net.get_layer("block_15_expand").trainable and net.get_layer("Conv_1").trainable
    # "block_1" names block_1 only, not block_10..block_16
    assert models.first_trainable_layer(net, "block_1") == [l.name for l in net.layers].index("block_1_expand")


def test_unknown_or_mid_block_start_is_one_clear_error():
    m = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    with pytest.raises(UserError, match="finetune.unfreeze_from: no .* named 'block_99'"):
        models.unfreeze_from(m, "block_99")
    # inside a residual block, later layers also read the block's input: not a valid cut
    with pytest.raises(UserError, match="finetune.unfreeze_from"):
        models.split_backbone(m, "block_14_depthwise")


def test_split_backbone_composes_to_the_backbone():
    m = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    lower, top = models.split_backbone(m, "block_13")
    x = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    net = m.get_layer("backbone")
    np.testing.assert_allclose(top(lower(x)), net(x), atol=1e-5)
    assert top.layers[-1] is net.layers[-1]  # shared layers: training the top trains the model


@pytest.mark.slow  # trains for tens of seconds
def test_finetune_on_cached_views_trains_the_top_blocks_of_the_full_model(tmp_path, caplog):
    s = _splits()
    p = _params(**{"finetune.unfreeze_from": "block_15", "finetune.views": 2, "finetune.epochs": 3, "finetune.patience": 3,
                   "finetune.mixup": 0.4,  # mixup, exposure augmentation and the surround fill too: deterministic as well
                   "train.augment": {"rotation": 0.03, "translation": 0.05, "zoom": 0.1, "flip": False, "brightness": 0.1, "contrast": 0.2,
                                     "outside_lungs": 0.75, "lung_box": [0.15, 0.15, 0.85, 0.85]}})
    model, _ = training.baseline(p, CLASSES, s, _live(tmp_path / "a"))
    path = tmp_path / "baseline.keras"
    training.save(model, path, training.model_info(p, CLASSES, "COVID"))
    runs = []
    for i in range(2):
        tuned, summary = training.finetune(p, CLASSES, s, path, _live(tmp_path / f"b{i}"))
        runs.append((summary, tuned))
    summary, tuned = runs[0]
    # 0.75 of the samples cannot be filled when one view in 3 is the whole image: every augmented view is, and it says so
    assert "every augmented view is filled, 0.667 of the samples" in caplog.text
    assert summary["epochs_run"] == 3 and summary["monitor"] == "macro_roc_auc"
    assert set(summary["start"]) >= {"val_loss", "val_macro_roc_auc", "val_sensitivity_at_specificity"}
    before, after = model.get_layer("backbone"), tuned.get_layer("backbone")
    assert np.array_equal(before.get_layer("block_14_expand").get_weights()[0], after.get_layer("block_14_expand").get_weights()[0])
    if summary["best_epoch"] > 0:
        assert not np.array_equal(before.get_layer("block_15_expand").get_weights()[0], after.get_layer("block_15_expand").get_weights()[0])
    # deterministic: the same params and data give the same weights
    for a, b in zip(runs[0][1].get_weights(), runs[1][1].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def test_view_batches_mixup_mixes_activations_and_keeps_each_image_s_class_weight_in_the_loss():
    rng = np.random.default_rng(0)
    n, k = 21, 3
    views = [rng.normal(size=(n, 2, 2, 4)).astype(np.float16) for _ in range(3)]
    labels = np.arange(n) % k
    onehot = np.eye(k, dtype=np.float32)[labels]
    w = np.array([1.0, 2.0, 4.0], np.float32)[labels]
    plain = training._view_batches(views, onehot, w, 8, seed=3)
    mixed = training._view_batches(views, onehot, w, 8, seed=3, mixup=0.4)
    again = training._view_batches(views, onehot, w, 8, seed=3, mixup=0.4)
    ce = lambda t, q: -(t * np.log(q)).sum(axis=1)  # noqa: E731
    lams = []
    for epoch in range(2):
        for i in range(len(plain)):
            (x, y, sw), (xm, ym, swm) = plain[i], mixed[i]
            for a, b in zip(mixed[i], again[i]):  # seeded
                np.testing.assert_array_equal(a, b)
            idx = np.sort(plain.order[i * 8 : (i + 1) * 8])
            lam, other = mixed.lam[idx], mixed.partner[idx]
            partner = np.stack([views[v][j] for v, j in zip(mixed.partner_view[idx], other)]).astype(np.float32)
            # the same images and views as without mixup, each mixed with its partner
            np.testing.assert_allclose(xm, lam[:, None, None, None] * x + (1 - lam[:, None, None, None]) * partner, rtol=1e-6)
            np.testing.assert_allclose(ym.sum(axis=1), 1.0, rtol=1e-6)
            # weighted loss = the lam-weighted mixture of the two images' class-weighted losses, for any prediction
            q = rng.dirichlet(np.ones(k), len(idx))
            np.testing.assert_allclose(swm * ce(ym, q), lam * sw * ce(y, q) + (1 - lam) * w[other] * ce(onehot[other], q), rtol=1e-5)
            lams.append(lam)
        plain.on_epoch_end(), mixed.on_epoch_end(), again.on_epoch_end()
    lams = np.concatenate(lams)
    assert ((lams > 0.1) & (lams < 0.9)).mean() > 0.2 and len(np.unique(lams)) == len(lams)  # Beta(0.4, 0.4), drawn anew


def test_greedy_soup_averages_the_members_that_help_and_leaves_out_a_bad_one():
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    rng = np.random.default_rng(0)
    x = rng.normal(size=(90, 4)).astype("float32")
    y = np.arange(90) % 3
    good = np.zeros((4, 3), "float32")
    good[np.arange(3), np.arange(3)] = 3.0
    x[np.arange(90), y] += 2.0  # feature c points at class c
    members = [[good + rng.normal(0, 0.3, good.shape).astype("float32"), np.zeros(3, "float32")] for _ in range(2)]
    members.append([-good, np.zeros(3, "float32")])  # a member that learned the opposite
    runs = []
    for w in members:
        m.set_weights(w)
        sel = training.Selector(lambda: m.predict(x, verbose=0), y, 0, "macro_roc_auc", 0.95, 5)
        sel.score(0, m)
        runs.append((sel.restore(m), [a.copy() for a in w], sel))
    summary = training._greedy_soup(m, runs, lambda: m.predict(x, verbose=0))
    assert summary["soup"] == {"members": 2, "of": 3}
    assert [summary["members"][str(i)]["in_soup"] for i in range(3)] == [1, 1, 0]
    np.testing.assert_allclose(m.get_weights()[0], (members[0][0] + members[1][0]) / 2, atol=1e-6)
    assert summary["val_macro_roc_auc"] >= max(r[0]["val_macro_roc_auc"] for r in runs) - 1e-9


@pytest.mark.slow  # trains for tens of seconds
@pytest.mark.parametrize("select", ["best", "last"])
def test_finetune_members_share_the_cache_and_are_deterministic(tmp_path, select):
    s = _splits()
    p = _params(**{"finetune.unfreeze_from": "block_15", "finetune.views": 1, "finetune.members": 2, "finetune.select": select,
                   "finetune.epochs": 3, "finetune.patience": 1})
    model, _ = training.baseline(p, CLASSES, s, _live(tmp_path / "a"))
    path = tmp_path / "baseline.keras"
    training.save(model, path, training.model_info(p, CLASSES, "COVID"))
    runs = [training.finetune(p, CLASSES, s, path, _live(tmp_path / f"b{i}")) for i in range(2)]
    summary = runs[0][1]
    assert set(summary["members"]) == {"0", "1"}
    if select == "best":
        assert summary["soup"]["of"] == 2 and 1 <= summary["soup"]["members"] <= 2
        assert summary["epochs_run"] <= 2 * 3
        assert training.kept_in_words(summary).startswith(f"a weight soup of the best epochs of {summary['soup']['members']} of 2 runs")
    else:  # every member runs to the schedule's end (patience does not stop it) and is kept, unless the guard steps in
        assert summary["epochs_run"] == 2 * 3 and [m["epoch"] for m in summary["members"].values()] == [3, 3]
        assert summary["ensemble"] == {"members": 1 if summary["start_kept"] else 2, "of": 2}
        assert models.member_count(runs[0][0]) == summary["ensemble"]["members"]
        assert training.kept_in_words(summary) == ("the starting weights (the ensemble of 2 runs did not beat them)" if summary["start_kept"]
                                                   else "the ensemble of 2 runs' final weights (epoch 3 each, 6 in all)")
    for a, b in zip(runs[0][0].get_weights(), runs[1][0].get_weights()):
        np.testing.assert_allclose(a, b, atol=1e-6)


def _recalibrate_batchnorm(model, x):
    """Set every backbone BatchNorm's statistics to its input's on `x`, layer by layer, so that an untrained
    backbone's activations stay O(1) instead of vanishing (and its outputs depend on the image)."""
    net = models.get_backbone(model)
    pre = np.asarray(models.before_backbone(model)(x))
    for layer in net.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            a = np.asarray(keras.Model(net.input, layer.input)(pre))
            gamma, beta, _, _ = layer.get_weights()
            layer.set_weights([gamma, beta, a.mean(axis=(0, 1, 2)), a.var(axis=(0, 1, 2)) + 1e-3])


def _members(model, unfreeze_from, n, seed=0):
    """n members: `model` with its top blocks' (from unfreeze_from) and its head's weights perturbed (BatchNorm
    statistics kept), each as (variables, values)."""
    rng = np.random.default_rng(seed)
    _, top = models.split_backbone(model, unfreeze_from)
    parts = top.weights + model.get_layer("predictions").weights
    start = [w.numpy() for w in parts]
    out = []
    for _ in range(n):
        out.append([w if "moving" in v.path else w + rng.normal(0, np.std(w) + 0.01, w.shape).astype(w.dtype)
                    for v, w in zip(parts, start)])
        out[-1][-2] *= 0.1  # the head's kernel: logits of order 1, not saturated softmaxes
    return parts, out


def test_ensemble_is_the_mean_of_the_members_softmaxes_and_one_ordinary_model(tmp_path):
    from cxr import gradcam

    keras.utils.set_random_seed(0)
    m = models.build("mobilenetv2", 3, 64, "none", alpha=0.35)
    x = np.random.default_rng(1).integers(0, 256, (5, 64, 64, 1)).astype("float32")
    _recalibrate_batchnorm(m, x)
    parts, members = _members(m, "block_14", 3)

    def load(i):
        for v, w in zip(parts, members[i]):
            v.assign(w)

    expected = []
    for i in range(3):
        load(i)
        expected.append(m.predict(x, verbose=0))
    ens = models.ensemble(m, "block_14", 3, load)
    assert models.member_count(ens) == 3 and models.member_count(m) == 1
    assert [layer.name for layer in models.outer_layers(ens)[1]] == ["pool", "dropout", "predictions"]
    got = ens.predict(x, verbose=0)
    np.testing.assert_allclose(got, np.mean(expected, axis=0), atol=1e-5)
    assert np.abs(expected[0] - expected[1]).max() > 0.05  # the members really differ
    assert np.abs(expected[0][0] - expected[0][1]).max() > 0.01  # and see their images
    load(0)
    head_only = [v.numpy() for v in m.get_layer("predictions").weights]
    for v, w in zip(parts, members[1]):
        v.assign(w)
    for v, w in zip(m.get_layer("predictions").weights, head_only):
        v.assign(w)
    assert np.abs(m.predict(x, verbose=0) - expected[0]).max() > 0.01  # the top blocks alone change the output
    # saved and loaded with safe_mode on, it predicts the same
    ens.save(tmp_path / "e.keras")
    again = models.load(tmp_path / "e.keras")
    np.testing.assert_allclose(again.predict(x, verbose=0), got, atol=1e-6)
    # temperature scaling tempers every member: what fit_temperature's (members, N, k) form assumes
    models.scale_logits(again, 2.0)
    np.testing.assert_allclose(again.predict(x, verbose=0), training.tempered(np.stack(expected), 2.0), atol=1e-5)
    # Grad-CAM explains it through the members' feature maps side by side
    layer, explain = gradcam.explainer(again, min_side=2)  # 2x2 maps at 64 px (7x7 at 224)
    cams = gradcam.heatmaps(again, x[..., 0].astype(np.uint8), got.argmax(axis=1), explain=explain)
    assert layer == "members" and cams.shape == (5, 64, 64) and np.isfinite(cams).all() and cams.max() <= 1


def test_fit_temperature_of_an_ensemble_calibrates_the_average():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (3000, 3))
    y = np.array([rng.choice(3, p=row) for row in np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)])
    members = np.stack([training.tempered(np.exp(3 * (z + rng.normal(0, 0.1, z.shape))), 1.0) for _ in range(3)])
    t = training.fit_temperature(members, y)  # over-confident members: T > 1, less than 3 as averaging softens them
    nll = lambda p: -np.log(p[np.arange(len(y)), y]).mean()  # noqa: E731
    assert 1.3 < t < 3.4 and nll(training.tempered(members, t)) < nll(members.mean(axis=0)) - 0.05
    assert nll(training.tempered(members, t)) <= min(nll(training.tempered(members, t * 1.1)), nll(training.tempered(members, t / 1.1)))
    assert training.tempered(members[:1], 1.0) == pytest.approx(members[0], abs=1e-9)


def test_selector_keeps_the_start_unless_an_epoch_beats_it():
    y = np.array([0, 1, 2, 0, 1, 2])
    good = np.eye(3)[y] * 0.8 + 0.2 / 3
    bad = np.full((6, 3), 1 / 3)

    class Weights:
        def __init__(self):
            self.w = "start"

        def get_weights(self):
            return self.w

        def set_weights(self, w):
            self.w = w

    holder = Weights()
    outputs = iter([good, bad, bad])
    sel = training.Selector(lambda: next(outputs), y, 0, "macro_roc_auc", 0.95, patience=5)
    for epoch in range(3):
        holder.w = f"epoch{epoch}"
        sel.score(epoch, holder)
    summary = sel.restore(holder)
    assert summary["best_epoch"] == 0 and holder.w == "epoch0"
    # a randomly initialised start (the baseline's head) is scored but never chosen, however good it looks
    outputs = iter([good, bad, bad])
    sel = training.Selector(lambda: next(outputs), y, 0, "loss", 0.95, patience=5, start_is_candidate=False)
    for epoch in range(3):
        holder.w = f"epoch{epoch}"
        sel.score(epoch, holder)
    assert sel.restore(holder)["best_epoch"] == 1 and holder.w == "epoch1"
    # a tie on the monitor is broken by the lower loss
    outputs = iter([bad, good * 0 + np.eye(3)[y] * 0.5 + 0.5 / 3, np.eye(3)[y] * 0.9 + 0.1 / 3])
    sel = training.Selector(lambda: next(outputs), y, 0, "macro_roc_auc", 0.95, patience=5)
    for epoch in range(3):
        holder.w = f"epoch{epoch}"
        sel.score(epoch, holder)
    assert sel.restore(holder)["best_epoch"] == 2


def test_ema_momentum_spans_the_window_in_epochs_and_is_never_negative():
    assert training.ema_momentum(2.5, 40) == pytest.approx(0.99)
    assert training.ema_momentum(2.5, 400) == pytest.approx(0.999)  # ten times the steps per epoch: the same epochs
    assert training.ema_momentum(0.1, 8) == 0.0  # a window under one step: the raw weights


@pytest.mark.parametrize("policy", ["float32", "mixed_float16"])  # mixed precision wraps the optimizer in a LossScaleOptimizer
def test_averaged_weights_are_the_moving_average_and_training_goes_on_from_the_raw_ones(policy):
    keras.mixed_precision.set_global_policy(policy)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(32, 4)).astype("float32")
    onehot = np.eye(3, dtype="float32")[np.arange(32) % 3]
    m = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3, activation="softmax")])
    start = m.get_weights()
    with training.averaged_weights(m):  # not compiled: nothing to average
        assert all((a == b).all() for a, b in zip(m.get_weights(), start))
    m.compile(optimizer=keras.optimizers.AdamW(0.1, use_ema=True, ema_momentum=0.5), loss="categorical_crossentropy")
    assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer) == (policy == "mixed_float16")
    with training.averaged_weights(m):  # no step taken yet: the weights as they are
        assert all((a == b).all() for a, b in zip(m.get_weights(), start))
    raw = []
    for _ in range(5):
        m.train_on_batch(x, onehot)
        if not all((a == b).all() for a, b in zip(m.get_weights(), raw[-1] if raw else start)):
            raw.append(m.get_weights())  # a step the optimizer took (a loss-scale overflow skips one, and the average too)
    assert len(raw) >= 3
    expected = raw[0]  # the average starts at the first step's weights, then moves by half towards each new step
    for w in raw[1:]:
        expected = [0.5 * e + 0.5 * a for e, a in zip(expected, w)]
    with training.averaged_weights(m):
        for a, e in zip(m.get_weights(), expected):
            np.testing.assert_allclose(a, e, atol=1e-6)
        assert not np.allclose(m.get_weights()[0], raw[-1][0])
    for a, b in zip(m.get_weights(), raw[-1]):  # back to the raw weights, which the next step starts from
        np.testing.assert_array_equal(a, b)
    # the Selector scores, and keeps, the averaged weights
    sel = training.Selector(lambda: m.predict(x, verbose=0), np.arange(32) % 3, 0, "loss", 0.95, patience=5)
    sel.score(1, m)
    for a, e in zip(sel.best_weights, expected):
        np.testing.assert_allclose(a, e, atol=1e-6)
    for a, b in zip(m.get_weights(), raw[-1]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.slow  # trains for tens of seconds
def test_finetune_with_weight_averaging_is_deterministic_and_leaves_training_unchanged(tmp_path):
    s = _splits()
    over = {"finetune.unfreeze_from": "block_15", "finetune.views": 1, "finetune.epochs": 3, "finetune.patience": 3,
            "finetune.learning_rate": 0.01, "finetune.monitor": "loss"}
    p = _params(**over, **{"finetune.ema_epochs": 1.0})
    model, _ = training.baseline(p, CLASSES, s, _live(tmp_path / "a"))
    path = tmp_path / "baseline.keras"
    training.save(model, path, training.model_info(p, CLASSES, "COVID"))
    on = [training.finetune(p, CLASSES, s, path, _live(tmp_path / f"on{i}")) for i in range(2)]
    off = training.finetune(_params(**over, **{"finetune.ema_epochs": 0}), CLASSES, s, path, _live(tmp_path / "off"))
    for a, b in zip(on[0][0].get_weights(), on[1][0].get_weights()):  # deterministic
        np.testing.assert_allclose(a, b, atol=1e-6)
    curve = lambda run, name: np.loadtxt(tmp_path / run / "plots" / "metrics" / name, skiprows=1)[:, 1]  # noqa: E731
    # the same training steps: the moving average never feeds back into training
    np.testing.assert_allclose(curve("on0", "train/loss.tsv"), curve("off", "train/loss.tsv"), rtol=1e-5)
    # (which checkpoint is scored and kept, the average, is test_averaged_weights_are_the_moving_average_...)


def test_temperature_scaling_calibrates_and_keeps_the_argmax():
    rng = np.random.default_rng(0)
    z = rng.normal(0, 1.5, (4000, 3))
    fair = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    y = np.array([rng.choice(3, p=row) for row in fair])  # labels drawn from softmax(z): calibrated at T=1
    sharp = np.exp(3 * z) / np.exp(3 * z).sum(axis=1, keepdims=True)  # over-confident by a factor 3
    assert 2.6 < training.fit_temperature(sharp, y) < 3.4
    assert training.fit_temperature(fair, y) == pytest.approx(1.0, abs=0.1)
    m = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    x = rng.integers(0, 256, (4, 32, 32, 1)).astype("float32")
    p1 = m.predict(x, verbose=0)
    models.scale_logits(m, 2.0)
    p2 = m.predict(x, verbose=0)
    expected = np.exp(np.log(p1) / 2.0)
    np.testing.assert_allclose(p2, expected / expected.sum(axis=1, keepdims=True), atol=1e-5)
    assert (p1.argmax(axis=1) == p2.argmax(axis=1)).all()


@pytest.mark.parametrize("arch", ["mobilenetv2", "efficientnetb0", "resnet50", "densenet121"])
def test_every_arch_builds_saves_and_loads_safely(arch, tmp_path):
    m = models.build(arch, 2, 32, "none", alpha=0.35 if arch == "mobilenetv2" else 1.0)
    x = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 1)).astype("float32")
    path = tmp_path / "m.keras"
    m.save(path)
    again = models.load(path)
    np.testing.assert_allclose(m.predict(x, verbose=0), again.predict(x, verbose=0), atol=1e-6)
    from cxr import gradcam

    layer, explain = gradcam.explainer(again, min_side=2)  # a layer where the backbone can be cut, maps for each image
    cams = gradcam.heatmaps(again, x[..., 0].astype(np.uint8), np.array([0, 1]), explain=explain)
    assert cams.shape == (2, 32, 32) and np.isfinite(cams).all() and cams.max() <= 1 and layer in {l.name for l in again.get_layer("backbone").layers}


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
    with pytest.raises(UserError, match="model.weights") as err:
        models.build("efficientnetb0", 3, 32, "imagenet")
    assert "efficientnetb0_notop.h5" in str(err.value) and "connection refused" in str(err.value)


def test_weights_that_do_not_fit_the_arch_name_the_params(tmp_path):
    """model.alpha 0.35 (the demo's) with a weights file of width 1.0, or of another architecture: one line naming
    model.arch, model.alpha, model.weights and clean.image_size, and what differs (not Keras' shape dump)."""
    net = models.backbone("mobilenetv2", 32, "none", alpha=1.0)
    path = tmp_path / "mobilenetv2_alpha1.weights.h5"
    net.save_weights(path)
    with pytest.raises(UserError) as err:
        models.build("mobilenetv2", 3, 32, str(path), alpha=0.35)
    msg = str(err.value)
    assert msg.startswith(f"model.weights={path} does not fit model.arch=mobilenetv2, model.alpha=0.35, clean.image_size=32: "), msg
    assert "Conv1/kernel has shape (3, 3, 3, 32) in the file, (3, 3, 3, 16) in this model" in msg, msg
    assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5" in msg and "\n" not in msg, msg
    # another architecture's file: the alpha is not involved, and is not named
    with pytest.raises(UserError) as err:
        models.build("efficientnetb0", 3, 32, str(path))
    msg = str(err.value)
    assert msg.startswith(f"model.weights={path} does not fit model.arch=efficientnetb0, clean.image_size=32: "), msg
    assert "model.alpha" not in msg and "\n" not in msg and not msg.rstrip(".").endswith(":"), msg


def test_model_init_of_another_arch_names_the_params(tmp_path):
    from cxr import modelinfo

    src = models.build("mobilenetv2", 3, 32, "none", alpha=0.35)
    path = tmp_path / "other.keras"
    modelinfo.save(src, path, {"classes": CLASSES, "positive": "COVID", "image_size": 32, "resize": "pad", "arch": "resnet50",
                               "dataset": "demo"})
    with pytest.raises(UserError, match=r"^model.init=.*other.keras does not fit model.arch=mobilenetv2, model.alpha=0.35, "
                                         r"clean.image_size=32: it is a resnet50 model\. Set model.arch, model.alpha and "
                                         r"clean.image_size to the saved model's \(resnet50, 32 px\)"):
        models.initialise_from(src, path, CLASSES, 0.35)


@pytest.mark.parametrize("keras_message, expected", [
    ("A total of 103 objects could not be loaded. Example error message for object <Conv2D name=Conv1, built=True>:\n\n"
     "The shape of the target variable and the shape of the target value in `variable.assign(value)` must match. "
     "variable.shape=(3, 3, 3, 16), Received: value.shape=(3, 3, 3, 32). Target variable: <Variable path=Conv1/kernel, "
     "shape=(3, 3, 3, 16), dtype=float32, value=[[[[-0.18\n  0.009]]]]>\n\nList of objects that could not be loaded:\n[...]",
     "Conv1/kernel has shape (3, 3, 3, 32) in the file, (3, 3, 3, 16) in this model"),
    ("Shape mismatch in layer #0 (named Conv1)for weight Conv1/kernel. Weight expects shape (3, 3, 3, 16). "
     "Received saved weight with shape (3, 3, 3, 32)", "Conv1/kernel has shape (3, 3, 3, 32) in the file, (3, 3, 3, 16) in this model"),
    ("A total of 104 objects could not be loaded. Example error message for object <Conv2D name=Conv1, built=True>:\n\n"
     "Layer 'Conv1' expected 1 variables, but received 2 variables during loading. Expected: ['kernel']\n\nList of ...",
     "layer Conv1 has 2 weights in the file, 1 in this model"),
    ("Layer count mismatch when loading weights from file. Model expected 106 layers, found 104 saved layers.",
     "the file holds 104 layers, this model 106"),
    ("Something else entirely:\nwith detail", "Something else entirely"),
])
def test_keras_weight_errors_become_one_phrase(keras_message, expected):
    assert models._shape_detail(keras_message) == expected
