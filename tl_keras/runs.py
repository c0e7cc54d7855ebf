"""Reading finished runs back: model, labels and resolved config of OUT."""

from __future__ import annotations

import json
import os

import keras

from tl_keras import data as data_lib
from tl_keras import evaluate as evaluate_lib
from tl_keras import report as report_lib
from tl_keras import layers  # noqa: F401  (registers tl_keras layers for loading)
from tl_keras import text  # noqa: F401  (registers the text model's layer and standardize)
from tl_keras import outputs
from tl_keras.config import Config, fail


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
    with open(config_file, encoding="utf-8") as f:
        cfg = Config.from_dict(json.load(f))
    try:
        model = keras.models.load_model(model_file, safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001
        raise fail(flag, path, f"cannot load the model: {' '.join(str(e).split())[:300]}") from None
    return model, classes, cfg


def evaluate_run(path: str, data: str, batch_size: int = 64, top_k: int = 3) -> dict:
    """Evaluates a finished run on a labelled source.

    Writes OUT/evaluation.json, a readable OUT/evaluation.md and its PNGs
    (evaluation_confusion_matrix.png, evaluation_mistakes.png).

    Returns:
        {"data": data, "test": {"accuracy", "n", ...}}, the same test block
        `train` writes to report.json (see `report.evaluation`).
    """
    model, classes, cfg = load_run(path)
    if not data:
        raise fail("data", data, "required: the labelled data to evaluate on")
    if cfg.task == "text":  # a text run: raw strings in (tl_keras/text.py)
        _, split = text.load_text_source(data, "data", classes, cfg.tfds_split,
                                         cfg.tfds_data_dir)
        probs = text.predict_texts(model, split.items, batch_size)
        result = {"data": data, "test": evaluate_lib.metrics(probs, split.labels, top_k)}
        run_dir = os.path.dirname(path) if path.endswith(".keras") else path
        outputs.atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
        return result
    run_dir = os.path.dirname(path) if path.endswith(".keras") else path
    # Multi-label runs and the pre-flight scan of the data (issue 3).
    from tl_keras import multilabel, preflight

    multi = os.path.isfile(os.path.join(run_dir, multilabel.THRESHOLDS_FILE))
    _, split = data_lib.load_source(data, "data", classes, cfg.tfds_split, cfg.tfds_data_dir,
                                    multi_label=multi)
    split, scan = preflight.scan_for_evaluation(split, classes, cfg.max_pixels,
                                                cfg.cache_dir or os.path.join(run_dir, "cache"))
    if multi:
        test = multilabel.evaluate_split(model, split, classes, cfg.image_size, batch_size, top_k,
                                         multilabel.read_thresholds(run_dir, classes))
    else:
        test = report_lib.evaluate_split(model, split, classes, cfg.image_size, batch_size, top_k)
    result = {"data": data, "test": test, "skipped": scan["skipped"]}
    outputs.atomic_write_json(os.path.join(run_dir, "evaluation.json"), result)
    report_lib.write_evaluation_files(run_dir, result, split.items)
    return result
