"""Open set on the shared flowers (issue 23): does the export's `unknown` flag unseen classes?

Trains `tl-keras train` with the defaults (MobileNetV2-0.35 weights file, 160
px, the export on) on three classes (daisy, dandelion, rose: the first 150
photos of each by file name), tests on the last 50 photos of all five
classes, and serves those 250 photos through the exported SavedModel's
`serving_default`. Prints, per seed and on average: the test accuracy on the
known classes, the AUROC of the served `ood_score` for telling the two unseen
classes (sunflower, tulip) from the known ones, the same AUROC for the
max-probability baseline (1 - the top served probability), and at the
threshold the run chose on its held-out predictions (--unknown_keep=0.95),
the share of unseen photos flagged unknown and of known photos kept.

Usage (from the repo root, ../shared/data beside it):
  python benchmarks/open_set.py --seeds 1,2,3
About 45 s a seed on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

REPO = Path(__file__).resolve().parents[1]
FLOWERS = REPO.parent / "shared" / "data" / "flowers"
WEIGHTS = (REPO.parent / "shared" / "data" / "weights"
           / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
KNOWN, UNSEEN = ("daisy", "dandelion", "rose"), ("sunflower", "tulip")
TRAIN, TEST = 150, 50


def write_lists(work: Path) -> tuple[Path, Path, list[Path], list[Path]]:
    train, test, unseen = [], [], []
    for c in KNOWN + UNSEEN:
        photos = sorted((FLOWERS / c).iterdir())
        if c in KNOWN:
            train += [(p, c) for p in photos[:TRAIN]]
            test += [(p, c) for p in photos[TRAIN:TRAIN + TEST]]
        else:
            unseen += photos[TRAIN:TRAIN + TEST]
    lists = []
    for name, rows in (("train.csv", train), ("test.csv", test)):
        (work / name).write_text("".join(f"{p},{c}\n" for p, c in rows))
        lists.append(work / name)
    return lists[0], lists[1], [p for p, _ in test], unseen


def run(seed: int, work: Path) -> dict:
    train_csv, test_csv, known, unseen = write_lists(work)
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "tl_keras", "train", f"--data={train_csv}",
           f"--test_data={test_csv}", "--allow_external_paths", "--backbone=mobilenet_v2",
           "--alpha=0.35", "--image_size=160", f"--weights={WEIGHTS}", f"--seed={seed}",
           f"--output_dir={out}", "--notensorboard"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    report = json.loads((out / "report.json").read_text())

    sys.path.insert(0, str(REPO))
    import tensorflow as tf

    from tl_keras.export import saved_model as export_lib

    served = export_lib.SavedModelClassifier(str(out / "export" / "1"))
    outs = [served.serve(image_bytes=tf.constant([p.read_bytes() for p in files]))
            for files in (known, unseen)]
    ood = np.concatenate([o["ood_score"].numpy() for o in outs])
    unknown = np.concatenate([o["unknown"].numpy() for o in outs])
    probs = np.concatenate([o["probabilities"].numpy() for o in outs])
    is_unseen = np.r_[np.zeros(len(known), bool), np.ones(len(unseen), bool)]
    return {"accuracy": report["test"]["accuracy"],
            "auroc": roc_auc_score(is_unseen, ood),
            "auroc_max_probability": roc_auc_score(is_unseen, 1 - probs.max(1)),
            "unseen_flagged": float(unknown[is_unseen].mean()),
            "known_kept": float(1 - unknown[~is_unseen].mean()),
            "threshold": report["open_set"]["threshold"]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    args = p.parse_args()
    cols = ("accuracy", "auroc", "auroc_max_probability", "unseen_flagged", "known_kept",
            "threshold")
    print(f"{'seed':>4}" + "".join(f"{c:>23}" for c in cols), flush=True)
    rows = []
    with tempfile.TemporaryDirectory(prefix="tl_keras_open_set_") as work:
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(seed, Path(work))
            rows.append([r[c] for c in cols])
            print(f"{seed:>4}" + "".join(f"{v:>23.4f}" for v in rows[-1]), flush=True)
    a = np.array(rows)
    print("mean" + "".join(f"{v:>23.4f}" for v in a.mean(0)))
    if len(a) > 1:
        print("s.e." + "".join(f"{v:>23.4f}" for v in a.std(0, ddof=1) / np.sqrt(len(a))))


if __name__ == "__main__":
    main()
