"""What a run prints: TensorFlow's C++ log level set before any stage loads it (cxr.quiet), and progress bars
drawn on a terminal only (cxr.progress). The stages' and `python -m cxr predict`'s real output is checked in
test_predict (a subprocess on a CPU-only machine) and test_pipeline (every stage, run by `dvc repro`)."""
from __future__ import annotations

import ast
import fcntl
import io
import os
import pty
import struct
import subprocess
import sys
import termios
import threading
from pathlib import Path

import numpy as np
import pytest
import yaml

from cxr import progress, training
from helpers import noise
from test_stage_deps import transitive_imports

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


class _Stream(io.StringIO):
    def __init__(self, tty: bool):
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


# --- cxr.quiet ------------------------------------------------------------------------------------

def _loads_tensorflow(path: Path) -> bool:
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""] if isinstance(node, ast.ImportFrom) else []
        if any(n.split(".")[0] in ("tensorflow", "keras") for n in names):
            return True
    return False


def _first_statements(path: Path) -> list[str]:
    """The module's first two statements after its docstring and `from __future__` imports, as source."""
    body = ast.parse(path.read_text()).body
    body = [s for s in body if not (isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant))
            and not (isinstance(s, ast.ImportFrom) and s.module == "__future__")]
    return [ast.unparse(s) for s in body[:2]]


@pytest.mark.parametrize("name", sorted(STAGES))
def test_stages_that_may_load_tensorflow_quiet_it_before_any_other_import(name):
    script = ROOT / "stages" / f"{name}.py"
    if not any(_loads_tensorflow(ROOT / f) for f in transitive_imports(script) | {script.relative_to(ROOT).as_posix()}):
        return
    assert _first_statements(script) == ["from cxr import quiet", "quiet.tensorflow()"], name


def test_quiet_imports_nothing_that_could_load_tensorflow():
    tree = ast.parse((ROOT / "cxr" / "quiet.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)}
    assert imported == {"logging", "os"}  # standard library only


def test_quiet_sets_the_level_unless_the_user_did(monkeypatch):
    from cxr import quiet

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    quiet.tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"  # 2 still prints `E0000 ... failed call to cuInit`
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    quiet.tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"


# --- cxr.progress ---------------------------------------------------------------------------------

def test_a_bar_is_drawn_only_when_stderr_is_a_terminal(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)
    for tty in (True, False):
        err = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", err)
        assert progress.interactive() is tty
        assert list(progress.bar(range(5), desc="decoding")) == list(range(5))
        assert list(progress.batches(10, 4, "forward")) == [0, 4, 8]
        if tty:  # named, with its total (tqdm skips redraws closer than 0.1 s apart: the last may not show)
            assert "decoding: " in err.getvalue() and "/5 [" in err.getvalue() and "forward: " in err.getvalue()
            assert "/10 [" in err.getvalue() and noise(err.getvalue())
        else:
            assert err.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", _Stream(True))
    assert progress.bar(desc=None).disable  # a step inside another step's bar draws none


def test_streams_without_a_terminal_answer_no():
    closed = io.StringIO()
    closed.close()
    assert not progress.interactive(closed)
    assert not progress.interactive(object())   # replaced by something without isatty
    assert not progress.interactive(io.StringIO())


def _on_pty(code: str) -> tuple[str, str]:
    """Run Python `code` with stderr on a pseudo-terminal 80 columns wide; returns (stderr as the terminal got
    it, stdout)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 80, 0, 0))
    chunks = []

    def read():
        while True:
            try:
                data = os.read(master, 4096)
            except OSError:  # the terminal's other end closed
                return
            if not data:
                return
            chunks.append(data)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-c", code], stderr=slave, stdout=subprocess.PIPE, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    finally:
        os.close(slave)
        reader.join(10)
        os.close(master)
    return b"".join(chunks).decode(errors="replace"), proc.stdout.decode()


def test_a_real_terminal_gets_a_bar_and_a_pipe_none():
    code = ("import sys, time\nfrom cxr import progress\nprogress.DELAY = 0\n"
            "for _ in progress.batches(12, 4, 'decoding'): time.sleep(0.05)\nprint(progress.interactive())")
    drawn, out = _on_pty(code)
    assert out.strip() == "True"
    assert "decoding: " in drawn and "/12 [" in drawn and noise(drawn)
    piped = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=60)
    assert piped.stdout.strip() == "False" and piped.stderr == ""


def _fit(callbacks: list) -> list[np.ndarray]:
    import keras

    keras.utils.set_random_seed(0)
    x = np.random.default_rng(0).normal(size=(40, 4)).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.int32)
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(2, activation="softmax")])
    model.compile("adam", "sparse_categorical_crossentropy")
    model.fit(x, y, batch_size=8, epochs=3, shuffle=True, callbacks=callbacks, verbose=0)
    model.predict(x, batch_size=8, verbose=0, callbacks=[training.progress_callback(5, "features", "batch")])
    return model.get_weights()


def test_keras_progress_shows_epochs_on_a_terminal_and_changes_no_number(monkeypatch):
    monkeypatch.setattr(progress, "DELAY", 0)
    plain = _fit([])
    for tty in (True, False):
        err = _Stream(tty)
        monkeypatch.setattr(sys, "stderr", err)
        weights = _fit([training.progress_callback(3, "training", "epoch", ("loss",))])
        for a, b in zip(plain, weights):
            np.testing.assert_array_equal(a, b)
        if tty:
            assert "training: " in err.getvalue() and "/3 [" in err.getvalue() and "epoch/s, loss" in err.getvalue()
            assert "features: " in err.getvalue() and "/5 [" in err.getvalue()
        else:
            assert err.getvalue() == ""
