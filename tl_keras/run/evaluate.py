"""Reading finished runs back: model, labels and resolved config of OUT."""

from __future__ import annotations

import json
import os

import keras

from tl_keras.config import Config
from tl_keras.core import outputs
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail
from tl_keras.model import layers  # noqa: F401  (registers tl_keras layers for loading)
from tl_keras.model import model_files as model_files_lib
from tl_keras.model import open_set
from tl_keras.report import markdown as markdown_lib
from tl_keras.report import metrics as metrics_lib
from tl_keras.text import model as text_model
from tl_keras.text import sources as text_sources


def load_run(path: str, flag: str = "model") -> tuple[keras.Model, list[str], Config]:
    """Loads a run folder (or a .keras file inside one) in Keras's safe mode.

    Returns:
        (model, class names, resolved config of the run).
    """
    run_dir = os.path.dirname(path) if path.endswith(".keras") else path
    model_file = path if path.endswith(".keras") else os.path.join(path, "model.keras")
    if not os.path.isfile(model_file):
        raise fail(flag, path, "no model.keras there (expected a tl-keras train --output_dir)")
    labels_file = os.path.join(run_dir, "labels.txt")
    config_file = os.path.join(run_dir, "config.json")
    for f in (labels_file, config_file):
        if not os.path.isfile(f):
            raise fail(flag, path, f"missing {os.path.basename(f)} next to the model")
    with open(labels_file, encoding="utf-8") as f:
        classes = [line.rstrip("\n") for line in f if line.strip()]
    try:
        cfg = Config.from_dict(outputs.read_json_object(config_file))
    except ValueError as e:  # unreadable, not JSON, not an object: the cause, on one line
        raise fail(flag, path, str(e)) from None
    model = model_files_lib.load_model(model_file, flag)  # safe mode: never runs code from the file
    return model, classes, cfg


def evaluate_run(path: str, data: str, batch_size: int = 64, top_k: int = 3,
                 allow_external_paths: bool = False) -> dict:
    """Evaluates a finished run on a labelled source.

    Writes OUT/evaluation.json, a readable OUT/evaluation.md and its PNGs
    (evaluation_confusion_matrix.png, evaluation_mistakes.png).

    Args:
        path: the run folder (OUT) or its model.keras.
        data: the labelled source to evaluate on (folder, list file, tfds:NAME).
        batch_size: images per prediction batch.
        top_k: the k of top-k accuracy.
        allow_external_paths: let a list file name images outside its folder.

    Returns:
        {"data": data, "test": {"accuracy", "n", ...}}, the same test block
        `train` writes to report.json (see `report.evaluation`), with
        "open_set" (how many images the run's unknown threshold flags) when
        the run chose one.
    """
    model, classes, cfg = load_run(path)
    if not data:
        raise fail("data", data, "required: the labelled data to evaluate on")
    if cfg.task == "text":  # a text run: raw strings in (tl_keras/text.py)
        _, split = text_sources.load_text_source(data, "data", classes, cfg.tfds_split,
                                         cfg.tfds_data_dir)
        probs = text_model.predict_texts(model, split.items, batch_size)
        result = {"data": data, "test": metrics_lib.metrics(probs, split.labels, top_k)}
        run_dir = os.path.dirname(path) if path.endswith(".keras") else path
        outputs.atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
        return result
    run_dir = os.path.dirname(path) if path.endswith(".keras") else path
    # Multi-label runs and the pre-flight scan of the data (issue 3).
    from tl_keras.data import preflight
    from tl_keras.report import thresholds as multilabel

    multi = os.path.isfile(os.path.join(run_dir, multilabel.THRESHOLDS_FILE))
    _, split = sources_lib.load_source(data, "data", classes, cfg.tfds_split, cfg.tfds_data_dir,
                                    multi_label=multi, allow_external_paths=allow_external_paths)
    split, scan = preflight.scan_for_evaluation(split, classes, cfg.max_pixels,
                                                cfg.cache_dir or os.path.join(run_dir, "cache"))
    thresholds = multilabel.read_thresholds(run_dir, classes) if multi else None
    probs = metrics_lib.predict(model, split, cfg.image_size, batch_size)
    test = metrics_lib.evaluate_probs(probs, split, classes, top_k, thresholds)
    unknown_threshold = _unknown_threshold(run_dir)
    if unknown_threshold is not None and not multi:  # how often the export would say "unknown"
        test["open_set"] = open_set.summary(probs, unknown_threshold)
    result = {"data": data, "test": test, "skipped": scan["skipped"]}
    outputs.atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
    markdown_lib.write_evaluation_files(run_dir, result, split.items)
    return result


def _unknown_threshold(run_dir: str):
    """The run's "none of the above" threshold (report.json's open_set), or None."""
    try:
        with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
            return float(json.load(f)["open_set"]["threshold"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
