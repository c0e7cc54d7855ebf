"""Calibration and selective prediction of the default run on the shared flowers (issue 23).

Runs `tl-keras train --flagfile=flags/flowers.flags` (MobileNetV2-0.35 weights
file, 160 px, 25% of the photos held out for testing; the seed also draws the
split) for several seeds and prints, per seed and on average, the test
accuracy, the test ECE (15 bins) before and after the validation-fitted
temperature, the temperature, and what --target_accuracy's threshold answers
on the test split.

Usage (from the repo root, ../shared/data beside it):
  python benchmarks/calibration.py --seeds 1,2,3
About 40 s a seed on 2 idle CPU cores.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def run(seed: int, work: Path) -> dict:
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "tl_keras", "train", "--flagfile=flags/flowers.flags",
           f"--seed={seed}", f"--output_dir={out}", "--noexport", "--notensorboard"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    args = p.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="tl_keras_calibration_") as work:
        print(f"{'seed':>4}{'accuracy':>10}{'ECE before':>12}{'ECE after':>11}{'T':>8}"
              f"{'answered':>10}{'acc. answered':>15}", flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(seed, Path(work))
            t, sel = r["test"], r["test"].get("selective", {})
            rows.append((t["accuracy"], t["ece_uncalibrated"], t["ece"],
                         r["calibration"]["temperature"], sel.get("coverage", 0.0),
                         sel.get("accuracy") or float("nan")))
            print(f"{seed:>4}" + "".join(f"{v:>{w}.4f}" for v, w in zip(rows[-1],
                                                                       (10, 12, 11, 8, 10, 15))),
                  flush=True)
    m = np.nanmean(np.array(rows), axis=0)
    print("mean" + "".join(f"{v:>{w}.4f}" for v, w in zip(m, (10, 12, 11, 8, 10, 15))))


if __name__ == "__main__":
    main()
