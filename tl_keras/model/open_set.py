""""None of the above": an out-of-distribution score and the `unknown` decision.

The score is the entropy of the served (calibrated) probabilities divided
by log(C): 0 when the model puts all its mass on one class, 1 when it
spreads it evenly over all C. An image whose score is above a threshold is
`unknown`. The threshold is chosen on held-out predictions of known images
(out-of-fold, a stage-2 trial fold, or the validation split) so that a set
share of them (--unknown_keep, default 0.95) stays below it.

Why entropy: chosen on photos no reported figure uses (the TUNE half of the
flowers128 photos not in flowers/, all 10 choices of 3 known classes out of
5, the default cross-validated head on MobileNetV2-0.35 features;
benchmarks/tune_explorations/open_set_scores.py). There the entropy
separated the unseen classes better than max-probability (AUROC 0.649
against 0.637), and no other score was ahead by more than its standard error
(about 0.02): relative Mahalanobis distance 0.675, the head's energy 0.662,
class centroids 0.654, k nearest neighbours 0.62. Entropy is a function of
the served probabilities, so the SavedModel, the float TFLite file and the
formula here agree exactly (a quantized TFLite file computes it from its own
probabilities, int8 in integer arithmetic: the same `unknown` on 99-99.7% of
test photos), and no feature statistics need to travel with
the model. Near-unknown classes (a tulip when only roses are known) are not
separable this way: benchmarks/README.md has what it achieves and what not.

`score` (numpy) and `graph_outputs` (the SavedModel's and TFLite's ops)
compute the same formula; `choose_threshold` picks the threshold.
"""

from __future__ import annotations

import math

import numpy as np
from keras import ops

SCORE = "normalized_entropy"
# Probabilities are clipped here before the log, in numpy and in the graph.
EPS = 1e-7


def score(probs: np.ndarray) -> np.ndarray:
    """The out-of-distribution score of each row: entropy(p) / log(C), in [0, 1].

    Args:
        probs: [N, C] single-label probabilities (calibrated, as served).

    Returns:
        [N] float32; higher means less like any known class.
    """
    p = np.clip(np.asarray(probs, np.float32), EPS, 1.0)
    n_classes = p.shape[-1]
    if n_classes < 2:
        return np.zeros(p.shape[:-1], np.float32)
    return (-(p * np.log(p)).sum(axis=-1) / np.float32(math.log(n_classes))).astype(np.float32)


def graph_outputs(probs, threshold: float) -> dict:
    """The same score in Keras ops (traced into the SavedModel and TFLite files),
    and `unknown` = score > threshold.

    Args:
        probs: a float32 [N, C] tensor (the model's probabilities).
        threshold: from `choose_threshold`.

    Returns:
        {"ood_score": float32 [N], "unknown": bool [N]}.
    """
    n_classes = int(probs.shape[-1])
    p = ops.clip(ops.cast(probs, "float32"), EPS, 1.0)
    if n_classes < 2:
        ood = ops.zeros_like(p[..., 0])
    else:
        ood = -ops.sum(p * ops.log(p), axis=-1) / np.float32(math.log(n_classes))
    return {"ood_score": ood, "unknown": ops.greater(ood, np.float32(threshold))}


def is_unknown(probs: np.ndarray, threshold: float) -> np.ndarray:
    """[N] bool: the `unknown` output the export computes for these probabilities."""
    return score(probs) > np.float32(threshold)


def choose_threshold(held_out_probs: np.ndarray, keep: float) -> dict:
    """The score threshold that keeps `keep` of the held-out known images.

    Args:
        held_out_probs: [N, C] calibrated probabilities of labelled images the
            model did not train on (all of them belong to known classes).
        keep: the share of them that must not be flagged unknown, in (0, 1].

    Returns:
        {"score", "threshold", "keep", "known_kept", "n"}: `known_kept` is the
        share of these images at or below the threshold (>= keep).
    """
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep!r}")
    s = np.sort(score(held_out_probs))
    if len(s) == 0:
        raise ValueError("no held-out predictions to choose the unknown threshold on")
    # The smallest threshold with at least ceil(keep * N) scores at or below it.
    k = max(1, math.ceil(keep * len(s) - 1e-9))
    threshold = float(s[k - 1])
    return {"score": SCORE, "threshold": threshold, "keep": float(keep),
            "known_kept": float(np.mean(s <= threshold)), "n": int(len(s))}


def summary(probs: np.ndarray, threshold: float) -> dict:
    """What the threshold flags on a split: {"n", "unknown", "unknown_rate"}."""
    flagged = is_unknown(probs, threshold)
    return {"n": int(len(flagged)), "unknown": int(flagged.sum()),
            "unknown_rate": round(float(flagged.mean()), 4) if len(flagged) else 0.0}
