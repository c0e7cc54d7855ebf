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
from tl_keras.errors import fail
from tl_keras.export import saved_model as export_lib
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import families as families_lib
from tl_keras.model import classifier as model_lib
from tl_keras.model import open_set
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
from tl_keras.train import features, finetune_trial, kfold, linear_head, resume
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
    # The head is chosen by k-fold cross-validation on one machine's images; with
    # several workers (each holding a share) it is trained by AdamW instead.
    cv_head = cfg.head_fit == "cv_logistic" and dist.num_workers == 1
    if cfg.head_fit == "cv_logistic" and not cv_head:
        log("stage 1: --head_fit=cv_logistic needs every image on one machine; "
            f"{dist.num_workers} workers train the head with adamw")
    data, scan = views.load_data(cfg, cache_dir, dist.worker_dir(out), cross_validated=cv_head)
    holdout = len(data.val) > 0  # else the folds of the cross-validation validate
    classes = data.class_names
    n_cls = len(classes)
    multi = data.train.multi_label
    class_weight = sources_lib.class_weights(data.train, n_cls, cfg.class_weight)
    if class_weight:
        log("class weights: " + ", ".join(f"{classes[i]} {w:.3f}" for i, w in class_weight.items()))
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    if cv_head:  # each fold must see every class: at least 2 images of each
        few = [(c, k) for c, k in zip(classes, counts["train"]) if k < 2]
        if few:
            raise fail("data", cfg.data, f"class {few[0][0]!r} has {few[0][1]} training image; "
                       "the cross-validated head (--head_fit=cv_logistic) needs at least 2 "
                       "of each class")
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
    mirrored = views.mirrors_training_images(cfg, cv_head)  # a pass of the mirrored images
    engine = views.frozen_engine(cfg, dist, policy, views.images_to_pass(cfg, data, mirrored),
                                 cache, key_parts)
    tr, hit = views.cached_views(scaled, blocks, clf, cut, train_images, "train",
                                 cfg.cache_views, augmenter, cache, key_parts, engine,
                                 copy_grid=cfg.audit)
    va, _ = views.cached_views(scaled, blocks, clf, cut, val_images, "val", 1, None, cache,
                               key_parts, engine, copy_grid=cfg.audit)
    # The exported model averages each image with its mirror (--tta): the
    # cross-validated head is trained and judged on the mirrored images too,
    # and a kept stage 2 is calibrated on its trial's image + mirror averages.
    mirrors = (views.mirror_features(scaled, clf, train_images, cache, key_parts, engine, cut,
                                     copy_grid=cfg.audit) if mirrored else {})
    t_cache = time.perf_counter() - t0
    log(f"stage 1: backbone outputs of {cfg.cache_views} view(s) per training image "
        f"{'read from cache' if hit else 'computed'} in {t_cache:.1f}s")

    # --- data audit (issue 22) on the cached features -------------------------
    audited = None
    if cfg.audit and dist.num_workers == 1:
        audited = audit_run.on_features(scaled, data, tr, va, clf, size, cache, key_parts, out,
                                        cut, engine, mirrors.get("f"))
        if cfg.drop_leakage:
            data, tr, va, mirrors, dropped = audit_run.drop_copies(audited, data, tr, va,
                                                                   cfg.seed, mirrors)
            audited["dropped"] = dropped
            if dropped:  # the images stage 2 and the export read
                train_images, val_images = views.split_images(cfg, dist, data, size,
                                                              image_cache)
    elif cfg.audit:
        log("audit: skipped with several workers (run tl-keras audit on one machine)")
    mirror = mirrors.get("f")  # the mirrored training images' features
    head_spec, finetune_spec = _stage_specs(scaled, multi, class_weight, jit)
    n_train = len(data.train)
    cv = None
    if cv_head:  # logistic regression, its strength chosen by k-fold cross-validation
        labels = tr["y"][:n_train]
        s1, cv = linear_head.fit_head_cv(
            clf.model, _per_view(tr["f"], n_train), labels, sources_lib.targets(labels, n_cls),
            linear_head.HeadCVSpec(cfg.cv_folds, multi, class_weight, cfg.seed),
            mirror=mirror, groups=_keys_in_order(data.train, cfg.seed))
        log(f"stage 1: logistic head, C={cv.c} chosen by {int(cv.folds.max()) + 1}-fold "
            f"cross-validation on {n_train} images: out-of-fold accuracy "
            f"{s1.val_accuracy:.4f} ({s1.seconds:.1f}s)")
        if holdout:  # judged on the validation split too, as stage 2 will be
            s1.val_loss, s1.val_accuracy = _head_on(clf.head, va, n_cls, multi)
    else:
        s1 = train_lib.fit_head(clf.head, tr["f"], sources_lib.targets(tr["y"], n_cls),
                                va["f"], sources_lib.targets(va["y"], n_cls), head_spec,
                                callbacks=state.stage_callbacks(1, scaled.head_learning_rate)
                                + tensorboard_logs.stage_callbacks(tb, 1, "head on features"),
                                examples_per_epoch=n_train)
    s1.seconds += t_cache
    s1 = state.finish_stage(1, s1)
    if cv is None:  # (the cross-validated head logged its figures above)
        log_stage(1, s1)
    report = {"classes": classes, "class_counts": counts, "backbone": family.name,
              "image_size": size, "stage1": {**s1.summary(), "caching_seconds": round(t_cache, 2),
                                             "head_fit": "cv_logistic" if cv_head else "adamw"},
              "stage2": {"epochs": 0}}
    if cv is not None:
        report["stage1"]["cross_validation"] = linear_head.describe(cv, n_train)
    # The held-out predictions of the kept procedure without a validation split
    # (calibration, selective prediction and the report's estimate use them).
    heldout = None if holdout else (cv.oof_probs, np.arange(n_train))
    report.update({"multi_label": multi, "class_weight": class_weight and {
                       classes[i]: w for i, w in class_weight.items()},
                   "preflight": scan["summary"], "image_cache": image_cache.plan})
    if audited is not None:
        report["audit"] = {**audited["summary"], "dropped": audited.get("dropped", {}),
                           "seconds": audited["audit_seconds"]}
    kept = "stage1"
    histories = [s1.history]

    # --- unfreeze the top blocks, recompile, stage 2 -------------------------
    if cfg.finetune_epochs and blocks and not holdout and cut is None:
        log("stage 2: skipped: without a validation split the folds decide whether it pays, "
            "on cached activations, which this run does not cache (give --val_fraction or "
            "--val_data to fine-tune through the full model)")
    elif cfg.finetune_epochs and blocks and not holdout and n_train < finetune_trial.MIN_DECIDABLE:
        report["stage2_skipped"] = (
            f"{n_train} training images: fewer than {finetune_trial.MIN_DECIDABLE}, too few "
            "held-out images for the trial to tell fine-tuning from the head (the head is kept)")
        log(f"stage 2: skipped: {report['stage2_skipped']}; give --val_fraction or --val_data "
            "to fine-tune anyway")
    elif cfg.finetune_epochs and blocks and not holdout:
        # No validation split: stage 2 is tried on held-out folds first and runs
        # on all images only where it beat the logistic head there.
        unfrozen = blocks_lib.set_trainable_top_blocks(clf.backbone, family, blocks)
        trial = state.once("stage2_trial", lambda: _trial_record(finetune_trial.try_finetune(
            clf.model, cut.trainer, _per_view(tr["a"], n_train), _per_view(tr["f"], n_train),
            tr["y"][:n_train], sources_lib.targets(tr["y"][:n_train], n_cls), cv,
            finetune_spec, mirror=mirror, mirror_activations=mirrors.get("a"))))
        report["stage2_trial"] = {k: v for k, v in trial.items() if k not in ("probs", "index")}
        log(f"stage 2 trial on fold(s) {trial['folds']} ({trial['images']} held-out images): "
            f"accuracy {trial['head_accuracy']:.4f} with the logistic head, "
            f"{trial['finetune_accuracy']:.4f} fine-tuned: "
            + ("fine-tuning all images" if trial["finetune_kept"] else "keeping the head"))
        if trial["finetune_kept"]:
            log(f"stage 2: fine-tuning blocks {', '.join(unfrozen)} (BatchNorm frozen) at peak "
                f"lr {scaled.finetune_learning_rate} for {scaled.finetune_epochs} epochs")
            s2 = train_lib.fit_finetune(
                cut.trainer, (tr["a"], sources_lib.targets(tr["y"], n_cls)), None,
                finetune_spec, initial_epoch=0, steps_per_epoch=-(-n_train // scaled.batch_size),
                callbacks=state.stage_callbacks(2, scaled.finetune_learning_rate)
                + tensorboard_logs.stage_callbacks(tb, 2, "fine-tuning " + ", ".join(unfrozen)))
            s2 = state.finish_stage(2, s2)
            histories.append(s2.history)
            report["stage2"] = {**s2.summary(), "blocks": unfrozen, "mode": "cached_activations"}
            kept = "stage2"
            heldout = (np.asarray(trial["probs"], np.float32), np.asarray(trial["index"], int))
        clf.backbone.trainable = False
    elif cfg.finetune_epochs and blocks:
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
    mirror = views.mirror_averaged(cfg)
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
    # Without a validation split, the held-out predictions of the kept procedure
    # (out-of-fold for the head, the trial folds' for stage 2) stand in for it.
    eval_batch = features.inference_batch_size(scaled.batch_size)
    if holdout:
        val_split = data.val
    else:
        # (row i of the cached training arrays is example_order's i-th image)
        val_split = data.train.subset(
            data_pipeline.example_order(len(data.train), cfg.seed)[heldout[1]])
    eval_name, eval_split = (("test", data.test) if data.test is not None else
                             ("val", data.val) if holdout else ("cross_validation", val_split))
    uncalibrated, temperature, val_probs = final, None, None
    if not holdout:
        val_probs = heldout[0]
    elif cfg.calibrate or multi or cfg.target_accuracy or cfg.unknown_keep:
        # (one validation pass serves them all)
        val_probs = metrics_lib.predict(final, data.val, size, eval_batch)
    if cfg.calibrate:  # a temperature fitted on the validation predictions
        temperature = calibration.fit_temperature(val_probs, val_split.labels, multi)
        final = model_lib.calibrated(final, temperature, multi)
        report["calibration"] = calibration.summary(val_probs, val_split.labels, temperature,
                                                    multi)
        log_calibration(report["calibration"])
        val_probs = calibration.apply_temperature(val_probs, temperature, multi)
    answer_above = None
    if cfg.target_accuracy and multi:
        log("selective prediction: single-label runs only (multi-label runs decide each label "
            "at its own threshold)")
    elif cfg.target_accuracy:  # the confidence above which answers reach the target
        report["selective"] = selective.choose_threshold(val_probs, val_split.labels,
                                                         cfg.target_accuracy)
        answer_above = report["selective"]["threshold"]
        log("selective prediction: " + (
            f"answering at confidence >= {answer_above:.4f} reached "
            f"{report['selective']['accuracy']:.4f} on {report['selective']['coverage']:.0%} "
            f"of the {'validation' if holdout else 'held-out'} images"
            if report["selective"]["reached"] else
            f"no confidence threshold reaches --target_accuracy={cfg.target_accuracy} on "
            "validation"))
    unknown_threshold = None
    if cfg.unknown_keep and multi:
        log("unknown output: single-label runs only (a multi-label model decides each label "
            "on its own: an image with no label above its threshold already has none)")
    elif cfg.unknown_keep:  # "none of the above": the score's threshold on known images
        report["open_set"] = {**open_set.choose_threshold(val_probs, cfg.unknown_keep),
                              "chosen_on": "validation predictions" if holdout
                              else "held-out predictions"}
        unknown_threshold = report["open_set"]["threshold"]
        log(f"unknown output: ood_score ({open_set.SCORE}) > {unknown_threshold:.4f}, which "
            f"keeps {report['open_set']['known_kept']:.1%} of the "
            f"{report['open_set']['n']} {'validation' if holdout else 'held-out'} images "
            f"(--unknown_keep={cfg.unknown_keep})")
    thresholds = None
    if multi:  # per-label thresholds, chosen on validation (issue 3), calibrated
        thresholds, thresholds_doc = multilabel.choose(val_probs, val_split.labels, classes)
        report["thresholds"] = thresholds_doc["thresholds"]
    if eval_name == "cross_validation":  # the held-out predictions, not a new pass
        report[eval_name] = {**_evaluate_probs(heldout[0], temperature, multi, eval_split,
                                               classes, cfg.top_k, thresholds,
                                               report.get("selective"), unknown_threshold),
                             "estimate": "out-of-fold" if kept == "stage1" else "trial folds"}
    else:
        def evaluation():
            raw = None
            if eval_name == "test" and (kept == "stage1" or report["stage2"].get("mode")
                                        == "cached_activations"):
                # The lower part of the kept model stayed frozen: the head on
                # the test images' cached features, or stage 2's top on their
                # activations below the cut (the audit's entry, or one frozen
                # pass on the run's engine), is what the model computes.
                arrays = views.test_features(scaled, clf, eval_split, size, cache, key_parts,
                                             cut, engine, mirror=mirror)
                raw = (views.cached_probabilities(clf.head, arrays, "f", mirror)
                       if kept == "stage1" else
                       views.cached_probabilities(cut.trainer, arrays, "a", mirror)
                       if "a" in arrays else None)
            if raw is None:
                raw = metrics_lib.predict(uncalibrated, eval_split, size, eval_batch)
            return _evaluate_probs(raw, temperature, multi, eval_split, classes, cfg.top_k,
                                   thresholds, report.get("selective"), unknown_threshold)

        report[eval_name] = state.once("evaluation", evaluation)
    log(f"{eval_name} accuracy {report[eval_name]['accuracy']:.4f} on "
        f"{report[eval_name]['n']} images"
        + (" (held-out predictions of the cross-validation; give --test_data or "
           "--test_fraction for a test)" if eval_name == "cross_validation" else ""))
    if tb is not None:
        tb.log_evaluation(eval_name, report[eval_name],
                          sum(len(h.get("loss", ())) for h in histories))
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
            # Without a held-out split, the variants are compared on training images.
            gate_name, gate_split = ((eval_name, eval_split) if eval_name != "cross_validation"
                                     else ("train", data.train))
            report["export"] = state.once("export", lambda: artifacts.export_run(
                final, scaled.replace(finetune_blocks=blocks), classes, size, out, data,
                gate_split, gate_name, run_manifest, log, preflight_report=scan,
                extra_files=({"selective.json": json.dumps(report["selective"], indent=2)}
                             if "selective" in report else None), val_probs=val_probs,
                unknown_threshold=unknown_threshold),
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


def _evaluate_probs(raw: np.ndarray, temperature, multi_label: bool, split, classes, top_k: int,
                    thresholds, chosen: dict | None, unknown_threshold=None) -> dict:
    """The evaluation of the calibrated model, with the uncalibrated calibration beside it.

    `raw`: the uncalibrated probabilities of the rows of `split`; the
    calibrated ones are the temperature's formula applied to them (what the
    exported model's `Temperature` layer computes). With `chosen` (the
    selective-prediction threshold picked on validation), also the
    accuracy-coverage curve and what that threshold answers on this split;
    with `unknown_threshold`, how many of the split's images it calls unknown.
    """
    probs = raw if temperature is None else calibration.apply_temperature(raw, temperature,
                                                                           multi_label)
    ev = metrics_lib.evaluate_probs(probs, split, classes, top_k, thresholds)
    if chosen is not None:
        ev["coverage_curve"] = selective.coverage_curve(probs, split.labels)
        ev["selective"] = {**selective.at_threshold(probs, split.labels, chosen["threshold"]),
                           "target_accuracy": chosen["target_accuracy"],
                           "validation": {k: chosen[k] for k in ("coverage", "accuracy")}}
    if unknown_threshold is not None:
        ev["open_set"] = open_set.summary(probs, unknown_threshold)
    if temperature is None:
        return ev
    ev["ece_uncalibrated"], ev["calibration_uncalibrated"] = metrics_lib.calibration_of(
        raw, split.labels, None if thresholds is None else np.asarray(thresholds, np.float32))
    return ev


def _per_view(rows: np.ndarray, n: int) -> list[np.ndarray]:
    """Cached rows laid out view after view -> one [n, ...] array per view."""
    return [rows[v * n:(v + 1) * n] for v in range(len(rows) // max(n, 1))]


def _keys_in_order(split: sources_lib.Split, seed: int):
    """The split's content keys in cached-row order (copies share a fold), or None."""
    if split.keys is None:
        return None
    return [split.keys[i] for i in data_pipeline.example_order(len(split), seed)]


def _head_on(head, arrays: dict, n_cls: int, multi: bool) -> tuple[float, float]:
    """(log loss, accuracy) of the head on cached validation features."""
    probs = np.asarray(head.predict(arrays["f"], batch_size=1024, verbose=0), np.float32)
    targets = sources_lib.targets(arrays["y"], n_cls)
    return kfold.log_loss(probs, targets, multi), kfold.accuracy(probs, arrays["y"])


def _trial_record(trial) -> dict:
    """The stage-2 trial as a JSON-able record (its held-out predictions kept for resume)."""
    return {**trial.summary(), "probs": trial.probs.tolist(), "index": trial.index.tolist()}


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
