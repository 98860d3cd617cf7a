"""cxr.sources adapters on small synthetic trees laid out like the real archives."""
from collections import Counter
from pathlib import Path

import pytest
import yaml
from PIL import Image

from cxr import download, params, sources
from cxr.errors import UserError
from cxr.sources import is_covid_finding

PARAMS = Path(__file__).resolve().parents[1] / "params.yaml"


def _png(path: Path, value: int = 128) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), value).save(path)
    return path


def _files(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


def _check_accounting(root, records, drops):
    """Every file is exactly one record (an image, or a mask read with it) or one drop."""
    names = [f for r in records for f in (r.file, r.mask, r.lungs) if f] + [d.file for d in drops]
    assert len(names) == len(set(names)), "a file was counted twice"
    assert set(names) == _files(root)


# --- COVID-19 Radiography Database ---------------------------------------------------------------

CURRENT = "COVID-19_Radiography_Dataset"
CLASSES3 = ["COVID", "Normal", "Viral Pneumonia"]


@pytest.fixture
def current_layout(tmp_path):
    root = tmp_path / "raw"
    base = root / CURRENT
    for cls, n in {"COVID": 3, "Normal": 4, "Viral Pneumonia": 2, "Lung_Opacity": 2}.items():
        for i in range(n):
            _png(base / cls / "images" / f"{cls}-{i + 1}.png")
            _png(base / cls / "masks" / f"{cls}-{i + 1}.png", 255)
        (base / f"{cls}.metadata.xlsx").write_bytes(b"PK\x03\x04 not really a workbook")
    (base / "README.md.txt").write_text("readme")
    _png(base / "stray.png")                       # inside the dataset folder, outside class folders
    _png(root / "toplevel.png")                    # outside the dataset folder entirely
    return root


def test_radiography_current_layout(current_layout):
    (current_layout / CURRENT / "COVID/images/COVID-3.png").unlink()     # a mask without its image
    (current_layout / CURRENT / "Normal/masks/Normal-4.png").unlink()    # an image without its mask
    records, drops = sources.radiography(current_layout, CLASSES3)
    _check_accounting(current_layout, records, drops)
    assert Counter(r.label for r in records) == {"COVID": 2, "Normal": 4, "Viral Pneumonia": 2}
    assert all("/images/" in r.file for r in records)
    # each image's lung mask is the same name under masks/
    lungs = {r.file: r.lungs for r in records}
    assert lungs[f"{CURRENT}/COVID/images/COVID-1.png"] == f"{CURRENT}/COVID/masks/COVID-1.png"
    assert lungs[f"{CURRENT}/Normal/images/Normal-4.png"] is None
    assert sum(v is not None for v in lungs.values()) == 7
    by_file = {d.file: d.reason for d in drops}
    assert Counter(by_file.values()) == {"auxiliary_file": 4 + 1 + 1, "class_not_selected": 4, "unlabeled": 2}
    assert by_file[f"{CURRENT}/COVID/masks/COVID-3.png"] == "auxiliary_file"
    assert by_file[f"{CURRENT}/Lung_Opacity/masks/Lung_Opacity-1.png"] == "class_not_selected"
    assert by_file[f"{CURRENT}/COVID.metadata.xlsx"] == "auxiliary_file"
    assert by_file[f"{CURRENT}/README.md.txt"] == "auxiliary_file"
    assert by_file[f"{CURRENT}/Lung_Opacity/images/Lung_Opacity-2.png"] == "class_not_selected"
    assert by_file[f"{CURRENT}/stray.png"] == "unlabeled"
    assert by_file["toplevel.png"] == "unlabeled"
    rec = {r.file: r for r in records}[f"{CURRENT}/Viral Pneumonia/images/Viral Pneumonia-2.png"]
    assert rec.label == "Viral Pneumonia" and rec.group == "Viral Pneumonia-2"


def test_radiography_selecting_lung_opacity(current_layout):
    records, drops = sources.radiography(current_layout, CLASSES3 + ["Lung_Opacity"])
    _check_accounting(current_layout, records, drops)
    assert Counter(r.label for r in records)["Lung_Opacity"] == 2
    assert not any(d.reason == "class_not_selected" for d in drops)


def test_radiography_via_load(current_layout):
    records, drops = sources.load("covid-radiography", current_layout, {"classes": CLASSES3})
    assert len(records) == 9
    with pytest.raises(UserError, match="not found"):
        sources.load("covid-radiography", current_layout / "absent", {"classes": CLASSES3})


def test_radiography_older_layout_upper_case_folders(tmp_path):
    root = tmp_path / "raw"
    base = root / "COVID-19 Radiography Database"
    for folder, n in {"COVID": 2, "NORMAL": 3, "Viral Pneumonia": 1}.items():
        for i in range(n):
            _png(base / folder / f"{folder} ({i + 1}).png")
        (base / f"{folder}.metadata.xlsx").write_bytes(b"xlsx")
    _png(base / "loose.png")
    records, drops = sources.radiography(root, CLASSES3)
    _check_accounting(root, records, drops)
    assert Counter(r.label for r in records) == {"COVID": 2, "Normal": 3, "Viral Pneumonia": 1}
    assert {r.label for r in records if "/NORMAL/" in r.file} == {"Normal"}
    assert Counter(d.reason for d in drops) == {"auxiliary_file": 3, "unlabeled": 1}


def test_radiography_old_covid19_folder_name(tmp_path):
    root = tmp_path / "raw"
    for folder in ("COVID-19", "NORMAL"):
        _png(root / folder / "x.png")
    records, drops = sources.radiography(root, ["COVID", "Normal"])
    assert sorted(r.label for r in records) == ["COVID", "Normal"] and drops == []


def test_radiography_no_layout_is_user_error(tmp_path):
    root = tmp_path / "raw"
    _png(root / "pictures" / "a.png")
    _png(root / "other" / "b.png")
    with pytest.raises(UserError, match="Radiography"):
        sources.radiography(root, CLASSES3)


def test_radiography_unknown_class_is_user_error(current_layout):
    with pytest.raises(UserError, match="Bacterial"):
        sources.radiography(current_layout, ["COVID", "Bacterial"])


def test_radiography_ignores_linked_class_folders(current_layout, tmp_path):
    # class folders elsewhere, reached through a linked folder and through linked class folders in a real one:
    # sorted before the real dataset folder, they must not pass for the dataset root
    elsewhere = tmp_path / "elsewhere"
    for cls in ("COVID", "Normal"):
        _png(elsewhere / cls / "x.png")
    (current_layout / "0link").symlink_to(elsewhere, target_is_directory=True)
    (current_layout / "0decoy").mkdir()
    for cls in ("COVID", "Normal"):
        (current_layout / "0decoy" / cls).symlink_to(elsewhere / cls, target_is_directory=True)
    records, drops = sources.radiography(current_layout, CLASSES3)
    assert Counter(r.label for r in records) == {"COVID": 3, "Normal": 4, "Viral Pneumonia": 2}
    assert all(r.file.startswith(f"{CURRENT}/") for r in records)
    links = {d.file for d in drops if d.reason == "link"}
    assert links == {"0link", "0decoy/COVID", "0decoy/Normal"}
    _check_accounting(current_layout, records, [d for d in drops if d.file not in links])


# --- ieee8023 covid-chestxray --------------------------------------------------------------------

CX_CLASSES = ["COVID-19", "non-COVID"]
VIEWS = ["PA", "AP", "AP Supine"]

META_ROWS = [
    # patientid, finding, view, modality, folder, filename
    ("1", "COVID-19", "PA", "X-ray", "images", "a.png"),
    ("1", "COVID-19", "AP Supine", "X-ray", "images", "a2.png"),
    ("2", "COVID-19, ARDS", "AP", "X-ray", "images", "b.png"),
    ("3", "Pneumonia/Viral/COVID-19", "PA", "X-ray", "images", "c.png"),
    ("4", "SARS", "PA", "X-ray", "images", "d.png"),
    ("5", "Pneumonia/Bacterial/Streptococcus", "AP", "X-ray", "images", "e.png"),
    ("6", "COVID-19", "Axial", "CT", "volumes", "f.png"),
    ("7", "COVID-19", "L", "X-ray", "images", "g.png"),
    ("8", "todo", "PA", "X-ray", "images", "h.png"),
    ("9", "COVID-19", "PA", "X-ray", "images", "missing.png"),
]


@pytest.fixture
def chestxray_tree(tmp_path):
    root = tmp_path / "raw"
    base = root / "covid-chestxray-dataset"
    lines = ["patientid,offset,finding,view,modality,folder,filename"]
    for pid, finding, view, modality, folder, fname in META_ROWS:
        lines.append(f'{pid},,"{finding}",{view},{modality},{folder},{fname}')
        if fname != "missing.png":
            _png(base / folder / fname)
    base.mkdir(parents=True, exist_ok=True)
    (base / "metadata.csv").write_text("\n".join(lines) + "\n")
    _png(base / "images" / "not_in_metadata.jpg")
    (base / "README.md").write_text("readme")
    _png(base / "annotations" / "seg.png")
    return root


def test_chestxray_labels_and_drops(chestxray_tree):
    records, drops = sources.chestxray(chestxray_tree, CX_CLASSES, "COVID-19", VIEWS)
    base = "covid-chestxray-dataset"
    rec = {r.file: r for r in records}
    assert {f: r.label for f, r in rec.items()} == {
        f"{base}/images/a.png": "COVID-19",
        f"{base}/images/a2.png": "COVID-19",
        f"{base}/images/b.png": "COVID-19",
        f"{base}/images/c.png": "COVID-19",
        f"{base}/images/d.png": "non-COVID",
        f"{base}/images/e.png": "non-COVID",
    }
    assert rec[f"{base}/images/a.png"].group == rec[f"{base}/images/a2.png"].group == "patient-1"
    assert rec[f"{base}/images/b.png"].group == "patient-2"
    reasons = {d.file: d.reason for d in drops}
    assert reasons == {
        f"{base}/volumes/f.png": "not_xray",
        f"{base}/images/g.png": "view_excluded",
        f"{base}/images/h.png": "unknown_finding",
        f"{base}/images/missing.png": "missing_file",
        f"{base}/images/not_in_metadata.jpg": "unlabeled",
        f"{base}/README.md": "auxiliary_file",
        f"{base}/annotations/seg.png": "auxiliary_file",
    }
    # every file on disk except metadata.csv is accounted for; the missing one only as a drop
    on_disk = _files(chestxray_tree) - {f"{base}/metadata.csv"}
    assert on_disk == (set(rec) | set(reasons)) - {f"{base}/images/missing.png"}


def test_chestxray_views_are_configurable(chestxray_tree):
    records, drops = sources.chestxray(chestxray_tree, CX_CLASSES, "COVID-19", ["PA"])
    assert "covid-chestxray-dataset/images/a2.png" in {d.file for d in drops if d.reason == "view_excluded"}
    assert "covid-chestxray-dataset/images/a2.png" not in {r.file for r in records}


def test_chestxray_without_folder_column_uses_images(tmp_path):
    root = tmp_path / "raw"
    _png(root / "images" / "a.png")
    _png(root / "images" / "b.png")
    (root / "metadata.csv").write_text(
        "patientid,finding,view,modality,filename\n"
        "1,COVID-19,PA,X-ray,a.png\n"
        "2,Pneumonia,AP,X-ray,b.png\n"
    )
    records, drops = sources.load("covid-chestxray", root, {"classes": CX_CLASSES, "positive": "COVID-19", "views": VIEWS})
    assert [(r.file, r.label, r.group) for r in records] == [
        ("images/a.png", "COVID-19", "patient-1"), ("images/b.png", "non-COVID", "patient-2")]
    assert drops == []


def test_chestxray_without_metadata_is_user_error(tmp_path):
    _png(tmp_path / "raw" / "images" / "a.png")
    with pytest.raises(UserError, match="metadata.csv"):
        sources.chestxray(tmp_path / "raw", CX_CLASSES, "COVID-19", VIEWS)


def test_chestxray_missing_columns_is_user_error(tmp_path):
    (tmp_path / "metadata.csv").write_text("patientid,finding\n1,COVID-19\n")
    with pytest.raises(UserError, match="filename"):
        sources.chestxray(tmp_path, CX_CLASSES, "COVID-19", VIEWS)


@pytest.mark.parametrize("finding,expected", [
    ("COVID-19", True),
    ("COVID-19, ARDS", True),
    ("Pneumonia/Viral/COVID-19", True),
    ("covid19", True),
    ("SARS", False),
    ("Pneumonia/Viral/SARS", False),
    ("Pneumonia", False),
    ("No Finding", False),
    ("", False),
])
def test_is_covid_finding(finding, expected):
    assert is_covid_finding(finding) is expected


# --- demo ----------------------------------------------------------------------------------------

def test_demo_refused_mask_drops_its_image_once_and_empty_file_is_missing(tmp_path):
    raw = tmp_path / "raw"
    for name in ("a", "b", "c"):
        _png(raw / "images" / f"{name}.png")
    _png(raw / "masks" / "a.png", 255)
    (raw / "metadata.csv").write_text(
        "file,label,patientid,mask,lungs\n"
        "images/a.png,COVID,p1,masks/a.png,\n"
        "images/b.png,COVID,p2,../../etc/passwd,\n"      # a mask outside: the image is dropped, once
        "images/c.png,Normal,p3,,../outside.png\n"       # lungs outside: likewise
        ",Normal,p4,,\n"                                  # no file named at all
    )
    records, drops = sources.demo(raw, ["COVID", "Normal"])
    assert [(r.file, r.mask) for r in records] == [("images/a.png", "masks/a.png")]
    by_file = {d.file: d for d in drops}
    assert by_file[""].reason == "missing_file" and by_file[""].detail == "metadata.csv names no file"
    for name in ("images/b.png", "images/c.png"):
        assert by_file[name].reason == "outside_dataset"
        assert "leaves the dataset folder" in by_file[name].detail
    named = [d for d in drops if d.file]
    _check_accounting(raw, records, named + [sources.Drop("metadata.csv", "read")])
    assert Counter(d.reason for d in drops) == {"outside_dataset": 2, "missing_file": 1}


# --- links into DVC's cache ------------------------------------------------------------------------

HEX = "0123456789abcdef" * 2


@pytest.fixture
def dvc_repo(tmp_path, monkeypatch):
    """A project folder with `.dvc/` as the working directory (as stages run), its cache location read afresh."""
    repo = tmp_path / "repo"
    (repo / ".dvc").mkdir(parents=True)
    monkeypatch.chdir(repo)
    sources.dvc_cache_dir.cache_clear()
    yield repo
    sources.dvc_cache_dir.cache_clear()


def _linked(raw: Path, target: Path) -> Path:
    """raw/images/x.png, a link to target (a real image there, named as DVC's cache names it: no suffix)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    Image.new("L", (8, 8), 128).save(target, format="PNG")
    link = raw / "images" / "x.png"
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target)
    return link


def test_link_to_a_cache_shaped_name_outside_dvc_cache_leaves_the_dataset(dvc_repo, tmp_path):
    raw = dvc_repo / "data" / "raw"
    _linked(raw, tmp_path / "anywhere" / "ab" / f"{HEX}.png")
    files, drops = sources.scan(raw)
    assert files == []
    assert drops == [sources.Drop("images/x.png", "outside_dataset", "a link to a file outside the dataset folder")]


def test_link_into_the_default_dvc_cache_is_a_dataset_file(dvc_repo, monkeypatch):
    raw = dvc_repo / "data" / "raw"
    link = _linked(raw, dvc_repo / ".dvc" / "cache" / "files" / "md5" / "ab" / HEX)
    (dvc_repo / "data" / "sub").mkdir()
    for cwd in (dvc_repo, dvc_repo / "data" / "sub"):  # the project is found upwards from the working directory
        monkeypatch.chdir(cwd)
        assert sources.scan(raw) == ([link], [])


@pytest.mark.parametrize("config,value", [
    ("config", "../../store"),             # relative to .dvc, as DVC reads it
    ("config", "{store}"),                 # absolute
    ("config.local", "{store}"),           # the local config wins over config
])
def test_link_into_a_configured_dvc_cache_is_a_dataset_file(dvc_repo, tmp_path, config, value):
    store = tmp_path / "store"
    (dvc_repo / ".dvc" / "config").write_text("[core]\n    autostage = true\n[cache]\n    dir = /elsewhere\n")
    (dvc_repo / ".dvc" / config).write_text(f"[cache]\n    dir = {value.format(store=store)}\n    type = symlink\n")
    raw = dvc_repo / "data" / "raw"
    link = _linked(raw, store / "files" / "md5" / "ab" / HEX)
    assert sources.scan(raw) == ([link], [])
    assert sources.dvc_cache_dir(str(dvc_repo)) == store.resolve()


def test_unreadable_dvc_config_falls_back_to_the_default_cache(dvc_repo):
    (dvc_repo / ".dvc" / "config").write_text("[cache\n dir = = /elsewhere\n\x00")
    assert sources.dvc_cache_dir(str(dvc_repo)) == (dvc_repo / ".dvc" / "cache").resolve()
    (dvc_repo / ".dvc" / "config").write_bytes(b"[cache]\ndir = \xff\xfe\n")
    sources.dvc_cache_dir.cache_clear()
    assert sources.dvc_cache_dir(str(dvc_repo)) == (dvc_repo / ".dvc" / "cache").resolve()


# --- the registry ------------------------------------------------------------------------------

class _Mini(sources.Source):
    """A made-up generated source: two classes, `n` one-pixel images each."""
    name = "mini"
    generated = True

    def check(self, p, key):
        params.integer(p, f"{key}.n", 1)

    def generate(self, dest, ds):
        for label in ds["classes"]:
            for i in range(ds["n"]):
                _png(dest / label / f"{i}.png")
        return "v1"

    def records(self, raw, ds):
        files = sorted(p for p in raw.rglob("*.png"))
        return [sources.Record(f.relative_to(raw).as_posix(), f.parent.name, f.stem) for f in files], []


def _tree(**mini):
    tree = yaml.safe_load(PARAMS.read_text())
    tree["dataset"] = "mini"
    tree["datasets"]["mini"] = {"classes": ["a", "b"], "positive": "a", "n": 2, **mini}
    return tree


def test_registering_an_adapter_is_all_a_new_source_needs(tmp_path, monkeypatch):
    monkeypatch.setitem(sources.SOURCES, "mini", _Mini())
    p = params.validate(_tree(), sources.SOURCES)
    ds = params.dataset(p)
    with pytest.raises(UserError, match=r"datasets\.mini\.n"):   # its own params are checked by its adapter
        params.validate(_tree(n=0), sources.SOURCES)
    with pytest.raises(UserError, match=r"unknown key datasets\.mini\.clases \(did you mean datasets\.mini\.classes\?\)"):
        params.validate(_tree(clases=1), sources.SOURCES)
    assert download.origin("mini", ds) == {"dataset": "mini", "origin": "generated"}
    record = download.fetch("mini", ds, tmp_path / "raw")
    assert (record["source"], record["version"], record["files"]) == ("generated", "v1", 4)
    records, drops = sources.load("mini", tmp_path / "raw", ds)
    assert Counter(r.label for r in records) == {"a": 2, "b": 2} and drops == []
    with pytest.raises(UserError, match="mini"):                  # listed among the registered sources
        sources.get("nope")


def test_unknown_dataset_is_one_line_never_a_fallback(tmp_path):
    (tmp_path / "raw").mkdir()
    for call in (lambda: sources.load("nope", tmp_path / "raw", {"classes": ["a", "b"]}),
                 lambda: download.origin("nope", {}),
                 lambda: download.fetch("nope", {}, tmp_path / "dest")):
        with pytest.raises(UserError) as info:
            call()
        assert str(info.value).splitlines() == [f"unknown dataset 'nope': the registered sources are {', '.join(sorted(sources.SOURCES))}"]
    assert not (tmp_path / "dest").exists()
    tree = yaml.safe_load(PARAMS.read_text())
    tree["dataset"] = "nope"
    tree["datasets"]["nope"] = {"classes": ["a", "b"], "positive": "a"}
    with pytest.raises(UserError, match=r"^params\.yaml: dataset must be one of covid-chestxray, covid-radiography, demo, got 'nope'$"):
        params.validate(tree, sources.SOURCES)
    tree["dataset"] = "demo"
    with pytest.raises(UserError, match=r"^params\.yaml: unknown key datasets\.nope \(valid keys here: covid-chestxray, covid-radiography, demo\)$"):
        params.validate(tree, sources.SOURCES)
    params.validate(tree)  # stages that never touch a source accept any block with classes and positive
