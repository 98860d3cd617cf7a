"""cxr.modelinfo: the model's sidecars written and read back, and read without TensorFlow."""
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from cxr import modelinfo
from cxr.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
CLASSES = ["COVID", "Normal", "Viral Pneumonia"]
PARAMS = {"dataset": "demo", "clean": {"image_size": 32, "resize": "pad"}, "model": {"arch": "mobilenetv2"}}


def _model_file(folder: Path) -> Path:
    """A file that is a .keras archive (a zip) as far as the checks before loading go."""
    path = folder / "models" / "m.keras"
    path.parent.mkdir(parents=True)
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", "{}")
    return path


def test_info_round_trip(tmp_path):
    path = _model_file(tmp_path)
    info = modelinfo.model_info(PARAMS, CLASSES, "COVID")
    assert info == {"classes": CLASSES, "positive": "COVID", "image_size": 32, "resize": "pad", "arch": "mobilenetv2", "dataset": "demo"}
    import keras

    modelinfo.save(keras.Sequential([keras.Input((2,)), keras.layers.Dense(3, activation="softmax")]), path, info)
    assert zipfile.is_zipfile(path)
    assert modelinfo.info_path(path) == tmp_path / "models" / "m.info.json"
    assert modelinfo.read_info(path) == info


def test_operating_point_round_trip(tmp_path):
    path = _model_file(tmp_path)
    modelinfo.write_operating_point(path, "COVID", 0.125, "sensitivity", 0.95, "conformal")
    side = tmp_path / "models" / "m.operating_point.json"
    op = {"class": "COVID", "threshold": 0.125, "by": "sensitivity", "target": 0.95, "rule": "conformal"}
    assert json.loads(side.read_text()) == op
    assert modelinfo.read_operating_point(path, CLASSES) == op
    # a file from before the rule was recorded still reads, without one
    side.write_text(json.dumps({k: v for k, v in op.items() if k != "rule"}))
    assert modelinfo.read_operating_point(path, CLASSES) == {**op, "rule": None}
    with pytest.raises(UserError, match="not one of the model's classes"):
        modelinfo.read_operating_point(path, ["A", "B"])
    side.unlink()
    assert modelinfo.read_operating_point(path, CLASSES) is None


def test_missing_info_and_missing_model_are_user_errors(tmp_path):
    path = _model_file(tmp_path)
    with pytest.raises(UserError, match="m.info.json not found"):
        modelinfo.read_info(path)
    with pytest.raises(UserError, match="not found"):
        modelinfo.read_info(tmp_path / "nope.keras")


def test_triage_labels_and_rule():
    assert modelinfo.triage_labels("COVID-19") == ("COVID-19 suspected", "COVID-19 not suspected")
    op = {"class": "COVID-19", "threshold": 0.4719360065460205, "by": "sensitivity", "target": 0.95}
    assert modelinfo.triage_rule(op) == ("COVID-19 suspected when positive_p >= 0.471936 "
                                         "(threshold chosen on the validation split for sensitivity 0.95)")
    assert modelinfo.triage_rule({**op, "by": None, "target": None}) == "COVID-19 suspected when positive_p >= 0.471936"
    assert modelinfo.triage_rule({**op, "rule": "conformal"}) == (
        "COVID-19 suspected when positive_p >= 0.471936 "
        "(threshold chosen on the validation split for sensitivity 0.95 on new cases (conformal))")


def test_reading_sidecars_does_not_import_tensorflow(tmp_path):
    path = _model_file(tmp_path)
    modelinfo.write_operating_point(path, "COVID", 0.5, "sensitivity", 0.95)
    modelinfo.info_path(path).write_text(json.dumps(modelinfo.model_info(PARAMS, CLASSES, "COVID")))
    code = ("import sys; from cxr import modelinfo; info = modelinfo.read_info(sys.argv[1]); "
            "modelinfo.read_operating_point(sys.argv[1], info['classes']); "
            "assert not {'tensorflow', 'keras'} & set(sys.modules), 'TensorFlow imported'")
    subprocess.run([sys.executable, "-c", code, str(path)], cwd=PROJECT, check=True, timeout=120)
