"""Helpers for the notebooks in `notebooks/` (Colab or any Jupyter).

Each notebook cell is one call into the library; what a cell needs beyond
`run_training` lives here: finding the images (a folder, a zip, Google Drive
or an upload), showing a finished run, classifying images with the
exported SavedModel (through `tl_keras.predict`), and handing the export to
the user as a zip.

Colab-only features (uploads, Drive, downloads) are used only when the code
runs in Colab; elsewhere every function takes plain paths, which is how the
notebooks run headless under papermill. TensorFlow and IPython are imported
only by the functions that need them.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import sys
import zipfile
from typing import Optional

from tl_keras.core import outputs

# Figures a training run writes (see `report.write_run_files`), in the order shown.
FIGURES = {
    "learning_curves": ("learning_curves.png",
                        "Loss, accuracy and learning rate of both stages"),
    "confusion_matrix": ("confusion_matrix.png",
                         "Confusion matrix of the evaluated split, normalised by true class"),
    "mistakes": ("mistakes.png", "The most confident mistakes"),
}
# Entries of zips that are not images of the data set: macOS resource forks
# and folder metadata that Finder and Windows put into the zips they make.
_ZIP_JUNK_DIRS = ("__MACOSX",)
_ZIP_JUNK_FILES = (".DS_Store", "Thumbs.db", "desktop.ini")
COLAB_DRIVE = "/content/drive"


def in_colab() -> bool:
    """Whether this code runs in Google Colab."""
    if "google.colab" in sys.modules:  # Colab's kernel imports it at start
        return True
    try:
        return importlib.util.find_spec("google.colab") is not None
    except (ModuleNotFoundError, ValueError):  # no `google` package at all
        return False


def _colab(module: str):
    """Imports `google.colab.<module>`; a clear error outside Colab."""
    if not in_colab():
        raise RuntimeError(f"google.colab.{module} is only available in Colab; "
                           "outside Colab give a path in the parameters cell instead")
    return importlib.import_module(f"google.colab.{module}")


def _display(obj) -> None:
    from IPython.display import display

    display(obj)


# --------------------------------------------------------------------------
# Environment
# --------------------------------------------------------------------------

def describe_environment() -> None:
    """Prints the versions, the device and the precision `auto` picks.

    In Colab without a GPU it also says how to get one (training on a CPU
    runtime works, only slowly).
    """
    import keras
    import tensorflow as tf

    import tl_keras
    from tl_keras.core import precision

    env = {"tl_keras": tl_keras.__version__, "tensorflow": tf.__version__,
           "keras": keras.__version__, "device": precision.describe_device(),
           "precision_auto": precision.resolve("auto")}
    print(", ".join(f"{k}: {v}" for k, v in env.items()))
    if in_colab() and env["device"] == "CPU":
        print("No GPU: training runs on the CPU, which is slow. In Colab choose "
              "Runtime > Change runtime type > GPU, then run the notebook again.")


# --------------------------------------------------------------------------
# Finding the images
# --------------------------------------------------------------------------

def mount_drive(folder: str, mountpoint: str = COLAB_DRIVE) -> str:
    """Mounts Google Drive (Colab only) and returns the path of `folder` in it.

    Args:
        folder: a folder in your Drive, e.g. "MyDrive/photos" or
            "photos" (taken to be under MyDrive), or a full path under
            the mount point. It may also be a .zip file.
        mountpoint: where Drive is mounted.

    Returns:
        The local path of `folder`.
    """
    drive = _colab("drive")
    drive.mount(mountpoint)
    if folder.startswith(mountpoint + "/"):
        path = folder
    else:
        rel = folder.strip().strip("/")
        if rel.split("/")[0] not in ("MyDrive", "Shareddrives", "Othercomputers"):
            rel = "MyDrive/" + rel
        path = os.path.join(mountpoint, rel)
    if not os.path.exists(path):
        raise ValueError(f"drive_folder={folder!r}: {path} does not exist in your Drive")
    return path


def upload_zip(dest_dir: str = "uploads") -> str:
    """Asks for a zip of class subfolders in Colab's upload widget; returns its path.

    Args:
        dest_dir: where the uploaded file is written.
    """
    files = _colab("files")
    print("Choose a .zip holding one subfolder of images per class.")
    uploaded = files.upload()
    zips = {name: data for name, data in uploaded.items() if name.lower().endswith(".zip")}
    if len(zips) != 1:
        raise ValueError(f"uploaded {sorted(uploaded)!r}: expected exactly one .zip file")
    name, data = next(iter(zips.items()))
    path = os.path.join(dest_dir, os.path.basename(name))
    with outputs.atomic_path(path) as tmp:
        with open(tmp, "wb") as f:
            f.write(data)
    return path


def _is_junk(member: str) -> bool:
    parts = member.replace("\\", "/").split("/")
    return (any(p in _ZIP_JUNK_DIRS for p in parts) or parts[-1] in _ZIP_JUNK_FILES
            or parts[-1].startswith("._"))


def extract_zip(path: str, dest_dir: str) -> str:
    """Extracts a zip of images, leaving out macOS and Windows metadata.

    Extraction goes to a temporary folder renamed into place, so an
    interrupted extraction leaves nothing half-written. Member names are
    sanitised by `zipfile` (no absolute paths, no `..`).

    Args:
        path: the .zip file.
        dest_dir: the folder to extract into (replaced if it exists).

    Returns:
        `dest_dir`.
    """
    try:
        with zipfile.ZipFile(path) as zf, outputs.atomic_path(dest_dir) as tmp:
            os.makedirs(tmp)
            for member in zf.infolist():
                if not member.is_dir() and not _is_junk(member.filename):
                    zf.extract(member, tmp)
    except zipfile.BadZipFile as e:
        raise ValueError(f"data={path!r}: not a readable zip file ({e})") from None
    return dest_dir


def find_class_root(folder: str) -> str:
    """The folder whose subfolders are the classes.

    Zips usually wrap everything in one top folder (photos/cats, photos/dogs),
    sometimes next to a README: while a folder holds exactly one subfolder
    and no images of its own, the classes are further down.
    """
    from tl_keras.data.sources import IMAGE_EXTENSIONS

    root = folder
    while True:
        entries = [e for e in os.listdir(root) if not e.startswith(".")]
        dirs = [e for e in entries if os.path.isdir(os.path.join(root, e))]
        images = [e for e in entries if e.lower().endswith(IMAGE_EXTENSIONS)]
        if len(dirs) != 1 or images:
            return root
        root = os.path.join(root, dirs[0])


def prepare_images(data: str, extract_dir: str = "images") -> str:
    """Resolves `data` to a folder of class subfolders and prints what it holds.

    Args:
        data: a folder of class subfolders (possibly wrapped in one top
            folder), or a .zip of one.
        extract_dir: a zip is extracted to `extract_dir/ZIP_NAME`, on local
            disk (not next to a zip in Google Drive, where reading thousands
            of small files is slow).

    Returns:
        The folder to train on: `--data` of `tl-keras train`.
    """
    from tl_keras.data import sources as sources_lib

    if not data:
        raise ValueError("data='': set `data` in the parameters cell to a folder of class "
                         "subfolders or a .zip of one (in Colab: upload a zip or use Drive)")
    if os.path.isfile(data) and data.lower().endswith(".zip"):
        stem = os.path.splitext(os.path.basename(data))[0]
        data = extract_zip(data, os.path.join(extract_dir, stem))
    elif not os.path.isdir(data):
        raise ValueError(f"data={data!r}: no such folder or .zip file")
    root = find_class_root(data)
    classes, files = sources_lib.list_class_folder(root, "data")
    print(f"{root}: {len(classes)} classes, {sum(len(v) for v in files.values())} images")
    for c in classes:
        print(f"  {c}: {len(files[c])}")
    return root


# --------------------------------------------------------------------------
# Showing a run
# --------------------------------------------------------------------------

def show_results(run_dir: str) -> None:
    """Prints the headline figures of a finished run (from its report.json)."""
    from tl_keras.report import metrics as metrics_lib

    with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    split = next(k for k in ("test", "val", "cross_validation") if k in report)
    head = metrics_lib.headline(report[split])
    cv = report.get("stage1", {}).get("cross_validation")
    if cv:
        print(f"stage1: logistic head, C={cv['c']}, out-of-fold accuracy "
              f"{report['stage1']['val_accuracy']:.3f} ({cv['folds']}-fold, "
              f"{cv['images']} images)")
    trial = report.get("stage2_trial")
    if trial:
        print(f"stage 2 trial on {trial['images']} held-out images: head "
              f"{trial['head_accuracy']:.3f}, fine-tuned {trial['finetune_accuracy']:.3f}")
    for stage in ("stage1", "stage2"):
        s = report.get(stage, {})
        if s.get("epochs"):
            judged = ("on all images (no validation split)" if s.get("val_accuracy") is None
                      else f"val_accuracy {s['val_accuracy']:.3f}")
            print(f"{stage}: {judged} after {s['epochs']} epochs ({s['seconds']:.0f}s)")
    print(f"kept: {report.get('kept')}")
    print(f"{split} ({head.get('n')} images): " +
          ", ".join(f"{k} {v:.3f}" for k, v in head.items() if k != "n" and v is not None))


def show_figure(run_dir: str, name: str) -> None:
    """Displays one figure of a finished run, or says that the run has none.

    (A run with no mistakes has no mistakes figure.) Display functions
    return None, so a notebook shows the figure and not a value after it.

    Args:
        run_dir: the run folder (`output_dir`).
        name: one of `FIGURES` (learning_curves, confusion_matrix, mistakes).
    """
    from IPython.display import Image

    if name not in FIGURES:
        raise ValueError(f"figure {name!r}: choose one of {', '.join(FIGURES)}")
    file, caption = FIGURES[name]
    path = os.path.join(run_dir, file)
    if not os.path.isfile(path):
        print(f"{caption}: none in {run_dir}" +
              (" (no mistakes)" if name == "mistakes" else ""))
        return
    print(caption)
    _display(Image(filename=path))


def show_run(run_dir: str) -> None:
    """Prints the headline figures of a run and displays all its figures."""
    show_results(run_dir)
    for name in FIGURES:
        show_figure(run_dir, name)


# --------------------------------------------------------------------------
# Using the export
# --------------------------------------------------------------------------

def export_dir(run_dir: str) -> str:
    """The newest exported version of a run (OUT/export/<version>), as TF Serving picks it."""
    from tl_keras.run import predict

    return predict.resolve_model(run_dir, "output_dir")


def _upload_images(dest_dir: str) -> str:
    """Colab: asks for images, writes them to `dest_dir`; returns their paths, comma-separated."""
    print("Choose one or more images (JPEG, PNG, GIF or BMP) to classify.")
    paths = []
    for name, data in _colab("files").upload().items():
        path = os.path.join(dest_dir, os.path.basename(name))
        with outputs.atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                f.write(data)
        paths.append(path)
    return ",".join(paths)


def _thumbnail_png(path: str, size: int = 256) -> Optional[bytes]:
    """A PNG thumbnail of an image file (any format PIL reads); None if unreadable."""
    import io

    from PIL import Image

    try:
        with Image.open(path) as img:
            img = img.convert("RGB")
            img.thumbnail((size, size))
            buf = io.BytesIO()
            img.save(buf, format="PNG")
            return buf.getvalue()
    except (OSError, ValueError):
        return None


def classify_images(run_dir: str, images: str = "", upload_dir: str = "uploads") -> None:
    """Shows images and prints what the run's exported SavedModel predicts for each.

    The export is called as a server would call it: `serving_default` on
    the files' encoded bytes (`tl-keras predict`). For each image it prints
    `NAME: predicted: CLASS (SCORE)` (or `unknown` where the export's unknown
    output says so) and the top-k classes; files that do not
    decode are reported and skipped. For the predictions as values, use
    `tl_keras.run.predict.predict_images`.

    Args:
        run_dir: the run folder (`output_dir`) or an export folder.
        images: image files or folders, comma-separated (`--images` of
            `tl-keras predict`); empty: in Colab, ask for an upload.
        upload_dir: where uploaded images are written.
    """
    from IPython.display import Image

    from tl_keras.run import predict

    if not images and in_colab():
        images = _upload_images(upload_dir)
    if not images:
        print("No image to classify: set `images` in the parameters cell to a photo's path "
              "(in Colab, leave it empty to upload one).")
        return
    result = predict.predict_images(run_dir, images, model_flag="output_dir")
    for p in result["predictions"]:
        png = _thumbnail_png(p["image"])
        if png is not None:
            _display(Image(data=png))
        name = os.path.basename(p["image"])
        if p.get("unknown"):  # the export's "none of the above" output
            print(f"{name}: predicted: unknown (ood_score {p['ood_score']:.2f}; nearest class "
                  f"{p['classes'][0]} {p['scores'][0]:.2f})")
        else:
            print(f"{name}: predicted: {p['classes'][0]} ({p['scores'][0]:.2f})")
        print("  top classes: " + ", ".join(f"{c} {s:.2f}"
                                            for c, s in zip(p["classes"], p["scores"])))
    for p in result["skipped"]:
        print(f"{os.path.basename(p['image'])}: skipped, {p['error']}")


def zip_export(run_dir: str, name: str = "") -> str:
    """Zips the newest exported version of a run for download.

    The zip holds `NAME/VERSION/saved_model.pb ...`, the layout TF Serving
    expects under its model base path (unzip it there and it serves).

    Args:
        run_dir: the run folder (`output_dir`).
        name: the model's name in the zip; default: the run folder's name.

    Returns:
        The path of the zip, `run_dir/NAME.zip`.
    """
    version_dir = export_dir(run_dir)
    if not os.path.isdir(version_dir):
        raise ValueError(f"output_dir={run_dir!r}: no exported SavedModel folder to zip")
    name = name or os.path.basename(os.path.normpath(os.path.abspath(run_dir)))
    version = os.path.basename(os.path.normpath(version_dir))
    path = os.path.join(run_dir, name + ".zip")
    with outputs.atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as zf:
            for dirpath, dirnames, filenames in os.walk(version_dir):
                dirnames.sort()
                for f in sorted(filenames):
                    full = os.path.join(dirpath, f)
                    zf.write(full, os.path.join(name, version,
                                                os.path.relpath(full, version_dir)))
    size = os.path.getsize(path)
    print(f"{path}: {size / 2 ** 20:.1f} MB")
    return path


def download(path: str) -> None:
    """Downloads a file to your computer in Colab; elsewhere says where it is."""
    if in_colab():
        _colab("files").download(path)
    else:
        print(f"saved to {os.path.abspath(path)}")


# --------------------------------------------------------------------------
# Data audit (issue 22): review the flagged labels, write the list to train on
# --------------------------------------------------------------------------

DROP = "(drop image)"


def write_reviewed_list(audit_dir: str, choices: dict, path: str = "") -> str:
    """Writes the audit's `--data` list with the reviewed labels.

    Args:
        audit_dir: the folder of a `tl-keras audit` (or train) run.
        choices: {image path: label, or `DROP` to leave the image out};
            images not named keep the label of `relabelled.csv` (the
            audit's suggestion for flagged images, the given label otherwise).
        path: the CSV to write; default: AUDIT_DIR/reviewed.csv.

    Returns:
        The CSV's path (pass it as --data=PATH with --allow_external_paths).
    """
    import csv
    import io

    from tl_keras.report import audit as audit_lib

    with open(os.path.join(audit_dir, audit_lib.RELABELLED_CSV), newline="") as f:
        rows = list(csv.reader(f))
    out_rows = [rows[0]]
    for p, label in rows[1:]:
        label = choices.get(p, label)
        if label != DROP:
            out_rows.append([p, label])
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(out_rows)
    path = path or os.path.join(audit_dir, "reviewed.csv")
    outputs.atomic_write_text(path, buf.getvalue())
    return path


def review_labels(audit_dir: str, limit: int = 24, path: str = "") -> str:
    """Shows the images the audit flagged, with a label choice per image.

    With ipywidgets (Colab, Jupyter): a thumbnail, the given and suggested
    labels and a drop-down per image (suggested, given, any class, or drop),
    and a button that writes the reviewed list. Without ipywidgets (or
    headless): a plain listing, and the list is written with the audit's
    suggestions applied, saying so.

    Returns:
        The reviewed CSV's path (written now, and again on each button press).
    """
    from tl_keras.report import audit as audit_lib

    with open(os.path.join(audit_dir, audit_lib.AUDIT_JSON)) as f:
        result = json.load(f)
    flagged = [d for d in result["label_issues"] if d["split"] in result.get(
        "relabelled_splits", ["train"])][:limit]
    path = write_reviewed_list(audit_dir, {}, path)
    if importlib.util.find_spec("ipywidgets") is None:
        print(f"{len(flagged)} flagged image(s) (ipywidgets is not installed, so no choices "
              f"here: {path} applies every suggestion; edit it, or pip install ipywidgets):")
        for d in flagged:
            print(f"  {d['file']}: given {d['given']}, suggested {d['suggested']} "
                  f"(score {d['score']:.3f})")
        return path
    import ipywidgets as widgets

    classes = result["classes"]
    boxes, picks = [], {}
    for d in flagged:
        options = [d["suggested"], d["given"]] + [c for c in classes
                                                  if c not in (d["suggested"], d["given"])]
        picks[d["file"]] = widgets.Dropdown(options=options + [DROP], value=d["suggested"],
                                            layout=widgets.Layout(width="180px"))
        png = _thumbnail_png(d["file"], 160) or b""
        boxes.append(widgets.VBox([widgets.Image(value=png, format="png", width=160),
                                   widgets.Label(f"given: {d['given']}"),
                                   widgets.Label(f"suggested: {d['suggested']}"),
                                   picks[d["file"]]]))
    status = widgets.Label(f"{path}: the suggestions applied")
    button = widgets.Button(description="write the list")

    def save(_):
        written = write_reviewed_list(audit_dir, {p: w.value for p, w in picks.items()}, path)
        status.value = f"wrote {written}"

    button.on_click(save)
    _display(widgets.VBox([widgets.GridBox(boxes, layout=widgets.Layout(
        grid_template_columns="repeat(4, 190px)")), widgets.HBox([button, status])]))
    return path
