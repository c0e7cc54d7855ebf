"""Evaluation of a trained classifier on a split: the one place metrics are computed.

`evaluation` turns predicted probabilities and true labels into the metrics
block that `report.json` keeps under "test" (or "val" when a run has no test
split) and `evaluation.json` under "test": accuracy, top-k accuracy,
per-class precision/recall/F1 with support, macro and weighted averages, the
confusion matrix, one-vs-rest ROC-AUC and PR-AUC, expected calibration error
and the most confident mistakes. Counting and averaging is scikit-learn's;
only ECE, which scikit-learn lacks, is computed here.

`evaluate_split` predicts a split and returns that block (multi-label runs at
their per-label thresholds); `metrics` is the small accuracy/top-k summary
used where a full report is not wanted.
"""
from __future__ import annotations

from typing import Optional, Sequence

import keras
import numpy as np
import tensorflow as tf
from sklearn import metrics as skm

from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.train import loop as loop_lib

# How many of the most confident mistakes the report keeps and shows.
NUM_MISTAKES = 16
# Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
# How many most-confused (true, predicted) pairs the report lists.
NUM_CONFUSED_PAIRS = 5


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins.

    ECE = sum over bins b of |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|,
    bins (i/n, (i+1)/n], the first one also holding confidence 0.

    Args:
        confidence: [N] the probability of each predicted label.
        correct: [N] whether that prediction was right.
        n_bins: number of bins.

    Returns:
        (ece, bins): bins lists the non-empty bins as {"lower", "upper",
        "count", "accuracy", "confidence"}.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    if n == 0:
        return 0.0, []
    idx = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        if not count:
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += count / n * abs(acc - conf)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "accuracy": acc, "confidence": conf})
    return float(ece), bins


def calibration_of(probs: np.ndarray, labels: np.ndarray, threshold=None
                   ) -> tuple[float, list[dict]]:
    """(ECE, reliability bins) of a set of predictions, as `evaluation` measures them.

    Single-label ([N] class ids): the confidence of each predicted class.
    Multi-label ([N, C] 0/1 rows, decided at `threshold`): each (example,
    class) decision is a binary prediction with confidence max(p, 1 - p);
    calibration is measured over all of them.
    """
    probs = np.asarray(probs)
    labels = np.asarray(labels)
    if labels.ndim == 2:
        pred = (probs >= (0.5 if threshold is None else threshold)).astype(int)
        confidence = np.where(pred == 1, probs, 1.0 - probs)
        return expected_calibration_error(confidence.ravel(), (pred == labels).ravel())
    pred = probs.argmax(axis=1)
    return expected_calibration_error(probs[np.arange(len(probs)), pred], pred == labels)


def one_vs_rest_auc(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    """ROC-AUC and PR-AUC (average precision) of each class against the rest.

    Args:
        probs: [N, C] scores.
        targets: [N, C] 0/1 indicators (one-hot for single-label data).
        class_names: the C names.

    Returns:
        {"roc_auc", "pr_auc", "per_class": {name: {"roc_auc", "pr_auc"}}}.
        A class without both positives and negatives has no AUC (None) and
        is left out of the macro average. With two single-label classes the
        headline figures are those of the second class as the positive one
        (scikit-learn's binary convention); otherwise they are macro averages.
    """
    per_class = {}
    for c, name in enumerate(class_names):
        y = targets[:, c]
        if 0 < y.sum() < len(y):
            per_class[name] = {"roc_auc": float(skm.roc_auc_score(y, probs[:, c])),
                               "pr_auc": float(skm.average_precision_score(y, probs[:, c]))}
        else:
            per_class[name] = {"roc_auc": None, "pr_auc": None}
    single_label = bool(np.all(targets.sum(axis=1) == 1))
    if single_label and len(class_names) == 2:
        head = per_class[class_names[1]]
        return {"roc_auc": head["roc_auc"], "pr_auc": head["pr_auc"], "average": "binary",
                "per_class": per_class}
    out = {"average": "macro", "per_class": per_class}
    for key in ("roc_auc", "pr_auc"):
        vals = [v[key] for v in per_class.values() if v[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _per_class_table(targets, predicted, class_names: Sequence[str]) -> tuple[list, dict]:
    """Per-class precision/recall/F1/support and their macro and weighted averages."""
    labels = list(range(len(class_names)))
    p, r, f, s = skm.precision_recall_fscore_support(targets, predicted, labels=labels,
                                                     zero_division=0)
    rows = [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, name in enumerate(class_names)]
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(targets, predicted, labels=labels,
                                                            average=avg, zero_division=0)
        averages[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af),
                         "support": int(np.sum(s))}
    return rows, averages


def describe_items(items: Sequence, source: str = "") -> list[str]:
    """How each example is named in reports: its file path, or its index in the source."""
    return [it if isinstance(it, str) else f"{source or 'data'}#{i}"
            for i, it in enumerate(items)]


def evaluation(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               top_k: int = 3, names: Optional[Sequence[str]] = None,
               threshold: float = 0.5, num_mistakes: int = NUM_MISTAKES) -> dict:
    """All evaluation metrics of a set of predictions.

    Args:
        probs: [N, C] predicted probabilities.
        labels: [N] int class ids (single-label), or [N, C] 0/1 targets
            (multi-label: each class is decided by `threshold`).
        class_names: the C class names.
        top_k: k of the top-k accuracy (capped at C; single-label only).
        names: [N] how to name each example in the mistakes list (file paths).
        threshold: decision threshold of multi-label predictions.
        num_mistakes: how many of the most confident mistakes to keep.

    Returns:
        A JSON-ready dict. Always: "accuracy" (exact match for multi-label),
        "n", "per_class" (class, precision, recall, f1, support),
        "macro_avg" / "weighted_avg", "roc_auc", "pr_auc", "auc" (per class),
        "ece", "calibration" (bins), "mistakes" (file, true, predicted,
        score, index; most confident first). Single-label also has
        "top_{k}_accuracy", "confusion_matrix" (rows true, columns
        predicted) and "most_confused" pairs; multi-label has
        "multi_label": true and "threshold".
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    n_cls = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_cls:
        raise ValueError(f"probabilities of shape {probs.shape} do not match "
                         f"{n_cls} classes")
    n = probs.shape[0]
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    if labels.ndim == 2:
        return _multi_label_evaluation(probs, labels.astype(int), class_names, names,
                                       threshold, num_mistakes)
    labels = labels.astype(int)
    result: dict = {"accuracy": 0.0, "n": int(n)}
    if n == 0:
        return result
    pred = probs.argmax(axis=1)
    k = min(top_k, n_cls)
    result["accuracy"] = float(skm.accuracy_score(labels, pred))
    if k >= n_cls:
        topk = 1.0
    elif n_cls == 2:  # scikit-learn wants 1-D scores for two classes; k is 1 here
        topk = result["accuracy"]
    else:
        topk = float(skm.top_k_accuracy_score(labels, probs, k=k, labels=range(n_cls)))
    result[f"top_{k}_accuracy"] = topk
    result["per_class"], averages = _per_class_table(labels, pred, class_names)
    result["macro_avg"], result["weighted_avg"] = averages["macro"], averages["weighted"]
    cm = skm.confusion_matrix(labels, pred, labels=list(range(n_cls)))
    result["confusion_matrix"] = cm.astype(int).tolist()
    off = [(int(cm[t, p]), t, p) for t in range(n_cls) for p in range(n_cls)
           if t != p and cm[t, p]]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    result["most_confused"] = [
        {"true": class_names[t], "predicted": class_names[p], "count": c,
         "fraction_of_true": c / max(int(cm[t].sum()), 1)}
        for c, t, p in off[:NUM_CONFUSED_PAIRS]]
    auc = one_vs_rest_auc(probs, np.eye(n_cls, dtype=int)[labels], class_names)
    result["roc_auc"], result["pr_auc"] = auc["roc_auc"], auc["pr_auc"]
    result["auc"] = auc
    confidence = probs[np.arange(n), pred]
    result["ece"], result["calibration"] = calibration_of(probs, labels)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:num_mistakes]
    result["mistakes"] = [{"file": names[i], "true": class_names[labels[i]],
                           "predicted": class_names[pred[i]], "score": float(confidence[i]),
                           "index": int(i)} for i in wrong]
    return result


def _multi_label_evaluation(probs, targets, class_names, names, threshold, num_mistakes):
    """`evaluation` for [N, C] 0/1 targets; every class is a yes/no decision."""
    n = len(targets)
    result: dict = {"multi_label": True, "threshold": threshold, "accuracy": 0.0, "n": int(n)}
    if n == 0:
        return result
    pred = (probs >= threshold).astype(int)
    result["accuracy"] = float(skm.accuracy_score(targets, pred))  # exact match
    result["per_class"], averages = _per_class_table(targets, pred, class_names)
    result["macro_avg"], result["weighted_avg"] = averages["macro"], averages["weighted"]
    auc = one_vs_rest_auc(probs, targets, class_names)
    result["roc_auc"], result["pr_auc"] = auc["roc_auc"], auc["pr_auc"]
    result["auc"] = auc
    confidence = np.where(pred == 1, probs, 1.0 - probs)
    correct = pred == targets
    result["ece"], result["calibration"] = calibration_of(probs, targets, threshold)
    wrong = np.flatnonzero(~correct.all(axis=1))
    worst = np.where(correct, 0.0, confidence).max(axis=1)
    wrong = wrong[np.argsort(-worst[wrong], kind="stable")][:num_mistakes]

    def label_set(row):
        return "+".join(class_names[c] for c in np.flatnonzero(row)) or "(none)"

    result["mistakes"] = [{"file": names[i], "true": label_set(targets[i]),
                           "predicted": label_set(pred[i]), "score": float(worst[i]),
                           "index": int(i)} for i in wrong]
    return result


def headline(ev: dict) -> dict:
    """The few figures of an `evaluation` worth printing (accuracy, top-k, macro F1, AUCs, ECE, n)."""
    keys = ["accuracy"] + [k for k in ev if k.startswith("top_") and k.endswith("_accuracy")]
    out = {k: ev[k] for k in keys if k in ev}
    if "macro_avg" in ev:
        out["macro_f1"] = ev["macro_avg"]["f1"]
    out.update({k: ev[k] for k in ("roc_auc", "pr_auc", "ece", "n") if k in ev})
    return out


def evaluate_split(model, split, class_names: Sequence[str], image_size: int,
                   batch_size: int = 64, top_k: int = 3, thresholds=None) -> dict:
    """Predicts a `Split` with `model` and returns its `evaluation` (see `evaluate_probs`)."""
    return evaluate_probs(predict(model, split, image_size, batch_size), split, class_names,
                          top_k, thresholds)


def evaluate_probs(probs: np.ndarray, split, class_names: Sequence[str], top_k: int = 3,
                   thresholds=None) -> dict:
    """The `evaluation` of a split's predicted probabilities.

    Args:
        thresholds: multi-label runs: one decision threshold per label (chosen
            on validation, `tl_keras.report.thresholds`); the evaluation then
            also holds `per_label_metrics` and the thresholds used.
    """
    decide = {} if thresholds is None else {"threshold": np.asarray(thresholds, np.float32)}
    ev = evaluation(probs, split.labels, class_names, top_k,
                    describe_items(split.items, split.source), **decide)
    if thresholds is not None:
        ev.update(per_label_metrics(probs, split.labels, thresholds, class_names))
        ev["threshold"] = {c: float(t) for c, t in zip(class_names, thresholds)}
    return ev


def predict(model: keras.Model, split: sources_lib.Split, image_size: int,
            batch_size: int = 64) -> np.ndarray:
    """Probabilities [N, C] for every example of `split`, in order.

    The last batch is padded to `batch_size`: the model is traced for one
    batch shape, where a smaller last batch would trace it a second time.
    """
    plain = tf.autograph.experimental.do_not_convert  # see tl_keras.data.pipeline
    ds = data_pipeline.image_dataset(split, image_size, cache=False).map(plain(lambda x, y: x))
    ds = ds.batch(batch_size).map(plain(lambda x: data_pipeline.pad_batch(x, batch_size)))
    ds = ds.prefetch(data_pipeline.AUTOTUNE)
    probs = np.asarray(loop_lib.predict(model, ds), dtype=np.float32)
    return probs[:len(split)]


def metrics(probs: np.ndarray, labels: np.ndarray, top_k: int = 3) -> dict:
    """Accuracy, top-k accuracy and count for single-label predictions."""
    n = int(len(labels))
    if n == 0:
        return {"accuracy": 0.0, "n": 0}
    pred = probs.argmax(axis=1)
    k = min(top_k, probs.shape[1])
    topk = np.argsort(-probs, axis=1)[:, :k]
    return {
        "accuracy": float(np.mean(pred == labels)),
        f"top_{k}_accuracy": float(np.mean([labels[i] in topk[i] for i in range(n)])),
        "n": n,
    }


def f1_scores(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """F1 from true-positive, false-positive and false-negative counts (0 where undefined)."""
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def average_precision(scores: np.ndarray, truth: np.ndarray) -> float:
    """Area under the precision-recall curve (step-wise, as scikit-learn)."""
    truth = truth > 0.5
    if not truth.any():
        return float("nan")
    order = np.argsort(-scores, kind="mergesort")
    s, t = scores[order], truth[order]
    # One point per distinct score.
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tp = np.cumsum(t)[last]
    fp = (last + 1) - tp
    precision = tp / (tp + fp)
    recall = tp / t.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def per_label_metrics(probs: np.ndarray, labels: np.ndarray, thresholds,
                      class_names: Sequence[str]) -> dict:
    """Per-label and overall metrics of multi-label predictions.

    Returns:
        {"accuracy": exact-match ratio (every label right), "micro_f1",
        "macro_f1", "mean_average_precision", "n", "per_label": {name:
        {"threshold", "precision", "recall", "f1", "average_precision",
        "support"}}}.
    """
    n = int(len(labels))
    if n == 0:
        return {"accuracy": 0.0, "n": 0}
    thr = np.asarray(thresholds, dtype=np.float64)[None, :]
    pred = probs >= thr
    y = labels > 0.5
    tp, fp, fn = (pred & y).sum(0), (pred & ~y).sum(0), (~pred & y).sum(0)
    f1 = f1_scores(tp, fp, fn)
    per = {}
    aps = []
    for c, name in enumerate(class_names):
        ap = average_precision(probs[:, c], labels[:, c])
        if not np.isnan(ap):
            aps.append(ap)
        per[name] = {"threshold": float(thr[0, c]),
                     "precision": float(tp[c] / max(tp[c] + fp[c], 1)),
                     "recall": float(tp[c] / max(tp[c] + fn[c], 1)),
                     "f1": float(f1[c]),
                     "average_precision": None if np.isnan(ap) else ap,
                     "support": int(y[:, c].sum())}
    micro = f1_scores(tp.sum(), fp.sum(), fn.sum())
    return {"accuracy": float(np.mean((pred == y).all(axis=1))),
            "micro_f1": float(micro), "macro_f1": float(np.mean(f1)),
            "mean_average_precision": float(np.mean(aps)) if aps else None,
            "n": n, "per_label": per}
