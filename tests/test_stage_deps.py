"""`dvc status` tells the truth only if every file a stage's code imports is a declared dep: each stage's
transitive imports inside `cxr/`, computed from the source, must be listed in dvc.yaml, and only those (an
extra one reruns the stage for nothing)."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def _imports(path: Path) -> set[Path]:
    """Project files (cxr/*.py) that `path` imports anywhere in its body, function-level imports included."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = path.parent.name == "cxr"
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("cxr.")]
            found |= {ROOT / (n.replace(".", "/") + ".py") for n in names}
        elif isinstance(node, ast.ImportFrom):
            if node.level == 1 and package:
                module = node.module
            elif node.level == 0 and node.module and (node.module == "cxr" or node.module.startswith("cxr.")):
                module = node.module[len("cxr"):].lstrip(".") or None
            else:
                continue
            if module:
                found.add(ROOT / "cxr" / (module.replace(".", "/") + ".py"))
            else:  # from cxr import a, b / from . import a, b
                found |= {ROOT / "cxr" / f"{a.name}.py" for a in node.names}
    return {p for p in found if p.exists()}


def transitive_imports(script: Path) -> set[str]:
    seen, todo = set(), [script]
    while todo:
        for dep in _imports(todo.pop()) - seen:
            seen.add(dep)
            todo.append(dep)
    return {p.relative_to(ROOT).as_posix() for p in seen}


def test_package_inits_are_empty():
    # importing any cxr module (or running `python -m stages.x`) runs these; they are left out of the deps
    # because they hold nothing
    for init in ("cxr/__init__.py", "stages/__init__.py"):
        assert (ROOT / init).read_text().strip() == "", init


def test_stages_run_as_modules_of_the_checkout():
    # `python stages/x.py` would put stages/ first on sys.path and import whichever cxr the virtualenv
    # was installed from; `python -m stages.x` run from the checkout's root imports the checkout's own
    for name, stage in STAGES.items():
        assert stage["cmd"] == f"python -m stages.{name}", name


@pytest.mark.parametrize("name", sorted(STAGES))
def test_every_imported_project_file_is_a_declared_dep(name):
    stage = STAGES[name]
    script = stage["cmd"].split()[-1]
    script = script if script.endswith(".py") else script.replace(".", "/") + ".py"
    deps = {d if isinstance(d, str) else next(iter(d)) for d in stage.get("deps", [])}
    assert script in deps, f"{name}: its own script {script} is not a dep"
    imported = transitive_imports(ROOT / script)
    missing = imported - deps
    assert not missing, f"stage {name} imports {sorted(missing)} but dvc.yaml does not list them as deps"
    # and no more: a project file the stage never imports only makes it rerun for nothing
    unused = {d for d in deps if d.endswith(".py") and d != script} - imported
    assert not unused, f"stage {name} lists {sorted(unused)} as deps but never imports them"


def test_project_code_imports_only_in_ways_the_dep_check_sees():
    # `import cxr` then `cxr.x.f()`, importlib, __import__ or `from stages import ...` would load project files the
    # walk above cannot name; no stage's code uses them (the `python -m cxr` CLI does, and no stage imports it)
    scripts = {stage["cmd"].split()[-1].replace(".", "/") + ".py" for stage in STAGES.values()}
    reached = scripts.union(*(transitive_imports(ROOT / s) for s in scripts))
    assert "cxr/__main__.py" not in reached
    for path in sorted(ROOT / r for r in reached):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            where = f"{path.relative_to(ROOT)}:{getattr(node, 'lineno', '?')}"
            if isinstance(node, ast.Import):
                assert not any(a.name in ("cxr", "stages", "importlib") or a.name.startswith(("stages.", "importlib."))
                               for a in node.names), where
            elif isinstance(node, ast.ImportFrom):
                assert not (node.module or "").startswith(("stages", "importlib")), where
                assert not (node.level and path.parent.name == "stages"), where
            elif isinstance(node, ast.Name):
                assert node.id != "__import__", where


def test_both_models_are_registered_artifacts_labelled_with_arch_and_dataset():
    """dvc.yaml's `artifacts:` (the model registry behind `dvc artifacts get`), read by DVC itself."""
    import json
    import subprocess
    import sys

    p = yaml.safe_load((ROOT / "params.yaml").read_text())
    code = ("import json; from dvc.repo import Repo; "
            "print(json.dumps({k: vars(a) for k, a in Repo('.').artifacts.read()['dvc.yaml'].items()}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert set(found) == {"baseline", "finetuned"}
    for name, artifact in found.items():
        assert artifact["type"] == "model" and artifact["path"] == f"models/{name}.keras"
        assert {p["model"]["arch"], p["dataset"], name} <= set(artifact["labels"])
