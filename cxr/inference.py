"""Running a trained model on images: the one forward pass and the one prediction table.

    uint8 (N, S, S) raw 0..255 pixels -> forward (the model does its own preprocessing) -> float32 (N, classes)
      -> prediction_table: key, argmax_class, argmax_p, p_<class>..., positive_p, triage, triage_rule, error

evaluate, gradcam, `python -m cxr predict` and bench/predict.py all run models through `forward`, and
evaluate's reports/test_predictions.csv and predict's CSV are both built by `prediction_table`, so the test
that predict reproduces evaluate guards one code path. The Keras backend is loaded only when a model runs.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from . import modelinfo, progress
from .errors import UserError

Forward = Callable[[np.ndarray], np.ndarray]
NON_FINITE = "non_finite_output: the model returned NaN or infinite probabilities"


def load_model(model_path: Path, info: dict):
    """models.load, and a check that the model matches its info sidecar (modelinfo.read_info)."""
    from . import models

    model = models.load(model_path)
    n, size = len(info["classes"]), int(info["image_size"])
    if model.output_shape[-1] != n or tuple(model.input_shape[1:3]) != (size, size):
        raise UserError(f"{model_path} (input {model.input_shape[1:3]}, {model.output_shape[-1]} outputs) does not match its "
                        f"info sidecar ({size}x{size}, {n} classes): retrain or restore both files together")
    return model


def forward(model) -> Forward:
    """uint8 (B, S, S) images -> float32 (B, classes) probabilities: the model's inference call
    (`model(x, training=False)`, the step model.predict runs), compiled once for any batch size on the Keras
    backend in use (backend.inference_function)."""
    from . import backend

    fn = backend.inference_function(model)
    return lambda batch: fn(np.asarray(batch, dtype=np.float32)[..., None])


def probabilities(model, images: np.ndarray, batch_size: int = 64, forward_fn: Forward | None = None,
                  desc: str | None = None) -> np.ndarray:
    """Class probabilities, float32 (N, classes), for uint8 images (N, S, S) held in memory, in batches; with
    `desc`, a progress bar of that name on a terminal (progress.bar)."""
    if len(images) == 0:
        return np.zeros((0, model.output_shape[-1]), np.float32)
    run = forward_fn or forward(model)
    return np.concatenate([run(images[i : i + batch_size]) for i in progress.batches(len(images), batch_size, desc)])


def predict_stream(items: Iterable, forward_fn: Forward, n_classes: int, batch_size: int = 32,
                   on_batch: Callable[[list[int], np.ndarray, np.ndarray], None] | None = None) -> tuple[np.ndarray, list[str]]:
    """Probabilities for decoded images as they arrive (images.Item: value = pixels, or error), in batches of
    batch_size, so the decoding workers decode the next files while the model runs. Returns (float32 (N,
    classes), NaN where a file failed; error per item, '' or `reason: detail`), in the items' index order.
    on_batch(indices, pixels, probabilities) is called after each batch (e.g. to draw Grad-CAM overlays)."""
    proba: dict[int, np.ndarray] = {}
    errors: dict[int, str] = {}
    failed_row = np.full(n_classes, np.nan, np.float32)

    def run(batch: list) -> None:
        x = np.stack([it.value for it in batch])
        p = forward_fn(x)
        indices = [it.index for it in batch]
        for i, row in zip(indices, p):
            proba[i], errors[i] = row, ""
        if on_batch is not None:
            on_batch(indices, x, p)

    batch = []
    for it in items:
        if it.error is not None:
            proba[it.index] = failed_row
            errors[it.index] = " ".join(f"{it.error.reason}: {it.error.detail}".split())
            continue
        batch.append(it)
        if len(batch) == batch_size:
            run(batch)
            batch = []
    if batch:
        run(batch)
    order = sorted(proba)
    table = np.stack([proba[i] for i in order]).astype(np.float32) if order else np.zeros((0, n_classes), np.float32)
    return table, [errors[i] for i in order]


def triage(proba: np.ndarray, classes: Sequence[str], operating_point: dict | None) -> np.ndarray:
    """The triage column: `<class> suspected` where the positive class's probability reaches the operating
    point's threshold (compared in float64), `<class> not suspected` elsewhere; '' without an operating point."""
    proba = np.asarray(proba, np.float64).reshape(-1, len(classes))
    if operating_point is None:
        return np.full(len(proba), "", dtype=object)
    pos = list(classes).index(operating_point["class"])
    called, not_called = modelinfo.triage_labels(operating_point["class"])
    return np.where(proba[:, pos] >= float(operating_point["threshold"]), called, not_called).astype(object)


def columns(classes: Sequence[str], key: str = "path") -> list[str]:
    return [key, "argmax_class", "argmax_p", *[f"p_{c}" for c in classes], "positive_p", "triage", "triage_rule", "error"]


def prediction_table(keys: Sequence[str], proba: np.ndarray, classes: Sequence[str], operating_point: dict | None = None, *,
                     errors: Sequence[str] | None = None, key: str = "path"):
    """One row per image (pandas DataFrame, columns()), in the order of `keys`:
      `key`         the file
      argmax_class  the class with the highest probability, argmax_p its probability
      p_<class>     every class's probability (float32)
      positive_p    the probability of the operating point's (positive) class: what triage thresholds
      triage        `<class> suspected` / `<class> not suspected` (see triage()); it can differ from the
                    argmax, since the threshold is chosen for a sensitivity, not at 0.5
      triage_rule   the rule in words, with the threshold (modelinfo.triage_rule)
      error         '' or why the row has no prediction
    Without an operating point, positive_p, triage and triage_rule are empty. A row with an error (a file that
    could not be decoded), or whose probabilities are not finite (a broken model: never a triage call on NaN),
    has every prediction column empty and says why in `error`."""
    import pandas as pd

    classes = list(classes)
    proba = np.asarray(proba, np.float32).reshape(len(keys), len(classes))
    errors = ["" for _ in keys] if errors is None else list(errors)
    finite = np.isfinite(proba).all(axis=1)
    errors = [e or ("" if ok else NON_FINITE) for e, ok in zip(errors, finite)]
    ok = np.array([e == "" for e in errors], dtype=bool)
    safe = np.nan_to_num(proba)
    best = safe.argmax(axis=1) if len(safe) else np.zeros(0, dtype=int)
    empty = np.full(len(keys), np.nan, np.float32)
    table = pd.DataFrame({key: list(keys), "argmax_class": np.where(ok, np.array(classes, dtype=object)[best], ""),
                          "argmax_p": np.where(ok, safe[np.arange(len(safe)), best], np.nan).astype(np.float32)})
    for k, c in enumerate(classes):
        table[f"p_{c}"] = np.where(ok, proba[:, k], np.nan).astype(np.float32)
    if operating_point is None:
        table["positive_p"], rule = empty, ""
    else:
        table["positive_p"] = table[f"p_{operating_point['class']}"]
        rule = modelinfo.triage_rule(operating_point)
    table["triage"] = np.where(ok, triage(safe, classes, operating_point), "")
    table["triage_rule"] = np.where(ok, rule, "")
    table["error"] = errors
    return table[columns(classes, key)]
