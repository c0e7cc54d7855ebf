"""Does a messy copy of the flowers train like the clean one?

Builds, under --work:
  test/   a seeded, class-balanced 25% of ../shared/data/flowers (never touched)
  clean/  the other 75%
  dirty/  clean/ plus bad and odd files of every kind (tests/odd_images.py,
          made with Pillow from the class's own training photos: empty,
          truncated JPEG, corrupt PNG, text named .jpg, decompression bomb,
          TIFF, CMYK JPEG, 16-bit PNG, palette PNG, transparent PNG,
          grayscale JPEG, animated GIF, EXIF-rotated JPEG), byte-identical
          copies within the training data and copies of test photos (leakage)
then trains both with flags/flowers.flags (same seed, same test set; the
leaked copies are dropped with --drop_leakage) and prints test accuracy of
each, and whether OUT/preflight.json of the dirty run lists every bad file
with the expected reason.

  python benchmarks/dirty_flowers.py [--image_size=128] [--finetune_epochs=5] [--seeds=42]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
FLOWERS = REPO.parent / "shared" / "data" / "flowers"
WEIGHTS = (REPO.parent / "shared" / "data" / "weights"
           / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")


def build(work: Path, reps: int) -> dict:
    import odd_images

    from tl_keras.data import sources as sources_lib

    classes, split = sources_lib.load_source(str(FLOWERS), "data")
    test_idx, train_idx = sources_lib.stratified_split(split.labels, [0.25], seed=0)
    for name, idx in (("test", test_idx), ("clean", train_idx)):
        for i in idx:
            dst = work / name / classes[split.labels[i]]
            dst.mkdir(parents=True, exist_ok=True)
            shutil.copy(split.items[i], dst)
    shutil.copytree(work / "clean", work / "dirty")
    expected_bad: dict[str, str] = {}
    made = 0
    for r in range(reps):
        # Each repetition puts one file of every kind into one class.
        cls = classes[r % len(classes)]
        photos = sorted((work / "clean" / cls).glob("*.jpg"))[r * 13:(r + 1) * 13]
        for odd in odd_images.make_odd_files(photos, work / "dirty" / cls / f"odd{r}"):
            made += 1
            if odd.status == "skipped":
                expected_bad[str(odd.path)] = odd.reason
    # Byte-identical copies within the training data, and leaked test photos.
    for cls in classes[:2]:
        p = sorted((work / "clean" / cls).glob("*.jpg"))[-1]
        shutil.copy(p, work / "dirty" / cls / f"copy_of_{p.name}")
        t = sorted((work / "test" / cls).glob("*.jpg"))[0]
        shutil.copy(t, work / "dirty" / cls / f"leaked_{t.name}")
    return {"classes": classes, "odd_files": made, "expected_bad": expected_bad,
            "train": len(train_idx), "test": len(test_idx)}


def train(variant: str, work: Path, seed: int, args) -> dict:
    out = work / "runs" / f"{variant}_seed{seed}"
    cmd = [sys.executable, "-m", "tl_keras", "train", f"--flagfile={REPO / 'flags/flowers.flags'}",
           f"--data={work / variant}", f"--test_data={work / 'test'}", "--test_fraction=0",
           f"--weights={WEIGHTS}", f"--image_size={args.image_size}",
           f"--finetune_epochs={args.finetune_epochs}", f"--seed={seed}", "--drop_leakage",
           "--export=false", f"--output_dir={out}"]
    t0 = time.time()
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(str(out) + ".log", "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} seed {seed} failed; see {out}.log")
    report = json.loads((out / "report.json").read_text())
    return {"variant": variant, "seed": seed, "test_accuracy": report["test"]["accuracy"],
            "n_test": report["test"]["n"], "n_train": sum(report["class_counts"]["train"]),
            "kept": report["kept"], "preflight": report["preflight"], "out": str(out),
            "minutes": round((time.time() - t0) / 60, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="/tmp/tl_keras_dirty_flowers")
    ap.add_argument("--image_size", type=int, default=160)
    ap.add_argument("--finetune_epochs", type=int, default=10)
    ap.add_argument("--seeds", default="42")
    ap.add_argument("--reps", type=int, default=3, help="files of each odd kind")
    args = ap.parse_args()
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    info = build(work, args.reps)
    print(f"train {info['train']} photos, test {info['test']}; dirty adds {info['odd_files']} odd "
          f"files ({len(info['expected_bad'])} unusable) + 2 copies + 2 leaked test photos",
          flush=True)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for variant in ("clean", "dirty"):
            r = train(variant, work, seed, args)
            rows.append(r)
            print(json.dumps(r), flush=True)
            if variant == "dirty":
                pre = json.loads((Path(r["out"]) / "preflight.json").read_text())
                listed = {e["path"]: e["reason"] for e in pre["sources"]["train"]["skipped"]}
                missing = [p for p in info["expected_bad"] if p not in listed]
                wrong = [p for p, why in info["expected_bad"].items()
                         if p in listed and why not in listed[p]]
                extra = [p for p in listed if p not in info["expected_bad"]]
                print(f"preflight.json: {len(listed)} skipped files listed; expected "
                      f"{len(info['expected_bad'])}; missing {missing}; wrong reason {wrong}; "
                      f"unexpected {extra}; converted {len(pre['sources']['train']['converted'])}; "
                      f"duplicate groups {len(pre['sources']['train']['duplicates'])}; "
                      f"leakage {len(pre['leakage'])}", flush=True)
    print("variant  seed  test_accuracy  n_train  n_test  kept  minutes")
    for r in rows:
        print(f"{r['variant']:7s} {r['seed']:5d}  {r['test_accuracy']:.4f}        "
              f"{r['n_train']:5d}  {r['n_test']:5d}  {r['kept']}  {r['minutes']}")
    (work / "summary.json").write_text(json.dumps({"info": info, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
