"""The up-front check of what a run needs from outside the project (cxr.needs, the `check` stage, `python -m cxr
check`), and the ImageNet weights' file names and cache (cxr.weights) against Keras. No test here needs the
network: probes are replaced, or refused at once by a dead proxy."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from cxr import needs, network, params, sources, weights
from cxr.download import DEMO_COMMAND, ENV
from cxr.errors import UserError

PROJECT = Path(__file__).resolve().parents[1]
DEAD_PROXY = {var: "http://127.0.0.1:9" for var in ("HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy")}


@pytest.fixture
def workspace(tmp_path, monkeypatch):
    """An empty project folder (no data/raw yet) as the working directory, Keras' cache empty, no CXR_DATA_DIR,
    and every network probe answering `no network (test)`; returns a recorder of the probed addresses."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras-home"))
    monkeypatch.delenv(ENV, raising=False)
    probed = []
    monkeypatch.setattr(network, "reachable", lambda url, timeout=None: probed.append(url) or "no network (test)")
    return probed


def _params(**over) -> dict:
    p = params.load(PROJECT / "params.yaml", sources=sources.SOURCES)
    for key, value in over.items():
        section, leaf = key.split(".")
        p[section][leaf] = value
    return p


def _check(p: dict):
    return needs.check(params.dataset(p), p["model"], p["clean"]["image_size"])


def test_every_missing_need_is_named_in_one_error(workspace):
    with pytest.raises(UserError) as err:
        _check(_params())
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith("2 things this run needs are missing, so nothing has run: ")
    dataset, _, weights_part = msg.partition(" (2) ")
    assert "(1) dataset covid-radiography: no local copy (CXR_DATA_DIR is not set) and Kaggle " \
           "(tawsifurrahman/covid19-radiography-database) cannot be reached: no network (test)." in dataset
    assert ENV in dataset and DEMO_COMMAND in dataset and "KAGGLE_USERNAME" in dataset
    name = "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5"
    assert weights_part.startswith("ImageNet weights for model.arch=mobilenetv2, model.alpha=1.0, clean.image_size=224: "
                                   f"{Path(os.environ['KERAS_HOME']) / 'models' / name} is not there and storage.googleapis.com "
                                   "cannot be reached: no network (test).")
    assert "model.weights" in weights_part and weights_part.endswith("(train from scratch).")
    assert workspace == [needs.KAGGLE_API, weights.url("mobilenetv2", 1.0, 224)]


def test_what_is_there_is_not_reported_or_probed(workspace, tmp_path, monkeypatch):
    # the generated demo without pretrained weights needs nothing from outside
    demo = _params(**{"model.weights": "none"})
    demo["dataset"] = "demo"
    assert _check(demo) == [needs.Need("dataset demo", found="generated here, nothing to download")]
    # ImageNet weights in Keras' cache and a local copy of the dataset: found where they are
    cache = Path(os.environ["KERAS_HOME"]) / "models"
    cache.mkdir(parents=True)
    (cache / "efficientnetb0_notop.h5").write_bytes(b"weights")
    (tmp_path / "store" / "covid-radiography").mkdir(parents=True)
    monkeypatch.setenv(ENV, str(tmp_path / "store"))
    found = _check(_params(**{"model.arch": "efficientnetb0"}))
    assert [n.found for n in found] == [f"local copy {tmp_path / 'store' / 'covid-radiography'}", str(cache / "efficientnetb0_notop.h5")]
    # a dataset data/raw holds already needs neither a copy nor Kaggle; a model.init start needs no ImageNet weights
    monkeypatch.delenv(ENV)
    Path("data/raw/x").mkdir(parents=True)
    Path("reports").mkdir()
    Path("reports/download.json").write_text(json.dumps({"dataset": "covid-radiography"}))
    model = {"arch": "mobilenetv2", "alpha": 1.0, "weights": "imagenet", "init": str(tmp_path / "start.keras")}
    found = needs.check(params.dataset(_params()), model, 224)
    assert [n.what for n in found] == ["dataset covid-radiography"] and "already" in found[0].found
    assert workspace == []   # nothing probed


def test_a_wrong_local_copy_is_named_instead_of_trying_kaggle(workspace, tmp_path, monkeypatch):
    (tmp_path / "empty-store").mkdir()
    monkeypatch.setenv(ENV, str(tmp_path / "empty-store"))
    with pytest.raises(UserError) as err:
        _check(_params(**{"model.weights": "none"}))
    assert str(err.value).startswith("1 thing this run needs is missing, so nothing has run: (1) dataset covid-radiography: "
                                     f"{ENV}={tmp_path / 'empty-store'} holds neither covid-radiography/ nor covid-radiography.zip")
    assert workspace == []


@pytest.mark.parametrize("command", [["-m", "cxr", "check"], ["-m", "stages.check"]])
def test_check_offline_lists_both_needs_at_once(tmp_path, command):
    """`python -m cxr check` and the stage, with the real probes, on a machine without network (a dead proxy
    refuses at once, even where there is a network)."""
    (tmp_path / "params.yaml").write_text((PROJECT / "params.yaml").read_text())
    env = {k: v for k, v in os.environ.items() if k not in (ENV, "NO_PROXY", "no_proxy")}
    env.update(DEAD_PROXY, PYTHONPATH=str(PROJECT), KERAS_HOME=str(tmp_path / "keras-home"))
    proc = subprocess.run([sys.executable, *command], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert errors[0].startswith("error: 2 things this run needs are missing")
    assert "(1) dataset covid-radiography" in errors[0] and "(2) ImageNet weights for model.arch=mobilenetv2" in errors[0]
    assert errors[0].count("connection refused") == 2


@pytest.mark.parametrize("arch, blocks", [("efficientnetb0", "block6d, block7a"), ("resnet50", "conv5_block2, conv5_block3"),
                                          ("densenet121", "conv5_block15, conv5_block16")])
def test_another_backbone_with_mobilenets_block_is_refused_before_train(tmp_path, arch, blocks):
    """The default finetune.unfreeze_from (MobileNetV2's block_13) with another model.arch: the check stage (the
    first a full `dvc repro` runs) refuses it in one line naming both keys and that backbone's last blocks, where
    finetune would find out only after train; a block of that backbone, or all, passes."""
    tree = yaml.safe_load((PROJECT / "params.yaml").read_text())
    tree["model"]["arch"] = arch
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(tree))
    env = {**os.environ, "PYTHONPATH": str(PROJECT)}
    proc = subprocess.run([sys.executable, "-m", "stages.check"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    assert errors[0].startswith(f"error: params.yaml: finetune.unfreeze_from=block_13 names no layer or block of "
                                f"model.arch={arch}; set it to one of its blocks (the last ones are "), errors[0]
    assert errors[0].endswith(f"{blocks}) or a layer name, or to all"), errors[0]
    for start in (blocks.split(", ")[0], "all", f"{blocks.split(', ')[0]}_1" if arch != "efficientnetb0" else "block6d_se"):
        assert needs.unfreeze_problem(arch, start) is None, start
    for start in ("block_13", "block_1", "Conv_1"):
        assert needs.unfreeze_problem("mobilenetv2", start) is None, start
    assert needs.unfreeze_problem("mobilenetv2", "block_17") is not None
    assert needs.unfreeze_problem("mobilenetv2", "block_1_expand_B") is not None   # a layer's prefix, not a block


def test_the_backbone_layer_table_is_what_keras_builds():
    """backbone_layers.json, which the check reads instead of building models, against keras.applications (a
    fresh process: Keras numbers unnamed layers per session). On a mismatch, regenerate it with that code."""
    code = ("import json, cxr.quiet; from cxr import models; print(json.dumps({a: [l.name for l in "
            "models.backbone(a, 224, 'none').layers[1:]] for a in ('mobilenetv2', 'efficientnetb0', 'resnet50', 'densenet121')}))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=PROJECT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    built = json.loads(proc.stdout.strip().splitlines()[-1])
    assert built == json.loads(needs.BACKBONE_LAYERS.read_text())
    assert set(built) == set(params.ARCHS)


def test_the_check_and_finetune_accept_the_same_unfreeze_from():
    """The rule is written twice: on the table here (no TensorFlow in the check) and on the built backbone in
    models.first_trainable_layer; for every block of every backbone, some layer names and some names that are
    neither, both must agree."""
    from cxr import models

    for arch, names in json.loads(needs.BACKBONE_LAYERS.read_text()).items():
        net = models.backbone(arch, 224, "none")
        blocks = {m.group(1) for m in map(needs.BLOCK.match, names) if m}
        for start in sorted(blocks) + names[-3:] + ["all", "block_13", "conv5_block1", "block6a", "block_1_expand_B", "nope"]:
            try:
                models.first_trainable_layer(net, start)
                built = True
            except UserError:
                built = False
            assert (needs.unfreeze_problem(arch, start) is None) == built, (arch, start)


def test_download_reads_no_model_params_and_the_check_writes_nothing():
    """The design that keeps reruns down: `download` would rerun on every model.* change if it checked the
    weights itself; the `check` stage has no outputs, so no stage depends on it and it never reruns another."""
    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert not any(k == "model" or k.startswith("model.") for k in stages["download"]["params"])
    assert not {"outs", "metrics", "plots"} & set(stages["check"])
    assert next(iter(stages)) == "check"   # listed first: a full `dvc repro` runs it first


# --- the weights Keras would fetch --------------------------------------------------------------------

@pytest.mark.parametrize("arch, alpha, size", [("mobilenetv2", 1.0, 224), ("mobilenetv2", 0.35, 64), ("mobilenetv2", 0.5, 96),
                                               ("resnet50", 1.0, 64), ("efficientnetb0", 1.0, 64), ("densenet121", 1.0, 64)])
def test_weights_file_is_the_one_keras_applications_fetches(arch, alpha, size, monkeypatch):
    import keras
    from keras.src.utils import file_utils

    from cxr import models

    class Asked(Exception):
        pass

    def get_file(fname=None, origin=None, **kwargs):
        raise Asked(fname, origin)

    monkeypatch.setattr(file_utils, "get_file", get_file)
    cls = getattr(keras.applications, models.BACKBONES[arch])
    with pytest.raises(Asked) as asked:
        cls(include_top=False, weights="imagenet", input_shape=(size, size, 3), **({"alpha": alpha} if arch == "mobilenetv2" else {}))
    assert asked.value.args == (weights.file_name(arch, alpha, size), weights.url(arch, alpha, size))


def test_weights_cache_is_where_keras_keeps_them():
    from keras.src.backend import config

    assert weights.cache_dirs()[0] == Path(config.keras_home()).expanduser() / "models"
