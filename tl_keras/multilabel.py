"""Multi-label classification: per-label thresholds and metrics.

A multi-label model (sigmoid head) gives each label an independent
probability. Turning probabilities into decisions needs a threshold per
label; 0.5 is rarely right for rare labels. Thresholds are chosen on the
validation split (the one maximising each label's F1), written to
`OUT/thresholds.json` and into the SavedModel's assets, and used for the
test metrics.
"""

from __future__ import annotations

import os

import numpy as np

from tl_keras import outputs

THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    denom = 2 * tp + fp + fn
    return np.where(denom > 0, 2 * tp / np.maximum(denom, 1), 0.0)


def fit_thresholds(probs: np.ndarray, labels: np.ndarray) -> list[float]:
    """The F1-maximising threshold of each label on held-out data.

    Candidate thresholds are midpoints between consecutive distinct scores.
    A label without positives (or without negatives) keeps 0.5.

    Args:
        probs: [N, C] sigmoid outputs.
        labels: [N, C] multi-hot truth.

    Returns:
        C thresholds in (0, 1).
    """
    out = []
    for c in range(probs.shape[1]):
        p, y = probs[:, c].astype(np.float64), labels[:, c] > 0.5
        if not y.any() or y.all():
            out.append(DEFAULT_THRESHOLD)
            continue
        s = np.unique(p)
        cands = np.concatenate([(s[:-1] + s[1:]) / 2, [s[0] / 2, (s[-1] + 1) / 2]])
        pred = p[None, :] >= cands[:, None]
        tp = (pred & y).sum(axis=1)
        fp = (pred & ~y).sum(axis=1)
        fn = (~pred & y).sum(axis=1)
        f1 = _f1(tp, fp, fn)
        # Ties: the threshold closest to 0.5 (least extreme).
        best = np.flatnonzero(f1 == f1.max())
        out.append(float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]]))
    return out


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


def metrics(probs: np.ndarray, labels: np.ndarray, thresholds, class_names: list[str]) -> dict:
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
    f1 = _f1(tp, fp, fn)
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
    micro = _f1(tp.sum(), fp.sum(), fn.sum())
    return {"accuracy": float(np.mean((pred == y).all(axis=1))),
            "micro_f1": float(micro), "macro_f1": float(np.mean(f1)),
            "mean_average_precision": float(np.mean(aps)) if aps else None,
            "n": n, "per_label": per}


def thresholds_document(class_names: list[str], thresholds, val_metrics: dict) -> dict:
    """The content of thresholds.json: label -> threshold, and how they were chosen."""
    return {"thresholds": {c: float(t) for c, t in zip(class_names, thresholds)},
            "chosen_on": "validation split, maximising each label's F1",
            "validation": val_metrics}


def write_thresholds(out_dir: str, doc: dict, export_dir: str = "") -> None:
    """Writes OUT/thresholds.json and, with an export, its assets/thresholds.json.

    A serving client applies `probabilities >= thresholds[label]` to the
    exported model's outputs.
    """
    outputs.atomic_write_json(os.path.join(out_dir, THRESHOLDS_FILE), doc)
    if export_dir and os.path.isdir(export_dir):
        outputs.atomic_write_json(os.path.join(export_dir, "assets", THRESHOLDS_FILE), doc)


def read_thresholds(run_dir: str, class_names: list[str]) -> list[float]:
    """Thresholds of a finished run (0.5 for labels it has none for)."""
    import json

    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return [DEFAULT_THRESHOLD] * len(class_names)
    with open(path, encoding="utf-8") as f:
        thr = json.load(f).get("thresholds", {})
    return [float(thr.get(c, DEFAULT_THRESHOLD)) for c in class_names]


def calibrate(model, val_split, class_names: list[str], image_size: int, batch_size: int = 64
              ) -> tuple[list[float], dict]:
    """Chooses thresholds on the validation split.

    Returns:
        (thresholds, the thresholds.json document with validation metrics).
    """
    from tl_keras import evaluate as evaluate_lib

    probs = evaluate_lib.predict(model, val_split, image_size, batch_size)
    thr = fit_thresholds(probs, val_split.labels)
    return thr, thresholds_document(class_names, thr,
                                    metrics(probs, val_split.labels, thr, class_names))


def evaluate_split(model, split, class_names: list[str], image_size: int, batch_size: int,
                   top_k: int, thresholds) -> dict:
    """`report.evaluate_split` for multi-label data, at per-label thresholds.

    The report's evaluation (exact match, per-class table, AUCs, calibration,
    mistakes) decided with each label's own threshold, plus `metrics` above
    (per-label threshold, precision, recall, F1, average precision).
    """
    from tl_keras import evaluate as evaluate_lib
    from tl_keras import report as report_lib

    probs = evaluate_lib.predict(model, split, image_size, batch_size)
    thr = np.asarray(thresholds, dtype=np.float32)
    ev = report_lib.evaluation(probs, split.labels, class_names, top_k,
                               report_lib.describe_items(split.items, split.source), threshold=thr)
    ev.update(metrics(probs, split.labels, thresholds, class_names))
    ev["threshold"] = {c: float(t) for c, t in zip(class_names, thresholds)}
    return ev
