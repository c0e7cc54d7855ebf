"""Is the input pipeline ever the bottleneck? Images/s of the pipeline vs the model.

Measures, in one process on the same machine:
  1. the pipeline alone: a cold pass (read, decode, resize, fill the cache)
     and a warm pass (from the cache, shuffled, augmented, batched);
  2. the model's own speed on in-memory tensors (no pipeline at all):
     a stage-2 training step (top blocks unfrozen) and a stage-1 feature
     extraction step (inference, what each cached view costs);
  3. the same two steps fed by the warm pipeline.
and prints the ratios (pipeline / model, fed / in-memory; goal >= 0.9) and
the peak resident memory of the process.

Each phase is timed in wall-clock seconds and in CPU seconds of this process
(all its threads). On a machine shared with other jobs, wall-clock rates
measure the contention as much as the code; CPU-seconds per image do not, so
the script also prints the ratio they project for a dedicated machine with
this many cores: training fed by the pipeline runs at
cpu(model) / (cpu(model) + cpu(pipeline)) of its in-memory speed when both
keep every core busy.

Run from the repo root (defaults: MobileNetV2-0.35 at 160 px over
../shared/data/flowers128, 4317 files):
  python benchmarks/input_pipeline.py
  python benchmarks/input_pipeline.py --cache_ram_mb=0   # all spilled to disk
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
SHARED = os.path.join(os.path.dirname(REPO), "shared", "data")

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras.data import augment  # noqa: E402
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib  # noqa: E402
from tl_keras.model import families as families_lib


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux


CPU: dict[str, float] = {}


def timed(fn, name: str = "") -> float:
    """Runs fn; returns wall seconds and records its CPU seconds under `name`."""
    c0, t0 = time.process_time(), time.perf_counter()
    fn()
    wall = time.perf_counter() - t0
    if name:
        CPU[name] = time.process_time() - c0
    return wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=os.path.join(SHARED, "flowers128"))
    ap.add_argument("--image_size", type=int, default=160)
    ap.add_argument("--alpha", type=float, default=0.35)
    ap.add_argument("--weights", default=os.path.join(
        SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"))
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--finetune_blocks", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20, help="timed steps per measurement")
    ap.add_argument("--cache_ram_mb", type=float, default=2048)
    args = ap.parse_args()
    keras.utils.set_random_seed(0)
    bs, size = args.batch_size, args.image_size

    classes, sources = sources_lib.load_sources(args.data)
    split = sources["train"]
    n = len(split)
    print(f"data: {args.data} ({n} files, {len(classes)} classes), {size}px, batch {bs}, "
          f"{os.cpu_count()} CPUs, TF {tf.__version__}")
    print(f"peak RSS after start: {peak_rss_mb():.0f} MiB")

    # --- the model --------------------------------------------------------------
    family = families_lib.get_family("mobilenet_v2")
    backbone = families_lib.build_backbone(family, args.weights, size, args.alpha)
    clf = model_lib.build_classifier(backbone, family, len(classes))
    blocks_lib.set_trainable_top_blocks(clf.backbone, family, args.finetune_blocks)
    clf.model.compile(optimizer=keras.optimizers.Adam(1e-4),
                      loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1))
    aug = augment.build_augmenter(True, 10.0, 0.1, 0.1, seed=0)

    # --- 1. the pipeline alone ---------------------------------------------------
    with tempfile.TemporaryDirectory() as cache_dir:
        budget = data_pipeline.CacheBudget(args.cache_ram_mb, cache_dir)
        images = data_pipeline.image_dataset(split, size, budget=budget, name="train", order_seed=0)
        cold = timed(lambda: [None for _ in images.batch(bs)], "cold")
        print(f"cache plan: {budget.plan['train']}")
        train = data_pipeline.batched(images, bs, len(classes), shuffle=True, seed=0, augment=aug)
        warm = timed(lambda: [None for _ in train], "warm")
        pipe_cold, pipe_warm = n / cold, n / warm
        print(f"pipeline, cold pass (read+decode+resize+cache): {pipe_cold:8.1f} images/s")
        print(f"pipeline, warm pass (cache+shuffle+augment):    {pipe_warm:8.1f} images/s")
        print(f"peak RSS after the pipeline passes: {peak_rss_mb():.0f} MiB")

        # --- 2. the model on in-memory tensors ----------------------------------------
        x, y = next(iter(train))
        x, y = tf.constant(x), tf.constant(y)
        mem = tf.data.Dataset.from_tensors((x, y)).repeat()
        k = args.steps
        clf.model.fit(mem, epochs=1, steps_per_epoch=3, verbose=0)  # trace + warm up
        t_mem = timed(lambda: clf.model.fit(mem, epochs=1, steps_per_epoch=k, verbose=0),
                      "train_mem")
        infer = keras.Model(clf.model.inputs, clf.features.outputs)
        infer.predict_on_batch(x)
        t_inf_mem = timed(lambda: [infer.predict_on_batch(x) for _ in range(k)], "infer_mem")
        train_mem, inf_mem = k * bs / t_mem, k * bs / t_inf_mem
        print(f"model, training step on in-memory tensors:      {train_mem:8.1f} images/s")
        print(f"model, feature extraction on in-memory tensors: {inf_mem:8.1f} images/s")

        # --- 3. the model fed by the pipeline -------------------------------------------
        fed = train.repeat()
        clf.model.fit(fed, epochs=1, steps_per_epoch=3, verbose=0)
        t_fed = timed(lambda: clf.model.fit(fed, epochs=1, steps_per_epoch=k, verbose=0),
                      "train_fed")
        views = data_pipeline.batched(images, bs, len(classes), augment=aug).repeat()

        def extract():
            it = iter(views)
            for _ in range(k):
                infer.predict_on_batch(next(it)[0])

        extract()
        t_inf_fed = timed(extract, "infer_fed")
        train_fed, inf_fed = k * bs / t_fed, k * bs / t_inf_fed
        print(f"training fed by the pipeline:                   {train_fed:8.1f} images/s")
        print(f"feature extraction fed by the pipeline:         {inf_fed:8.1f} images/s")
        budget.cleanup()

    per = {"cold": n, "warm": n, "train_mem": k * bs, "infer_mem": k * bs,
           "train_fed": k * bs, "infer_fed": k * bs}
    ms = {name: 1000 * CPU[name] / per[name] for name in per}
    print("CPU milliseconds per image (all threads of this process):")
    for name, label in (("cold", "pipeline, cold pass"), ("warm", "pipeline, warm pass"),
                        ("train_mem", "training step, in memory"),
                        ("infer_mem", "feature extraction, in memory"),
                        ("train_fed", "training step, fed"),
                        ("infer_fed", "feature extraction, fed")):
        print(f"  {label:32s} {ms[name]:8.2f}")
    print(f"load average during the run: {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs "
          "(wall-clock ratios below are only meaningful on an otherwise idle machine)")
    print("projected for a dedicated machine, from CPU time (goal >= 0.9):")
    print(f"  training fed / training in memory:          "
          f"{ms['train_mem'] / (ms['train_mem'] + ms['warm']):6.2f}")
    print(f"  extraction fed / extraction in memory:      "
          f"{ms['infer_mem'] / (ms['infer_mem'] + ms['warm']):6.2f}")
    print("measured wall-clock ratios (goal >= 0.9):")
    print(f"  warm pipeline / training step:              {pipe_warm / train_mem:6.2f}")
    print(f"  warm pipeline / feature extraction:         {pipe_warm / inf_mem:6.2f}")
    print(f"  training fed / training in memory:          {train_fed / train_mem:6.2f}")
    print(f"  extraction fed / extraction in memory:      {inf_fed / inf_mem:6.2f}")
    print(f"peak RSS: {peak_rss_mb():.0f} MiB "
          f"(decoded images: {n * size * size * 3 / 2 ** 20:.0f} MiB)")


if __name__ == "__main__":
    main()
