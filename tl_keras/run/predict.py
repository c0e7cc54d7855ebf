"""`tl-keras predict`: top-k class names and scores for image files.

Runs an export the way it will be used: a SavedModel through its
`serving_default` signature on the files' encoded bytes (decoded in its graph
as in training: EXIF orientation, transparency on white, ...), or a .tflite
file with tf.lite.Interpreter on pixels decoded by `data.decode_image` (the
same function) and resized as in training. A file the model refuses (not an
image, truncated, over the pixel cap, a format it does not decode) is
skipped with the model's reason. An export with the unknown output
(`model.open_set`) also says, per image, whether it is "none of the above".
"""

from __future__ import annotations

import os

import numpy as np
import tensorflow as tf

from tl_keras.data import decode as decode_lib
from tl_keras.data import preflight
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail
from tl_keras.export import saved_model as export_lib
from tl_keras.export import tflite as tflite_lib
from tl_keras.model import open_set


def list_images(spec: str, flag: str = "images") -> list[str]:
    """Image files named by a comma-separated list of files and folders.

    Folders are searched recursively for JPEG/PNG/GIF/BMP files (sorted);
    files are taken as given, whatever their extension.

    Raises:
        ConfigError: nothing given, a path that does not exist, or no images.
    """
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if not parts:
        raise fail(flag, spec, "required: image files or folders, comma-separated")
    files: list[str] = []
    for p in parts:
        if os.path.isfile(p):
            files.append(p)
        elif os.path.isdir(p):
            found = []
            for dirpath, dirnames, filenames in os.walk(p):
                dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
                found += [os.path.join(dirpath, f) for f in sorted(filenames)
                          if f.lower().endswith(sources_lib.IMAGE_EXTENSIONS)
                          and not f.startswith(".")]
            if not found:
                raise fail(flag, p, "no JPEG/PNG/GIF/BMP files in this folder")
            files += found
        else:
            raise fail(flag, p, "no such file or folder")
    return files


def resolve_model(path: str, flag: str = "model") -> str:
    """The artifact a `--model` value names.

    Accepts a .tflite file, an export version folder (OUT/export/<v>), the
    export folder (OUT/export: its newest version, as TF Serving picks) or a
    run folder (OUT: the newest version of OUT/export).
    """
    if os.path.isfile(path):
        if not path.endswith(".tflite"):
            raise fail(flag, path, "expected a .tflite file or a SavedModel folder")
        return path
    if not os.path.isdir(path):
        raise fail(flag, path, "no such file or folder")
    if os.path.isfile(os.path.join(path, "saved_model.pb")):
        return path
    for folder in (path, os.path.join(path, "export")):
        found = export_lib.versions(folder)
        if found:
            return os.path.join(folder, str(found[-1]))
    raise fail(flag, path, "not a SavedModel folder (no saved_model.pb), an export folder "
               "with version subfolders, nor a run folder with export/")


def _tflite_labels(path: str, flag: str) -> list[str]:
    folder = os.path.dirname(os.path.abspath(path))
    for candidate in (os.path.join(folder, "labels.txt"),
                      os.path.join(folder, export_lib.LABELS_ASSET)):
        if os.path.isfile(candidate):
            with open(candidate, encoding="utf-8") as f:
                return [line.rstrip("\n") for line in f if line.strip()]
    raise fail(flag, path, "no labels.txt or assets/labels.txt next to the .tflite file")


def _top_k(probs: np.ndarray, names: list[str], k: int) -> tuple[list[str], list[float]]:
    idx = np.argsort(-probs, kind="stable")[:k]
    return [names[i] for i in idx], [round(float(probs[i]), 6) for i in idx]


def _predict_saved_model(path: str, files: list[str], batch_size: int, flag: str):
    clf = export_lib.SavedModelClassifier(path, flag)
    probs: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    encoded: dict[str, bytes] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                encoded[f] = fh.read()
        except OSError as e:
            errors[f] = e.strerror or str(e)
    readable = [f for f in files if f in encoded]
    # One refused file fails its whole request, exactly as in TF Serving;
    # predict_each then sends that batch's files one by one.
    found, reasons = clf.predict_each([encoded[f] for f in readable], batch_size)
    for f, p, why in zip(readable, found, reasons):
        if p is None:
            errors[f] = why
        else:
            probs[f] = p
    # The served `unknown` is this formula of the served probabilities at the
    # export's threshold (tests compare the two).
    unknown = ({} if clf.unknown_threshold is None else
               {f: (float(open_set.score(p[None])[0]),
                    bool(open_set.is_unknown(p[None], clf.unknown_threshold)[0]))
                for f, p in probs.items()})
    return clf.class_names, probs, errors, unknown


def _predict_tflite(path: str, files: list[str], flag: str, max_pixels: int):
    names = _tflite_labels(path, flag)
    clf = tflite_lib.TFLiteClassifier(path)
    if clf.num_classes != len(names):
        raise fail(flag, path, f"the model has {clf.num_classes} outputs but its labels file "
                   f"lists {len(names)} classes")
    probs: dict[str, np.ndarray] = {}
    errors: dict[str, str] = {}
    unknown: dict[str, tuple[float, bool]] = {}
    for f in files:
        try:
            with open(f, "rb") as fh:
                image = decode_lib.decode_bytes(fh.read(), max_pixels)
        except OSError as e:
            errors[f] = e.strerror or str(e)
            continue
        except tf.errors.InvalidArgumentError as e:
            errors[f] = decode_lib.refusal_reason(e).removeprefix("image: ")
            continue
        pixels = decode_lib.resize_image(image, clf.image_size).numpy()
        out = clf.predict_outputs(pixels[None])
        probs[f] = out["probabilities"][0]
        if clf.has_unknown:  # the file's own outputs
            unknown[f] = (float(out["ood_score"][0]), bool(out["unknown"][0]))
    return names, probs, errors, unknown


def predict_images(model: str, images: str, top_k: int = 3, batch_size: int = 32,
                   model_flag: str = "model", images_flag: str = "images",
                   max_pixels: int = 100_000_000) -> dict:
    """Predicts image files with an exported model.

    Args:
        model: a SavedModel export (or export / run folder) or a .tflite file.
        images: comma-separated image files and folders.
        top_k: how many classes to return per image.
        batch_size: images per SavedModel call.
        model_flag, images_flag: the flags named in error messages.
        max_pixels: images whose header claims more pixels are skipped
            undecoded (decompression bombs).

    Returns:
        {"model": resolved path, "predictions": [{"image", "classes", "scores"}
         (and "ood_score", "unknown" when the export has the unknown output)],
         "skipped": [{"image", "error"}]} in the order the files were listed.
        Files that cannot be read or decoded, or are over `max_pixels`,
        are skipped, not fatal.
    """
    if top_k < 1:
        raise fail("top_k", top_k, "must be >= 1")
    path = resolve_model(model, model_flag)
    files = list_images(images, images_flag)
    refused = {f: why for f in files
               if (why := preflight.over_pixel_limit(f, max_pixels)) is not None}
    todo = [f for f in files if f not in refused]
    if not todo:
        names, probs, errors, unknown = [], {}, {}, {}
    elif path.endswith(".tflite"):
        names, probs, errors, unknown = _predict_tflite(path, todo, model_flag, max_pixels)
    else:
        names, probs, errors, unknown = _predict_saved_model(path, todo, batch_size,
                                                             model_flag)
    errors.update(refused)
    predictions, skipped = [], []
    for f in files:
        if f in probs:
            classes, scores = _top_k(probs[f], names, top_k)
            predictions.append({"image": f, "classes": classes, "scores": scores})
            if f in unknown:
                predictions[-1].update(ood_score=round(unknown[f][0], 6),
                                       unknown=unknown[f][1])
        else:
            skipped.append({"image": f, "error": errors.get(f, "not predicted")})
    return {"model": path, "predictions": predictions, "skipped": skipped}


def format_table(result: dict) -> str:
    """One row per image: the image, then `class score` for each of the top k;
    with the unknown output, a last column "answer": the top class, or "unknown"."""
    rows = result["predictions"]
    if not rows:
        return ""
    k = max(len(r["classes"]) for r in rows)
    width = max(len("image"), *(len(r["image"]) for r in rows))
    cells = [[f"{c} {s:.4f}" for c, s in zip(r["classes"], r["scores"])] for r in rows]
    answers = any("unknown" in r for r in rows)
    if answers:
        for r, row in zip(rows, cells):
            row += [""] * (k - len(row)) + ["unknown" if r.get("unknown") else r["classes"][0]]
    col = max(len("top-1"), *(len(c) for row in cells for c in row))
    head = "image".ljust(width) + "".join(f"  {f'top-{i + 1}':<{col}}" for i in range(k))
    if answers:
        head += f"  {'answer':<{col}}"
    lines = [head.rstrip()]
    for r, row in zip(rows, cells):
        lines.append((r["image"].ljust(width) + "".join(f"  {c:<{col}}" for c in row)).rstrip())
    return "\n".join(lines)
