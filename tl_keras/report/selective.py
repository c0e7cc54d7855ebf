"""Selective prediction: answer only when confident enough, at an accuracy the user sets.

A model used for decisions ("send this X-ray to a radiologist when unsure")
needs to know how accurate it is on the images it answers and how many it
leaves to a person. Sorting images by the confidence of the predicted class
(calibrated probabilities) gives the accuracy-coverage curve; the threshold
for a target accuracy is chosen on validation predictions and measured on
the test split, where its coverage and accuracy are reported as they come
out (they are not guaranteed to meet the target on new data: the report
says how far off they are).
"""

from __future__ import annotations

import numpy as np


def _ranked(probs: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, correct) sorted by confidence, most confident first (stable)."""
    conf = np.asarray(probs, np.float64).max(axis=1)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    order = np.argsort(-conf, kind="mergesort")
    return conf[order], correct[order]


def coverage_curve(probs: np.ndarray, labels: np.ndarray, points: int = 20) -> list[dict]:
    """Accuracy of the most confident fraction of images, at `points` coverages.

    Returns:
        [{"coverage", "accuracy", "threshold"}]: answering the images whose
        confidence is >= threshold covers that fraction at that accuracy.
    """
    conf, correct = _ranked(probs, labels)
    n = len(conf)
    if n == 0:
        return []
    out = []
    for c in np.linspace(1.0 / points, 1.0, points):
        k = max(1, int(round(c * n)))
        out.append({"coverage": round(k / n, 4), "accuracy": float(correct[:k].mean()),
                    "threshold": float(conf[k - 1])})
    return out


def choose_threshold(probs: np.ndarray, labels: np.ndarray, target: float) -> dict:
    """The lowest confidence threshold whose answered images reach `target` accuracy.

    Args:
        probs: [N, C] (calibrated) validation probabilities.
        labels: [N] class ids.
        target: the accuracy wanted on the answered images.

    Returns:
        {"target_accuracy", "threshold", "coverage", "accuracy", "reached"}:
        coverage and accuracy on these images; with `reached` False no
        threshold reaches the target and `threshold` is None (answer nothing).
    """
    conf, correct = _ranked(probs, labels)
    result = {"target_accuracy": float(target), "threshold": None, "coverage": 0.0,
              "accuracy": None, "reached": False, "chosen_on": "validation predictions"}
    if not len(conf):
        return result
    acc = np.cumsum(correct) / np.arange(1, len(conf) + 1)
    # Only cut between different confidences: ties are answered together.
    cuts = np.r_[np.flatnonzero(np.diff(conf) < 0), len(conf) - 1]
    ok = cuts[acc[cuts] >= target]
    if len(ok):
        k = int(ok.max())
        result.update(threshold=float(conf[k]), coverage=round((k + 1) / len(conf), 4),
                      accuracy=float(acc[k]), reached=True)
    return result


def at_threshold(probs: np.ndarray, labels: np.ndarray, threshold) -> dict:
    """Coverage and accuracy of the images answered at `threshold` (None: none answered)."""
    conf = np.asarray(probs).max(axis=1)
    answered = (conf >= threshold) if threshold is not None else np.zeros(len(conf), bool)
    correct = np.asarray(probs).argmax(axis=1) == np.asarray(labels)
    n = int(answered.sum())
    return {"threshold": threshold, "answered": n,
            "coverage": round(n / len(conf), 4) if len(conf) else 0.0,
            "accuracy": float(correct[answered].mean()) if n else None}
