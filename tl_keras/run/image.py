"""The two-stage transfer-learning run, top to bottom.

data -> model -> stage 1 (head on cached features) -> unfreeze top blocks ->
recompile -> stage 2 (fine-tune) -> keep the better stage -> evaluate ->
write model, labels, config, report -> export a new version (SavedModel,
TFLite variants) through the parity gate.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from tl_keras.config import Config
from tl_keras.core import cache as cache_lib
from tl_keras.core import determinism, outputs, precision
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.export import saved_model as export_lib
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import families as families_lib
from tl_keras.model import classifier as model_lib
from tl_keras.report import calibration
from tl_keras.report import markdown as markdown_lib
from tl_keras.report import metrics as metrics_lib
from tl_keras.report import selective
from tl_keras.report import tensorboard as tensorboard_logs
from tl_keras.report import thresholds as multilabel
from tl_keras.run import artifacts
from tl_keras.run import manifest as manifest_lib
from tl_keras.run import audit as audit_run
from tl_keras.run import views
from tl_keras.run.setup import log, log_calibration, log_stage, validate
from tl_keras.train import features, resume
from tl_keras.train import stages as train_lib
from tl_keras.train import strategy as strategy_lib


def train(cfg: Config) -> dict:
    """Runs the whole two-stage pipeline described by `cfg`.

    Under a distribution strategy (--strategy, see `tl_keras.train.strategy`)
    every worker runs this; only the chief evaluates and writes the outputs.

    Returns:
        The report (also written to `OUT/report.json` by the chief).
    """
    if cfg.task == "text":  # the same two stages on word vectors: tl_keras/run/text.py
        from tl_keras.run import text as text_pipeline

        strategy_lib.require_one_device(cfg.strategy, cfg.tpu, "--task=text")
        return text_pipeline.train(cfg)
    validate(cfg)
    # Before anything runs TensorFlow: multi-worker and TPU strategies need it first.
    dist = strategy_lib.create(cfg.strategy, cfg.tpu, cfg.replica_scaling)
    log(f"distribution: {dist}")
    with dist.scope():  # models are built and trained in the strategy's scope
        report = _train(cfg, dist)
    dist.barrier()  # the other workers wait until the chief has written the outputs
    return report


def _train(cfg: Config, dist: strategy_lib.Distribution) -> dict:
    """The image pipeline; trains in the strategy's scope (see `train`)."""
    t_start = time.perf_counter()
    family, size = views.resolve_family(cfg)
    out = outputs.ensure_writable_dir(cfg.output_dir)
    policy = precision.apply(dist.precision(cfg.precision))  # before any model is built
    jit = train_lib.jit_setting(cfg.jit_compile, log)
    determinism.apply(cfg.seed, cfg.deterministic)
    # The batch size and learning rates training uses (--replica_scaling);
    # `cfg` keeps the flags as given, which config.json records.
    scaled = dist.scale(cfg)
    cache_dir, cache = views.open_cache(cfg, dist.worker_dir(out))

    # --- data ----------------------------------------------------------------
    # Pre-flight scan (issue 3): bad files skipped, odd ones converted, OUT/preflight.json.
    data, scan = views.load_data(cfg, cache_dir, dist.worker_dir(out))
    classes = data.class_names
    n_cls = len(classes)
    multi = data.train.multi_label
    class_weight = sources_lib.class_weights(data.train, n_cls, cfg.class_weight)
    if class_weight:
        log("class weights: " + ", ".join(f"{classes[i]} {w:.3f}" for i, w in class_weight.items()))
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    sizes = {"train": len(data.train), "val": len(data.val), "test": len(data.test or [])}
    log(f"{n_cls} classes; images: " + ", ".join(f"{k} {sizes[k]}" for k in counts))

    # --- resume (issue 7): continue an interrupted run, refuse a changed one ----
    # Each worker keeps its own state (the chief's is OUT's): resume per worker.
    state = resume.RunState.open(
        dist.worker_dir(out), scaled.replace(image_size=size),
        views.cache_key_parts(cfg, family, size, data, policy),
        {"test": data.test and cache_lib.split_fingerprint(data.test.items, data.test.labels)},
        log)
    if state.finished:
        log(f"{out} holds this run, finished: nothing to do (--restart trains it again)")
        return state.report()

    # --- model ---------------------------------------------------------------
    step = views.build_model(cfg, family, size, n_cls, multi)
    n_blocks, blocks, clf, augmenter = step.n_blocks, step.blocks, step.clf, step.augmenter
    image_cache = data_pipeline.CacheBudget(cfg.cache_ram_mb, cache_dir)
    # Each worker reads, caches and trains on its own part of the data.
    train_images, val_images = views.split_images(cfg, dist, data, size, image_cache)
    log(f"backbone {family.name} at {size}px, {n_blocks} blocks, weights={cfg.weights}, "
        f"precision {policy}, device {precision.describe_device()}")
    for note in family.notes:  # how a --backbone=PATH.keras file was cut and grouped
        log(note)
    key_parts = {**views.cache_key_parts(cfg, family, size, data, policy), **dist.cache_key()}

    tb = tensorboard_logs.start(out,
                                scaled.replace(image_size=size, finetune_blocks=blocks).to_dict(),
                                cfg.tensorboard and dist.is_chief,  # only the chief writes
                                resume=state.resumed)

    # --- stage 1: the head on cached features ------------------------------
    # One inference pass per view feeds both stages: pooled features for the
    # head and, below the blocks stage 2 unfreezes, activations for stage 2.
    t0 = time.perf_counter()
    cut = views.plan_cut(cfg, blocks, clf, data)
    resume.check_disk_space(dist.worker_dir(out), cache_dir, clf, cfg.cache_views, cut,
                            len(data.train), len(data.val))
    tr, hit = views.cached_views(scaled, blocks, clf, cut, train_images, "train",
                                 cfg.cache_views, augmenter, cache, key_parts)
    va, _ = views.cached_views(scaled, blocks, clf, cut, val_images, "val", 1, None, cache,
                               key_parts)
    t_cache = time.perf_counter() - t0
    log(f"stage 1: backbone outputs of {cfg.cache_views} view(s) per training image "
        f"{'read from cache' if hit else 'computed'} in {t_cache:.1f}s")

    # --- data audit (issue 22) on the cached features -------------------------
    audited = None
    if cfg.audit and dist.num_workers == 1:
        audited = audit_run.on_features(scaled, data, tr, va, clf, size, cache, key_parts, out)
        if cfg.drop_leakage:
            data, tr, va, dropped = audit_run.drop_copies(audited, data, tr, va, cfg.seed)
            audited["dropped"] = dropped
            if dropped:  # the images stage 2 and the export read
                train_images, val_images = views.split_images(cfg, dist, data, size,
                                                              image_cache)
    elif cfg.audit:
        log("audit: skipped with several workers (run tl-keras audit on one machine)")
    head_spec, finetune_spec = _stage_specs(scaled, multi, class_weight, jit)
    s1 = train_lib.fit_head(clf.head, tr["f"], sources_lib.targets(tr["y"], n_cls), va["f"],
                            sources_lib.targets(va["y"], n_cls), head_spec,
                            callbacks=state.stage_callbacks(1, scaled.head_learning_rate)
                            + tensorboard_logs.stage_callbacks(tb, 1, "head on features"),
                            examples_per_epoch=len(data.train))
    s1.seconds += t_cache
    s1 = state.finish_stage(1, s1)
    log_stage(1, s1)
    report = {"classes": classes, "class_counts": counts, "backbone": family.name,
              "image_size": size, "stage1": {**s1.summary(), "caching_seconds": round(t_cache, 2)},
              "stage2": {"epochs": 0}}
    report.update({"multi_label": multi, "class_weight": class_weight and {
                       classes[i]: w for i, w in class_weight.items()},
                   "preflight": scan["summary"], "image_cache": image_cache.plan})
    if audited is not None:
        report["audit"] = {**audited["summary"], "dropped": audited.get("dropped", {}),
                           "seconds": audited["audit_seconds"]}
    kept = "stage1"
    histories = [s1.history]

    # --- unfreeze the top blocks, recompile, stage 2 -------------------------
    if cfg.finetune_epochs and blocks:
        stage1_weights = train_lib.snapshot(clf.model)
        unfrozen = blocks_lib.set_trainable_top_blocks(clf.backbone, family, blocks)
        log(f"stage 2: fine-tuning blocks {', '.join(unfrozen)} "
            f"(BatchNorm frozen) at peak lr {scaled.finetune_learning_rate}")
        if cut is not None:
            log(f"stage 2: training the top on cached activations {cut.shape}")
            trainer, mode = cut.trainer, "cached_activations"
            train_data = (tr["a"], sources_lib.targets(tr["y"], n_cls))
            val_data = (va["a"], sources_lib.targets(va["y"], n_cls))
        else:
            trainer, mode = clf.model, "full_model"
            batch = strategy_lib.local_batch_size(scaled.batch_size)  # this worker's share
            train_data = data_pipeline.batched(train_images, batch, n_cls, shuffle=True,
                                               seed=cfg.seed, augment=augmenter)
            val_data = data_pipeline.batched(val_images, batch, n_cls)
        # An epoch is one pass over the training images (one cached view of
        # each, on average), as in stage 1: all the workers' images together,
        # so every worker takes the same steps (each its share of every batch).
        n_train = len(data.train)
        s2 = train_lib.fit_finetune(
            trainer, train_data, val_data, finetune_spec, initial_epoch=s1.epochs,
            steps_per_epoch=-(-n_train // scaled.batch_size),
            callbacks=state.stage_callbacks(2, scaled.finetune_learning_rate)
            + tensorboard_logs.stage_callbacks(tb, 2, "fine-tuning " + ", ".join(unfrozen)))
        s2 = state.finish_stage(2, s2)
        histories.append(s2.history)
        report["stage2"] = {**s2.summary(), "blocks": unfrozen, "mode": mode}
        log_stage(2, s2)
        kept = train_lib.keep_better(clf.model, s1, s2, stage1_weights)
        clf.backbone.trainable = False
    report["kept"] = kept
    log(f"kept the weights of {kept}")
    mirror = cfg.tta and cfg.flip
    final = clf.inference_model(mirror_average=mirror)
    report["tta"] = "mirror_average" if mirror else "none"
    image_cache.cleanup()
    report["distribution"] = dist.describe(clf.model, scaled)
    log(f"weights fingerprint {report['distribution']['weights_fingerprint']}")
    dist.deactivate()  # evaluate, save and export outside the strategy's scope
    if not dist.is_chief:  # only the chief evaluates and writes outputs
        # The worker's own report, in its own folder, so that rerunning the
        # command on this worker finds its run finished.
        outputs.atomic_write_json(os.path.join(dist.worker_dir(out), "report.json"), report)
        state.finish()
        return report

    # --- evaluate (the validation split when there is no test split) ----------
    eval_name, eval_split = ("test", data.test) if data.test is not None else ("val", data.val)
    eval_batch = features.inference_batch_size(scaled.batch_size)
    uncalibrated, temperature, val_probs = final, None, None
    if cfg.calibrate or multi or cfg.target_accuracy:  # one validation pass serves them all
        val_probs = metrics_lib.predict(final, data.val, size, eval_batch)
    if cfg.calibrate:  # a temperature fitted on the validation predictions
        temperature = calibration.fit_temperature(val_probs, data.val.labels, multi)
        final = model_lib.calibrated(final, temperature, multi)
        report["calibration"] = calibration.summary(val_probs, data.val.labels, temperature, multi)
        log_calibration(report["calibration"])
        val_probs = calibration.apply_temperature(val_probs, temperature, multi)
    answer_above = None
    if cfg.target_accuracy and multi:
        log("selective prediction: single-label runs only (multi-label runs decide each label "
            "at its own threshold)")
    elif cfg.target_accuracy:  # the confidence above which answers reach the target
        report["selective"] = selective.choose_threshold(val_probs, data.val.labels,
                                                         cfg.target_accuracy)
        answer_above = report["selective"]["threshold"]
        log("selective prediction: " + (
            f"answering at confidence >= {answer_above:.4f} reached "
            f"{report['selective']['accuracy']:.4f} on {report['selective']['coverage']:.0%} "
            "of the validation images" if report["selective"]["reached"] else
            f"no confidence threshold reaches --target_accuracy={cfg.target_accuracy} on "
            "validation"))
    thresholds = None
    if multi:  # per-label thresholds, chosen on validation (issue 3), calibrated
        thresholds, thresholds_doc = multilabel.choose(val_probs, data.val.labels, classes)
        report["thresholds"] = thresholds_doc["thresholds"]
    report[eval_name] = state.once("evaluation", lambda: _evaluate(
        uncalibrated, temperature, multi, eval_split, classes, size, eval_batch, cfg.top_k,
        thresholds, report.get("selective")))
    log(f"{eval_name} accuracy {report[eval_name]['accuracy']:.4f} on "
        f"{report[eval_name]['n']} images")
    if tb is not None:
        tb.log_evaluation(eval_name, report[eval_name], sum(len(h["loss"]) for h in histories))
        tb.close()

    # --- write outputs and export ----------------------------------------------
    resolved = cfg.replace(  # the flags as given (not scaled per replica), auto values resolved
        image_size=size, alpha=families_lib.resolve_alpha(family, cfg.alpha) or 0.0,
        finetune_blocks=blocks)
    artifacts.write_model_files(out, final, classes, resolved)
    run_manifest = manifest_lib.build(resolved.to_dict(), data,
                                      {"kept": kept, "precision_policy": policy})
    outputs.atomic_write_json(os.path.join(out, "manifest.json"), run_manifest)
    rejected = None
    if cfg.export:
        # A new version (or the newest replaced, --overwrite): SavedModel, then
        # TFLite, then the parity gate; published only if the gate passes.
        try:
            report["export"] = state.once("export", lambda: artifacts.export_run(
                final, scaled.replace(finetune_blocks=blocks), classes, size, out, data,
                eval_split, eval_name, run_manifest, log, preflight_report=scan,
                extra_files=({"selective.json": json.dumps(report["selective"], indent=2)}
                             if "selective" in report else None), val_probs=val_probs),
                lambda done: os.path.isdir(done.get("path", "")))
        except export_lib.ExportRejected as e:
            report["export"], rejected = e.result, e
    if multi:
        published = report.get("export") if rejected is None and cfg.export else None
        multilabel.write_thresholds(out, thresholds_doc,
                                    published.get("path", "") if published else "")
    written = markdown_lib.write_run_files(out, report, histories, eval_split.items, run_manifest)
    log(f"wrote {', '.join(written)} to {out}")
    return artifacts.finish_run(out, report, state, rejected, t_start)


def _evaluate(model, temperature, multi_label: bool, split, classes, size: int, batch: int,
              top_k: int, thresholds, chosen: dict | None) -> dict:
    """The evaluation of the calibrated model, with the uncalibrated calibration beside it.

    One prediction pass: the calibrated probabilities are the temperature's
    formula applied to the uncalibrated ones (what the exported model's
    `Temperature` layer computes). With `chosen` (the selective-prediction
    threshold picked on validation), also the accuracy-coverage curve and
    what that threshold answers on this split.
    """
    raw = metrics_lib.predict(model, split, size, batch)
    probs = raw if temperature is None else calibration.apply_temperature(raw, temperature,
                                                                           multi_label)
    ev = metrics_lib.evaluate_probs(probs, split, classes, top_k, thresholds)
    if chosen is not None:
        ev["coverage_curve"] = selective.coverage_curve(probs, split.labels)
        ev["selective"] = {**selective.at_threshold(probs, split.labels, chosen["threshold"]),
                           "target_accuracy": chosen["target_accuracy"],
                           "validation": {k: chosen[k] for k in ("coverage", "accuracy")}}
    if temperature is None:
        return ev
    ev["ece_uncalibrated"], ev["calibration_uncalibrated"] = metrics_lib.calibration_of(
        raw, split.labels, None if thresholds is None else np.asarray(thresholds, np.float32))
    return ev


def _stage_specs(scaled: Config, multi_label: bool, class_weight, jit
                 ) -> tuple[train_lib.StageSpec, train_lib.StageSpec]:
    """The two stages' training settings, from the (replica-scaled) flags."""
    common = dict(batch_size=scaled.batch_size, patience=scaled.patience,
                  label_smoothing=scaled.label_smoothing, multi_label=multi_label,
                  class_weight=class_weight, jit_compile=jit, seed=scaled.seed)
    head = train_lib.StageSpec(epochs=scaled.head_epochs, learning_rate=scaled.head_learning_rate,
                               weight_decay=scaled.head_weight_decay, **common)
    finetune = train_lib.StageSpec(epochs=scaled.finetune_epochs,
                                   learning_rate=scaled.finetune_learning_rate,
                                   warmup_epochs=scaled.warmup_epochs, **common)
    return head, finetune
