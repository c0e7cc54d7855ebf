"""The notebooks in notebooks/: committed clean, thin, and running headless.

Both notebooks are executed with papermill on the shared data (flowers_mini,
the MobileNetV2-0.35 weights file, small images, one or two epochs), in a
kernel that runs this interpreter on this checkout. A cell that errors fails
the test. The helpers of `tl_keras.notebook` that only Colab exercises
(uploads, Drive, downloads) are tested against a stand-in `google.colab`.
"""

from __future__ import annotations

import ast
import dataclasses
import json
import os
import re
import sys
import types
import zipfile
from pathlib import Path

import nbformat
import pytest
from conftest import FLOWERS_MINI, REPO, WEIGHTS_MNV2_035

from tl_keras import notebook
from tl_keras.config import Config

NOTEBOOKS = REPO / "notebooks"
NAMES = ("quickstart", "your_own_images")
# The parameters the issue names; each notebook has them all.
FLAG_PARAMETERS = {"data", "weights", "image_size", "head_epochs", "finetune_epochs",
                   "output_dir"}
# Parameters that are no flag of tl-keras: where in Google Drive; what to pip install.
OTHER_PARAMETERS = {"drive_folder", "tl_keras_requirement"}
SMALL = dict(weights=str(WEIGHTS_MNV2_035), alpha=0.35, image_size=64, head_epochs=2,
             finetune_epochs=1)
KERNEL = "tl-keras-test"


def _read(name: str):
    return nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)


def _code_cells(nb):
    return [c for c in nb.cells if c.cell_type == "code"]


def _parameters_cell(nb):
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1, "exactly one cell tagged `parameters`"
    return cells[0]


# --------------------------------------------------------------------------
# The committed notebooks
# --------------------------------------------------------------------------

@pytest.mark.parametrize("name", NAMES)
def test_committed_without_outputs(name):
    nb = _read(name)
    nbformat.validate(nb)
    for cell in _code_cells(nb):
        assert cell.outputs == [] and cell.execution_count is None, (
            f"{name}: outputs committed in cell {cell.get('id')}; clear them "
            "(jupyter nbconvert --clear-output --inplace notebooks/*.ipynb)")


@pytest.mark.parametrize("name", NAMES)
def test_parameters_are_named_like_the_flags(name):
    tree = ast.parse(_parameters_cell(_read(name)).source)
    assigned = {t.id for node in tree.body for t in getattr(node, "targets", [])}
    assert FLAG_PARAMETERS <= assigned
    fields = {f.name: f for f in dataclasses.fields(Config)}
    assert assigned <= set(fields) | OTHER_PARAMETERS, assigned - set(fields) - OTHER_PARAMETERS
    # Same types as the flags, so papermill's -p VALUE parses the same way.
    values = {}
    exec(compile(tree, name, "exec"), {}, values)  # literals only
    for k, v in values.items():
        if k in fields:
            assert type(v) is type(getattr(Config(), k)), (k, v)


@pytest.mark.parametrize("name", NAMES)
def test_thin_every_cell_calls_the_library(name):
    nb = _read(name)
    params, install = _code_cells(nb)[:2]
    assert "parameters" in params.metadata.tags
    assert '%pip install -q "{tl_keras_requirement}"' in install.source
    assert "import tl_keras" in install.source
    for cell in _code_cells(nb)[2:]:
        tree = ast.parse(cell.source)
        for node in ast.walk(tree):
            assert not isinstance(node, (ast.FunctionDef, ast.ClassDef, ast.Lambda, ast.For,
                                         ast.While)), f"pipeline code in a notebook: {cell.source}"
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                module = getattr(node, "module", None) or node.names[0].name
                assert module.split(".")[0] == "tl_keras", f"{name} imports {module}"
        assert re.search(r"\b(notebook\.|run_training|Config)", cell.source), cell.source


@pytest.mark.parametrize("name", NAMES)
def test_installs_the_requirement_the_readme_names(name):
    """tl_keras is not on PyPI: no invented default; empty means a wheel uploaded in Colab."""
    values = {}
    exec(compile(_parameters_cell(_read(name)).source, name, "exec"), {}, values)
    assert values["tl_keras_requirement"] == ""
    install = _code_cells(_read(name))[1].source
    assert "files.upload()" in install and "pip wheel . --no-deps -w dist" in install
    assert "python -m pip wheel . --no-deps -w dist" in (REPO / "README.md").read_text()
    assert "parameters" in _code_cells(_read(name))[0].metadata.tags  # the first cell


# --------------------------------------------------------------------------
# Running them headless
# --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    """A Jupyter kernel running this interpreter on this checkout (not an installed copy)."""
    root = tmp_path_factory.mktemp("jupyter")
    spec = root / "kernels" / KERNEL
    spec.mkdir(parents=True)
    pythonpath = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    spec.joinpath("kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "tl_keras tests", "language": "python",
        "env": {"PYTHONPATH": pythonpath, "TF_CPP_MIN_LOG_LEVEL": "2"}}))
    old = os.environ.get("JUPYTER_PATH")
    os.environ["JUPYTER_PATH"] = os.pathsep.join(p for p in (str(root), old) if p)
    yield KERNEL
    if old is None:
        os.environ.pop("JUPYTER_PATH", None)
    else:
        os.environ["JUPYTER_PATH"] = old


def _execute(name: str, workdir: Path, kernel_name: str, **parameters):
    import papermill

    return papermill.execute_notebook(
        str(NOTEBOOKS / f"{name}.ipynb"), str(workdir / f"{name}.out.ipynb"),
        parameters=parameters, kernel_name=kernel_name, cwd=str(workdir),
        progress_bar=False, execution_timeout=900)


def test_install_cell_installs_nothing_when_tl_keras_imports(kernel, tmp_path):
    """A papermill run on a checkout: the requirement is a parameter, and nothing is installed."""
    nb = _read("quickstart")
    params, install = _code_cells(nb)[:2]
    nb.cells = [params, install]
    path = tmp_path / "install.ipynb"
    nbformat.write(nb, str(path))
    import papermill

    # Were it installed, pip would fail on this requirement and say so.
    out = papermill.execute_notebook(
        str(path), str(tmp_path / "install.out.ipynb"), kernel_name=kernel,
        parameters={"tl_keras_requirement": "tl_keras @ file:///no/such/archive.zip"},
        progress_bar=False, execution_timeout=300)
    assert _texts(out) == "", _texts(out)
    injected = [c for c in out.cells if "injected-parameters" in c.metadata.get("tags", [])]
    assert "file:///no/such/archive.zip" in injected[0].source


def _texts(nb) -> str:
    parts = []
    for cell in _code_cells(nb):
        for out in cell.outputs:
            if out.output_type == "stream":
                parts.append(out.text)
            elif "data" in out and "text/plain" in out.data:
                parts.append(out.data["text/plain"])
    return "\n".join(parts)


def _results(nb) -> list[str]:
    """The cells that end in a value (Out[n]); display cells should not."""
    return [c.source for c in _code_cells(nb)
            if any(o.output_type == "execute_result" for o in c.outputs)]


def _mime_count(nb, mime: str) -> int:
    return sum(mime in out.get("data", {}) for c in _code_cells(nb) for out in c.outputs)


@pytest.mark.slow
def test_quickstart_runs_headless(kernel, tmp_path):
    out = tmp_path / "run"
    image = sorted((FLOWERS_MINI / "daisy").iterdir())[0]
    nb = _execute("quickstart", tmp_path, kernel, data=str(FLOWERS_MINI), output_dir=str(out),
                  images=str(image), **SMALL)
    assert (out / "export" / "1" / "saved_model.pb").is_file()
    classes = (out / "labels.txt").read_text().split()
    text = _texts(nb)
    # The parameters reached the run.
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["image_size"], cfg["alpha"], cfg["data"]) == (64, 0.35, str(FLOWERS_MINI))
    assert re.search(r"test \(20 images\): accuracy [0-9.]+", text), text[-2000:]
    # The run's figures were displayed, each once.
    figures = [f for f, _ in notebook.FIGURES.values() if (out / f).is_file()]
    assert {"learning_curves.png", "confusion_matrix.png"} <= set(figures)
    # ... and so was the photo, classified by the SavedModel.
    assert _mime_count(nb, "image/png") == len(figures) + 1
    # (the class and its score, or "unknown" with the nearest class when the
    # export's unknown output flags the photo)
    m = (re.search(rf"{re.escape(image.name)}: predicted: (?!unknown)(\S+) \(([0-9.]+)\)", text)
         or re.search(rf"{re.escape(image.name)}: predicted: unknown \(ood_score [0-9.]+; "
                      r"nearest class (\S+) ([0-9.]+)\)", text))
    assert m, text[-2000:]
    assert m.group(1) in classes and 0 < float(m.group(2)) <= 1
    assert _results(nb) == ["notebook.export_dir(output_dir)"]


@pytest.mark.slow
def test_your_own_images_runs_headless_on_a_zip(kernel, tmp_path):
    # A zip as a Mac makes it: one top folder, plus resource forks and Finder files.
    archive = tmp_path / "my_photos.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        for path in sorted(FLOWERS_MINI.rglob("*.jpg")):
            rel = path.relative_to(FLOWERS_MINI)
            zf.write(path, f"my_photos/{rel}")
            zf.writestr(f"__MACOSX/my_photos/{rel.parent}/._{rel.name}", b"\0\5\26\7")
        zf.writestr("my_photos/.DS_Store", b"\0\0\0\1Bud1")
    out = tmp_path / "flowers_model"
    nb = _execute("your_own_images", tmp_path, kernel, data=str(archive), output_dir=str(out),
                  **SMALL)
    text = _texts(nb)
    assert re.search(r"my_photos: 5 classes, 100 images", text), text[-2000:]
    assert (out / "labels.txt").read_text().split() == sorted(
        p.name for p in FLOWERS_MINI.iterdir() if p.is_dir())
    assert _mime_count(nb, "image/png") >= 2  # curves and confusion matrix at least
    zipped = out / "flowers_model.zip"
    with zipfile.ZipFile(zipped) as zf:
        names = zf.namelist()
    assert "flowers_model/1/saved_model.pb" in names
    assert "flowers_model/1/assets/labels.txt" in names
    assert f"saved to {zipped}" in text
    assert _results(nb) == []


# --------------------------------------------------------------------------
# tl_keras.notebook, the parts the headless runs do not reach
# --------------------------------------------------------------------------

def test_prepare_images_takes_a_plain_folder_and_reports_bad_input(tmp_path, capsys):
    assert notebook.prepare_images(str(FLOWERS_MINI)) == str(FLOWERS_MINI)
    assert "5 classes, 100 images" in capsys.readouterr().out
    with pytest.raises(ValueError, match=r"data='': set `data`"):
        notebook.prepare_images("")
    with pytest.raises(ValueError, match=r"no such folder or \.zip file"):
        notebook.prepare_images(str(tmp_path / "missing"))
    # One top folder (next to a README) is looked through; images of its own stop that.
    for c in ("cats", "dogs"):
        (tmp_path / "wrap" / "top" / c).mkdir(parents=True)
        (tmp_path / "wrap" / "top" / c / "a.jpg").write_bytes(b"jpeg")
    (tmp_path / "wrap" / "README.txt").write_text("my photos")
    assert notebook.prepare_images(str(tmp_path / "wrap")) == str(tmp_path / "wrap" / "top")
    (tmp_path / "wrap" / "top" / "cover.jpg").write_bytes(b"jpeg")
    (tmp_path / "wrap" / "top" / "cats" / "inner").mkdir()
    assert notebook.find_class_root(str(tmp_path / "wrap" / "top" / "cats")) == str(
        tmp_path / "wrap" / "top" / "cats")  # has an image of its own
    bad = tmp_path / "broken.zip"
    bad.write_bytes(b"PK\3\4 this is not a zip")
    with pytest.raises(ValueError, match=r"broken\.zip.*not a readable zip"):
        notebook.prepare_images(str(bad), extract_dir=str(tmp_path / "x"))
    assert not (tmp_path / "x" / "broken").exists()  # nothing half-extracted


def test_zip_export_holds_the_version_folders_only(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    with pytest.raises(ValueError, match="output_dir=.*not a SavedModel folder"):
        notebook.zip_export(str(run))
    for version in ("1", "2"):
        (run / "export" / version / "variables").mkdir(parents=True)
        (run / "export" / version / "saved_model.pb").write_bytes(b"pb" + version.encode())
        (run / "export" / version / "variables" / "variables.index").write_bytes(b"ix")
    (run / "export" / ".tmp123.3").mkdir()  # an export in progress
    (run / "export" / ".tmp123.3" / "saved_model.pb").write_bytes(b"partial")
    path = notebook.zip_export(str(run), name="flowers")
    assert path == str(run / "flowers.zip")
    with zipfile.ZipFile(path) as zf:  # the newest version only, as TF Serving would serve
        assert sorted(zf.namelist()) == ["flowers/2/saved_model.pb",
                                         "flowers/2/variables/variables.index"]
        assert zf.read("flowers/2/saved_model.pb") == b"pb2"
    assert notebook.export_dir(str(run)) == str(run / "export" / "2")


def test_show_figure_says_when_a_run_has_none(tmp_path, capsys):
    notebook.show_figure(str(tmp_path), "mistakes")
    assert "The most confident mistakes: none in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="figure 'roc'"):
        notebook.show_figure(str(tmp_path), "roc")


@pytest.fixture
def fake_colab(monkeypatch):
    """A stand-in for google.colab's files and drive modules, recording calls."""
    calls = {"download": [], "mount": [], "upload": {}}
    files = types.ModuleType("google.colab.files")
    files.upload = lambda: calls["upload"]
    files.download = lambda path: calls["download"].append(path)
    drive = types.ModuleType("google.colab.drive")
    drive.mount = lambda mountpoint: calls["mount"].append(mountpoint)
    colab = types.ModuleType("google.colab")
    colab.files, colab.drive = files, drive
    for name, mod in (("google.colab", colab), ("google.colab.files", files),
                      ("google.colab.drive", drive)):
        monkeypatch.setitem(sys.modules, name, mod)
    return calls


def test_outside_colab_nothing_is_uploaded_or_downloaded(tmp_path, capsys):
    assert not notebook.in_colab()
    notebook.classify_images(str(tmp_path), "")
    assert "set `images` in the parameters cell" in capsys.readouterr().out
    f = tmp_path / "model.zip"
    f.write_bytes(b"z")
    notebook.download(str(f))
    assert f"saved to {f}" in capsys.readouterr().out
    with pytest.raises(RuntimeError, match="only available in Colab"):
        notebook.upload_zip(str(tmp_path))


def test_in_colab_uploads_downloads_and_drive(fake_colab, tmp_path):
    assert notebook.in_colab()
    fake_colab["upload"].update({"notes.txt": b"x", "photos.zip": b"PK zip bytes"})
    path = notebook.upload_zip(str(tmp_path / "uploads"))
    assert Path(path).read_bytes() == b"PK zip bytes"
    fake_colab["upload"]["more.zip"] = b"PK"
    with pytest.raises(ValueError, match="expected exactly one .zip"):
        notebook.upload_zip(str(tmp_path / "uploads"))
    notebook.download(path)
    assert fake_colab["download"] == [path]
    fake_colab["upload"].clear()
    fake_colab["upload"].update({"a.jpg": b"jpeg a", "b.png": b"png b"})
    uploaded = notebook._upload_images(str(tmp_path / "photos")).split(",")
    assert [Path(p).read_bytes() for p in uploaded] == [b"jpeg a", b"png b"]
    mount = tmp_path / "drive"
    (mount / "MyDrive" / "photos").mkdir(parents=True)
    assert notebook.mount_drive("photos", str(mount)) == str(mount / "MyDrive" / "photos")
    assert notebook.mount_drive("/MyDrive/photos/", str(mount)) == str(mount / "MyDrive" / "photos")
    assert fake_colab["mount"] == [str(mount)] * 2
    with pytest.raises(ValueError, match=r"drive_folder='fotos'.*does not exist"):
        notebook.mount_drive("fotos", str(mount))


@pytest.mark.parametrize("evaluated", ["test", "cross_validation"])
def test_show_results_prints_a_cross_validated_run_that_fine_tuned_on_all_images(
        tmp_path, capsys, evaluated):
    # A run without a validation split: the head's out-of-fold figures, the
    # stage-2 trial, stage 2 on all images (no validation accuracy), and the
    # test or, without one, the held-out estimate.
    report = {"stage1": {"epochs": 0, "val_accuracy": 0.8387, "seconds": 1.6,
                         "cross_validation": {"folds": 5, "images": 750, "c": 0.003}},
              "stage2_trial": {"images": 150, "head_accuracy": 0.8067,
                               "finetune_accuracy": 0.8467},
              "stage2": {"epochs": 6, "val_accuracy": None, "seconds": 3.0},
              "kept": "stage2", evaluated: {"accuracy": 0.844, "n": 250, "ece": 0.02}}
    (tmp_path / "report.json").write_text(json.dumps(report))
    notebook.show_results(str(tmp_path))
    out = capsys.readouterr().out
    assert "out-of-fold accuracy 0.839" in out and "fine-tuned 0.847" in out
    assert "stage2: on all images (no validation split) after 6 epochs" in out
    assert f"{evaluated} (250 images): accuracy 0.844" in out
