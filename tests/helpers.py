"""Helpers the tests share: the demo configuration, params overrides, and running git, DVC and stages in a
repository built in a temporary folder."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

PROJECT = Path(__file__).resolve().parents[1]

# The offline demo configuration: no pretrained weights, small images, few epochs; a 2-core CPU
# runs the whole pipeline in a few minutes.
DEMO = {
    "dataset": "demo",
    "datasets.demo.per_class": 150,
    "datasets.demo.size": 64,
    "clean.image_size": 64,
    "model.weights": "none",
    "model.alpha": 0.35,
    "train.epochs": 5,
    "train.batch_size": 16,
    "train.patience": 4,
    "finetune.unfreeze_from": "all",
    "finetune.views": 0,
    "finetune.members": 1,
    "finetune.epochs": 15,
    "finetune.batch_size": 16,
    "finetune.learning_rate": 0.003,
    # the demo's findings are peripheral and its poses vary, so the lung box clips them, and without cached views
    # every training image is augmented: filling the surround of 3 in 4 cost the demo model (README, Offline)
    "train.augment.outside_lungs": 0.0,
    "finetune.patience": 8,
    "evaluate.bootstrap.resamples": 200,
    "gradcam.per_class": 3,
    # at 64 px the default target (the last map at least 7 px across) is 8x8, coarse for lesions covering ~4% of
    # the image; a 16x16 map is the finer one a user would pick for images this small
    "gradcam.min_side": 16,
    # the default ieee8023 set (no local copy in tests: skipped), and a demo set generated with another seed
    "external.sets": [
        {"name": "ieee8023", "source": "covid-chestxray", "map": {"COVID-19": "positive", "non-COVID": "rest"}},
        {"name": "demo-seed1", "source": "demo", "seed": 1, "per_class": 40, "size": 64,
         "map": {"COVID": "COVID", "Normal": "Normal", "Viral Pneumonia": "Viral Pneumonia"}},
    ],
}


def set_params(path: Path, overrides: dict) -> None:
    """Write dotted-key overrides into a params.yaml."""
    tree = yaml.safe_load(path.read_text())
    for key, value in overrides.items():
        node = tree
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    path.write_text(yaml.safe_dump(tree, sort_keys=False))


def env() -> dict:
    """The test's Python first on PATH (dvc.yaml runs `python`), no outside data or credentials, and
    TensorFlow's log level left to the stages (cxr.quiet), as a user's shell leaves it."""
    e = dict(os.environ)
    e["PATH"] = str(Path(sys.executable).parent) + os.pathsep + e.get("PATH", "")
    e.pop("CXR_DATA_DIR", None)
    e.pop("TF_CPP_MIN_LOG_LEVEL", None)
    e.setdefault("GIT_AUTHOR_NAME", "test")
    e.setdefault("GIT_AUTHOR_EMAIL", "test@localhost")
    e.setdefault("GIT_COMMITTER_NAME", "test")
    e.setdefault("GIT_COMMITTER_EMAIL", "test@localhost")
    return e


def run(cwd: Path, *args: str, check: bool = True, extra_env: dict | None = None, timeout: float = 1800,
        log: Path | None = None) -> subprocess.CompletedProcess:
    """Run a command (e.g. `dvc repro`) in cwd; on failure show its output. No PYTHONPATH: stages import the
    repository's own `cxr` because dvc.yaml runs them as `python -m stages.<name>` from its root. Past `timeout`
    seconds it is killed and the test fails. With `log`, its output goes to that file, not to pipes: a command
    that leaves a background process behind (`dvc queue start`'s workers inherit its stdout and stderr) would
    otherwise hold the pipes open, and reading them would wait for that process to end."""
    e = env()
    e.pop("PYTHONPATH", None)
    e.update(extra_env or {})
    try:
        if log is None:
            proc = subprocess.run(list(args), cwd=cwd, env=e, capture_output=True, text=True, timeout=timeout)
        else:
            with open(log, "w") as out:
                proc = subprocess.run(list(args), cwd=cwd, env=e, stdin=subprocess.DEVNULL, stdout=out,
                                      stderr=subprocess.STDOUT, text=True, timeout=timeout)
            proc.stdout, proc.stderr = Path(log).read_text(), ""
    except subprocess.TimeoutExpired as exc:
        raise AssertionError(f"{' '.join(args)} still running after {timeout}s: killed") from exc
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}")
    return proc


def dvc(cwd: Path, *args: str, check: bool = True, extra_env: dict | None = None, timeout: float = 1800,
        log: Path | None = None) -> subprocess.CompletedProcess:
    return run(cwd, sys.executable, "-m", "dvc", *args, check=check, extra_env=extra_env, timeout=timeout, log=log)


# What must never reach a user's terminal from a run on a CPU-only machine, nor any captured output: a C++
# error line from TensorFlow (`E0000 00:00:... ] failed call to cuInit`, or the older `...: E tensorflow/...`), a
# Python warning, or a progress bar drawn where no terminal is (carriage returns, block characters, `40%|`).
NOISE = re.compile(r"cuInit|failed call|^E\d{4} |^[\d:. -]+: E |\w+Warning: |\r|[\u2588-\u258f]|\d+%\|")


def noise(output: str) -> list[str]:
    """The lines of `output` that look like an error, a warning or a progress bar (NOISE)."""
    return [line for line in output.split("\n") if NOISE.search(line)]


def ran_stages(output: str, with_source: bool = False) -> list[str]:
    """Stage names DVC actually ran, from `dvc repro`/`dvc exp run` output. `source` runs on every repro
    (always_changed) and is left out unless `with_source`: the list is what its inputs made rerun."""
    names = [line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")]
    return names if with_source else [n for n in names if n != "source"]


def make_repo(root: Path, overrides: dict) -> Path:
    """A fresh git + DVC repository holding the project's pipeline, with params overridden."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("stages", "cxr"):
        shutil.copytree(PROJECT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("dvc.yaml", "params.yaml", ".gitignore", ".dvcignore"):
        if (PROJECT / name).exists():
            shutil.copy(PROJECT / name, root / name)
    set_params(root / "params.yaml", overrides)
    run(root, "git", "init", "-q")
    dvc(root, "init", "-q")
    shutil.copytree(PROJECT / ".dvc/plots", root / ".dvc/plots")  # the project's plot templates
    dvc(root, "config", "core.analytics", "false")
    run(root, "git", "add", "-A")
    run(root, "git", "commit", "-qm", "pipeline")
    return root
