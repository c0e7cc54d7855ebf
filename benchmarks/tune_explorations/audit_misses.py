"""Why flipped labels are missed (issue 22): a diagnosis on the report planting, not a choice.

Runs `audit_quality.py`'s report planting (all 1000 flowers, seed 0: 40 flipped
training labels, 25 altered copies) through the real audit and prints, for
each flipped photo, whether it was flagged, its given and true class, the
audit heads' out-of-fold probability of the given class against cleanlab's
per-class threshold (the mean of p(j) over the photos labelled j), the
predicted class and the photo's rank by self-confidence among all photos
(0: the most suspicious). Nothing is chosen from it.

  python benchmarks/tune_explorations/audit_misses.py
"""
import os
import shutil
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np  # noqa: E402

import audit_quality as aq  # noqa: E402
from tl_keras.report import audit as audit_lib  # noqa: E402

SEEN = {}
LABEL_ISSUES, ANALYSE = audit_lib.label_issues, audit_lib._analyse


def label_issues(*args, **kwargs):
    result = LABEL_ISSUES(*args, **kwargs)
    SEEN.update(lab=result, y=np.asarray(args[1]))
    return result


def analyse(features, labels, items, class_names, *rest):
    names = [s for s in audit_lib.SPLITS if s in features and len(features[s])]
    SEEN["files"] = [os.path.abspath(audit_lib._name(items[s][i], s, i))
                     for s in names for i in range(len(features[s]))]
    SEEN["classes"] = class_names
    return ANALYSE(features, labels, items, class_names, *rest)


def main():
    audit_lib.label_issues, audit_lib._analyse = label_issues, analyse
    root = os.path.join(aq.DATA, "flowers")
    photos = {c: [os.path.join(root, c, f) for f in os.listdir(os.path.join(root, c))]
              for c in sorted(os.listdir(root))}
    truth = aq.plant(photos, "/tmp/audit_misses/data", seed=0, flip_fraction=0.05, copies=25)
    shutil.rmtree("/tmp/audit_misses/out", ignore_errors=True)
    scored = aq.score(aq.run_audit("/tmp/audit_misses/data", "/tmp/audit_misses/out", 160, 0.72),
                      truth)
    print(f"precision {scored['precision']}, recall {scored['recall']}")
    p, y, classes = SEEN["lab"]["probs"], SEEN["y"], SEEN["classes"]
    flagged = set(SEEN["lab"]["issues"].tolist())
    threshold = np.array([p[y == j, j].mean() for j in range(len(classes))])
    rank = np.argsort(np.argsort(p[np.arange(len(y)), y], kind="stable"), kind="stable")
    rows = []
    for f in truth["flipped"]:
        i = SEEN["files"].index(os.path.abspath(f))
        true = next(c for c in classes if os.path.isfile(os.path.join(root, c, os.path.basename(f))))
        rows.append((i in flagged, rank[i],
                     f"{'flagged' if i in flagged else 'MISSED ':8s}{os.path.basename(f):32s} "
                     f"given {classes[y[i]]:9s} true {true:9s} p(given) {p[i, y[i]]:.3f} "
                     f"(threshold {threshold[y[i]]:.3f}) predicted {classes[p[i].argmax()]:9s} "
                     f"p(true) {p[i, classes.index(true)]:.3f} rank {rank[i]}"))
    for _, _, line in sorted(rows, key=lambda r: (not r[0], r[1])):
        print(line)


if __name__ == "__main__":
    main()
