"""The two-stage transfer-learning run, top to bottom.

data -> model -> stage 1 (head on cached features) -> unfreeze top blocks ->
recompile -> stage 2 (fine-tune) -> keep the better stage -> evaluate ->
write model, labels, config, report -> export SavedModel.
"""

from __future__ import annotations

import json
import math
import os
import time

import keras
import numpy as np

from tl_keras import activations
from tl_keras import augment
from tl_keras import backbones
from tl_keras import cache as cache_lib
from tl_keras import data as data_lib
from tl_keras import determinism
from tl_keras import export as export_lib
from tl_keras import features
from tl_keras import manifest as manifest_lib
from tl_keras import model as model_lib
from tl_keras import outputs
from tl_keras import precision
from tl_keras import report as report_lib
from tl_keras import resume
from tl_keras import tensorboard_logs
from tl_keras import train as train_lib
from tl_keras.config import Config, fail, validate


# Share of a backbone's blocks that stage 2 unfreezes by default (measured on
# the shared flowers with MobileNetV2-0.35: 4 blocks 0.816, 8 blocks 0.832,
# 12 blocks 0.836 test accuracy with 4 views, before mirror averaging; 8 blocks
# take about two thirds of the stage-2 time of 12).
AUTO_FINETUNE_FRACTION = 0.4


def log(msg: str) -> None:
    print(f"[tl_keras] {msg}", flush=True)


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[labels]


def _snapshot(model: keras.Model) -> list[np.ndarray]:
    return [v.numpy() for v in model.weights]


def _restore(model: keras.Model, values: list[np.ndarray]) -> None:
    for v, a in zip(model.weights, values):
        v.assign(a)


def _cache_key_parts(cfg: Config, family, size: int, data, policy: str) -> dict:
    """Everything that changes cached features or activations."""
    w = cfg.weights
    weights = cache_lib.file_fingerprint(w) if os.path.isfile(w) else w.lower()
    return dict(train=cache_lib.split_fingerprint(data.train.items, data.train.labels),
                val=cache_lib.split_fingerprint(data.val.items, data.val.labels),
                backbone=family.name, alpha=cfg.alpha, weights=weights, size=size,
                preprocess=family.preprocess, policy=policy, seed=cfg.seed,
                augment=[cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast])


def _stage2_inputs(cfg: Config, clf, data, train_images, val_images, augmenter, cache,
                   key_parts: dict, n_cls: int):
    """Chooses how stage 2 trains: on cached activations below the first
    unfrozen block when they fit --cache_max_mb, else through the full model.

    Returns:
        (model to fit, train data, val data, mode name).
    """
    cut = activations.cut(clf, cfg.finetune_blocks)
    if cut is not None:
        need = activations.estimate_bytes(cut, len(data.train), cfg.cache_views)
        need += activations.estimate_bytes(cut, len(data.val), 1)
        if need <= cfg.cache_max_mb * 2 ** 20:
            key = dict(what="activations", blocks=cfg.finetune_blocks, shape=cut.shape,
                       **key_parts)
            (tr_x, tr_y), hit = cache.get_or_compute(
                cache_lib.make_key(split="train", views=cfg.cache_views, **key), ("x", "y"),
                lambda: activations.extract(cut.bottom, train_images, cfg.batch_size,
                                            cfg.cache_views, augmenter)[:2], log)
            (va_x, va_y), _ = cache.get_or_compute(
                cache_lib.make_key(split="val", **key), ("x", "y"),
                lambda: activations.extract(cut.bottom, val_images, cfg.batch_size,
                                            progress=False)[:2], log)
            log(f"stage 2: training the top on cached activations {cut.shape} "
                f"({need / 2 ** 20:.0f} MB, {'read from cache' if hit else 'computed'})")
            return (cut.trainer, (tr_x, _one_hot(tr_y, n_cls)), (va_x, _one_hot(va_y, n_cls)),
                    "cached_activations")
        log(f"stage 2: cached activations would need {need / 2 ** 20:.0f} MB "
            f"> --cache_max_mb={cfg.cache_max_mb}; training through the full model")
    train_ds = data_lib.batched(train_images, cfg.batch_size, n_cls, shuffle=True,
                                seed=cfg.seed, augment=augmenter)
    val_ds = data_lib.batched(val_images, cfg.batch_size, n_cls)
    return clf.model, train_ds, val_ds, "full_model"


def train(cfg: Config) -> dict:
    """Runs the whole two-stage pipeline described by `cfg`.

    Returns:
        The report (also written to `OUT/report.json`).
    """
    t_start = time.perf_counter()
    validate(cfg)
    family = backbones.get_family(cfg.backbone)
    size = cfg.image_size or family.default_size
    backbones.validate(family, size, cfg.alpha, cfg.weights)
    out = outputs.ensure_writable_dir(cfg.output_dir)
    policy = precision.apply(cfg.precision)  # before any model is built
    jit = train_lib.jit_setting(cfg.jit_compile)
    determinism.apply(cfg.seed, cfg.deterministic)
    if cfg.cache_dir:
        outputs.ensure_writable_dir(cfg.cache_dir, "cache_dir")
    cache = cache_lib.ArrayCache(cfg.cache_dir or os.path.join(out, "cache"), cfg.cache_ram_mb)

    # --- data ----------------------------------------------------------------
    data = data_lib.load_dataset(cfg.data, cfg.val_data, cfg.test_data, cfg.val_fraction,
                                 cfg.test_fraction, cfg.seed, cfg.tfds_split, cfg.tfds_data_dir)
    classes = data.class_names
    n_cls = len(classes)
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    log(f"{n_cls} classes; images: " + ", ".join(f"{k} {sum(v)}" for k, v in counts.items()))

    # --- resume (issue 7): continue an interrupted run, refuse a changed one ----
    state = resume.RunState.open(
        out, cfg.replace(image_size=size), _cache_key_parts(cfg, family, size, data, policy),
        {"test": data.test and cache_lib.split_fingerprint(data.test.items, data.test.labels)},
        log)
    if state.finished:
        log(f"{out} holds this run, finished: nothing to do (--restart trains it again)")
        return state.report()

    # --- model ---------------------------------------------------------------
    backbone = backbones.build_backbone(family, cfg.weights, size, cfg.alpha)
    n_blocks = backbones.num_blocks(backbone, family)
    if cfg.finetune_blocks > n_blocks:
        raise fail("finetune_blocks", cfg.finetune_blocks,
                   f"{family.name} has only {n_blocks} blocks")
    # Auto: a fraction, not a count, so the default means the same depth for
    # a 12-block Inception as for a 62-block DenseNet.
    cfg = cfg.replace(finetune_blocks=cfg.finetune_blocks or
                      max(1, math.ceil(AUTO_FINETUNE_FRACTION * n_blocks)))
    clf = model_lib.build_classifier(backbone, family, n_cls, cfg.dropout)
    resume.check_disk_space(out, cache.folder, clf, cfg, len(data.train), len(data.val))
    augmenter = augment.build_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed)
    train_images = data_lib.image_dataset(data.train, size)
    val_images = data_lib.image_dataset(data.val, size)
    log(f"backbone {family.name} at {size}px, {n_blocks} blocks, weights={cfg.weights}, "
        f"precision {policy}, device {precision.describe_device()}")
    key_parts = _cache_key_parts(cfg, family, size, data, policy)

    tb = tensorboard_logs.start(out, cfg.replace(image_size=size).to_dict(), cfg.tensorboard,
                                resume=state.resumed)

    # --- stage 1: the head on cached features ------------------------------
    t0 = time.perf_counter()
    (tr_f, tr_y), hit = cache.get_or_compute(
        cache_lib.make_key(what="features", split="train", views=cfg.cache_views, **key_parts),
        ("x", "y"), lambda: features.extract(clf.features, train_images, cfg.batch_size,
                                             cfg.cache_views, augmenter)[:2], log)
    (va_f, va_y), _ = cache.get_or_compute(
        cache_lib.make_key(what="features", split="val", **key_parts), ("x", "y"),
        lambda: features.extract(clf.features, val_images, cfg.batch_size, progress=False)[:2],
        log)
    t_cache = time.perf_counter() - t0
    log(f"stage 1: features of {cfg.cache_views} view(s) per training image "
        f"{'read from cache' if hit else 'computed'} in {t_cache:.1f}s")
    s1 = train_lib.fit_head(clf.head, tr_f, _one_hot(tr_y, n_cls), va_f, _one_hot(va_y, n_cls),
                            epochs=cfg.head_epochs, learning_rate=cfg.head_learning_rate,
                            weight_decay=cfg.head_weight_decay, batch_size=cfg.batch_size,
                            patience=cfg.patience, label_smoothing=cfg.label_smoothing,
                            jit_compile=jit,
                            callbacks=state.stage_callbacks(1, cfg.head_learning_rate)
                            + tensorboard_logs.stage_callbacks(tb, 1, "head on features"))
    s1.seconds += t_cache
    s1 = state.finish_stage(1, s1)
    log(f"stage 1: val_accuracy {s1.val_accuracy:.4f} after {s1.epochs} epochs "
        f"(best {s1.best_epoch}), {s1.seconds:.1f}s")
    report = {"classes": classes, "class_counts": counts, "backbone": family.name,
              "image_size": size, "stage1": s1.summary(), "stage2": {"epochs": 0}}
    kept = "stage1"
    histories = [s1.history]

    # --- unfreeze the top blocks, recompile, stage 2 -------------------------
    if cfg.finetune_epochs and cfg.finetune_blocks:
        stage1_weights = _snapshot(clf.model)
        unfrozen = backbones.set_trainable_top_blocks(clf.backbone, family, cfg.finetune_blocks)
        log(f"stage 2: fine-tuning blocks {', '.join(unfrozen)} "
            f"(BatchNorm frozen) at peak lr {cfg.finetune_learning_rate}")
        t0 = time.perf_counter()
        trainer, train_data, val_data, mode = _stage2_inputs(
            cfg, clf, data, train_images, val_images, augmenter, cache, key_parts, n_cls)
        t_cache = time.perf_counter() - t0
        n_train = len(train_data[0]) if isinstance(train_data, tuple) else len(data.train)
        s2 = train_lib.fit_finetune(trainer, train_data, val_data, epochs=cfg.finetune_epochs,
                                    initial_epoch=s1.epochs,
                                    steps_per_epoch=-(-n_train // cfg.batch_size),
                                    learning_rate=cfg.finetune_learning_rate,
                                    warmup_epochs=cfg.warmup_epochs, patience=cfg.patience,
                                    label_smoothing=cfg.label_smoothing,
                                    batch_size=cfg.batch_size, jit_compile=jit,
                                    callbacks=state.stage_callbacks(
                                        2, cfg.finetune_learning_rate)
                                    + tensorboard_logs.stage_callbacks(
                                        tb, 2, "fine-tuning " + ", ".join(unfrozen)))
        s2.seconds += t_cache
        s2 = state.finish_stage(2, s2)
        histories.append(s2.history)
        report["stage2"] = {**s2.summary(), "blocks": unfrozen, "mode": mode}
        log(f"stage 2: val_accuracy {s2.val_accuracy:.4f} after {s2.epochs} epochs "
            f"(best {s2.best_epoch}), {s2.seconds:.1f}s")
        # Fine-tuning can hurt on small data: keep what validates best
        # (accuracy first, loss breaks ties).
        if (s2.val_accuracy, -s2.val_loss) >= (s1.val_accuracy, -s1.val_loss):
            kept = "stage2"
        else:
            _restore(clf.model, stage1_weights)
        clf.backbone.trainable = False
    report["kept"] = kept
    log(f"kept the weights of {kept}")
    mirror = cfg.tta and cfg.flip
    final = clf.inference_model(mirror_average=mirror)
    report["tta"] = "mirror_average" if mirror else "none"

    # --- evaluate (the validation split when there is no test split) ----------
    eval_name, eval_split = ("test", data.test) if data.test is not None else ("val", data.val)
    report[eval_name] = state.once("evaluation", lambda: report_lib.evaluate_split(
        final, eval_split, classes, size, cfg.batch_size, cfg.top_k))
    log(f"{eval_name} accuracy {report[eval_name]['accuracy']:.4f} on "
        f"{report[eval_name]['n']} images")
    if tb is not None:
        tb.log_evaluation(eval_name, report[eval_name], sum(len(h["loss"]) for h in histories))
        tb.close()

    # --- write outputs and export ----------------------------------------------
    resolved = cfg.replace(image_size=size, alpha=backbones.resolve_alpha(family, cfg.alpha) or 0.0)
    with outputs.atomic_path(os.path.join(out, "model.keras")) as tmp:
        final.save(tmp)
    outputs.atomic_write_text(os.path.join(out, "labels.txt"), "\n".join(classes) + "\n")
    outputs.atomic_write_text(os.path.join(out, "config.json"), resolved.to_json() + "\n")
    run_manifest = manifest_lib.build(resolved.to_dict(), data,
                                      {"kept": kept, "precision_policy": policy})
    outputs.atomic_write_json(os.path.join(out, "manifest.json"), run_manifest)
    if cfg.export:
        path = state.once("export", lambda: export_lib.export_saved_model(
            final, classes, size, os.path.join(out, "export", "1"), cfg.top_k,
            {"manifest.json": json.dumps(run_manifest, indent=2)}), os.path.isdir)
        report["export"] = path
        log(f"exported SavedModel to {path}")
    written = report_lib.write_run_files(out, report, histories, eval_split.items, run_manifest)
    log(f"wrote {', '.join(written)} to {out}")
    report["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, "report.json"), report)
    state.finish()
    return report
