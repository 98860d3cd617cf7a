"""What a run prints: TensorFlow's C++ log level set before any stage loads it (cxr.quiet). The stages' and
`python -m cxr predict`'s real output is checked in test_predict (a subprocess on a CPU-only machine)."""
from __future__ import annotations

import ast
import os
from pathlib import Path

import pytest
import yaml

from test_stage_deps import transitive_imports

ROOT = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


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
    assert imported == {"os"}


def test_quiet_sets_the_level_unless_the_user_did(monkeypatch):
    from cxr import quiet

    monkeypatch.delenv("TF_CPP_MIN_LOG_LEVEL", raising=False)
    quiet.tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "3"  # 2 still prints `E0000 ... failed call to cuInit`
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "0")
    quiet.tensorflow()
    assert os.environ["TF_CPP_MIN_LOG_LEVEL"] == "0"
