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

VARIANT = {"name": "default"}


def _oof(features, views, mirror, targets, fid, c):
    cv = kfold.cross_validate([features, *views], targets, fid, mirror=mirror, grid=(c,),
                              max_dim=audit_lib.PRINCIPAL_DIM, held_out_views=True)
    return cv.oof_probs.astype(np.float64)


def variant(name, first, y, fid, features, views, mirror, num_classes):
    p = first["probs"]
    if name == "calibrated":
        import cleanlab.count

        n = cleanlab.count.num_label_issues(y, p, estimation_method="off_diagonal_calibrated")
        issues = np.argsort(p[np.arange(len(y)), y], kind="stable")[:n]
        return {**first, "issues": np.asarray(issues, int)}
    grid = sorted(kfold.DEFAULT_C_GRID)
    i = grid.index(first["c"])
    t = np.eye(num_classes, dtype=np.float32)[y]
    strengths = grid[max(0, i - 1):max(1, i)] if name == "c_down" else grid[max(0, i - 1):i + 2]
    return audit_rounds.flag(first, y, np.mean(
        [_oof(features, views, mirror, t, fid, c) for c in strengths], axis=0))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["c_down", "c_path", "calibrated"])
    ap.add_argument("--work", default="/tmp/audit_heads")
    args = ap.parse_args()
    audit_lib.label_issues = audit_rounds.patched(variant, VARIANT)
    audit_rounds.compare(args.variants, VARIANT, args.work)


if __name__ == "__main__":
    main()
