"""Where a run leaves the CPU idle: tl_keras on the shared flowers with a CPU sampler.

Each run trains with `vs_recipe.py`'s settings (MobileNetV2-0.35 at 160 px,
seed 42, every other flag at its default, no export) in a fresh process,
while a thread samples every 0.25 s how many cores the process used and how
many of the machine's cores were idle (`/proc/stat`: idle + I/O wait) or
stolen by the host. It prints, per run, the stretches where the whole
machine sat idle, split into those inside stage 1 (first caching pass to the
head's last epoch) and elsewhere.

This is how the waits in tf.data's iterator destructor were found (see
`data.steady`). `--autotune` runs with tf.data's autotuning left on (as
before that fix), for comparison; `--recipe` samples the TensorFlow
tutorial's recipe as `vs_recipe.py` runs it (its "stage 1" is its first fit),
whose Keras pipelines keep autotuning on.

Usage: python benchmarks/cpu_timeline.py [--runs N] [--autotune | --recipe] [--data DIR]
Linux only (reads /proc/stat).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
WEIGHTS = os.path.join(SHARED, "weights",
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
PERIOD = 0.25


def _machine() -> tuple[int, int, int]:
    """(idle + iowait, steal, total) jiffies over all cores."""
    with open("/proc/stat", encoding="ascii") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[3] + v[4], v[7], sum(v)


def one_run(data: str, autotune: bool, recipe: bool = False) -> dict:
    """Trains once in this process and returns the samples and the stage-1 window."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, os.path.join(HERE, ".."))
    sys.path.insert(0, HERE)
    from tl_keras import Config
    from tl_keras.data import pipeline as data_pipeline
    from tl_keras.data import sources as sources_lib
    from tl_keras.run import image as pipeline
    from tl_keras.train import features
    from tl_keras.train import stages as train_lib

    samples, marks, t0 = [], {}, time.perf_counter()
    cores = os.cpu_count() or 1

    def sampler():
        last = (time.perf_counter(), time.process_time(), _machine())
        while True:
            time.sleep(PERIOD)
            now = (time.perf_counter(), time.process_time(), _machine())
            jiffies = max(now[2][2] - last[2][2], 1)
            samples.append((now[0] - t0, (now[1] - last[1]) / (now[0] - last[0]),
                            (now[2][0] - last[2][0]) / jiffies * cores,
                            (now[2][1] - last[2][1]) / jiffies * cores))
            last = now

    def mark(fn, start=None, end=None):
        """`fn`, noting when its first call starts and ends under those names."""
        def wrapped(*a, **k):
            if start:
                marks.setdefault(start, time.perf_counter() - t0)
            out = fn(*a, **k)
            if end:
                marks.setdefault(end, time.perf_counter() - t0)
            return out
        return wrapped

    threading.Thread(target=sampler, daemon=True).start()
    work = tempfile.mkdtemp(prefix="tl_keras_cpu_")
    try:
        if recipe:  # the tutorial's recipe as vs_recipe.py runs it; its stage 1 is its first fit
            import keras
            import vs_recipe

            keras.Model.fit = mark(keras.Model.fit, "stage1_start", "stage1_end")
            ds = sources_lib.load_dataset(
                                          sources_lib.DataSpec(data=data, test_fraction=0.25,
                                                               val_fraction=0.2, seed=42))
            dirs = {k: vs_recipe.materialize(getattr(ds, k), ds.class_names,
                                             os.path.join(work, k))
                    for k in ("train", "val", "test")}
            stage1 = vs_recipe.recipe(dirs, WEIGHTS, len(ds.class_names))["stage1"]
        else:
            if autotune:
                data_pipeline.steady = lambda ds: ds  # the pipelines as they were before the fix
            features.extract = mark(features.extract, start="stage1_start")
            train_lib.fit_head = mark(train_lib.fit_head, end="stage1_end")
            cfg = Config(data=data, test_fraction=0.25, backbone="mobilenet_v2", alpha=0.35,
                         image_size=160, weights=WEIGHTS, seed=42, export=False,
                         output_dir=os.path.join(work, "out"))
            stage1 = pipeline.train(cfg)["stage1"]["seconds"]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return {"samples": samples, "marks": marks, "cores": cores, "stage1_seconds": stage1,
            "total": time.perf_counter() - t0}


def idle_stretches(samples: list, cores: int) -> list[tuple[float, float]]:
    """(start, seconds) of consecutive samples with the whole machine idle."""
    out, start = [], None
    for t, used, idle, _ in samples:
        quiet = used < 0.1 and idle >= cores - 0.2
        if quiet and start is None:
            start = t - PERIOD
        elif not quiet and start is not None:
            out.append((start, t - PERIOD - start))
            start = None
    if start is not None:
        out.append((start, samples[-1][0] - start))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--autotune", action="store_true",
                    help="leave tf.data's autotuning on (as before data.steady)")
    ap.add_argument("--recipe", action="store_true",
                    help="sample the tutorial's recipe (vs_recipe.py) instead of tl_keras")
    ap.add_argument("--data", default=os.path.join(SHARED, "flowers"))
    ap.add_argument("--one", default="", help=argparse.SUPPRESS)  # internal: one run -> FILE
    args = ap.parse_args()
    if args.one:
        with open(args.one, "w", encoding="utf-8") as f:
            json.dump(one_run(args.data, args.autotune, args.recipe), f)
        return

    with_idle = 0
    for i in range(args.runs):
        with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
            path = tmp.name
        try:
            subprocess.run([sys.executable, os.path.abspath(__file__), "--one", path,
                            "--data", args.data] + (["--autotune"] if args.autotune else [])
                           + (["--recipe"] if args.recipe else []),
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(path, encoding="utf-8") as f:
                r = json.load(f)
        finally:
            os.remove(path)
        a, b = r["marks"]["stage1_start"], r["marks"]["stage1_end"]
        stretches = idle_stretches(r["samples"], r["cores"])
        inside = [(s, d) for s, d in stretches if s < b and s + d > a]
        outside = [(s, d) for s, d in stretches if (s, d) not in inside]
        with_idle += bool(inside)
        fmt = lambda xs: ", ".join(f"{d:.2f}s at {s:.1f}s" for s, d in xs) or "none"  # noqa: E731
        print(f"run {i + 1}: total {r['total']:.1f}s, stage 1 {a:.1f}-{b:.1f}s "
              f"({r['stage1_seconds']:.1f}s); machine idle in stage 1: {fmt(inside)}; "
              f"elsewhere: {fmt(outside)}", flush=True)
    what = ("the tutorial's recipe" if args.recipe else "tf.data autotuning "
            + ("on" if args.autotune else "off (data.steady)"))
    print(f"{what}: idle stretches in stage 1 in {with_idle} of {args.runs} runs")


if __name__ == "__main__":
    main()
