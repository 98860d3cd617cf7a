"""cxr.inference and the Grad-CAM renderer on a real (tiny) Keras model and real arrays."""
from pathlib import Path

import numpy as np
import pytest

from cxr import gradcam, images, inference, panels

CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
SIZE = 32


@pytest.fixture(scope="module")
def model():
    from cxr import models

    return models.build("mobilenetv2", len(CLASSES), SIZE, "none", alpha=0.35)


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(0).integers(0, 256, (7, SIZE, SIZE), dtype=np.uint8)


def test_forward_equals_model_predict_for_any_batch_size(model, pixels):
    expected = model.predict(pixels[..., None].astype(np.float32), verbose=0)
    run = inference.forward(model)
    for bs in (1, 3, 64):
        got = inference.probabilities(model, pixels, batch_size=bs, forward_fn=run)
        assert got.dtype == np.float32 and got.shape == (7, 3)
        np.testing.assert_allclose(got, expected, atol=1e-6)
    assert inference.probabilities(model, pixels[:0]).shape == (0, 3)


def test_predict_stream_keeps_order_and_errors(model, pixels):
    error = images.DecodeError("not_an_image", "Pillow cannot\nidentify it")
    items = [images.Item(i, Path(f"x{i}.png"), None if i == 2 else pixels[i], error if i == 2 else None) for i in range(7)]
    seen = []
    proba, errors = inference.predict_stream(reversed(items), inference.forward(model), 3, batch_size=2,
                                             on_batch=lambda idx, x, p: seen.append((idx, x.shape, p.shape)))
    assert errors == ["", "", "not_an_image: Pillow cannot identify it", "", "", "", ""]
    assert np.isnan(proba[2]).all() and np.isfinite(np.delete(proba, 2, axis=0)).all()
    np.testing.assert_allclose(np.delete(proba, 2, axis=0), inference.probabilities(model, np.delete(pixels, 2, axis=0)), atol=1e-6)
    assert [len(idx) for idx, _, _ in seen] == [2, 2, 2] and sorted(i for idx, _, _ in seen for i in idx) == [0, 1, 3, 4, 5, 6]


def test_prediction_table_columns_rows_and_triage():
    proba = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [np.nan, np.nan, np.nan], [0.3, 0.3, 0.4]], np.float32)
    errors = ["", "", "unreadable: truncated", ""]
    op = {"class": "COVID", "threshold": 0.3, "by": "sensitivity", "target": 0.95}
    table = inference.prediction_table(["a", "b", "c", "d"], proba, CLASSES, op, errors=errors)
    assert list(table.columns) == ["path", "argmax_class", "argmax_p", "p_COVID", "p_Normal", "p_Viral Pneumonia", "positive_p",
                                   "triage", "triage_rule", "error"]
    assert table["path"].tolist() == ["a", "b", "c", "d"]                         # the order of the keys given
    assert table["argmax_class"].tolist() == ["COVID", "Normal", "", "Viral Pneumonia"]
    np.testing.assert_allclose(table["argmax_p"], [0.7, 0.8, np.nan, 0.4], rtol=1e-6)
    np.testing.assert_allclose(table["positive_p"], [0.7, 0.1, np.nan, 0.3], rtol=1e-6)
    # the last row: the argmax is Viral Pneumonia, and triage still flags COVID (0.3 >= 0.3)
    assert table["triage"].tolist() == ["COVID suspected", "COVID not suspected", "", "COVID suspected"]
    rule = "COVID suspected when positive_p >= 0.3 (threshold chosen on the validation split for sensitivity 0.95)"
    assert table["triage_rule"].tolist() == [rule, rule, "", rule]
    assert table["error"].tolist() == errors and table["p_COVID"].dtype == np.float32
    assert np.isnan(table.loc[2, "p_COVID"])
    # NaN from the model itself: an error row, never a triage call
    broken = inference.prediction_table(["a"], proba[2:3], CLASSES, op, key="file")
    assert list(broken.columns)[0] == "file" and broken["triage"].tolist() == [""]
    assert broken["error"].iloc[0].startswith("non_finite_output: ")
    plain = inference.prediction_table(["a"], proba[:1], CLASSES)                 # no operating point
    assert (plain[["triage", "triage_rule"]] == "").all().all() and np.isnan(plain["positive_p"]).all()


def test_evaluate_table_is_predicts_with_the_label():
    """reports/test_predictions.csv: predict's columns at the same operating point, the true label after the file,
    probabilities rounded to 6 decimals, no error column (evaluate never fails a row)."""
    from cxr import data, evaluation

    proba = np.array([[0.51, 0.3, 0.19], [0.2, 0.45, 0.35]], np.float32)
    subset = data.Subset(["a.png", "b.png"], np.zeros((2, SIZE, SIZE), np.uint8), np.array([0, 2], np.int32), None)
    op = {"class": "COVID", "threshold": 0.25, "by": "sensitivity", "target": 0.95}
    table = evaluation.prediction_table(subset, proba, CLASSES, op)
    predicted = inference.prediction_table(["a.png", "b.png"], proba, CLASSES, op, key="file")
    assert list(table.columns) == ["file", "label", *[c for c in predicted.columns if c not in ("file", "error")]]
    assert table["label"].tolist() == ["COVID", "Viral Pneumonia"]
    for c in ("argmax_class", "triage", "triage_rule"):
        assert table[c].tolist() == predicted[c].tolist()
    assert table["argmax_p"].tolist() == [0.51, 0.45] and table["positive_p"].tolist() == [0.51, 0.2]
    assert table["triage"].tolist() == ["COVID suspected", "COVID not suspected"]


def test_render_is_a_pure_rgb_array():
    image = np.tile(np.arange(0, 256, 8, dtype=np.uint8), (SIZE, 1))
    cam = np.zeros((SIZE, SIZE), np.float32)
    cam[8:16, 8:16] = 1.0
    rgb = panels.render(image, cam, 0.4, "COVID p=0.900\nsecond line")
    assert rgb.dtype == np.uint8 and rgb.ndim == 3 and rgb.shape[2] == 3
    assert rgb.shape[1] == panels.MIN_SIDE and rgb.shape[0] > panels.MIN_SIDE      # upscaled, under a title bar
    assert 0 <= rgb.min() and rgb.max() <= 255 and rgb.min() < rgb.max()
    np.testing.assert_array_equal(rgb, panels.render(image, cam, 0.4, "COVID p=0.900\nsecond line"))
    plain = panels.overlay(image, cam, 0.0)
    np.testing.assert_array_equal(plain[..., 0], image)                            # alpha 0: the X-ray itself


def test_heatmaps_and_overlay_files(model, pixels, tmp_path):
    cams = gradcam.heatmaps(model, pixels, np.zeros(len(pixels), np.int32), batch_size=3)
    assert cams.shape == pixels.shape and cams.min() >= 0 and cams.max() <= 1
    proba = inference.probabilities(model, pixels[:2])
    proba[1] = np.nan
    files = [tmp_path / "a.png", tmp_path / "b.png"]
    gradcam.write_overlays(model, pixels[:2], proba, CLASSES, {"class": "COVID", "threshold": 0.5}, files)
    assert files[0].is_file() and not files[1].exists()                            # no picture for a NaN row


def test_overlay_titles_keep_the_argmax_and_the_triage_call_apart(model, pixels, tmp_path, monkeypatch):
    titles = []
    monkeypatch.setattr(panels, "save_png", lambda path, rgb: None)
    monkeypatch.setattr(panels, "render", lambda image, cam, alpha, title: titles.append(title))
    proba = np.array([[0.3, 0.5, 0.2], [0.2, 0.1, 0.7]], np.float32)
    op = {"class": "COVID", "threshold": 0.25}
    gradcam.write_overlays(model, pixels[:2], proba, CLASSES, op, [tmp_path / "a.png", tmp_path / "b.png"])
    assert titles == ["argmax Normal p=0.500\ntriage: COVID suspected (positive_p 0.300 >= 0.25)",
                      "argmax Viral Pneumonia p=0.700\ntriage: COVID not suspected (positive_p 0.200 < 0.25)"]
    titles.clear()
    gradcam.write_overlays(model, pixels[:1], proba[:1], CLASSES, None, [tmp_path / "a.png"])
    assert titles == ["argmax Normal p=0.500"]


def test_outline_marks_the_masks_border_and_panels_carry_a_colour_scale(tmp_path):
    from PIL import Image

    image = np.full((SIZE, SIZE), 100, np.uint8)
    cam = np.zeros((SIZE, SIZE), np.float32)
    mask = np.zeros((SIZE, SIZE), bool)
    mask[8:20, 8:20] = True
    out = panels.overlay(image, cam, 0.4, outline=mask)
    green = (out == panels.OUTLINE).all(axis=-1)
    assert green[8, 8:20].all() and green[19, 8:20].all() and green[8:20, 8].all()   # the border ...
    assert not green[9:19, 9:19].any() and not green[~mask].any()                    # ... and only the border
    np.testing.assert_array_equal(panels.overlay(image, cam, 0.4, outline=np.zeros_like(mask)), panels.overlay(image, cam, 0.4))
    bar = panels.colorbar(100)
    assert bar.shape[0] == 100 and tuple(bar[0, 0]) != tuple(bar[-1, 0])             # max at the top, 0 at the bottom
    panels.figure(tmp_path / "p.png", np.stack([image, image]), np.stack([cam, cam]), ["a", "b"], "t", 0.4, np.stack([mask, mask]))
    with Image.open(tmp_path / "p.png") as png:
        assert png.width >= 2 * panels.MIN_SIDE + bar.shape[1]
