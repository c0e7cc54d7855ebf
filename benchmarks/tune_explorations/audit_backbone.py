"""Tune plantings (issue 22): does a stronger backbone find more flipped labels?

`audit_quality.py`'s planting of 400 flowers128 photos a class that are not in
flowers/ (5% of the training labels flipped, seeds 0, 1, 2), audited as
`tl-keras audit` does with MobileNetV2-0.35 (the benchmark's backbone) and
MobileNetV2-0.5 (the other official weights file in ../shared/data), both at
160 px. Prints precision and recall of the flagged set and the out-of-fold
accuracy of the audit's k-fold heads. A diagnosis: the benchmark's backbone is
fixed by the issue.

  PYTHONPATH=. python benchmarks/tune_explorations/audit_backbone.py
"""
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np  # noqa: E402

import audit_quality as aq  # noqa: E402
from tl_keras.config import Config  # noqa: E402
from tl_keras.run import audit  # noqa: E402

WEIGHTS = {0.35: aq.WEIGHTS, 0.5: aq.WEIGHTS.replace("_0.35_224_", "_0.5_224_")}


def main(work="/tmp/audit_backbone"):
    photos = aq.tune_photos(400)
    rows = {}
    for seed in (0, 1, 2):
        truth = aq.plant(photos, os.path.join(work, "data"), seed=seed, flip_fraction=0.05,
                         copies=0)
        for alpha, weights in WEIGHTS.items():
            out = os.path.join(work, f"out_{alpha}")
            shutil.rmtree(out, ignore_errors=True)
            result = audit.audit(Config(
                data=os.path.join(work, "data", "train"),
                test_data=os.path.join(work, "data", "test"), backbone="mobilenet_v2",
                alpha=alpha, weights=weights, image_size=160, output_dir=out,
                audit_similarity=0.72, seed=42))
            r = aq.score(result, truth)
            rows.setdefault(alpha, []).append((r["precision"], r["recall"],
                                               result["oof_accuracy"]))
            print(seed, alpha, rows[alpha][-1], flush=True)
    for alpha, v in rows.items():
        p, r, acc = np.array(v).mean(0)
        print(f"MobileNetV2-{alpha}: precision {p:.3f} recall {r:.3f} "
              f"out-of-fold accuracy {acc:.3f}")


if __name__ == "__main__":
    main()
