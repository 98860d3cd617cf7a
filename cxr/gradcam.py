"""Grad-CAM (Selvaraju et al. 2017) on the project's models, and how well maps match known lesions.

The model is a chain ending in `backbone -> pool -> dropout -> predictions`; the target layer is the last
layer with a 4-D output inside the nested backbone (its last conv feature map), found automatically.
"""
from __future__ import annotations

import numpy as np


def target_layer(model, min_side: int = 7):
    """(backbone, name of its target layer): the last layer with a 4-D output at least `min_side` pixels
    across (padding layers excepted). At the usual 224 px that is the last conv feature map (7x7 for all
    four architectures); for small inputs, whose last map is 2x2, an earlier and finer one."""
    net = model.get_layer("backbone")
    import keras

    maps = [layer for layer in net.layers
            if len(layer.output.shape) == 4 and not isinstance(layer, keras.layers.ZeroPadding2D)]
    if not maps:
        raise ValueError("no 4-D feature map in the backbone")
    wide = [layer for layer in maps if min(layer.output.shape[1:3]) >= min_side]
    return net, (wide or maps)[-1].name


def heatmaps(model, images: np.ndarray, class_index: np.ndarray | None = None, batch_size: int = 32,
             min_side: int = 7) -> tuple[np.ndarray, np.ndarray]:
    """Grad-CAM maps (N, S, S) in [0, 1] for uint8 images (N, S, S), for the given classes (default: the
    predicted ones). Returns (maps, probabilities)."""
    import keras
    import tensorflow as tf

    from . import models

    net, layer_name = target_layer(model, min_side)
    inner = keras.Model(net.inputs, [net.get_layer(layer_name).output, net.output])
    before, after = models.outer_layers(model)
    size = images.shape[1:3]
    maps, probs = [], []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start : start + batch_size, ..., None], tf.float32)
        for layer in before:
            x = layer(x, training=False)
        with tf.GradientTape() as tape:
            feats, y = inner(x, training=False)
            tape.watch(feats)
            for layer in after:
                y = layer(y, training=False)
            idx = tf.argmax(y, axis=1) if class_index is None else tf.constant(class_index[start : start + batch_size])
            score = tf.gather(y, idx, axis=1, batch_dims=1)
        grads = tape.gradient(score, feats)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * feats, axis=-1))
        cam = tf.image.resize(cam[..., None], size, method="bilinear")[..., 0]
        peak = tf.reduce_max(cam, axis=(1, 2), keepdims=True)
        maps.append((cam / tf.maximum(peak, 1e-12)).numpy())
        probs.append(y.numpy())
    return np.concatenate(maps), np.concatenate(probs)


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


def overlay(image: np.ndarray, cam: np.ndarray, alpha: float = 0.4) -> np.ndarray:
    """RGB uint8: the grayscale X-ray with the map in a 'jet' colour scale on top."""
    from matplotlib import colormaps

    rgb = np.repeat(image[..., None].astype(np.float32) / 255.0, 3, axis=-1)
    heat = colormaps["jet"](cam)[..., :3]
    return (np.clip((1 - alpha) * rgb + alpha * heat, 0, 1) * 255).astype(np.uint8)
