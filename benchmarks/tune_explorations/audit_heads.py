"""Tune plantings (issue 22): the audit heads' regularisation and cleanlab's count.

`audit_quality.py`'s planting of 400 flowers128 photos a class that are not in
flowers/ (5% of the training labels flipped, seeds 0, 1, 2); the audit runs as
`tl-keras audit` does, with `report.audit.label_issues` patched for the variant:

  c_down      the out-of-fold probabilities of the next stronger regularisation
              on kfold's grid than the one cross-validation chose (heads that
              memorise the flipped labels less);
  c_path      the mean of the out-of-fold probabilities at the chosen strength
              and its two grid neighbours;
  calibrated  the default ranking, cut at cleanlab's
              `num_label_issues(estimation_method="off_diagonal_calibrated")`.

Prints precision, recall and F1 of the flagged set against the flipped labels.

  PYTHONPATH=. python benchmarks/tune_explorations/audit_heads.py [--variants c_down ...]
"""
import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import audit_rounds  # noqa: E402
from tl_keras.report import audit as audit_lib  # noqa: E402
from tl_keras.train import kfold  # noqa: E402

DEFAULT = audit_lib.label_issues
VARIANT = {"name": "default"}


def _oof(features, views, mirror, targets, fid, c):
    cv = kfold.cross_validate([features, *views], targets, fid, mirror=mirror, grid=(c,),
                              max_dim=audit_lib.PRINCIPAL_DIM, held_out_views=True)
    return cv.oof_probs.astype(np.float64)


def label_issues(features, labels, num_classes, seed, groups=None, folds=audit_lib.AUDIT_FOLDS,
                 views=(), mirror=None):
    first = DEFAULT(features, labels, num_classes, seed, groups, folds, views, mirror)
    name = VARIANT["name"]
    if name == "default" or np.asarray(labels).ndim == 2:
        return first
    import cleanlab.count
    import cleanlab.filter

    y = np.asarray(labels).astype(int)
    p = first["probs"]
    if name in ("c_down", "c_path"):
        grid = sorted(kfold.DEFAULT_C_GRID)
        i = grid.index(first["c"])
        k = int(min(folds, max(2, min(np.bincount(y, minlength=num_classes)))))
        fid = kfold.fold_ids(y, k, seed, groups=None if groups is None else groups.tolist())
        t = np.eye(num_classes, dtype=np.float32)[y]
        if name == "c_down":
            p = _oof(features, views, mirror, t, fid, grid[max(0, i - 1)])
        else:
            cs = grid[max(0, i - 1):i + 2]
            p = np.mean([_oof(features, views, mirror, t, fid, c) for c in cs], axis=0)
        p = np.clip(p, 1e-6, 1)
        p /= p.sum(1, keepdims=True)
        issues = cleanlab.filter.find_label_issues(y, p, filter_by=audit_lib.LABEL_FILTER,
                                                   return_indices_ranked_by="self_confidence",
                                                   n_jobs=1)
    elif name == "calibrated":
        n = cleanlab.count.num_label_issues(y, p, estimation_method="off_diagonal_calibrated")
        sc = p[np.arange(len(y)), y]
        issues = np.argsort(sc, kind="stable")[:n]
    else:
        raise ValueError(name)
    return {**first, "issues": np.asarray(issues, int), "probs": p, "suggested": p.argmax(1)}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["c_down", "c_path", "calibrated"])
    ap.add_argument("--work", default="/tmp/audit_heads")
    args = ap.parse_args()
    audit_lib.label_issues = label_issues
    audit_rounds.compare(args.variants, VARIANT, args.work)


if __name__ == "__main__":
    main()
