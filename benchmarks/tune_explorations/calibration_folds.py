"""Does a temperature fitted on k-fold predictions sharpen too little (issue 23)? TUNE half.

The 200-a-class TUNE-half photos of `open_set_scores.py` (its cached
features), 10 seeded draws of 100 training photos a class, the rest (500)
as test. The default stage 1 (the cross-validated logistic head, clean view
and mirror) chooses C on 5 folds; a temperature is fitted on the
out-of-fold predictions of 5, 10 or 20 folds at that C, and applied to the
final head (trained on all 500) on the test photos. Prints the test ECE
(15 bins) per draw on average and pooled over the 5000 test predictions,
and the test NLL, for no temperature, each fitted one, and the temperature
that is best on the test photos themselves (a ceiling, not a method).

Usage (from the repo root): PYTHONPATH=. python benchmarks/tune_explorations/calibration_folds.py
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import numpy as np  # noqa: E402

from open_set_scores import load_features  # noqa: E402
from tl_keras.report import calibration, metrics  # noqa: E402
from tl_keras.train import kfold  # noqa: E402


def ece(q, y):
    return metrics.expected_calibration_error(q.max(1), q.argmax(1) == y)[0]


def main():
    clean, mirror, y = load_features()
    arms = ("none", "5 folds", "10 folds", "20 folds", "best on test")
    per_draw, pooled, labels = {a: [] for a in arms}, {a: [] for a in arms}, []
    for draw in range(1, 11):
        rng = np.random.default_rng(draw)
        tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:100] for c in range(5)])
        te = np.setdiff1d(np.arange(len(y)), tr)
        t = np.eye(5, dtype=np.float32)[y[tr]]
        cv = kfold.cross_validate([clean[tr]], t, kfold.fold_ids(y[tr], 5, 0), mirror=mirror[tr])
        temps = {"none": 1.0, "5 folds": calibration.fit_temperature(cv.oof_probs, y[tr])}
        for k in (10, 20):
            cvk = kfold.cross_validate([clean[tr]], t, kfold.fold_ids(y[tr], k, 0),
                                       mirror=mirror[tr], grid=[cv.c])
            temps[f"{k} folds"] = calibration.fit_temperature(cvk.oof_probs, y[tr])
        head = kfold.fit_views([clean[tr]], t, cv.c, mirror=mirror[tr])
        p = (head.predict(clean[te]) + head.predict(mirror[te])) / 2
        grid = np.exp(np.linspace(np.log(0.3), np.log(3.0), 121))
        temps["best on test"] = min(grid, key=lambda g: ece(calibration.apply_temperature(p, g),
                                                            y[te]))
        labels.append(y[te])
        for a in arms:
            q = calibration.apply_temperature(p, temps[a])
            per_draw[a].append(ece(q, y[te]))
            pooled[a].append(q)
        print(draw, {a: round(float(v), 3) for a, v in temps.items()}, flush=True)
    yy = np.concatenate(labels)
    print(f"{'temperature':14s}{'mean ECE':>10}{'pooled ECE':>12}{'NLL':>8}")
    for a in arms:
        q = np.concatenate(pooled[a])
        print(f"{a:14s}{np.mean(per_draw[a]):10.4f}{ece(q, yy):12.4f}"
              f"{calibration.negative_log_likelihood(q, yy):8.4f}")


if __name__ == "__main__":
    main()
