"""Stage 1 as a cross-validated logistic regression on the cached features.

On small data the strongest simple head is an L2-regularised logistic
regression whose strength is chosen by k-fold cross-validation on all the
labelled images (issue 20: with 100 images a class, a 20% validation split
is a fifth of the data, and one small split is a noisy judge of
regularisation). The features of every view are cached, so the k fits cost
seconds (`tl_keras.train.kfold`), and their out-of-fold predictions are an
honest estimate of the head: the report's cross-validated accuracy, the
calibration's and the selective threshold's inputs.

The final head is fitted on every view of every image at the chosen
strength and written into the model's Dense head layer, so the model,
the SavedModel and TFLite serve exactly it.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Optional, Sequence

import keras
import numpy as np

from tl_keras.model.classifier import HEAD_LAYER
from tl_keras.train import kfold
from tl_keras.train.stages import StageResult


@dataclasses.dataclass(frozen=True)
class HeadCVSpec:
    """How the cross-validated head is chosen.

    Attributes:
        folds: k of the k-fold cross-validation (fewer when an image class
            has fewer images; at least 2).
        multi_label: one sigmoid per label instead of a softmax.
        class_weight: {class id: weight} applied to each image's rows, or None.
        seed: deals the images into folds.
        grid: inverse regularisation strengths tried (`kfold.DEFAULT_C_GRID`).
    """

    folds: int = 5
    multi_label: bool = False
    class_weight: Optional[dict] = None
    seed: int = 0
    grid: tuple = kfold.DEFAULT_C_GRID


def _row_weights(labels: np.ndarray, class_weight: Optional[dict]) -> Optional[np.ndarray]:
    if not class_weight or labels.ndim != 1:
        return None
    return np.array([class_weight[int(c)] for c in labels], np.float32)


def fit_head_cv(model: keras.Model, views: Sequence[np.ndarray], labels: np.ndarray,
                targets: np.ndarray, spec: HeadCVSpec, mirror: Optional[np.ndarray] = None,
                groups: Optional[Sequence] = None
                ) -> tuple[StageResult, kfold.CrossValidation]:
    """Chooses, fits and installs the logistic head of `model`.

    Args:
        model: the classifier whose Dense layer `HEAD_LAYER` receives the head.
        views: V arrays [N, D] of pooled features: view 0 the clean images,
            the others augmented views of the same images in the same order.
        labels: [N] class ids or [N, C] multi-hot rows.
        targets: [N, C] one-hot (multi-hot) targets.
        spec: folds, loss, class weights, seed, grid.
        mirror: [N, D] features of the mirrored images (a training view, and
            averaged with view 0 for held-out images, as the exported model
            averages an image and its mirror), or None.
        groups: a key per image that keeps copies in one fold (e.g. content
            hashes), or None.

    Returns:
        (the stage's result: `val_accuracy`/`val_loss` are the out-of-fold
        accuracy and log loss at the chosen strength, `epochs` 0;
        the CrossValidation with the out-of-fold probabilities).
    """
    t0 = time.perf_counter()
    labels = np.asarray(labels)
    counts = (np.bincount(labels) if labels.ndim == 1 else labels.sum(axis=0)).astype(int)
    k = int(max(2, min(spec.folds, len(labels), counts[counts > 0].min(initial=len(labels)))))
    folds = kfold.fold_ids(labels, k, spec.seed, groups)
    weights = _row_weights(labels, spec.class_weight)
    cv = kfold.cross_validate(views, targets, folds, mirror=mirror,
                              multi_label=spec.multi_label, grid=spec.grid, weights=weights)
    head = kfold.fit_views(views, targets, cv.c, mirror=mirror, multi_label=spec.multi_label,
                           weights=weights)
    model.get_layer(HEAD_LAYER).set_weights([head.kernel, head.bias])
    result = StageResult(epochs=0, best_epoch=0, seconds=time.perf_counter() - t0,
                         val_accuracy=cv.accuracy(labels), val_loss=float(cv.losses[cv.c]),
                         history={})
    return result, cv


def describe(cv: kfold.CrossValidation, n_images: int) -> dict:
    """The report's record of the cross-validation (what chose the head)."""
    return {"folds": int(cv.folds.max()) + 1, "images": int(n_images), "c": cv.c,
            "out_of_fold_log_loss": {str(c): round(v, 5) for c, v in sorted(cv.losses.items())}}
