"""ImageNet weights of the backbones: the file keras.applications fetches for each one, and where Keras keeps it.

Keras downloads the file on first use into `<Keras home>/models/` (`~/.keras/models/`, or `$KERAS_HOME/models/`)
and reads it from there afterwards. The names and addresses mirror keras.applications (tests/test_needs.py
checks them against it); this module imports neither Keras nor TensorFlow, so a check of what a run needs
stays light.
"""
from __future__ import annotations

import os
from pathlib import Path

MOBILENETV2_SIZES = (96, 128, 160, 192, 224)   # input sides MobileNetV2 has ImageNet weights for; others get 224's
_BASE = "https://storage.googleapis.com/tensorflow/keras-applications/"
_FILES = {
    "efficientnetb0": "https://storage.googleapis.com/keras-applications/efficientnetb0_notop.h5",
    "resnet50": _BASE + "resnet/resnet50_weights_tf_dim_ordering_tf_kernels_notop.h5",
    "densenet121": _BASE + "densenet/densenet121_weights_tf_dim_ordering_tf_kernels_notop.h5",
}


def url(arch: str, alpha: float = 1.0, image_size: int = 224) -> str:
    """Where keras.applications downloads the ImageNet weights (include_top=False) of `arch` from."""
    if arch == "mobilenetv2":
        rows = image_size if image_size in MOBILENETV2_SIZES else 224
        return f"{_BASE}mobilenet_v2/mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_{rows}_no_top.h5"
    return _FILES[arch]


def file_name(arch: str, alpha: float = 1.0, image_size: int = 224) -> str:
    return url(arch, alpha, image_size).rsplit("/", 1)[1]


def cache_dirs() -> list[Path]:
    """Where Keras keeps downloaded weights, in the order it looks: `$KERAS_HOME/models` (default
    `~/.keras/models`), or `/tmp/.keras/models` when that home cannot be written."""
    home = os.environ["KERAS_HOME"] if "KERAS_HOME" in os.environ else os.path.join(
        os.path.expanduser("~") if os.access(os.path.expanduser("~"), os.W_OK) else "/tmp", ".keras")
    return [Path(home).expanduser() / "models", Path("/tmp/.keras/models")]


def cached(arch: str, alpha: float = 1.0, image_size: int = 224) -> Path | None:
    """The weights file Keras would use without downloading, or None."""
    name = file_name(arch, alpha, image_size)
    return next((d / name for d in cache_dirs() if (d / name).is_file()), None)


def describe(arch: str, alpha: float, image_size: int) -> str:
    """The params that decide a backbone's layer shapes: model.arch, model.alpha (MobileNetV2's width, the only
    arch that reads it) and clean.image_size, as `key=value` pairs."""
    return f"model.arch={arch}" + (f", model.alpha={alpha}" if arch == "mobilenetv2" else "") + f", clean.image_size={image_size}"
