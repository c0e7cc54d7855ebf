"""Test accuracy of stage-2 settings and cached views across several splits.

How the defaults of `--finetune_epochs`, `--finetune_blocks` (auto) and
`--cache_views` were chosen: each setting runs `tl-keras train` (a fresh
process, MobileNetV2-0.35 at 160 px, the official weights file, every other
flag at its default) on

* the shared flowers with --test_fraction=0.25 and seeds 1, 2, 3, 42 (the seed
  also draws the split), and
* three disjoint subsets of flowers128 (150 photos per class each) made of the
  photos that are NOT in flowers/ (flowers128 holds the same source photos at
  128x128, heavily compressed): other photos, and lower-quality ones, seed 42.

The subsets are written to a temporary folder (never into the project) and
removed at the end. Prints one row per setting: each split's test accuracy,
the means, and the mean stage-2 seconds. Views are cached per split in a
shared --cache_dir, so settings that differ only in stage 2 reuse them.

Usage: python benchmarks/defaults_study.py [--settings NAME=FLAGS ...] [--keep DIR]
  e.g. --settings "v4e6=--finetune_epochs=6" "v4e6b8=--finetune_epochs=6 --finetune_blocks=8"
About 40 s per run on 2 CPU cores: 7 runs per setting.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
SHARED = os.path.normpath(os.path.join(ROOT, "..", "shared", "data"))
WEIGHTS = os.path.join(SHARED, "weights",
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
DEFAULT_SETTINGS = [
    "v4e10b8=--cache_views=4 --finetune_epochs=10 --finetune_blocks=8",
    "v2e10b8=--cache_views=2 --finetune_epochs=10 --finetune_blocks=8",
    "v2e6b8=--cache_views=2 --finetune_epochs=6 --finetune_blocks=8",
    "v4e6b8=--cache_views=4 --finetune_epochs=6 --finetune_blocks=8",
    "v4e6b4=--cache_views=4 --finetune_epochs=6 --finetune_blocks=4",
    "v4e10b4=--cache_views=4 --finetune_epochs=10 --finetune_blocks=4",
    "v3e6b8=--cache_views=3 --finetune_epochs=6 --finetune_blocks=8",
    "v3e6b4=--cache_views=3 --finetune_epochs=6 --finetune_blocks=4",
    "v2e6b4=--cache_views=2 --finetune_epochs=6 --finetune_blocks=4",
]


def flowers128_subsets(root: str, n_subsets: int = 3, per_class: int = 150) -> list[str]:
    """Disjoint class folders of flowers128 photos absent from flowers/, under ROOT."""
    out = [os.path.join(root, f"f128{'abc'[i]}") for i in range(n_subsets)]
    for c in sorted(os.listdir(os.path.join(SHARED, "flowers128"))):
        seen = {os.path.splitext(f)[0] for f in os.listdir(os.path.join(SHARED, "flowers", c))}
        rest = sorted(f for f in os.listdir(os.path.join(SHARED, "flowers128", c))
                      if os.path.splitext(f)[0] not in seen)
        random.Random(7).shuffle(rest)
        for i, d in enumerate(out):
            os.makedirs(os.path.join(d, c), exist_ok=True)
            for f in rest[i * per_class:(i + 1) * per_class]:
                shutil.copy(os.path.join(SHARED, "flowers128", c, f), os.path.join(d, c, f))
    return out


def run(data: str, seed: int, flags: str, work: str, name: str) -> dict:
    out = os.path.join(work, "runs", f"{name}_{os.path.basename(data)}_{seed}")
    cmd = [sys.executable, "-m", "tl_keras", "train", f"--data={data}", "--test_fraction=0.25",
           "--backbone=mobilenet_v2", "--alpha=0.35", "--image_size=160",
           f"--weights={WEIGHTS}", f"--seed={seed}", "--noexport", "--notensorboard",
           f"--cache_dir={os.path.join(work, 'cache', os.path.basename(data) + str(seed))}",
           f"--output_dir={out}", *flags.split()]
    subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    with open(os.path.join(out, "report.json"), encoding="utf-8") as f:
        report = json.load(f)
    return {"test": report["test"]["accuracy"], "stage2_s": report["stage2"].get("seconds", 0.0)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--settings", nargs="+", default=DEFAULT_SETTINGS)
    ap.add_argument("--keep", default="", help="keep the runs and subsets in this folder")
    args = ap.parse_args()
    work = args.keep or tempfile.mkdtemp(prefix="tl_keras_defaults_")
    try:
        splits = [(os.path.join(SHARED, "flowers"), s) for s in (1, 2, 3, 42)]
        splits += [(d, 42) for d in flowers128_subsets(os.path.join(work, "subsets"))]
        names = [f"{os.path.basename(d)}:{s}" for d, s in splits]
        print(f"{'setting':<10}" + "".join(f"{n:>12}" for n in names)
              + f"{'flowers':>9}{'f128':>7}{'all':>7}{'stage 2 s':>11}", flush=True)
        for setting in args.settings:
            name, flags = setting.split("=", 1)
            rows = [run(d, s, flags, work, name) for d, s in splits]
            acc = [r["test"] for r in rows]
            fl, f128 = acc[:4], acc[4:]
            print(f"{name:<10}" + "".join(f"{a:>12.3f}" for a in acc)
                  + f"{sum(fl) / len(fl):>9.3f}{sum(f128) / len(f128):>7.3f}"
                  f"{sum(acc) / len(acc):>7.3f}"
                  f"{sum(r['stage2_s'] for r in rows) / len(rows):>11.1f}", flush=True)
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
