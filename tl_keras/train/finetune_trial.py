"""Whether stage 2 pays, decided on held-out folds instead of a validation split.

Without a validation split (the default: every labelled image trains), the
head is chosen by k-fold cross-validation (`linear_head`). Fine-tuning can
help or hurt on small data (measured on few-shot flowers draws: from -3 to
+1 points), so it is tried first: on one or more of the same folds, the
fold's logistic head is fine-tuned on the other folds' cached activations
with the very schedule the final stage 2 will run, and compared with that
head on the held-out fold. Stage 2 then runs on all images only if it won
there. Folds are tried until `min_heldout` images have been held out (all
folds on small data, where one fold is too few images to judge; one fold
of the shared flowers), so the trial costs about one stage 2. With fewer
than `MIN_DECIDABLE` training images the driver keeps the head without a
trial.
"""

from __future__ import annotations

import dataclasses
from typing import Optional, Sequence

import keras
import numpy as np

from tl_keras.model.classifier import HEAD_LAYER
from tl_keras.train import kfold
from tl_keras.train import stages as stages_lib

# Held-out images the trial validates on before it decides (more folds while fewer).
MIN_HELDOUT = 150
# Below this many training images (all of them held out in turn) the trial does not run
# and the head is kept: one image is then over a point of accuracy, and on the TUNE half
# of flowers128 (10 photos a class, 50 images) fine-tuning lowered accuracy on average in
# every schedule tried (-0.4 to -2.5 points) while the trial accepted it on one draw of
# three, where it cost 3.5 points (benchmarks/README.md, "the stage-2 trial's floor").
MIN_DECIDABLE = 100


@dataclasses.dataclass
class Trial:
    """What the trial measured on its held-out images.

    Attributes:
        folds: the folds tried.
        images: held-out images.
        head_accuracy / finetune_accuracy: of the fold's logistic head and of
            the same head after stage 2, on those images.
        head_loss / finetune_loss: their log losses.
        probs: [images, C] stage 2's held-out probabilities as the model is
            served (averaged with the mirror's when the trial had mirror
            activations), rows in `index` order: they calibrate a kept
            stage 2 and place its thresholds.
        index: the held-out images' indices.
        head_only_right / finetune_only_right: held-out images only the head,
            or only the fine-tuned model, got right (the discordant pairs).
    """

    folds: list
    images: int
    head_accuracy: float
    finetune_accuracy: float
    head_loss: float
    finetune_loss: float
    probs: np.ndarray
    index: np.ndarray
    head_only_right: int = 0
    finetune_only_right: int = 0

    @property
    def finetune_wins(self) -> bool:
        """Stage 2 more accurate on the held-out images (log loss breaks ties)."""
        return (self.finetune_accuracy, -self.finetune_loss) > (self.head_accuracy,
                                                                 -self.head_loss)

    def summary(self) -> dict:
        return {"folds": self.folds, "images": self.images,
                "head_accuracy": round(self.head_accuracy, 4),
                "finetune_accuracy": round(self.finetune_accuracy, 4),
                "head_log_loss": round(self.head_loss, 4),
                "finetune_log_loss": round(self.finetune_loss, 4),
                "head_only_right": self.head_only_right,
                "finetune_only_right": self.finetune_only_right,
                "finetune_kept": self.finetune_wins}


def try_finetune(model: keras.Model, trainer: keras.Model, activations: Sequence[np.ndarray],
                 features: Sequence[np.ndarray], labels: np.ndarray, targets: np.ndarray,
                 cv: kfold.CrossValidation, spec: stages_lib.StageSpec,
                 mirror: Optional[np.ndarray] = None,
                 mirror_activations: Optional[np.ndarray] = None,
                 min_heldout: int = MIN_HELDOUT, batch_size: int = 256) -> Trial:
    """Runs stage 2 on held-out folds and compares it with the logistic head.

    The model must be set up for stage 2 (top blocks unfrozen); its weights
    are put back as they were before returning.

    Args:
        model: the full classifier (its weights are snapshotted and restored).
        trainer: activations -> probabilities, sharing layers with `model`
            (`activations.Cut.trainer`).
        activations: V arrays [N, ...] of cached activations, view 0 clean.
        features: the V matching arrays [N, D] of pooled features.
        labels: [N] class ids or [N, C] multi-hot rows.
        targets: [N, C] training targets.
        cv: the head's cross-validation (folds and chosen strength).
        spec: stage 2's settings (its whole schedule runs, no early stopping).
        mirror: [N, D] mirrored images' features (a head training view).
        mirror_activations: [N, ...] the mirrored images' activations, or
            None. Given (the exported model averages each image with its
            mirror), `Trial.probs`, which calibrate a kept stage 2 and place
            its thresholds, average each held-out image's prediction with its
            mirror's, as the model is served. The decision itself compares
            the clean views: judging both models on image + mirror changed
            the decision on one TUNE split of six, where it cost 2.7 points
            (benchmarks/README.md, session 12).
        min_heldout: folds are tried until this many images were held out.
        batch_size: prediction batch size.

    Returns:
        The Trial.
    """
    start = stages_lib.snapshot(model)

    def predict(x):
        return np.asarray(trainer.predict(x, batch_size=batch_size, verbose=0), np.float32)

    dense = model.get_layer(HEAD_LAYER)
    k = int(cv.folds.max()) + 1
    multi = labels.ndim == 2
    tried, idx, head_p, tuned_p, served_p = [], [], [], [], []
    try:
        for f in range(k):
            tr, te = np.flatnonzero(cv.folds != f), np.flatnonzero(cv.folds == f)
            head = kfold.fit_views([v[tr] for v in features], targets[tr], cv.c,
                                   mirror=None if mirror is None else mirror[tr],
                                   multi_label=multi)
            stages_lib.restore(model, start)
            dense.set_weights([head.kernel, head.bias])
            head_p.append(head.predict(features[0][te]))
            x = np.concatenate([a[tr] for a in activations])
            y = np.tile(targets[tr], (len(activations), 1))
            stages_lib.fit_finetune(trainer, (x, y), None, spec, initial_epoch=0,
                                    steps_per_epoch=-(-len(tr) // spec.batch_size), verbose=0)
            tuned_p.append(predict(activations[0][te]))
            if mirror_activations is not None:
                served_p.append((tuned_p[-1] + predict(mirror_activations[te])) / 2)
            tried.append(f)
            idx.append(te)
            if sum(len(i) for i in idx) >= min_heldout:
                break
    finally:
        stages_lib.restore(model, start)
    index = np.concatenate(idx)
    p1, p2 = np.concatenate(head_p), np.concatenate(tuned_p)
    t = targets[index]
    right1, right2 = kfold.correct(p1, labels[index]), kfold.correct(p2, labels[index])
    return Trial(tried, len(index), float(right1.mean()), float(right2.mean()),
                 kfold.log_loss(p1, t, multi), kfold.log_loss(p2, t, multi),
                 np.concatenate(served_p) if served_p else p2, index,
                 int((right1 & ~right2).sum()), int((right2 & ~right1).sum()))
