"""Calibrated probabilities: a temperature fitted on held-out predictions.

A network trained with cross-entropy on little data is over-confident: its
0.9 is right less than 90% of the time. Temperature scaling (Guo et al.,
2017, "On Calibration of Modern Neural Networks") divides the logits by one
scalar T chosen to minimise the negative log-likelihood of held-out
predictions; it keeps every argmax, so accuracy is unchanged, and measured
best or on par with richer calibrators on small validation sets. Multi-label
heads get one temperature per label (each label is its own binary problem).

`fit_temperature` chooses T; `apply_temperature` is the formula of the
`tl_keras.model.layers.Temperature` layer that the exported model carries.
"""

from __future__ import annotations

import numpy as np

# log T is searched in [-LOG_RANGE, LOG_RANGE]: T from 0.05 to 20.
LOG_RANGE = 3.0
_EPS = 1e-7


def apply_temperature(probs: np.ndarray, temperature, multi_label: bool = False) -> np.ndarray:
    """softmax(log(p) / T), or per label sigmoid(logit(p) / T) (float32, as the layer)."""
    p = np.clip(np.asarray(probs, np.float32), _EPS, 1 - _EPS)
    t = np.asarray(temperature, np.float32)
    if multi_label:
        return (1.0 / (1.0 + np.exp(-(np.log(p) - np.log1p(-p)) / t))).astype(np.float32)
    z = np.log(p) / t
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def negative_log_likelihood(probs: np.ndarray, labels: np.ndarray,
                            multi_label: bool = False) -> float:
    """Mean NLL of the true labels (multi-label: summed over labels, averaged over rows)."""
    p = np.clip(np.asarray(probs, np.float64), _EPS, 1 - _EPS)
    if multi_label:
        y = np.asarray(labels) > 0.5
        return float(-np.mean(np.sum(np.where(y, np.log(p), np.log1p(-p)), axis=1)))
    return float(-np.mean(np.log(p[np.arange(len(p)), np.asarray(labels, int)])))


def _fit_one(nll) -> float:
    from scipy.optimize import minimize_scalar

    # A tight tolerance: T must follow the predictions smoothly (two runs whose
    # weights differ by float rounding, a resumed and an uninterrupted one,
    # must get the same T to ~1e-7, not to the solver's step).
    res = minimize_scalar(lambda s: nll(float(np.exp(s))), bounds=(-LOG_RANGE, LOG_RANGE),
                          method="bounded", options={"xatol": 1e-8})
    best = float(np.exp(res.x))
    # Never worse than leaving the probabilities as they are.
    return best if nll(best) < nll(1.0) else 1.0


def fit_temperature(probs: np.ndarray, labels: np.ndarray, multi_label: bool = False):
    """The temperature minimising the NLL of held-out predictions.

    Args:
        probs: [N, C] uncalibrated probabilities of held-out images.
        labels: [N] class ids, or [N, C] multi-hot rows.
        multi_label: fit one temperature per label.

    Returns:
        T (float), or a list of C temperatures for multi-label data. 1.0
        (no change) when no T lowers the NLL or there are no examples.
    """
    probs = np.asarray(probs, np.float32)
    if len(probs) == 0:
        return [1.0] * probs.shape[1] if multi_label else 1.0
    if multi_label:
        labels = np.asarray(labels)
        return [_fit_one(lambda t, c=c: negative_log_likelihood(
            apply_temperature(probs[:, c:c + 1], t, True), labels[:, c:c + 1], True))
            for c in range(probs.shape[1])]
    return _fit_one(lambda t: negative_log_likelihood(apply_temperature(probs, t), labels))


def summary(probs: np.ndarray, labels: np.ndarray, temperature, multi_label: bool = False) -> dict:
    """The report block: T and the held-out NLL before and after it."""
    return {"temperature": temperature, "fitted_on": "validation predictions",
            "val_nll_uncalibrated": round(negative_log_likelihood(probs, labels, multi_label), 4),
            "val_nll": round(negative_log_likelihood(
                apply_temperature(probs, temperature, multi_label), labels, multi_label), 4)}
