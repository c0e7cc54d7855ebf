"""Calibration and selective prediction of the default run on the shared flowers (issue 23).

Runs `tl-keras train --flagfile=flags/flowers.flags` (MobileNetV2-0.35 weights
file, 160 px, 25% of the photos held out for testing; the seed also draws the
split) for several seeds and prints, per seed and on average, the test
accuracy, the test ECE (15 bins) before and after the validation-fitted
temperature, the temperature, and what --target_accuracy's threshold answers
on the test split. The last columns are diagnoses, not methods: the lowest
test ECE any single temperature reaches (chosen on the test images
themselves, from a fine grid), i.e. how far temperature scaling could go
on these 250 images; and the ECE floor: the mean ECE that a perfectly
calibrated model with the same test confidences scores on 250 images
(each image counted correct with probability equal to its confidence, 2000
draws), i.e. the binning noise below which no calibration can be measured.
A last line pools the seeds' test predictions (3 x 250 images: a lower
floor) and gives their ECE before and after calibration with its floor.

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
WIDTHS = (10, 12, 11, 8, 10, 15, 12, 8, 8)


def run(seed: int, work: Path) -> dict:
    out = work / f"seed{seed}"
    cmd = [sys.executable, "-m", "tl_keras", "train", "--flagfile=flags/flowers.flags",
           f"--seed={seed}", f"--output_dir={out}", "--noexport", "--notensorboard"]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return json.loads((out / "report.json").read_text())


def ece_floor(conf: np.ndarray, draws: int = 2000) -> float:
    """Mean ECE of a perfectly calibrated model with these confidences (15 bins)."""
    sys.path.insert(0, str(REPO))
    from tl_keras.report import metrics

    rng = np.random.default_rng(0)
    return float(np.mean([metrics.expected_calibration_error(conf, rng.random(len(conf)) < conf)[0]
                          for _ in range(draws)]))


def best_temperature_ece(out: Path, temperature: float):
    """((lowest test ECE over temperatures, that temperature, the ECE floor),
    (calibrated test probabilities, uncalibrated ones, labels)).

    The first two are the ceiling of temperature scaling; the floor is the
    mean ECE of a perfectly calibrated model with the run's calibrated test
    confidences (correct with probability = confidence, 2000 draws).

    The run's model.keras is calibrated (softmax(log p / T)); its test
    probabilities are predicted again and turned back into the uncalibrated
    ones (p proportional to p_cal ** T) before the sweep.
    """
    sys.path.insert(0, str(REPO))
    from tl_keras.config import Config
    from tl_keras.model import model_files
    from tl_keras.report import metrics
    from tl_keras.run import views

    cfg = Config.from_dict(json.loads((out / "config.json").read_text()))
    scratch = out / "oracle"
    scratch.mkdir(exist_ok=True)
    data, _ = views.load_data(cfg, str(out / "cache"), str(scratch), cross_validated=True)
    model = model_files.load_model_file(str(out / "model.keras"))
    cal = metrics.predict(model, data.test, cfg.image_size, 64).astype(np.float64)
    log_raw = temperature * np.log(np.clip(cal, 1e-12, 1.0))
    y = np.asarray(data.test.labels)
    best = (np.inf, 1.0)
    for t in np.exp(np.linspace(np.log(0.3), np.log(3.0), 241)):
        q = np.exp(log_raw / t - (log_raw / t).max(axis=1, keepdims=True))
        q /= q.sum(axis=1, keepdims=True)
        ece = metrics.expected_calibration_error(q.max(axis=1), q.argmax(axis=1) == y)[0]
        best = min(best, (ece, float(t)))
    raw = np.exp(log_raw - log_raw.max(axis=1, keepdims=True))
    raw /= raw.sum(axis=1, keepdims=True)
    return (*best, ece_floor(cal.max(axis=1))), (cal, raw, y)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3")
    args = p.parse_args()
    rows, pooled = [], []
    with tempfile.TemporaryDirectory(prefix="tl_keras_calibration_") as work:
        print(f"{'seed':>4}{'accuracy':>10}{'ECE before':>12}{'ECE after':>11}{'T':>8}"
              f"{'answered':>10}{'acc. answered':>15}{'best-T ECE':>12}{'best T':>8}{'floor':>8}",
              flush=True)
        for seed in (int(s) for s in args.seeds.split(",")):
            r = run(seed, Path(work))
            t, sel = r["test"], r["test"].get("selective", {})
            temperature = r["calibration"]["temperature"]
            diagnosis, arrays = best_temperature_ece(Path(work) / f"seed{seed}", temperature)
            pooled.append(arrays)
            rows.append((t["accuracy"], t["ece_uncalibrated"], t["ece"], temperature,
                         sel.get("coverage", 0.0), sel.get("accuracy") or float("nan"),
                         *diagnosis))
            print(f"{seed:>4}" + "".join(f"{v:>{w}.4f}" for v, w in zip(rows[-1], WIDTHS)),
                  flush=True)
    m = np.nanmean(np.array(rows), axis=0)
    print("mean" + "".join(f"{v:>{w}.4f}" for v, w in zip(m, WIDTHS)))
    from tl_keras.report import metrics

    cal, raw, y = (np.concatenate(a) for a in zip(*pooled))
    ece = {name: metrics.expected_calibration_error(p.max(axis=1), p.argmax(axis=1) == y)[0]
           for name, p in (("before", raw), ("after", cal))}
    print(f"pooled over the seeds ({len(y)} test images): ECE before {ece['before']:.4f}, "
          f"after {ece['after']:.4f}, floor {ece_floor(cal.max(axis=1)):.4f}")


if __name__ == "__main__":
    main()
