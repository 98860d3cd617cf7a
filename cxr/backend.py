"""The one module that knows which Keras backend runs: TensorFlow (the default), JAX or PyTorch, chosen as Keras
chooses it (the KERAS_BACKEND environment variable, else ~/.keras/keras.json). Everything else in the model path
is plain Keras (keras.ops, layers, fit/predict) and numpy, so the same code trains, evaluates, explains and
predicts on all three; only seeding for determinism, multi-device training, the compiled inference call, input
gradients (Grad-CAM) and dvclive's Keras callback differ per backend, and live here. Each backend's own
package is imported only when it is the one in use, so JAX or PyTorch runs need no TensorFlow installed.
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Callable

import numpy as np

log = logging.getLogger("backend")

BACKENDS = ("tensorflow", "jax", "torch")


def name() -> str:
    import keras

    return keras.backend.backend()


def to_numpy(x) -> np.ndarray:
    """A backend tensor (on any device) or array as a numpy array."""
    import keras

    return np.asarray(keras.ops.convert_to_numpy(x))


def seed_everything(seed: int, deterministic: bool = True) -> None:
    """Seeds Python, numpy and the backend (keras.utils.set_random_seed); with `deterministic`, the backend's
    deterministic kernels too, so the same params and data give the same weights. TensorFlow: op determinism
    (XLA, runtime.xla, needs it off); JAX: deterministic on CPU, and XLA's deterministic GPU ops when set before
    JAX starts (XLA_FLAGS); PyTorch: torch.use_deterministic_algorithms."""
    import keras

    backend = name()
    if backend == "jax" and deterministic:
        _jax_gpu_determinism()
    keras.utils.set_random_seed(seed)
    if backend == "tensorflow":
        import tensorflow as tf

        if deterministic:
            tf.config.experimental.enable_op_determinism()
        else:
            from tensorflow.python.framework import config  # the public API can only switch it on

            config.disable_op_determinism()
            log.info("XLA on: deterministic ops off, results may vary slightly between runs")
    elif backend == "torch":
        import torch

        if deterministic:
            os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(deterministic, warn_only=True)


def _jax_gpu_determinism() -> None:
    """Ask XLA for deterministic GPU kernels. JAX reads XLA_FLAGS once, when it first starts its devices (the
    first array it makes), so this comes before anything runs; a user's own XLA_FLAGS are kept."""
    flag = "--xla_gpu_deterministic_ops=true"
    if flag not in os.environ.get("XLA_FLAGS", ""):
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + flag).strip()


class Devices:
    """Where training runs: `replicas` devices, and scope() to build the model under (TensorFlow's
    MirroredStrategy scope; JAX's keras.distribution.DataParallel is global, set by configure)."""

    def __init__(self, replicas: int = 1, strategy=None, kind: str = "one device"):
        self.replicas, self.strategy, self.kind = replicas, strategy, kind

    def scope(self):
        return self.strategy.scope() if self.strategy is not None else contextlib.nullcontext()


def _gpus() -> list:
    import keras

    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        return tf.config.list_logical_devices("GPU")
    if backend == "jax":
        return keras.distribution.list_devices("gpu") if _has_platform("gpu") else []
    import torch

    return [f"cuda:{i}" for i in range(torch.cuda.device_count())]


def _has_platform(platform: str) -> bool:
    import jax

    try:
        return bool(jax.devices(platform))
    except RuntimeError:
        return False


def configure(runtime: dict) -> Devices:
    """Mixed precision and multi-device data parallelism (params `runtime`). `distribute: auto` spreads each
    batch over all visible GPUs when there are 2 or more; `all` over every visible device, CPUs included (JAX
    sees several with XLA_FLAGS=--xla_force_host_platform_device_count=N, TensorFlow with logical devices: how
    the path is tested without GPUs); `none` keeps one device. TensorFlow: tf.distribute.MirroredStrategy; JAX:
    keras.distribution.DataParallel (also across hosts, after keras.distribution.initialize()); PyTorch: one
    device (Keras has no multi-device training for it)."""
    import keras

    keras.mixed_precision.set_global_policy("mixed_float16" if runtime["mixed_precision"] else "float32")
    backend, mode = name(), runtime["distribute"]
    gpus = _gpus()
    devices = Devices()
    if backend == "tensorflow":
        import tensorflow as tf

        many = gpus if len(gpus) > 1 else (tf.config.list_logical_devices("CPU") if mode == "all" else [])
        if mode != "none" and len(many) > 1:
            strategy = tf.distribute.MirroredStrategy([d.name for d in many])
            devices = Devices(strategy.num_replicas_in_sync, strategy, "MirroredStrategy")
    elif backend == "jax":
        keras.distribution.set_distribution(None)
        many = gpus if len(gpus) > 1 else (keras.distribution.list_devices() if mode == "all" else [])
        if mode != "none" and len(many) > 1:
            keras.distribution.set_distribution(keras.distribution.DataParallel(devices=many))
            devices = Devices(len(many), None, "keras.distribution.DataParallel")
    elif mode == "all" or len(gpus) > 1:
        log.info("the torch backend trains on one device (Keras has no multi-device training for it)")
    xla = {"tensorflow": runtime["xla"], "jax": "always", "torch": False}[backend]
    log.info("backend %s; %d GPU(s); %s, %d replica(s); mixed precision %s; XLA %s", backend, len(gpus), devices.kind,
             devices.replicas, runtime["mixed_precision"], xla)
    return devices


def compile_kwargs(runtime: dict) -> dict:
    """model.compile's jit_compile for params runtime.xla: TensorFlow compiles with XLA only when asked; JAX
    always compiles (XLA is how it runs); PyTorch runs eagerly (its torch.compile path in Keras is not used)."""
    return {"jit_compile": {"tensorflow": runtime["xla"], "jax": True, "torch": False}[name()]}


def inference_function(model) -> Callable[[np.ndarray], np.ndarray]:
    """float32 (B, S, S, 1) -> float32 (B, classes) numpy: the model's inference call (`model(x, training=False)`,
    what model.predict runs), compiled once for any batch size where the backend compiles. TensorFlow: a
    tf.function with a batch-free signature; JAX: jax.jit of the stateless call, with smaller batches padded to
    the first one's size (one compilation, not one per shape); PyTorch: eager, without autograd."""
    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        spec = tf.TensorSpec((None, *model.input_shape[1:]), tf.float32)
        fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        return lambda x: np.asarray(fn(tf.convert_to_tensor(x)), dtype=np.float32)
    if backend == "jax":
        import jax

        step = jax.jit(lambda tv, ntv, x: model.stateless_call(tv, ntv, x, training=False)[0])
        padded_to: list[int] = []

        def run_jax(x: np.ndarray) -> np.ndarray:
            n = len(x)
            if not padded_to:
                padded_to.append(n)
            if n < padded_to[0]:
                x = np.concatenate([x, np.zeros((padded_to[0] - n, *x.shape[1:]), x.dtype)])
            # the weights as they are now (as TensorFlow's and PyTorch's calls read them), not when this was made
            tv, ntv = [v.value for v in model.trainable_variables], [v.value for v in model.non_trainable_variables]
            return np.asarray(step(tv, ntv, x), dtype=np.float32)[:n]

        return run_jax
    import torch

    def run_torch(x: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            return to_numpy(model(x, training=False)).astype(np.float32)

    return run_torch


def input_gradients(fn: Callable, x) -> tuple[np.ndarray, np.ndarray]:
    """(fn(x), d sum(fn(x)) / dx) as numpy, with the backend's automatic differentiation (TensorFlow's
    GradientTape, jax.value_and_grad, torch autograd). `fn` maps a batch to one score per sample; since each
    sample's score depends only on that sample, the gradient of the sum is every sample's own gradient."""
    import keras

    backend = name()
    if backend == "tensorflow":
        import tensorflow as tf

        x = tf.convert_to_tensor(x)
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        return to_numpy(y), to_numpy(tape.gradient(y, x))
    if backend == "jax":
        import jax

        def total(v):
            y = fn(v)
            return keras.ops.sum(y), y

        (_, y), g = jax.value_and_grad(total, has_aux=True)(keras.ops.convert_to_tensor(x))
        return to_numpy(y), to_numpy(g)
    import torch

    x = keras.ops.convert_to_tensor(x).detach().requires_grad_(True)
    y = fn(x)
    (g,) = torch.autograd.grad(y.sum(), x)
    return to_numpy(y.detach()), to_numpy(g)


def live_callback(live):
    """The Keras callback that logs each epoch's metrics to dvclive (train/<name>, eval/<name> for val_<name>):
    dvclive's own (dvclive.keras.DVCLiveCallback) under TensorFlow; under JAX or PyTorch the same callback on
    keras.callbacks.Callback, since dvclive's is built on tf.keras and so imports TensorFlow."""
    import keras

    if name() == "tensorflow":
        from dvclive.keras import DVCLiveCallback

        return DVCLiveCallback(live=live)
    from dvclive.utils import standardize_metric_name

    class LiveCallback(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            for metric, value in (logs or {}).items():
                live.log_metric(standardize_metric_name(metric, "dvclive.keras"), value)
            live.next_step()

        def on_train_end(self, logs=None):
            live.end()

    return LiveCallback()
