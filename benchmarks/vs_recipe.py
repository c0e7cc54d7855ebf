"""tl_keras with defaults vs the TensorFlow transfer-learning tutorial's recipe.

Both run in this one script on the same split of the shared flowers photos
(150 train / 50 test per class; the train part split 120 / 30 for
validation), the same backbone (MobileNetV2 alpha 0.35 at 160 px, the
official weights file) and the same seed.

(a) The tutorial's recipe, written plainly: image_dataset_from_directory,
    augmentation layers in the model, frozen base called with training=False,
    GAP -> Dropout(0.2) -> Dense, Adam 1e-4 for 10 epochs, then layers from
    100 on unfrozen and RMSprop 1e-5 for 10 more epochs.
(b) tl_keras.run.image.train with its defaults.

Prints each one's stage times, total time and test accuracy, the speed-up,
and stage 1's time divided by the plain inference passes it cannot avoid
(one per cached view of the training images plus one over the validation
images: the floor for a frozen backbone).

The CPU this was developed on changes speed by up to 2x for minutes at a
time, so with --repeats N the two runs alternate N times (recipe, tl_keras,
recipe, ...), the speed-up is the ratio of the median totals, and the floor
is measured before and after each tl_keras run (its mean is the floor that
run is divided by).

Whole processes (--mode=whole_process, or both): what a user waits for.
Each side runs as its own subprocess, timed from start to exit (imports,
reports, export and interpreter exit included), one after the other: the
recipe as a plain script (benchmarks/tutorial_recipe.py, on the same
split's folders) and `python -m tl_keras train` with the defaults of
flags/flowers.flags (export and reports on) and this checkout's code. Wall
seconds and the child's CPU seconds (user + system, all threads) are
printed; the CPU seconds are the steadier figure on a shared machine.

Usage: python benchmarks/vs_recipe.py [--data DIR] [--weights FILE] [--skip_recipe]
       [--repeats N] [--mode in_process|whole_process|both]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras import Config
from tl_keras.config import DEFAULT_VAL_FRACTION
from tl_keras.data import augment  # noqa: E402
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.model import classifier as model_lib  # noqa: E402
from tl_keras.model import families as families_lib
from tl_keras.run import image as pipeline  # noqa: E402
from tl_keras.train import features  # noqa: E402
from tutorial_recipe import ALPHA, SEED, SIZE, recipe  # noqa: E402 (benchmarks/)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, ".."))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def materialize(split: sources_lib.Split, classes: list[str], root: str) -> str:
    """Symlinks a split into ROOT/CLASS/ so image_dataset_from_directory sees it."""
    for path, label in zip(split.items, split.labels):
        d = os.path.join(root, classes[label])
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(d, os.path.basename(path)))
    return root


def inference_floor(cfg: Config, data, views: int) -> float:
    """Seconds of the plain inference passes stage 1 cannot avoid.

    What a plain script must do to get the same features: decode the
    training and validation images once (tf.data cache), then one
    `predict_on_batch` pass per view over the training images (views after
    the first augmented with the same layer, as stage 1 does) and one over
    the validation images, at the batch size tl_keras infers with. The model
    is traced before the clock starts; nothing is stored or trained. Its
    pipelines start from `data.image_dataset`, so they too run without
    tf.data's autotuning thread (`data.steady`), whose waits would only
    lengthen the floor.
    """
    fam = families_lib.get_family(cfg.backbone)
    clf = model_lib.build_classifier(families_lib.build_backbone(fam, cfg.weights, SIZE, ALPHA),
                                     fam, len(data.class_names))
    aug = augment.build_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed,
                                  cfg.translation, cfg.crop_min_area)
    bs = features.inference_batch_size(cfg.batch_size)
    fn = clf.features.predict_on_batch
    fn(np.zeros((bs, SIZE, SIZE, 3), "float32"))  # trace outside the timing
    t0 = time.perf_counter()
    train = data_pipeline.image_dataset(data.train, SIZE, cache=False).cache()
    val = data_pipeline.image_dataset(data.val, SIZE, cache=False)
    for v in range(views):
        for x, _ in train.batch(bs).prefetch(data_pipeline.AUTOTUNE):
            x = tf.cast(x, tf.float32)
            fn(aug(x, training=True) if v and aug is not None else x)
    for x, _ in val.batch(bs).prefetch(data_pipeline.AUTOTUNE):
        fn(tf.cast(x, tf.float32))
    return time.perf_counter() - t0


def run_process(cmd: list[str], cwd: str) -> tuple[float, float, str]:
    """Runs `cmd` to its exit: (wall seconds, the child's CPU seconds, its output)."""
    env = {**os.environ, "PYTHONPATH": ROOT}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT)
    out = proc.stdout.read().decode(errors="replace")
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if status != 0:
        sys.exit(f"{' '.join(cmd[:4])} ... failed:\n{out[-3000:]}")
    return wall, usage.ru_utime + usage.ru_stime, out


def whole_process_pair(args, dirs: dict, work: str, i: int) -> list[tuple[str, dict]]:
    """One recipe process, then one `tl_keras train` process, each timed start to exit."""
    rows = []
    if not args.skip_recipe:
        wall, cpu, out = run_process([sys.executable, os.path.join(HERE, "tutorial_recipe.py"),
                                      os.path.dirname(dirs["train"]), args.weights], ROOT)
        acc = json.loads(out.strip().splitlines()[-1])["test_accuracy"]
        rows.append(("tutorial recipe", {"total": wall, "cpu": cpu, "test_accuracy": acc}))
    out_dir = os.path.join(work, f"process{i}")
    wall, cpu, _ = run_process([
        sys.executable, "-m", "tl_keras", "train", f"--data={args.data}", "--test_fraction=0.25",
        "--backbone=mobilenet_v2", f"--alpha={ALPHA}", f"--image_size={SIZE}",
        f"--weights={args.weights}", f"--seed={SEED}", f"--output_dir={out_dir}"], ROOT)
    with open(os.path.join(out_dir, "report.json"), encoding="utf-8") as f:
        acc = json.load(f)["test"]["accuracy"]
    rows.append(("tl-keras train", {"total": wall, "cpu": cpu, "test_accuracy": acc}))
    return rows


def print_whole_process(rows: list[tuple[str, dict]]) -> None:
    print("\nwhole processes, start to exit, one after the other:")
    print(f"{'process':<20}{'wall s':>10}{'CPU s':>10}{'test acc':>10}")
    for name, r in rows:
        print(f"{name:<20}{r['total']:>10.1f}{r['cpu']:>10.1f}{r['test_accuracy']:>10.3f}")
    ours = [r for name, r in rows if name == "tl-keras train"]
    base = [r for name, r in rows if name == "tutorial recipe"]
    if base:
        med = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
        print(f"whole-process speed-up: {med(base, 'total') / med(ours, 'total'):.2f}x wall "
              f"(median {med(base, 'total'):.1f}s / {med(ours, 'total'):.1f}s), "
              f"{med(base, 'cpu') / med(ours, 'cpu'):.2f}x CPU "
              f"(median {med(base, 'cpu'):.1f}s / {med(ours, 'cpu'):.1f}s); test accuracy "
              f"{med(ours, 'test_accuracy'):.3f} vs {med(base, 'test_accuracy'):.3f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(SHARED, "flowers"))
    ap.add_argument("--weights", default=os.path.join(
        SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"))
    ap.add_argument("--skip_recipe", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate the two runs this many times (medians compared)")
    ap.add_argument("--mode", choices=("in_process", "whole_process", "both"), default="both",
                    help="time the runs inside this process, as whole processes, or both")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="tl_keras_bench_")
    rows: list[tuple[str, dict]] = []
    processes: list[tuple[str, dict]] = []
    try:
        cfg = Config(data=args.data, test_fraction=0.25, backbone="mobilenet_v2", alpha=ALPHA,
                     image_size=SIZE, weights=args.weights, seed=SEED, export=False,
                     output_dir=os.path.join(work, "out"))
        data = sources_lib.load_dataset(
                                        sources_lib.DataSpec(data=cfg.data,
                                                             test_fraction=cfg.test_fraction,
                                                             # the recipe's validation split
                                                             val_fraction=DEFAULT_VAL_FRACTION,
                                                             seed=cfg.seed))
        dirs = {k: materialize(getattr(data, s), data.class_names, os.path.join(work, k))
                for k, s in (("train", "train"), ("val", "val"), ("test", "test"))}
        for i in range(max(args.repeats, 1)):
            if args.mode != "in_process":
                processes += whole_process_pair(args, dirs, work, i)
            if args.mode == "whole_process":
                continue
            if not args.skip_recipe:
                keras.backend.clear_session()
                rows.append(("tutorial recipe", recipe(dirs, args.weights,
                                                      len(data.class_names))))
            keras.backend.clear_session()
            before = inference_floor(cfg, data, cfg.cache_views)
            keras.backend.clear_session()
            run_cfg = cfg.replace(output_dir=os.path.join(work, f"out{i}"))
            t0 = time.perf_counter()
            report = pipeline.train(run_cfg)
            total = time.perf_counter() - t0
            keras.backend.clear_session()
            after = inference_floor(cfg, data, cfg.cache_views)
            rows.append(("tl_keras defaults", {
                "stage1": report["stage1"]["seconds"],
                "caching": report["stage1"]["caching_seconds"],
                "stage2": report["stage2"].get("seconds", 0.0), "total": total,
                "test_accuracy": report["test"]["accuracy"], "floor": (before + after) / 2,
                "floors": (before, after)}))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    if processes:
        print_whole_process(processes)
    if not rows:
        return
    print(f"\nflowers split: train {len(data.train)}, val {len(data.val)}, "
          f"test {len(data.test)}; MobileNetV2-{ALPHA} at {SIZE}px, seed {SEED}, "
          f"device {tf.config.list_physical_devices('GPU') and 'GPU' or 'CPU'}")
    print(f"{'run':<20}{'stage 1 s':>11}{'stage 2 s':>11}{'total s':>10}{'test acc':>10}"
          f"{'stage 1 / floor':>26}")
    for name, r in rows:
        floor = (f"{r['stage1']:.1f}/{r['floor']:.1f} = {r['stage1'] / r['floor']:.2f}"
                 if "floor" in r else "")
        print(f"{name:<20}{r['stage1']:>11.1f}{r['stage2']:>11.1f}{r['total']:>10.1f}"
              f"{r['test_accuracy']:>10.3f}{floor:>26}")
    ours = [r for name, r in rows if name == "tl_keras defaults"]
    base = [r for name, r in rows if name == "tutorial recipe"]
    median = lambda rs, k: float(np.median([r[k] for r in rs]))  # noqa: E731
    if base:
        print(f"speed-up end to end: {median(base, 'total') / median(ours, 'total'):.2f}x "
              f"(median totals {median(base, 'total'):.1f}s / {median(ours, 'total'):.1f}s); "
              f"test accuracy {median(ours, 'test_accuracy'):.3f} vs "
              f"{median(base, 'test_accuracy'):.3f}")
    ratios = [r["stage1"] / r["floor"] for r in ours]
    print(f"stage 1 / inference floor (decode once; {cfg.cache_views} train views, "
          f"{cfg.cache_views - 1} augmented, + val; floor measured before and after each "
          f"run: {', '.join(f'{a:.1f}/{b:.1f}s' for a, b in (r['floors'] for r in ours))}): "
          f"median {float(np.median(ratios)):.2f}")
    # Stage 1 is the caching passes (their one trace of the model included) plus
    # the head's fit; the floor traces outside its clock.
    print("of which caching / floor: " + ", ".join(
        f"{r['caching']:.1f}/{r['floor']:.1f} = {r['caching'] / r['floor']:.2f}" for r in ours)
        + "; head: " + ", ".join(f"{r['stage1'] - r['caching']:.1f}s" for r in ours))


if __name__ == "__main__":
    main()
