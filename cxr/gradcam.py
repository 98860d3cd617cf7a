"""Grad-CAM (Selvaraju et al. 2017): the maps, how well they match known lesions, the gradcam stage, predict's overlays.

The model is a chain ending in `backbone -> pool -> dropout -> predictions`; the target layer is the last
layer with a 4-D output inside the nested backbone (its last conv feature map), found automatically.
"""
from __future__ import annotations

import collections
import logging
import os
from pathlib import Path

import numpy as np

from . import atomic, data, inference, metrics, modelinfo, panels, paths, progress

log = logging.getLogger("gradcam")


def target_layer(model, min_side: int = 7):
    """(backbone, name of its target layer): the last layer with a 4-D output at least `min_side` pixels
    across (padding layers excepted) where the backbone can be cut, i.e. nothing above it reads a tensor below
    it. At the usual 224 px that is the last conv feature map (7x7 for all four architectures); for small
    inputs, whose last map is 2x2, an earlier and finer one, at a block's end."""
    net, layer_name, _ = _cut(model, min_side)
    return net, layer_name


def _cut(model, min_side: int):
    """(backbone, target layer name, the backbone above it: _top's model, or None at the backbone's output)."""
    net = model.get_layer("backbone")
    import keras

    maps = [layer for layer in net.layers
            if len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.ZeroPadding2D)]
    if not maps:
        raise ValueError("no 4-D feature map in the backbone")
    wide = [layer for layer in maps if min(layer.output.shape[1:3]) >= min_side] or maps
    for layer in reversed(wide):
        top = _top(net, layer.name)
        if top is not False:
            return net, layer.name, top
    return net, maps[-1].name, _top(net, maps[-1].name)  # the backbone's own output: nothing above it


def _top(net, layer_name: str):
    """The backbone above `layer_name` as a model from that layer's output to the backbone's output; None when
    the layer is the backbone's last; False when the backbone cannot be cut there."""
    import keras

    out = net.get_layer(layer_name).output
    if out is net.output:
        return None
    try:
        return keras.Model(out, net.output, name="backbone_above_target")
    except ValueError:
        return False


def explainer(model, min_side: int = 7):
    """(layer name, explain): explain(uint8 images (B, S, S), class indices (B,)) -> Grad-CAM maps (B, S, S) in
    [0, 1], each for its class. The model is cut at the target layer (target_layer): the part below it runs as
    one compiled inference call, the part above it is differentiated by the backend in use
    (backend.input_gradients), so TensorFlow, JAX and PyTorch give the same maps."""
    import keras

    from . import backend, models

    net, layer_name, top = _cut(model, min_side)
    inp = keras.Input(model.input_shape[1:], name="image")
    below = backend.inference_function(keras.Model(inp, keras.Model(net.inputs, net.get_layer(layer_name).output)(
        models.before_backbone(model)(inp)), name="below_target"))
    after = models.outer_layers(model)[1]

    def explain(images: np.ndarray, class_index: np.ndarray) -> np.ndarray:
        feats = below(np.asarray(images, dtype=np.float32)[..., None])
        picked = keras.ops.convert_to_tensor(np.asarray(class_index, np.int32)[:, None])

        def score(f):
            y = top(f, training=False) if top else f
            for layer in after:
                y = layer(y, training=False)
            return keras.ops.take_along_axis(keras.ops.cast(y, "float32"), picked, axis=1)[:, 0]

        _, grads = backend.input_gradients(score, feats)
        weights = grads.astype(np.float32).mean(axis=(1, 2), keepdims=True)
        cam = np.maximum((weights * feats.astype(np.float32)).sum(axis=-1), 0.0)
        cam = backend.to_numpy(keras.ops.image.resize(cam[..., None], images.shape[1:3], interpolation="bilinear"))[..., 0]
        return cam / np.maximum(cam.max(axis=(1, 2), keepdims=True), 1e-12)

    return layer_name, explain


def heatmaps(model, images: np.ndarray, class_index: np.ndarray, batch_size: int = 32, min_side: int = 7,
             desc: str | None = None, explain=None) -> np.ndarray:
    """Grad-CAM maps (N, S, S) in [0, 1] for uint8 images (N, S, S), each for the class class_index[i]
    (e.g. the predicted one: inference.probabilities(...).argmax(axis=1)); with `desc`, a progress bar.
    `explain`: an explainer's function, to reuse its compiled parts across calls."""
    explain = explain or explainer(model, min_side)[1]
    class_index = np.asarray(class_index, np.int32)
    maps = [explain(images[start : start + batch_size], class_index[start : start + batch_size])
            for start in progress.batches(len(images), batch_size, desc)]
    return np.concatenate(maps).astype(np.float32) if maps else np.zeros((0, *images.shape[1:3]), np.float32)


def energy_inside(cam: np.ndarray, mask: np.ndarray) -> float | None:
    """Share of the map's total energy inside the mask (None for an empty mask or map)."""
    total = float(cam.sum())
    if not mask.any() or total <= 0:
        return None
    return float(cam[mask].sum() / total)


def pointing_hit(cam: np.ndarray, mask: np.ndarray, tolerance: int = 0) -> bool | None:
    """Pointing game: is the map's maximum inside the mask (dilated by `tolerance` px)?"""
    if not mask.any():
        return None
    if tolerance:
        from scipy.ndimage import binary_dilation

        mask = binary_dilation(mask, iterations=tolerance)
    r, c = np.unravel_index(int(np.argmax(cam)), cam.shape)
    return bool(mask[r, c])


def localisation(cams: np.ndarray, masks: np.ndarray) -> dict:
    """Mean energy-inside share and pointing-game hit rate over images with a non-empty mask, next to
    what a uniform map would score (the mask's area share) as a baseline."""
    energy, hits, area = [], [], []
    for cam, mask in zip(cams, masks):
        e = energy_inside(cam, mask)
        if e is None:
            continue
        energy.append(e)
        hits.append(pointing_hit(cam, mask))
        area.append(float(mask.mean()))
    if not energy:
        return {"n": 0, "energy_inside": None, "pointing_game": None, "uniform_energy_inside": None}
    return {"n": len(energy), "energy_inside": round(float(np.mean(energy)), 4),
            "pointing_game": round(float(np.mean(hits)), 4), "uniform_energy_inside": round(float(np.mean(area)), 4)}


# --- the gradcam stage --------------------------------------------------------------------------------

def run(cfg: dict, classes: list[str], box: list[float], model_path: Path = paths.FINETUNED,
        out: Path = paths.PLOTS / "gradcam", metrics_path: Path = paths.METRICS / "gradcam.json") -> dict:
    """The gradcam stage (`cfg`: params `gradcam`): one panel of test images per class into `out`
    (<class key>.png); how much of each test image's map (of the class it explains) lies in the lungs: its
    lung mask where the dataset ships one, else `box` (params `external.probes.box`, the probes' lung region);
    and, where lesion masks are known, how well the true class's maps localise them. Writes and returns the
    metrics. Each (image, class) map is computed once."""
    from . import models, probes

    test = data.load_splits(classes, only=("test",))["test"]
    model = models.load(model_path)
    proba = inference.probabilities(model, test.images, desc="test split")
    explains = "predicted class" if cfg["class"] == "predicted" else cfg["class"]
    target = proba.argmax(axis=1) if cfg["class"] == "predicted" else np.full(len(test), classes.index(cfg["class"]))
    chosen = {k: panels.pick(test.labels, proba, k, cfg["per_class"]) for k in range(len(classes))}
    # Localisation is measured for the class whose lesion the mask marks: the true class.
    lesion = np.flatnonzero(test.masks.any(axis=(1, 2))) if test.masks is not None else np.zeros(0, int)
    wanted = [(i, int(target[i])) for i in range(len(test))] + [(int(i), int(test.labels[i])) for i in lesion]
    pairs = list(dict.fromkeys(wanted))
    idx = np.array([i for i, _ in pairs], int)
    layer_name, explain = explainer(model, cfg["min_side"])
    cams = heatmaps(model, test.images[idx], np.array([c for _, c in pairs], np.int32), desc="Grad-CAM", explain=explain)
    cam_of = {pair: cams[n] for n, pair in enumerate(pairs)}
    with atomic.atomic_dir(out) as tmp:
        for k, name in enumerate(classes):
            titles = [f"true {name}\npred {classes[proba[i].argmax()]} p={proba[i].max():.2f}" for i in chosen[k]]
            outlines = test.masks[chosen[k]] if test.masks is not None else None
            panels.figure(tmp / f"{metrics.class_key(name)}.png", test.images[chosen[k]],
                          np.array([cam_of[(i, int(target[i]))] for i in chosen[k]]), titles,
                          f"Grad-CAM ({explains}): test images of class {name}"
                          + ("; green: the known lesion" if outlines is not None and outlines.any() else ""),
                          cfg["alpha"], outlines)
    result = {"images": len(test), "layer": layer_name}
    regions, region_counts = probes.lung_regions(test.images.shape, box, test.lungs)
    explained = np.array([cam_of[(i, int(target[i]))] for i in range(len(test))]).reshape(test.images.shape)
    result["lungs"] = {"explains": explains, "region": region_counts, **localisation(explained, regions)}
    log.info("share of the Grad-CAM energy in the lungs (%s): %s, uniform map %s", region_counts,
             result["lungs"]["energy_inside"], result["lungs"]["uniform_energy_inside"])
    if test.masks is not None:
        true_cams = np.array([cam_of[(int(i), int(test.labels[i]))] for i in lesion]).reshape(len(lesion), *test.images.shape[1:])
        result["localisation"] = localisation(true_cams, test.masks[lesion])
        log.info("localisation on %d lesion images: %s", result["localisation"]["n"], result["localisation"])
    atomic.write_json(metrics_path, result)
    log.info("panels in %s", out)
    return result


# --- overlays of `python -m cxr predict --gradcam` ------------------------------------------------------

def overlay_names(files: list[Path]) -> list[str]:
    """One PNG file name per input, named after it: `<stem>.png`; files sharing a stem get their folders
    (relative to the inputs' common folder) joined with '__' (`a__x.png`, `b__x.png`), plus the original
    suffix where that still collides (`x_jpg.png`), plus `-<n>` as a last resort."""
    def safe(s: str) -> str:
        return "".join(ch if ch.isalnum() or ch in "-_. " else "_" for ch in s).strip() or "image"

    stems = collections.Counter(f.stem for f in files)
    try:
        common = Path(os.path.commonpath([str(f.parent.absolute()) for f in files])) if files else Path()
    except ValueError:  # different drives
        common = None
    names = []
    for f in files:
        if stems[f.stem] == 1:
            names.append(safe(f.stem))
            continue
        parent = f.parent.absolute()
        rel = parent.relative_to(common).parts if common is not None and parent.is_relative_to(common) else parent.parts[1:]
        names.append(safe("__".join([*rel, f.stem])))
    counts = collections.Counter(n.lower() for n in names)  # case-insensitive: macOS and Windows disks
    names = [safe(f"{n}_{f.suffix.lstrip('.')}") if counts[n.lower()] > 1 and f.suffix else n for n, f in zip(names, files)]
    counts = collections.Counter(n.lower() for n in names)
    taken = {n.lower() for n in names if counts[n.lower()] == 1}
    out = []
    for n in names:
        if counts[n.lower()] > 1:
            k = 1
            while f"{n}-{k}".lower() in taken:
                k += 1
            n = f"{n}-{k}"
            taken.add(n.lower())
        out.append(f"{n}.png")
    return out


def write_overlays(model, pixels: np.ndarray, proba: np.ndarray, classes: list[str], operating_point: dict | None,
                   files: list[Path], alpha: float = 0.4, explain=None) -> None:
    """For a batch of images and their probabilities: the Grad-CAM overlay of each one's predicted class,
    titled with the argmax class and, under it, the triage call with the positive class's probability against the
    threshold (the two can differ), as PNG files (panels.render); none for non-finite rows. `explain`: an
    explainer's function, built once for many batches."""
    finite = np.isfinite(proba).all(axis=1)
    pred = np.nan_to_num(proba).argmax(axis=1)
    cams = heatmaps(model, pixels, pred, batch_size=len(pixels), explain=explain)
    calls = inference.triage(np.nan_to_num(proba), classes, operating_point)
    for k, path in enumerate(files):
        if not finite[k]:
            continue
        title = f"argmax {classes[pred[k]]} p={proba[k, pred[k]]:.3f}"
        if operating_point is not None:
            pos_p = float(proba[k, classes.index(operating_point["class"])])
            sign = ">=" if calls[k] == modelinfo.triage_labels(operating_point["class"])[0] else "<"
            title += f"\ntriage: {calls[k]} (positive_p {pos_p:.3f} {sign} {operating_point['threshold']:.3g})"
        panels.save_png(path, panels.render(pixels[k], cams[k], alpha, title))
