"""Training-time augmentation as one Keras layer that every backend can compile.

Keras' RandomRotation, RandomTranslation and RandomZoom mark themselves as not jit-compilable, so a JAX model
that contains them trains eagerly (measured: 7x slower per epoch on CPU, and far worse on a GPU), and each
resamples the image once, three interpolations in a row. RandomAffine draws the same random rotation,
translation, zoom and flip per image, composes them into one affine map and resamples once with
keras.ops.image.affine_transform, which compiles on TensorFlow, JAX and PyTorch. Identity at inference.
"""
from __future__ import annotations

import math

import keras


@keras.saving.register_keras_serializable(package="cxr")
class RandomAffine(keras.layers.Layer):
    """Per image: rotation by U(-rotation, rotation) of a full turn, shift by U(-translation, translation) of
    the height and width, isotropic zoom by 1 + U(-zoom, zoom) (above 1 zooms out, as in keras' RandomZoom),
    and a horizontal flip with probability 0.5 when `flip`; about the image centre, bilinear, the outside filled
    with 0 (black). Input (B, H, W, C), channels last."""

    def __init__(self, rotation: float = 0.0, translation: float = 0.0, zoom: float = 0.0, flip: bool = False,
                 seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rotation, self.translation, self.zoom, self.flip, self.seed = rotation, translation, zoom, flip, seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        b, h, w = shape[0], shape[1], shape[2]

        def uniform(limit):
            return keras.random.uniform((b,), -limit, limit, seed=self.generator) if limit else ops.zeros((b,))

        angle = uniform(self.rotation * 2 * math.pi)
        scale = 1.0 + uniform(self.zoom)
        tx, ty = uniform(self.translation) * ops.cast(w, "float32"), uniform(self.translation) * ops.cast(h, "float32")
        f = (ops.where(keras.random.uniform((b,), 0.0, 1.0, seed=self.generator) < 0.5, -1.0, 1.0)
             if self.flip else ops.ones((b,)))
        cx, cy = (ops.cast(w, "float32") - 1) / 2, (ops.cast(h, "float32") - 1) / 2
        # output pixel p -> input pixel c + scale * R(angle) * F * (p - c) + t
        a0, a1 = scale * ops.cos(angle) * f, -scale * ops.sin(angle)
        b0, b1 = scale * ops.sin(angle) * f, scale * ops.cos(angle)
        a2, b2 = cx - a0 * cx - a1 * cy + tx, cy - b0 * cx - b1 * cy + ty
        zero = ops.zeros((b,))
        transform = ops.stack([a0, a1, a2, b0, b1, b2, zero, zero], axis=1)
        out = ops.image.affine_transform(ops.cast(images, "float32"), transform, interpolation="bilinear",
                                         fill_mode="constant", fill_value=0)
        return ops.cast(out, self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rotation": self.rotation, "translation": self.translation, "zoom": self.zoom,
                "flip": self.flip, "seed": self.seed}


@keras.saving.register_keras_serializable(package="cxr")
class OutsideFill(keras.layers.Layer):
    """Per image, with probability `rate`: every pixel outside `box` (x0, y0, x1, y1 as fractions of the width
    and height, the region where the lungs of a padded frontal radiograph lie) replaced by the image's own
    mean gray level, the same fill as the lungs-only shortcut probe. Text, markers, borders and devices around
    the chest then carry no label on those images, so the classes must be told apart by the lungs. Identity at
    inference. Input (B, H, W, C), channels last."""

    def __init__(self, rate: float = 0.0, box=(0.15, 0.15, 0.85, 0.85), seed: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.rate, self.box, self.seed = float(rate), [float(v) for v in box], seed
        self.generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training or not self.rate:
            return images
        ops = keras.ops
        shape = ops.shape(images)
        b, h, w = shape[0], shape[1], shape[2]
        x0, y0, x1, y1 = self.box
        # the probes' rows round(y0 * h) .. round(y1 * h) - 1, likewise columns (cxr.probes.box_slices)
        rows = ops.cast(ops.arange(h), "float32")[:, None]
        cols = ops.cast(ops.arange(w), "float32")[None, :]
        hf, wf = ops.cast(h, "float32"), ops.cast(w, "float32")
        inside = ((rows >= ops.round(y0 * hf)) & (rows < ops.round(y1 * hf))
                  & (cols >= ops.round(x0 * wf)) & (cols < ops.round(x1 * wf)))
        chosen = keras.random.uniform((b,), 0.0, 1.0, seed=self.generator) < self.rate
        fill = chosen[:, None, None, None] & ~inside[None, :, :, None]
        x = ops.cast(images, "float32")
        mean = ops.mean(x, axis=(1, 2, 3), keepdims=True)
        return ops.cast(ops.where(fill, mean, x), self.compute_dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "rate": self.rate, "box": self.box, "seed": self.seed}
