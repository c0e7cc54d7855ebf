"""The few-shot draws of the TUNE-half explorations, and the head they all fit."""

import numpy as np

from tl_keras.train import kfold


def draws(y: np.ndarray, per: int, n_classes: int = 5):
    """(train idx, test idx, one-hot train targets, 5 folds) for seeds 1-3: `per` photos a class."""
    for draw in (1, 2, 3):
        rng = np.random.default_rng(draw)
        tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per]
                             for c in range(n_classes)])
        te = np.setdiff1d(np.arange(len(y)), tr)
        yield tr, te, np.eye(n_classes, dtype=np.float32)[y[tr]], kfold.fold_ids(y[tr], 5, 0)


def cv_head_accuracy(views, mirror, t, folds, test_clean, test_mirror, y_test, **kw):
    """Accuracy of the cross-validated logistic head (mirror-averaged) and its C."""
    cv = kfold.cross_validate(views, t, folds, mirror=mirror, **kw)
    head = kfold.fit_views(views, t, cv.c, mirror=mirror)
    p = (head.predict(test_clean) + head.predict(test_mirror)) / 2
    return float(np.mean(p.argmax(1) == y_test)), cv.c
