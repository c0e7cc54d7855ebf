"""Tune plantings (issue 22): two audit variants against the default, through the real audit.

`audit_quality.py`'s planting of 400 flowers128 photos a class that are not in
flowers/ (5% of the training labels flipped, seeds 0, 1, 2); the audit runs as
`tl-keras audit` does, with `report.audit.label_issues` patched for the variant:

  relabel  a second round: the k-fold heads refitted with round one's flagged
           images relabelled to their suggested class, then cleanlab again
           (given labels, the new out-of-fold probabilities);
  folds10  10 folds instead of 5.

Prints precision, recall and F1 of the flagged set against the flipped labels.
Neither was kept (benchmarks/README.md, "Data audit", session 12).

  PYTHONPATH=. python benchmarks/tune_explorations/audit_rounds.py [--variants relabel folds10]
"""
import argparse
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np  # noqa: E402

import audit_quality as aq  # noqa: E402
from tl_keras.report import audit as audit_lib  # noqa: E402
from tl_keras.train import kfold  # noqa: E402

DEFAULT = audit_lib.label_issues
VARIANT = {"name": "default"}


def heldout_folds(labels, num_classes, seed, groups, folds):
    """The audit's class ids and fold ids (as `report.audit.label_issues` draws them)."""
    y = np.asarray(labels).astype(int)
    k = int(min(folds, max(2, min(np.bincount(y, minlength=num_classes)))))
    return y, kfold.fold_ids(y, k, seed, groups=None if groups is None else groups.tolist())


def flag(first, y, probs):
    """`first` (the default result) with the images cleanlab flags on `probs` instead."""
    import cleanlab.filter

    p = np.clip(np.asarray(probs, np.float64), 1e-6, 1)
    p /= p.sum(1, keepdims=True)
    issues = cleanlab.filter.find_label_issues(y, p, filter_by=audit_lib.LABEL_FILTER,
                                               return_indices_ranked_by="self_confidence",
                                               n_jobs=1)
    return {**first, "issues": np.asarray(issues, int), "probs": p, "suggested": p.argmax(1)}


def patched(variant, state):
    """A `label_issues` that runs the default, then `variant` for the variant `state` names.

    `variant(name, first, y, folds, features, views, mirror, num_classes)`
    returns the result (see `flag`); "default" and multi-label data keep `first`.
    """
    def label_issues(features, labels, num_classes, seed, groups=None,
                     folds=audit_lib.AUDIT_FOLDS, views=(), mirror=None):
        first = DEFAULT(features, labels, num_classes, seed, groups, folds, views, mirror)
        if state["name"] == "default" or np.asarray(labels).ndim == 2:
            return first
        y, fid = heldout_folds(labels, num_classes, seed, groups, folds)
        return variant(state["name"], first, y, fid, features, views, mirror, num_classes)

    return label_issues


def label_issues(features, labels, num_classes, seed, groups=None, folds=audit_lib.AUDIT_FOLDS,
                 views=(), mirror=None):
    name = VARIANT["name"]
    if name == "folds10":
        return DEFAULT(features, labels, num_classes, seed, groups, 10, views, mirror)
    first = DEFAULT(features, labels, num_classes, seed, groups, folds, views, mirror)
    if name == "default" or np.asarray(labels).ndim == 2:
        return first
    y, fid = heldout_folds(labels, num_classes, seed, groups, folds)
    relabelled = y.copy()
    relabelled[first["issues"]] = first["suggested"][first["issues"]]
    cv = kfold.cross_validate([features, *views], np.eye(num_classes, dtype=np.float32)[relabelled],
                              fid, mirror=mirror, max_dim=audit_lib.PRINCIPAL_DIM,
                              held_out_views=True)
    return flag(first, y, cv.oof_probs)


def compare(variants, state, work):
    """Runs the default and each variant on the three tune plantings; prints their scores.

    Args:
        variants: names the patched `label_issues` understands.
        state: the dict whose "name" selects the variant of the patched function.
        work: scratch folder (the planted data and the audit's output).
    """
    photos = aq.tune_photos(400)
    rows = {}
    for seed in (0, 1, 2):
        data_dir, out = os.path.join(work, "data"), os.path.join(work, "out")
        truth = aq.plant(photos, data_dir, seed=seed, flip_fraction=0.05, copies=0)
        shutil.rmtree(out, ignore_errors=True)
        for name in ["default", *variants]:  # the first computes the features
            state["name"] = name
            r = aq.score(aq.run_audit(data_dir, out, 160, 0.72), truth)
            f1 = 2 * r["precision"] * r["recall"] / max(1e-9, r["precision"] + r["recall"])
            rows.setdefault(name, []).append((r["precision"], r["recall"], f1, r["flagged"]))
            print(seed, name, rows[name][-1], flush=True)
    for name, v in rows.items():
        v = np.array(v)
        print(f"{name}: precision {v[:, 0].mean():.3f} recall {v[:, 1].mean():.3f} "
              f"F1 {v[:, 2].mean():.3f} flagged {v[:, 3].mean():.0f} "
              f"(F1 per planting {np.round(v[:, 2], 3).tolist()})")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--variants", nargs="+", default=["relabel", "folds10"])
    ap.add_argument("--work", default="/tmp/audit_rounds")
    args = ap.parse_args()
    audit_lib.label_issues = label_issues
    compare(args.variants, VARIANT, args.work)


if __name__ == "__main__":
    main()
