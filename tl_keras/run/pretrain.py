"""Pretraining a source model from scratch (`tl-keras pretrain`).

The second way to transfer: when no public model fits the domain, train a
source model on a related task with plenty of data, then use its file as
the backbone of `tl-keras train --backbone=OUT/model.keras` for the task
with little data.

data (pre-flight scan, as in `train`) -> decoded images, cached (RAM up to
--cache_ram_mb, disk beyond) -> source model (an architecture of
`source_models`, or a keras.applications family with weights=None) -> one
learning-rate cycle of AdamW -> evaluate -> write model, block map, labels,
config, manifest, report -> export a version (parity-gated, as in `train`).

Written to OUT (the contract of `train`, plus the block map):
  model.keras        images 0..255 -> probabilities; carries its preprocessing
  model.blocks.json  where a backbone made from it is cut, its preprocessing,
                     and its blocks (what stage 2 of `train` unfreezes)
  labels.txt, config.json, manifest.json, preflight.json, report.json,
  report.md (+ PNGs), tensorboard/, export/<version>/ (unless --noexport)
"""

from __future__ import annotations

import math
import os
import time

import keras

from tl_keras.config import Config
from tl_keras.run import artifacts
from tl_keras.run.setup import data_spec, log, validate
from tl_keras.core import determinism, outputs, precision
from tl_keras.data import augment, preflight
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail
from tl_keras.export import saved_model as export_lib
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import families as families_lib
from tl_keras.model import model_files as model_files_lib
from tl_keras.model import source_models
from tl_keras.report import markdown as markdown_lib
from tl_keras.report import metrics as metrics_lib
from tl_keras.report import tensorboard as tensorboard_logs
from tl_keras.run import manifest as manifest_lib
from tl_keras.train import stages as train_lib
from tl_keras.train import strategy as strategy_lib

MODEL_FILE = "model.keras"



def validate_pretrain(cfg: Config) -> None:
    """Checks the pretraining flags; raises ConfigError."""
    if cfg.task != "image":
        raise fail("task", cfg.task, "pretrain trains image models")
    strategy_lib.require_one_device(cfg.strategy, cfg.tpu, "pretrain")
    if int(cfg.pretrain_epochs) < 1:
        raise fail("pretrain_epochs", cfg.pretrain_epochs, "must be >= 1")
    if int(cfg.pretrain_batch_size) < 1:
        raise fail("pretrain_batch_size", cfg.pretrain_batch_size, "must be >= 1")
    if not cfg.pretrain_learning_rate > 0:
        raise fail("pretrain_learning_rate", cfg.pretrain_learning_rate, "must be > 0")
    if cfg.pretrain_weight_decay < 0:
        raise fail("pretrain_weight_decay", cfg.pretrain_weight_decay, "must be >= 0")
    if model_files_lib.is_model_file(cfg.architecture):
        raise fail("architecture", cfg.architecture, "pretrain builds an architecture from "
                   "scratch; to start from a model file use train --backbone=PATH.keras")


def write_block_map(path: str, body: keras.Model, family, cut: str, size: int) -> dict:
    """Writes OUT/model.blocks.json: cut, preprocessing and blocks of a source model.

    `train --backbone=OUT/model.keras` reads it (`model_files_lib.family_from_model_file`),
    so a backbone made from the file has exactly these blocks.
    """
    blocks = blocks_lib.block_map(body, family)
    doc = {
        "format": model_files_lib.BLOCK_MAP_FORMAT,
        "model": MODEL_FILE,
        "architecture": family.name,
        "image_size": size,
        # The model file applies it itself (layer source_models.PREPROCESS_LAYER).
        "preprocess": family.preprocess,
        "preprocess_layer": source_models.PREPROCESS_LAYER,
        "cut_layer": cut,
        "grouping": family.grouping,
        "blocks": [{"name": b, "layers": names} for b, names in blocks],
    }
    outputs.atomic_write_json(path, doc)
    return doc


def _compile(model: keras.Model, cfg: Config, steps_per_epoch: int, jit) -> None:
    """AdamW over one cycle: linear warmup to the peak, cosine decay to zero."""
    total = max(steps_per_epoch * cfg.pretrain_epochs, 1)
    warmup = min(steps_per_epoch * cfg.warmup_epochs, total - 1)
    lr = cfg.pretrain_learning_rate
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else lr, decay_steps=total - warmup, alpha=0.0,
        warmup_target=lr if warmup else None, warmup_steps=warmup)
    opt = keras.optimizers.AdamW(schedule, weight_decay=cfg.pretrain_weight_decay)
    # Decay shrinks the weights that scale features; biases and the scale and
    # shift of normalization layers are left alone.
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=opt,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                  jit_compile=jit)


def _write_report_md(out: str, report: dict, history: dict, eval_name: str, eval_items,
                     manifest: dict) -> list[str]:
    """report.md of a pretraining run, with the figures `train` draws."""
    from tl_keras.report import plots

    images = {"curves": markdown_lib.CURVES_PNG}
    plots.learning_curves_png([history], os.path.join(out, markdown_lib.CURVES_PNG),
                              kept_epoch=report["pretrain"]["best_epoch"])
    ev = report[eval_name]
    images.update(markdown_lib.evaluation_pngs(out, ev, eval_items, ""))
    p = report["pretrain"]
    lines = ["# tl_keras pretrain report", "",
             f"- architecture: {report['architecture']} at {report['image_size']} px, "
             f"{report['parameters']:,} parameters, trained from scratch",
             f"- classes ({len(report['classes'])}): " + ", ".join(report["classes"]),
             "- images: " + ", ".join(f"{k} {sum(v)}" for k, v in report["class_counts"].items()),
             f"- as a backbone: `tl-keras train --backbone={os.path.join(out, MODEL_FILE)}` "
             f"(cut at `{report['cut_layer']}`, blocks {', '.join(report['blocks'])})", "",
             "## Training", "", "| epochs | best epoch | val accuracy | val loss | seconds | "
             "images/s |", "|---|---|---|---|---|---|",
             f"| {p['epochs']} | {p['best_epoch']} | {p['val_accuracy']:.4f} | "
             f"{p['val_loss']:.4f} | {p['seconds']} | {p['images_per_second']} |", "",
             f"![learning curves]({images['curves']})", ""]
    title = (f"Test ({ev['n']} images)" if eval_name == "test" else
             f"Validation ({ev['n']} images; no test split, so this is the split that chose "
             "the epoch: an optimistic estimate)")
    lines.append(markdown_lib.evaluation_markdown(ev, title, images))
    lines += ["## Manifest", "", f"- data hash: `{manifest.get('data', {}).get('hash', '?')}`",
              f"- seed: {manifest.get('seeds', {}).get('seed', '?')}",
              "- full manifest: `manifest.json`", ""]
    outputs.atomic_write_text(os.path.join(out, "report.md"), "\n".join(lines))
    return ["report.md"] + list(images.values())


def pretrain(cfg: Config) -> dict:
    """Trains a source model from scratch on `cfg.data` and writes OUT.

    Returns:
        The report (also written to `OUT/report.json`).
    """
    t_start = time.perf_counter()
    validate(cfg)
    validate_pretrain(cfg)
    family = source_models.get_architecture(cfg.architecture)
    size = cfg.image_size or family.default_size
    families_lib.validate(family, size, cfg.alpha, "none")
    out = outputs.ensure_writable_dir(cfg.output_dir)
    policy = precision.apply(cfg.precision)  # before any model is built
    jit = train_lib.jit_setting(cfg.jit_compile, log)
    determinism.apply(cfg.seed, cfg.deterministic)
    cache_dir = outputs.ensure_writable_dir(cfg.cache_dir or os.path.join(out, "cache"),
                                            "cache_dir" if cfg.cache_dir else "output_dir")

    # --- data: scanned as for train; decoded once, then cached ------------------
    data, scan = preflight.prepare_dataset(
        data_spec(cfg), max_pixels=cfg.max_pixels, cache_dir=cache_dir,
        drop_leakage=cfg.drop_leakage, report_path=os.path.join(out, "preflight.json"), log=log)
    if data.train.multi_label:
        raise fail("data", cfg.data, "pretrain needs one class per image (multi-label data "
                   "cannot train its softmax classifier)")
    classes = data.class_names
    n_cls = len(classes)
    class_weight = sources_lib.class_weights(data.train, n_cls, cfg.class_weight)
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    log(f"{n_cls} classes; images: " + ", ".join(f"{k} {sum(v)}" for k, v in counts.items()))
    image_cache = data_pipeline.CacheBudget(cfg.cache_ram_mb, cache_dir)
    train_images = data_pipeline.image_dataset(data.train, size, budget=image_cache, name="train",
                                          order_seed=cfg.seed)
    val_images = data_pipeline.image_dataset(data.val, size, budget=image_cache, name="val")

    # --- model ---------------------------------------------------------------
    model, cut = source_models.build_source_model(family, n_cls, size, cfg.alpha, cfg.dropout)
    body = keras.Model(model.input, model.get_layer(cut).output, name="source_body")
    log(f"source model {family.name} at {size}px, {model.count_params():,} parameters, "
        f"precision {policy}, device {precision.describe_device()}")

    # --- train: one cycle ----------------------------------------------------
    augmenter = augment.build_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed,
                                        cfg.translation, cfg.crop_min_area)
    bs = cfg.pretrain_batch_size
    train_ds = data_pipeline.batched(train_images, bs, n_cls, shuffle=True, seed=cfg.seed,
                                augment=augmenter)
    val_ds = data_pipeline.batched(val_images, bs, n_cls)
    steps = math.ceil(len(data.train) / bs)
    _compile(model, cfg, steps, jit)
    tb = tensorboard_logs.start(out, cfg.replace(image_size=size).to_dict(), cfg.tensorboard)
    log(f"pretraining {cfg.pretrain_epochs} epochs of {steps} batches of {bs}, "
        f"peak lr {cfg.pretrain_learning_rate}")
    history, best_epoch, seconds = train_lib.fit_model(
        model, train_ds, None, val_ds, cfg.pretrain_epochs, None, cfg.patience, 0,
        tensorboard_logs.stage_callbacks(tb, 1, "pretraining from scratch"),
        class_weight=class_weight)
    val_loss, val_acc = model.evaluate(val_ds, verbose=0)[:2]
    result = train_lib.StageResult(len(history["loss"]), best_epoch, seconds,
                                   float(val_acc), float(val_loss), history)
    # The first epoch also decodes every image (later ones read the cache).
    ips = len(data.train) * result.epochs / max(seconds, 1e-9)
    log(f"pretrain: val_accuracy {val_acc:.4f} after {result.epochs} epochs "
        f"(best {best_epoch}), {seconds:.1f}s ({ips:.0f} images/s)")
    report = {"classes": classes, "class_counts": counts, "architecture": family.name,
              "image_size": size, "parameters": int(model.count_params()),
              "pretrain": {**result.summary(), "images_per_second": round(ips, 1),
                           "history": {k: [float(v) for v in vs] for k, vs in history.items()}},
              "cut_layer": cut, "preflight": scan["summary"], "image_cache": image_cache.plan,
              "class_weight": class_weight and {classes[i]: w for i, w in class_weight.items()}}
    image_cache.cleanup()

    # --- evaluate (the validation split when there is no test split) ----------
    eval_name, eval_split = ("test", data.test) if data.test is not None else ("val", data.val)
    report[eval_name] = metrics_lib.evaluate_split(model, eval_split, classes, size,
                                                  cfg.batch_size, cfg.top_k)
    log(f"{eval_name} accuracy {report[eval_name]['accuracy']:.4f} on "
        f"{report[eval_name]['n']} images")
    if tb is not None:
        tb.log_evaluation(eval_name, report[eval_name], result.epochs)
        tb.close()

    # --- write outputs and export ----------------------------------------------
    resolved = cfg.replace(image_size=size,
                           alpha=families_lib.resolve_alpha(family, cfg.alpha) or 0.0)
    model_path = artifacts.write_model_files(out, model, classes, resolved, MODEL_FILE)
    blocks = write_block_map(model_files_lib.block_map_path(model_path), body, family, cut, size)
    report["blocks"] = [b["name"] for b in blocks["blocks"]]
    run_manifest = manifest_lib.build(resolved.to_dict(), data, {"precision_policy": policy})
    outputs.atomic_write_json(os.path.join(out, "manifest.json"), run_manifest)
    rejected = None
    if cfg.export:
        # The source classifier is a classifier of task A: exported exactly
        # like a train run (new version, TFLite variants, parity gate).
        try:
            report["export"] = artifacts.export_run(model, cfg, classes, size, out, data,
                                                     eval_split, eval_name, run_manifest, log,
                                                     preflight_report=scan)
        except export_lib.ExportRejected as e:
            report["export"], rejected = e.result, e
    written = _write_report_md(out, report, history, eval_name, eval_split.items, run_manifest)
    log(f"wrote {', '.join(written)} to {out}")
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, "report.json"), report)
    log(f"use it as a backbone: tl-keras train --backbone={model_path}")
    if rejected is not None:
        raise rejected
    return report
