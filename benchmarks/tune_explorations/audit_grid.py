"""Tune plantings (issue 22): the audit heads helped by the copy descriptor.

`audit_quality.py`'s tune plantings (`audit_rounds.compare`), with
`report.audit.label_issues` patched to combine the default out-of-fold
probabilities (heads on the pooled features) with a second classifier on the
copy descriptor the same frozen pass computes (block 12's output on a 5x5
grid, L2-normalised), whose errors differ from the pooled features':

  grid_blend  the mean of the two heads' out-of-fold probabilities;
  grid_geo    their geometric mean;
  concat      one head on the pooled features and the descriptor's top 256
              principal directions side by side.

Not kept (benchmarks/README.md, "Data audit", session 13).

  PYTHONPATH=. python benchmarks/tune_explorations/audit_grid.py
"""
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

ANALYSE = audit_lib._analyse
VARIANT = {"name": "default"}
GRID = {}


def analyse(features, labels, items, class_names, seed, threshold, outlier_fraction,
            copy_features, *rest):
    names = [s for s in audit_lib.SPLITS if s in features and len(features[s])]
    GRID["g"] = np.concatenate([np.asarray(copy_features[s], np.float32) for s in names])
    return ANALYSE(features, labels, items, class_names, seed, threshold, outlier_fraction,
                   copy_features, *rest)


def variant(name, first, y, fid, features, views, mirror, num_classes):
    targets = np.eye(num_classes, dtype=np.float32)[y]
    g = GRID["g"] / np.linalg.norm(GRID["g"], axis=1, keepdims=True)
    if name == "concat":
        gz = kfold.Projection.fit(g, 256)(g)
        gz = gz / gz.std() * features.std()
        p = kfold.cross_validate([np.concatenate([features, gz], 1)], targets, fid,
                                 max_dim=512).oof_probs.astype(np.float64)
    else:
        q = np.clip(kfold.cross_validate([g], targets, fid, max_dim=256).oof_probs, 1e-6, 1)
        p = ((first["probs"] + q) / 2 if name == "grid_blend"
             else np.exp((np.log(first["probs"]) + np.log(q)) / 2))
    print(f"{name}: out-of-fold accuracy {(p.argmax(1) == y).mean():.4f} "
          f"(default {(first['probs'].argmax(1) == y).mean():.4f})", flush=True)
    return audit_rounds.flag(first, y, p)


def main():
    audit_lib.label_issues = audit_rounds.patched(variant, VARIANT)
    audit_lib._analyse = analyse
    audit_rounds.compare(["grid_blend", "grid_geo", "concat"], VARIANT, "/tmp/audit_grid")


if __name__ == "__main__":
    main()
