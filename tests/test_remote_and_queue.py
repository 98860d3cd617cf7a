"""Beyond one machine: a DVC remote shared by two clones, and queued experiments run by parallel workers."""
from __future__ import annotations

import json
import time

import pytest

from helpers import dvc, ran_stages, run, set_params

pytestmark = pytest.mark.slow  # every test here runs the real dvc CLI


@pytest.mark.slow
def test_push_on_one_clone_pull_on_another_reruns_nothing(demo_copy, tmp_path):
    remote = tmp_path / "remote"
    a = demo_copy
    dvc(a, "remote", "add", "-d", "store", str(remote))
    run(a, "git", "commit", "-qam", "remote")
    dvc(a, "push")

    b = tmp_path / "clone-b"
    run(tmp_path, "git", "clone", "-q", str(a), str(b))
    assert not (b / "models/finetuned.keras").exists()
    dvc(b, "pull")
    for out in ("data/raw/metadata.csv", "data/clean/manifest.csv", "data/split.csv", "models/baseline.keras",
                "models/finetuned.keras", "models/finetuned.operating_point.json"):
        assert (b / out).is_file(), out
    assert ran_stages(dvc(b, "repro").stdout) == []

    set_params(b / "params.yaml", {"finetune.epochs": 2})
    assert sorted(ran_stages(dvc(b, "repro").stdout)) == sorted(["finetune", "evaluate", "gradcam", "external"])


def _start_queue(repo, jobs: int):
    """`dvc queue start -j jobs`, its output to a file: its workers inherit its stdout and stderr, and would hold
    pipes open until they exit."""
    dvc(repo, "queue", "start", "-j", str(jobs), log=repo.parent / f"{repo.name}-queue-start.log", timeout=120)


@pytest.fixture
def stop_workers():
    """Stops the queue workers of the repositories a test started them in, whatever its outcome."""
    repos = []
    yield repos.append
    for repo in repos:
        dvc(repo, "queue", "stop", "--kill", check=False, timeout=120)


def _wait_for_queue(repo, timeout=600):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = dvc(repo, "queue", "status").stdout
        if "Queued" not in status and "Running" not in status:
            return status
        time.sleep(3)
    dvc(repo, "queue", "kill", check=False)
    raise AssertionError(f"queue did not finish in {timeout}s:\n{status}")


@pytest.mark.slow
def test_queued_experiments_run_in_parallel_workers(demo_copy, stop_workers):
    for target in ("0.8", "0.99"):
        dvc(demo_copy, "exp", "run", "--queue", "-S", f"evaluate.operating_point.target={target}")
    stop_workers(demo_copy)
    _start_queue(demo_copy, 2)
    status = _wait_for_queue(demo_copy)
    assert "Failed" not in status, status
    rows = json.loads(dvc(demo_copy, "exp", "show", "--json").stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    thresholds = {}
    for exp in exps:
        data = exp["revs"][0]["data"]
        target = data["params"]["params.yaml"]["data"]["evaluate"]["operating_point"]["target"]
        metrics = data["metrics"]["metrics/evaluate/finetuned.json"]["data"]
        thresholds[target] = metrics["threshold"]
    assert set(thresholds) == {0.8, 0.99}, exps
    assert thresholds[0.8] != thresholds[0.99]


@pytest.mark.slow
def test_queued_experiment_runs_its_own_library_code(demo_copy, stop_workers):
    """A queued experiment runs in a temporary workspace under .dvc/tmp/exps/: its stages must import that
    workspace's cxr/ (with the experiment's change), not the checkout the virtualenv was installed from."""
    path = demo_copy / "cxr/evaluation.py"
    source = path.read_text()
    marker = '    return head\n'
    assert marker in source
    path.write_text(source.replace(marker, '    head["code_marker"] = 7\n' + marker, 1))
    dvc(demo_copy, "exp", "run", "--queue", "-n", "marked")
    path.write_text(source)  # the workspace goes back; the queued snapshot keeps the change
    stop_workers(demo_copy)
    _start_queue(demo_copy, 1)
    status = _wait_for_queue(demo_copy)
    assert "Failed" not in status, status
    rows = json.loads(dvc(demo_copy, "exp", "show", "--json").stdout)
    exps = [e for row in rows for e in (row.get("experiments") or [])]
    assert len(exps) == 1, exps
    metrics = exps[0]["revs"][0]["data"]["metrics"]["metrics/evaluate/finetuned.json"]["data"]
    assert metrics.get("code_marker") == 7, metrics
