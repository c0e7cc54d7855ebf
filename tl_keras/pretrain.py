"""Pretraining a source model from scratch (`tl-keras pretrain`).

The second way to transfer: when no public model fits the domain, train a
source model on a related task with plenty of data, then use its file as
the backbone of `tl-keras train --backbone=OUT/model.keras` for the task
with little data.

data -> decoded images (cached as arrays) -> source model (an architecture
of `source_models`, or a keras.applications family with weights=None) ->
one learning-rate cycle of AdamW -> evaluate -> write model, block map,
labels, config, report -> export SavedModel.

Written to OUT (the same contract as `train`, plus the block map):
  model.keras        images 0..255 -> probabilities; carries its preprocessing
  model.blocks.json  where a backbone made from it is cut, its preprocessing,
                     and its blocks (what stage 2 of `train` unfreezes)
  labels.txt, config.json, report.json, export/1/ (unless --noexport)
"""

from __future__ import annotations

import math
import os
import time

import keras
import numpy as np
import tensorflow as tf

from tl_keras import augment
from tl_keras import backbones
from tl_keras import cache as cache_lib
from tl_keras import data as data_lib
from tl_keras import evaluate as evaluate_lib
from tl_keras import export as export_lib
from tl_keras import outputs
from tl_keras import precision
from tl_keras import source_models
from tl_keras import train as train_lib
from tl_keras.config import Config, fail, validate

MODEL_FILE = "model.keras"


def log(msg: str) -> None:
    print(f"[tl_keras] {msg}", flush=True)


def validate_pretrain(cfg: Config) -> None:
    """Checks the pretraining flags; raises ConfigError."""
    if int(cfg.pretrain_epochs) < 1:
        raise fail("pretrain_epochs", cfg.pretrain_epochs, "must be >= 1")
    if int(cfg.pretrain_batch_size) < 1:
        raise fail("pretrain_batch_size", cfg.pretrain_batch_size, "must be >= 1")
    if not cfg.pretrain_learning_rate > 0:
        raise fail("pretrain_learning_rate", cfg.pretrain_learning_rate, "must be > 0")
    if cfg.pretrain_weight_decay < 0:
        raise fail("pretrain_weight_decay", cfg.pretrain_weight_decay, "must be >= 0")
    if backbones.is_model_file(cfg.architecture):
        raise fail("architecture", cfg.architecture, "pretrain builds an architecture from "
                   "scratch; to start from a model file use train --backbone=PATH.keras")


def decode_split(split: data_lib.Split, size: int, batch_size: int = 256
                 ) -> tuple[np.ndarray, np.ndarray]:
    """Decodes and resizes every image of a split: (uint8 [N, size, size, 3], int labels).

    Pixels come from `data.decode_and_resize`, as in `train` and the export.
    """
    ds = data_lib.image_dataset(split, size, cache=False).batch(batch_size)
    xs, ys = [], []
    for x, y in ds.prefetch(data_lib.AUTOTUNE):
        xs.append(x.numpy())
        ys.append(y.numpy())
    return np.concatenate(xs), np.concatenate(ys).astype(np.int64)


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int, num_classes: int,
                  shuffle: bool = False, seed: int = 0, augmenter=None) -> tf.data.Dataset:
    """Batches of (float32 images, one-hot labels) from decoded arrays.

    Works the same on arrays in RAM and memory-mapped ones (`cache.ArrayCache`
    maps arrays over its RAM budget): only index batches go through tf.data
    and each batch is gathered from the array, so nothing is copied whole.
    """
    n, shape = len(x), tuple(x.shape[1:])
    idx = tf.data.Dataset.range(n)
    if shuffle:
        idx = idx.shuffle(n, seed=seed, reshuffle_each_iteration=True)

    def gather(i):
        i = np.sort(i)  # in file order: memory-mapped reads stay sequential
        return np.asarray(x[i]), np.asarray(y[i], dtype=np.int32)

    def load(i):
        images, labels = tf.numpy_function(gather, [i], (tf.uint8, tf.int32))
        images.set_shape((None,) + shape)
        labels.set_shape((None,))
        images = tf.cast(images, tf.float32)
        if augmenter is not None:
            images = augmenter(images, training=True)
        return images, tf.one_hot(labels, num_classes)

    ds = idx.batch(batch_size).map(load, num_parallel_calls=data_lib.AUTOTUNE)
    return ds.prefetch(data_lib.AUTOTUNE)


def write_block_map(path: str, body: keras.Model, family, cut: str, size: int,
                    architecture: str) -> dict:
    """Writes OUT/model.blocks.json: cut, preprocessing and blocks of the source model."""
    blocks = backbones.block_map(body, family)
    doc = {
        "format": backbones.BLOCK_MAP_FORMAT,
        "model": MODEL_FILE,
        "architecture": architecture,
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
    # Decay shrinks weights that scale features; biases and the scale and
    # shift of normalization layers only move them.
    opt.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    model.compile(optimizer=opt,
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=cfg.label_smoothing),
                  metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],
                  jit_compile=jit)


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
    backbones.validate(family, size, cfg.alpha, "none")
    out = outputs.ensure_writable_dir(cfg.output_dir)
    policy = precision.apply(cfg.precision)  # before any model is built
    jit = train_lib.jit_setting(cfg.jit_compile)
    keras.utils.set_random_seed(cfg.seed)
    cache = cache_lib.ArrayCache(cfg.cache_dir or os.path.join(out, "cache"), cfg.cache_ram_mb)

    # --- data: decoded once, cached as arrays --------------------------------
    data = data_lib.load_dataset(cfg.data, cfg.val_data, cfg.test_data, cfg.val_fraction,
                                 cfg.test_fraction, cfg.seed, cfg.tfds_split, cfg.tfds_data_dir)
    classes = data.class_names
    n_cls = len(classes)
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    log(f"{n_cls} classes; images: " + ", ".join(f"{k} {sum(v)}" for k, v in counts.items()))
    t0 = time.perf_counter()
    arrays, hits = {}, []
    for name, split in (("train", data.train), ("val", data.val)):
        key = cache_lib.make_key(what="decoded", size=size,
                                 split=cache_lib.split_fingerprint(split.items, split.labels))
        arrays[name], hit = cache.get_or_compute(key, ("x", "y"),
                                                 lambda split=split: decode_split(split, size),
                                                 log)
        hits.append(hit)
    t_decode = time.perf_counter() - t0
    log(f"decoded images at {size}px {'read from cache' if all(hits) else 'computed'} "
        f"in {t_decode:.1f}s")

    # --- model ---------------------------------------------------------------
    model, cut = source_models.build_source_model(family, n_cls, size, cfg.alpha, cfg.dropout)
    body = keras.Model(model.input, model.get_layer(cut).output, name="source_body")
    log(f"source model {family.name} at {size}px, {model.count_params():,} parameters, "
        f"precision {policy}, device {precision.describe_device()}")

    # --- train: one cycle ----------------------------------------------------
    augmenter = augment.build_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed)
    bs = cfg.pretrain_batch_size
    (tr_x, tr_y), (va_x, va_y) = arrays["train"], arrays["val"]
    train_ds = array_batches(tr_x, tr_y, bs, n_cls, shuffle=True, seed=cfg.seed,
                             augmenter=augmenter)
    val_ds = array_batches(va_x, va_y, bs, n_cls)
    steps = math.ceil(len(tr_x) / bs)
    _compile(model, cfg, steps, jit)
    log(f"pretraining {cfg.pretrain_epochs} epochs of {steps} batches of {bs}, "
        f"peak lr {cfg.pretrain_learning_rate}")
    history, best_epoch, seconds = train_lib._fit(model, train_ds, None, val_ds,
                                                  cfg.pretrain_epochs, None, cfg.patience, 0, [])
    val_loss, val_acc = model.evaluate(val_ds, verbose=0)[:2]
    result = train_lib.StageResult(len(history["loss"]), best_epoch, seconds + t_decode,
                                   float(val_acc), float(val_loss), history)
    ips = len(tr_x) * result.epochs / max(seconds, 1e-9)
    log(f"pretrain: val_accuracy {val_acc:.4f} after {result.epochs} epochs "
        f"(best {best_epoch}), {seconds:.1f}s ({ips:.0f} images/s)")
    report = {"classes": classes, "class_counts": counts, "architecture": family.name,
              "image_size": size, "parameters": int(model.count_params()),
              "pretrain": {**result.summary(), "images_per_second": round(ips, 1),
                           "history": {k: [float(v) for v in vs] for k, vs in history.items()}},
              "cut_layer": cut}

    # --- evaluate ------------------------------------------------------------
    if data.test is not None:
        report["test"] = evaluate_lib.evaluate(model, data.test, size, cfg.batch_size, cfg.top_k)
        log(f"test accuracy {report['test']['accuracy']:.4f} on {report['test']['n']} images")

    # --- write outputs and export ----------------------------------------------
    resolved = cfg.replace(image_size=size,
                           alpha=backbones.resolve_alpha(family, cfg.alpha) or 0.0)
    with outputs.atomic_path(os.path.join(out, MODEL_FILE)) as tmp:
        model.save(tmp)
    blocks = write_block_map(backbones.block_map_path(os.path.join(out, MODEL_FILE)), body,
                             family, cut, size, family.name)
    report["blocks"] = [b["name"] for b in blocks["blocks"]]
    outputs.atomic_write_text(os.path.join(out, "labels.txt"), "\n".join(classes) + "\n")
    outputs.atomic_write_text(os.path.join(out, "config.json"), resolved.to_json() + "\n")
    if cfg.export:
        path = export_lib.export_saved_model(model, classes, size,
                                             os.path.join(out, "export", "1"), cfg.top_k)
        report["export"] = path
        log(f"exported SavedModel to {path}")
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, "report.json"), report)
    log(f"wrote {os.path.join(out, MODEL_FILE)}; use it with "
        f"tl-keras train --backbone={os.path.join(out, MODEL_FILE)}")
    return report
