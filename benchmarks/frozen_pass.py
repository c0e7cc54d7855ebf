"""Frozen passes: TensorFlow vs the LiteRT engine (XNNPACK) on the CPU (issue 24).

Part 1, per backbone (pooled-features model, as stage 1 caches it; batch 64
of real flowers128 photos resized to the backbone's size):
  - images/s of TensorFlow (`predict_on_batch`, traced beforehand) and of the
    converted model in ai_edge_litert with XNNPACK, one thread per core;
  - conversion seconds, TensorFlow's first-batch (tracing) seconds;
  - the max abs difference of the outputs, and the largest output;
  - break-even images: where converting pays, (conversion + litert's first
    batch - TensorFlow's first batch) / (1/rate_tf - 1/rate_litert).

Part 2, the whole caching pass on 10,000 images (the flowers128 files
repeated): MobileNetV2-0.35 at 160 px with the real weights file, one view,
the model a run caches with (activations at the stage-2 cut of the top 4
blocks + pooled features), decoded and resized by tl_keras's tf.data pipeline
(cached in RAM as a run does), batch 64. TensorFlow ("today") vs LiteRT with
its conversion included; plus the decode pipeline alone, to see whether it
bounds the pass.

Usage (from the repo root):
  PYTHONPATH=. python3 benchmarks/frozen_pass.py [--images=10000] [--models=...]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras.core import cache as cache_lib  # noqa: E402
from tl_keras.data import pipeline as data_pipeline  # noqa: E402
from tl_keras.data import sources as sources_lib  # noqa: E402
from tl_keras.model import classifier as model_lib  # noqa: E402
from tl_keras.model import families as families_lib  # noqa: E402
from tl_keras.train import activations, engine, features  # noqa: E402

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
WEIGHTS = DATA / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
FLOWERS128 = DATA / "flowers128"
BATCH = 64
# label: (family, alpha, size, weights)
MODELS = {
    "mnv2_035_160": ("mobilenet_v2", 0.35, 160, str(WEIGHTS)),
    "mnv2_100_224": ("mobilenet_v2", 1.0, 224, "none"),
    "effnet_b0_224": ("efficientnet_b0", 0.0, 224, "none"),
    "resnet50_224": ("resnet50", 0.0, 224, "none"),
    # Beyond the issue's four: which families `auto` sends to LiteRT (engine.LITERT_FAMILIES).
    "mnv1_025_160": ("mobilenet", 0.25, 160,
                     str(DATA / "weights" / "mobilenet_2_5_224_tf_no_top.h5")),
    "mnv3_small_224": ("mobilenet_v3_small", 0.0, 224, "none"),
    "effnetv2_b0_224": ("efficientnet_v2_b0", 0.0, 224, "none"),
}


def flowers_files() -> list[str]:
    return sorted(str(p) for p in FLOWERS128.rglob("*") if p.is_file())


def classifier(family_name, alpha, size, weights):
    keras.utils.set_random_seed(0)
    fam = families_lib.get_family(family_name)
    bb = families_lib.build_backbone(fam, weights, size, alpha)
    return model_lib.build_classifier(bb, fam, 5, dropout=0.0)


def real_batch(size: int) -> np.ndarray:
    files = flowers_files()[:: max(1, len(flowers_files()) // BATCH)][:BATCH]
    split = sources_lib.Split(files, np.zeros(len(files), np.int64), "bench")
    ds = data_pipeline.image_dataset(split, size, cache=False).batch(BATCH)
    return np.asarray(next(iter(ds))[0], np.float32)


class Clock:
    """Wall seconds and CPU seconds of this process (all its threads) since start.

    Under load from other processes, wall-clock rates mostly measure them;
    CPU seconds per image are what the work costs, and project the rate of
    a dedicated machine (cores / CPU seconds per image, at full use).
    """

    def __init__(self):
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def read(self) -> tuple[float, float]:
        return time.perf_counter() - self.wall, time.process_time() - self.cpu


def rate(fn, x, min_seconds: float) -> tuple[float, float]:
    """(images/s, CPU ms per image) of fn(x), repeated for at least min_seconds (>= 2 calls)."""
    n, clock = 0, Clock()
    while n < 2 or clock.read()[0] < min_seconds:
        fn(x)
        n += 1
    wall, cpu = clock.read()
    return n * len(x) / wall, 1000 * cpu / (n * len(x))


def part1(names, min_seconds):
    print(f"part 1: frozen pass of the pooled-features model, batch {BATCH}, "
          f"{engine.cpu_threads()} threads; wall-clock img/s and CPU ms per image", flush=True)
    header = (f"{'model':<14} {'tf img/s':>8} {'litert':>7} {'ratio':>6} {'tf cpu ms':>9} "
              f"{'lt cpu ms':>9} {'cpu ratio':>9} {'convert s':>9} {'conv cpu s':>10} "
              f"{'max diff':>9} {'max |y|':>7} {'break-even':>10}")
    print(header, flush=True)
    rows = []
    for name in names:
        family, alpha, size, weights = MODELS[name]
        model = classifier(family, alpha, size, weights).features
        x = real_batch(size)
        clock = Clock()
        ref = model.predict_on_batch(x)
        tf_first = clock.read()[1]
        r_tf, c_tf = rate(model.predict_on_batch, x, min_seconds)
        clock = Clock()
        try:
            flat = engine.convert(model)
        except Exception as e:  # noqa: BLE001 - a family that does not convert: say so
            print(f"{name:<14} {r_tf:8.1f}  does not convert: {str(e).splitlines()[0][:120]}")
            continue
        conv_s, conv_cpu = clock.read()
        lt = engine.LiteRTModel(flat)
        out = lt.predict_on_batch(x)
        lt_first = clock.read()[1] - conv_cpu
        r_lt, c_lt = rate(lt.predict_on_batch, x, min_seconds)
        diff = float(np.abs(out - ref).max())
        # Break-even in CPU work: images after which converting has paid for itself.
        gain = (c_tf - c_lt) / 1000
        even = (conv_cpu + lt_first - tf_first) / gain if gain > 0 else float("inf")
        rows.append((name, r_tf, r_lt, conv_s, diff, even))
        print(f"{name:<14} {r_tf:8.1f} {r_lt:7.1f} {r_lt / r_tf:5.2f}x {c_tf:9.2f} {c_lt:9.2f} "
              f"{c_tf / c_lt:8.2f}x {conv_s:9.1f} {conv_cpu:10.1f} {diff:9.2e} "
              f"{np.abs(ref).max():7.2f} {even:10.0f}", flush=True)
    return rows


def part2(n_images: int):
    files = flowers_files()
    items = (files * (n_images // len(files) + 1))[:n_images]
    split = sources_lib.Split(items, np.zeros(n_images, np.int64), "flowers128 x")
    size = 160
    clf = classifier("mobilenet_v2", 0.35, size, str(WEIGHTS))
    cut = activations.cut(clf, 4)
    print(f"\npart 2: caching pass over {n_images} images ({len(files)} flowers128 files "
          f"repeated), MobileNetV2-0.35 at {size} px, activations {cut.shape} + pooled "
          f"features, batch {BATCH}", flush=True)

    # The decode pipeline alone: what bounds the pass from below.
    clock = Clock()
    for _ in data_pipeline.image_dataset(split, size, cache=False).batch(BATCH):
        pass
    decode_s, decode_cpu = clock.read()
    print(f"decode + resize alone: {decode_s:.1f}s ({n_images / decode_s:.0f} img/s), "
          f"{1000 * decode_cpu / n_images:.2f} CPU ms/img", flush=True)

    results = {}
    for name in ("tensorflow", "litert"):
        clock = Clock()
        predict = None
        conv = 0.0
        if name == "litert":
            # No disk cache: the conversion is part of the pass, as on a first run.
            eng = engine.FrozenEngine("litert", n_images, cache_lib.ArrayCache(""), {},
                                      log=lambda s: None)
            predict = eng.predictor(cut.joint)
            conv = clock.read()[0]
        images = data_pipeline.image_dataset(split, size)
        (a, f), _, pass_s = features.extract(cut.joint, images, BATCH, progress=False,
                                             predict=predict)
        total, cpu = clock.read()
        results[name] = (total, cpu, f, a)
        print(f"{name:<10} whole pass {total:6.1f}s ({n_images / total:5.0f} img/s), "
              f"{cpu:6.1f} CPU s ({1000 * cpu / n_images:.2f} CPU ms/img); conversion "
              f"{conv:4.1f}s; pass alone {pass_s:6.1f}s ({n_images / pass_s:5.0f} img/s)",
              flush=True)
    (t_tf, c_tf, f_tf, a_tf), (t_lt, c_lt, f_lt, a_lt) = results["tensorflow"], results["litert"]
    print(f"ratio tensorflow / litert, whole pass with conversion: {t_tf / t_lt:.2f}x wall, "
          f"{c_tf / c_lt:.2f}x CPU; max abs diff features {np.abs(f_tf - f_lt).max():.2e}, "
          f"activations {np.abs(a_tf - a_lt).max():.2e}")
    cores = engine.cpu_threads()
    print(f"projected on a dedicated {cores}-core machine (CPU s / cores): tensorflow "
          f"{c_tf / cores:.1f}s, litert {c_lt / cores:.1f}s; decode + resize alone "
          f"{decode_cpu / cores:.1f}s of them")
    return t_tf / t_lt


def main(argv):
    p = argparse.ArgumentParser()
    p.add_argument("--models", default=",".join(MODELS),
                   help="comma-separated labels of MODELS (empty: none)")
    p.add_argument("--images", type=int, default=10000)
    p.add_argument("--min_seconds", type=float, default=4.0)
    args = p.parse_args(argv)
    print(f"load: {os.getloadavg()}, cores: {os.cpu_count()}, TF {tf.__version__}", flush=True)
    if args.models:
        part1([m for m in args.models.split(",") if m], args.min_seconds)
    if args.images:
        part2(args.images)
    print(f"load: {os.getloadavg()}")


if __name__ == "__main__":
    main(sys.argv[1:])
