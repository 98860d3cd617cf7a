"""Shared fixtures: a real git + DVC repository in a temporary folder, running the real pipeline on `demo`.
Helpers tests import (set_params, dvc, run, ...) live in helpers.py."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from helpers import DEMO, dvc, make_repo, run


@pytest.fixture(scope="session")
def demo_repo(tmp_path_factory) -> Path:
    """The demo pipeline reproduced end to end once (`dvc repro`), committed; tests read it or copy it."""
    repo = make_repo(tmp_path_factory.mktemp("pipeline") / "repo", DEMO)
    proc = dvc(repo, "repro")
    repo.joinpath("first_repro.log").write_text(proc.stdout + proc.stderr)
    run(repo, "git", "add", "-A")
    run(repo, "git", "commit", "-qm", "reproduced")
    return repo


@pytest.fixture
def demo_copy(demo_repo, tmp_path) -> Path:
    """A private copy of the reproduced repository (DVC cache included), for tests that change it."""
    dst = tmp_path / "repo"
    shutil.copytree(demo_repo, dst, symlinks=True)
    return dst
