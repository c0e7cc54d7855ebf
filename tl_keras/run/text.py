"""The two-stage run for text (`--task=text`), top to bottom.

data -> vocabulary (training texts) -> word vectors -> model -> vectorize once
-> stage 1 (embeddings frozen; encoder and head trained) -> unfreeze the
embeddings -> stage 2 (everything at a low learning rate) -> keep the better
stage -> evaluate on raw strings -> write model, labels, config, report ->
export a new SavedModel version (parity-gated, as for images).

Without `--embeddings` the word vectors are random, and are trained from
stage 1 on: freezing random vectors would only handicap them.
"""

from __future__ import annotations

import os
import time

import numpy as np
import tensorflow as tf

from tl_keras.config import Config
from tl_keras.run import artifacts, setup
from tl_keras.run.setup import log, log_calibration, log_stage, validate
from tl_keras.core import cache as cache_lib
from tl_keras.core import determinism, outputs
from tl_keras.data import pipeline as data_pipeline
from tl_keras.errors import fail
from tl_keras.export import saved_model as export_lib
from tl_keras.model import classifier
from tl_keras.report import calibration
from tl_keras.report import metrics as metrics_lib
from tl_keras.text import export as text_export
from tl_keras.text import model as text_model
from tl_keras.text import sources as text_sources
from tl_keras.text import vectors as vectors_lib
from tl_keras.train import resume
from tl_keras.train import stages as train_lib

EMBEDDING_INITS = ("pretrained", "random")



def validate_text(cfg: Config) -> None:
    """Checks the text flags that need no data; raises ConfigError."""
    if cfg.encoder not in text_model.ENCODERS:
        raise fail("encoder", cfg.encoder, f"must be one of {', '.join(text_model.ENCODERS)}")
    if cfg.max_tokens < 3:
        raise fail("max_tokens", cfg.max_tokens, "must be >= 3 (padding, [UNK] and a word)")
    shortest = max(text_model.CNN_WIDTHS) if cfg.encoder == "cnn" else 1
    if cfg.sequence_length != 0 and cfg.sequence_length < shortest:
        raise fail("sequence_length", cfg.sequence_length,
                   f"must be >= {shortest} for --encoder={cfg.encoder} (or 0: auto)")
    if cfg.encoder_units < 1:
        raise fail("encoder_units", cfg.encoder_units, "must be >= 1")
    if not 0 <= cfg.embedding_dropout < 1:
        raise fail("embedding_dropout", cfg.embedding_dropout, "must be in [0, 1)")
    if cfg.embedding_vocabulary < 0:
        raise fail("embedding_vocabulary", cfg.embedding_vocabulary,
                   "must be >= 0 (words of --embeddings added to the training vocabulary; "
                   "0: none)")
    if cfg.embedding_init not in EMBEDDING_INITS:
        raise fail("embedding_init", cfg.embedding_init,
                   f"must be one of {', '.join(EMBEDDING_INITS)}")
    if cfg.embedding_dim < 0:
        raise fail("embedding_dim", cfg.embedding_dim, "must be >= 1 (or 0 for the default)")
    if cfg.embeddings and not os.path.isfile(cfg.embeddings):
        raise fail("embeddings", cfg.embeddings,
                   "no such file (expected GloVe or word2vec vectors)")


def _one_hot(labels: np.ndarray, n: int) -> np.ndarray:
    return np.eye(n, dtype=np.float32)[labels]


def _fingerprint(split) -> str:
    """A hash of a split's texts and labels (what resuming must find unchanged)."""
    return cache_lib.make_key(items=list(split.items), labels=np.asarray(split.labels).tolist())


def _fingerprints(cfg: Config, data) -> dict:
    """What training reads besides the settings: the splits and the word-vectors file."""
    vectors = (cache_lib.file_fingerprint(cfg.embeddings) if os.path.isfile(cfg.embeddings)
               else cfg.embeddings)
    return {"train": _fingerprint(data.train), "val": _fingerprint(data.val),
            "embeddings": vectors}


def train(cfg: Config) -> dict:
    """Runs the two-stage text pipeline described by `cfg` (cfg.task == "text").

    Returns:
        The report (also written to `OUT/report.json`).
    """
    t_start = time.perf_counter()
    validate(cfg)
    validate_text(cfg)
    out = outputs.ensure_writable_dir(cfg.output_dir)
    determinism.apply(cfg.seed, cfg.deterministic)

    # --- data ----------------------------------------------------------------
    data = text_sources.load_text_dataset(cfg.data, cfg.val_data, cfg.test_data, setup.val_fraction(cfg),
                                      cfg.test_fraction, cfg.seed, cfg.tfds_split,
                                      cfg.tfds_data_dir)
    classes = data.class_names
    n_cls = len(classes)
    counts = {"train": data.train.class_counts(n_cls), "val": data.val.class_counts(n_cls)}
    if data.test is not None:
        counts["test"] = data.test.class_counts(n_cls)
    log(f"{n_cls} classes; texts: " + ", ".join(f"{k} {sum(v)}" for k, v in counts.items()))

    # --- resume (issue 7): continue an interrupted run, refuse a changed one ----
    state = resume.RunState.open(out, cfg, _fingerprints(cfg, data),
                                 {"test": data.test and _fingerprint(data.test)}, log)
    if state.finished:
        log(f"{out} holds this run, finished: nothing to do (--restart trains it again)")
        return state.report()

    # --- vocabulary and word vectors -----------------------------------------
    seq_len = cfg.sequence_length
    if not seq_len:
        seq_len, p = text_model.auto_sequence_length(data.train.items)
        log(f"sequence length {seq_len} (--sequence_length=0, auto: {p} tokens hold "
            f"{text_model.AUTO_LENGTH_PERCENTILE}% of the training texts)")
    vectorizer = text_model.build_vectorizer(data.train.items, cfg.max_tokens, seq_len)
    training_words = len(vectorizer.get_vocabulary()) - 2
    vectors = None
    if cfg.embeddings:
        vectors = vectors_lib.load_vectors(cfg.embeddings, set(vectorizer.get_vocabulary()[2:]),
                                        first=cfg.embedding_vocabulary)
        if cfg.embedding_dim and cfg.embedding_dim != vectors.dim:
            raise fail("embedding_dim", cfg.embedding_dim,
                       f"the vectors in {cfg.embeddings} have {vectors.dim} dimensions")
        dim = vectors.dim
        # The file's most frequent words join the vocabulary after the training words.
        vectorizer, _ = text_model.extend_vocabulary(vectorizer, vectors.top)
    else:
        dim = cfg.embedding_dim or vectors_lib.DEFAULT_RANDOM_DIM
    vocabulary = vectorizer.get_vocabulary()
    train_ids = text_model.vectorize(vectorizer, data.train.items)
    val_ids = text_model.vectorize(vectorizer, data.val.items)
    pretrained = vectors is not None and cfg.embedding_init == "pretrained"
    matrix, coverage = vectors_lib.embedding_matrix(vocabulary, vectors if pretrained else None,
                                                 dim, cfg.seed, train_ids, training_words,
                                                 val_ids)
    embeddings = {"source": cfg.embeddings or "random", "dim": dim,
                  "init": "pretrained" if pretrained else "random", **coverage}
    if vectors is not None:
        embeddings["format"] = vectors.format
    extra = (f", {coverage['vectors_only']} of them from {cfg.embeddings} only "
             f"(--embedding_vocabulary={cfg.embedding_vocabulary})" if vectors is not None else "")
    if pretrained:
        if coverage["found"] == 0:
            raise fail("embeddings", cfg.embeddings,
                       f"has a vector for none of the {coverage['training_words']} training "
                       "words")
        log(f"word vectors: {coverage['found']} of {coverage['training_words']} training words "
            f"found in {cfg.embeddings} ({vectors.format}, {dim}d): word coverage "
            f"{coverage['word_coverage']:.1%}, token coverage {coverage['token_coverage']:.1%} "
            f"(validation {coverage['val_token_coverage']:.1%}); vocabulary "
            f"{coverage['words']} words{extra}")
    else:
        log(f"word vectors: random, {dim}d, trained from stage 1 on "
            f"(vocabulary {coverage['words']} words{extra})")

    # --- model ---------------------------------------------------------------
    clf = text_model.build_text_classifier(vectorizer, matrix, n_cls, cfg.encoder,
                                         cfg.encoder_units, cfg.dropout,
                                         train_embeddings=not pretrained,
                                         embedding_dropout=cfg.embedding_dropout)
    log(f"encoder {cfg.encoder}, vocabulary {len(vocabulary)}, {seq_len} tokens "
        f"per text, {clf.ids_model.count_params()} parameters")

    # --- stage 1: encoder and head on frozen word vectors -------------------
    tr_y, va_y = _one_hot(data.train.labels, n_cls), _one_hot(data.val.labels, n_cls)
    log("stage 1: " + ("embeddings frozen" if pretrained else "embeddings trained")
        + f", encoder and head at lr {cfg.head_learning_rate}")
    s1 = train_lib.fit_head(clf.ids_model, train_ids, tr_y, val_ids, va_y,
                            train_lib.StageSpec(epochs=cfg.head_epochs,
                                                learning_rate=cfg.head_learning_rate,
                                                weight_decay=cfg.head_weight_decay,
                                                batch_size=cfg.batch_size, patience=cfg.patience,
                                                label_smoothing=cfg.label_smoothing),
                            callbacks=state.stage_callbacks(1, cfg.head_learning_rate))
    s1 = state.finish_stage(1, s1)
    log_stage(1, s1)
    report = {"task": "text", "classes": classes, "class_counts": counts,
              "encoder": cfg.encoder, "vocabulary": len(vocabulary),
              "sequence_length": seq_len, "embeddings": embeddings,
              "stage1": s1.summary(), "stage2": {"epochs": 0}}
    kept = "stage1"

    # --- unfreeze the embeddings, recompile, stage 2 -------------------------
    if cfg.finetune_epochs:
        stage1_weights = train_lib.snapshot(clf.ids_model)
        clf.embedding.trainable = True
        log(f"stage 2: embeddings unfrozen, everything at peak lr {cfg.finetune_learning_rate}")
        train_ds = data_pipeline.steady(
            tf.data.Dataset.from_tensor_slices((train_ids, tr_y))
            .shuffle(len(train_ids), seed=cfg.seed, reshuffle_each_iteration=True)
            .batch(cfg.batch_size).prefetch(tf.data.AUTOTUNE))
        val_ds = data_pipeline.steady(
            tf.data.Dataset.from_tensor_slices((val_ids, va_y)).batch(cfg.batch_size))
        steps = -(-len(train_ids) // cfg.batch_size)
        s2 = train_lib.fit_finetune(clf.ids_model, train_ds, val_ds,
                                    train_lib.StageSpec(epochs=cfg.finetune_epochs,
                                                        learning_rate=cfg.finetune_learning_rate,
                                                        warmup_epochs=cfg.warmup_epochs,
                                                        patience=cfg.patience,
                                                        label_smoothing=cfg.label_smoothing),
                                    initial_epoch=s1.epochs, steps_per_epoch=steps,
                                    callbacks=state.stage_callbacks(2, cfg.finetune_learning_rate))
        s2 = state.finish_stage(2, s2)
        report["stage2"] = s2.summary()
        log_stage(2, s2)
        kept = train_lib.keep_better(clf.ids_model, s1, s2, stage1_weights)
    report["kept"] = kept
    log(f"kept the weights of {kept}")

    # --- calibrate (a temperature fitted on the validation predictions) -------
    final = clf.model
    if cfg.calibrate:
        val_probs = text_model.predict_texts(clf.model, data.val.items, cfg.batch_size)
        temperature = calibration.fit_temperature(val_probs, data.val.labels)
        final = classifier.calibrated(clf.model, temperature)
        report["calibration"] = calibration.summary(val_probs, data.val.labels, temperature)
        log_calibration(report["calibration"])

    # --- evaluate (the string model: what is saved and served) ---------------
    if data.test is not None:
        report["test"] = state.once("evaluation", lambda: metrics_lib.metrics(
            text_model.predict_texts(final, data.test.items, cfg.batch_size),
            data.test.labels, cfg.top_k))
        log(f"test accuracy {report['test']['accuracy']:.4f} on {report['test']['n']} texts")

    # --- write outputs and export ----------------------------------------------
    resolved = cfg.replace(embedding_dim=dim, sequence_length=seq_len)
    artifacts.write_model_files(out, final, classes, resolved)
    rejected = None
    if cfg.export:
        # As for images: a new version (or the newest replaced, --overwrite),
        # published only if the reloaded SavedModel predicts the validation
        # texts as the Keras model does (the parity gate). Done once: a
        # resumed run does not export again.
        try:
            report["export"] = state.once("export", lambda: text_export.export_text_version(
                final, classes, os.path.join(out, "export"), artifacts.export_spec(cfg),
                parity_texts=data.val.items, check_path=os.path.join(out, "export_check.json"),
                log=log), lambda done: os.path.isdir(done.get("path", "")))
        except export_lib.ExportRejected as e:
            report["export"], rejected = e.result, e
    return artifacts.finish_run(out, report, state, rejected, t_start)
