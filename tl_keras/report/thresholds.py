"""Multi-label classification: per-label decision thresholds.

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

from tl_keras.core import outputs
from tl_keras.errors import fail
from tl_keras.report.metrics import f1_scores, per_label_metrics

THRESHOLDS_FILE = "thresholds.json"
DEFAULT_THRESHOLD = 0.5


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
        f1 = f1_scores(tp, fp, fn)
        # Ties: the threshold closest to 0.5 (least extreme).
        best = np.flatnonzero(f1 == f1.max())
        out.append(float(cands[best[np.argmin(np.abs(cands[best] - 0.5))]]))
    return out


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
    path = os.path.join(run_dir, THRESHOLDS_FILE)
    if not os.path.isfile(path):
        return [DEFAULT_THRESHOLD] * len(class_names)
    try:
        thr = outputs.read_json_object(path).get("thresholds", {})
        if not isinstance(thr, dict):
            raise ValueError(f"{THRESHOLDS_FILE}: 'thresholds' is not an object of label: number")
        return [float(thr.get(c, DEFAULT_THRESHOLD)) for c in class_names]
    except (TypeError, ValueError) as e:  # the cause on one line, the file named
        why = " ".join(str(e).split())
        raise fail("model", run_dir, why if THRESHOLDS_FILE in why
                   else f"{THRESHOLDS_FILE}: {why}") from None


def choose(probs: np.ndarray, labels: np.ndarray, class_names: list[str]
           ) -> tuple[list[float], dict]:
    """Chooses each label's threshold on validation probabilities (`fit_thresholds`).

    Returns:
        (thresholds, the thresholds.json document with validation metrics).
    """
    thr = fit_thresholds(probs, labels)
    return thr, thresholds_document(class_names, thr,
                                    per_label_metrics(probs, labels, thr, class_names))
