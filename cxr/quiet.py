"""TensorFlow without its C++ log chatter: a CPU-only run prints nothing that looks like an error.

TensorFlow reads TF_CPP_MIN_LOG_LEVEL once, when its library loads, so every stage that may load it calls
tensorflow() first, before its other imports (stages/<name>.py; `python -m cxr` likewise). Level 3 leaves only
fatal messages: no `E0000 ... failed call to cuInit` on a machine without a GPU (level 2 still prints that
one), no INFO/WARNING lines; a real failure still raises a Python exception with its message. A value already
in the environment wins: `TF_CPP_MIN_LOG_LEVEL=0` shows everything again (e.g. why a GPU is not used).
Two INFO lines the library prints while it loads, before it reads any setting (oneDNN on; no CUDA driver
found), cannot be turned off from here.

Under the JAX backend, JAX logs a WARNING for every platform it probes and does not find (`Unable to initialize
backend 'tpu'`), through Python logging: tensorflow() raises that logger's level to ERROR.
"""
import logging
import os

LOG_LEVEL = "3"


def tensorflow() -> None:
    """Set TensorFlow's C++ log level unless the user did; call before anything imports TensorFlow or Keras."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", LOG_LEVEL)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.ERROR)
