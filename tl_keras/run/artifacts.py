"""What a finished run writes: model, labels, config, manifest, and its export.

Shared by the image, pretrain and text drivers, so every run folder has the
same files, each written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Callable, Optional

import keras
import numpy as np

from tl_keras.config import Config
from tl_keras.core import outputs
from tl_keras.data import sources as sources_lib
from tl_keras.export import parity
from tl_keras.export import saved_model as export_lib
from tl_keras.export import tflite as tflite_lib


def write_model_files(out: str, model: keras.Model, classes: list[str], resolved: Config,
                      model_file: str = "model.keras") -> str:
    """Writes OUT/model.keras, labels.txt and config.json (the flags as resolved).

    Returns:
        The model file's path.
    """
    path = os.path.join(out, model_file)
    with outputs.atomic_path(path) as tmp:
        model.save(tmp)
    outputs.atomic_write_text(os.path.join(out, "labels.txt"), "\n".join(classes) + "\n")
    outputs.atomic_write_text(os.path.join(out, "config.json"), resolved.to_json() + "\n")
    return path


def finish_run(out: str, report: dict, state, rejected, t_start: float) -> dict:
    """The last step of a run: report.json (with the run's seconds), then the
    parity gate's rejection if there was one, else the run marked finished."""
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, "report.json"), report)
    if rejected is not None:
        raise rejected
    state.finish()
    return report


def export_spec(cfg: Config) -> export_lib.ExportSpec:
    """The export settings of a run's flags."""
    return export_lib.ExportSpec(
        top_k=cfg.top_k, overwrite=cfg.overwrite,
        tflite_variants=tuple(tflite_lib.parse_variants(cfg.tflite)),
        parity_images=cfg.parity_images,
        min_agreement=parity.min_agreement_limits(cfg.parity_min_agreement),
        max_prob_diff=parity.max_prob_diff_limits(cfg.parity_max_prob_diff),
        batch_size=cfg.batch_size, seed=cfg.seed, max_pixels=cfg.max_pixels)


def export_run(model: keras.Model, cfg: Config, class_names: list[str], image_size: int, out: str,
               data: sources_lib.Dataset, eval_split: sources_lib.Split, eval_name: str,
               run_manifest: dict, log: Callable[[str], None] = lambda s: None,
               preflight_report: Optional[dict] = None,
               extra_files: Optional[dict] = None,
               val_probs: Optional[np.ndarray] = None,
               unknown_threshold: Optional[float] = None) -> dict:
    """`export_version` with a run's settings: OUT/export, the TFLite variants,
    int8 calibration and parity limits of `cfg`, the run manifest in assets.extra.

    Args:
        model: the model to export.
        cfg: the run's `Config` (tflite, parity, top_k, overwrite, seed, ...).
        class_names, image_size: as `export_version`.
        out: the run's output folder.
        data: the run's splits (train for int8 calibration, val for the gate).
        eval_split, eval_name: where each TFLite variant's accuracy is measured.
        run_manifest: written to the SavedModel's assets.extra/manifest.json.
        log: progress messages.
        preflight_report: the run's pre-flight report: the gate also serves the
            original bytes of the files it converted or noted.
        extra_files: more {file name: text} for assets.extra (e.g. selective.json).
        val_probs: `model`'s probabilities on `data.val` when the run has them
            (the gate's reference; see `export_version`'s `parity_reference`).
        unknown_threshold: the served models also return `ood_score` and
            `unknown` (`model.open_set`); None: they do not.

    Returns / Raises: as `export_version`.
    """
    spec = dataclasses.replace(export_spec(cfg), unknown_threshold=unknown_threshold)
    return export_lib.export_version(
        model, class_names, image_size, os.path.join(out, "export"), spec,
        calibration_images=(tflite_lib.representative_images(
            data.train, image_size, cfg.int8_calibration_images, cfg.seed)
            if "int8" in spec.tflite_variants else None),
        # The gate's Keras-vs-served comparison: validation images (with the
        # run's own predictions of them), or training images in a run without a
        # validation split (cross-validated).
        parity_split=data.val if len(data.val) else data.train,
        parity_reference=val_probs if len(data.val) else None, eval_split=eval_split,
        eval_name=eval_name,
        check_path=os.path.join(out, "export_check.json"),
        extra_files={"manifest.json": json.dumps(run_manifest, indent=2), **(extra_files or {})},
        originals=parity.odd_files(preflight_report, cfg.parity_images, cfg.seed), log=log)
