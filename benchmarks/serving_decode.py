"""What the in-graph header checks and Pillow-equal decoding (issue 21) cost when serving.

In one process, on the same machine, the same model is exported twice:
  before: `serving_default` decoding with `tf.io.decode_image` + resize, as
          every export did before issue 21 (commit a141e6d);
  after:  the current export (`tl_keras.data.decode`: header read first,
          EXIF orientation, alpha on white, 16-bit, index-naming refusals).
Both are called in turn on the same normal JPEG (a flowers photo, and the same
photo at 1600x1200) through `serving_default`, many times; the medians of
wall-clock and process CPU seconds per request give the ratio after / before.
Models: MobileNetV2-0.35 at 160 px (the flowers recipe; the model dominates)
and a tiny one (1 conv), which leaves the decoding cost almost alone.

It also measures, in fresh processes, the peak resident memory of serving a
request holding a 16000x16000 PNG (1 MB, 768 MB decoded) against a normal
request: with the current export (refused from its header), and with the
"before" export (decoded) as the control that shows the probe sees memory.
And the tf.data decode + resize rate of the 1000 flowers JPEGs, before / after.

Run from the repo root:
  python benchmarks/serving_decode.py            # about 3 minutes on 2 cores
  python benchmarks/serving_decode.py --reps 100 --no_control
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
SHARED = REPO.parent / "shared" / "data"
WEIGHTS = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"

import keras  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras.data import decode as decode_lib  # noqa: E402
from tl_keras.export import saved_model as export_lib  # noqa: E402
from tl_keras.model.layers import Preprocess  # noqa: E402

CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def old_decode_and_resize(data, size, *unused, **unused_kw):
    """The decoding every export used before issue 21."""
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return decode_lib.resize_image(image, size)


def export(model, size: int, path: str, before: bool) -> str:
    saved = decode_lib.decode_and_resize
    if before:
        decode_lib.decode_and_resize = old_decode_and_resize
    try:
        export_lib.write_saved_model(model, CLASSES, size, path)
    finally:
        decode_lib.decode_and_resize = saved
    return path


def models():
    tiny_in = keras.Input((64, 64, 3))
    x = Preprocess("tf")(tiny_in)
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(x)
    tiny = keras.Model(tiny_in, keras.layers.Dense(5, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(x)))
    base = keras.applications.MobileNetV2(input_shape=(160, 160, 3), alpha=0.35,
                                          include_top=False, weights=str(WEIGHTS))
    inp = keras.Input((160, 160, 3))
    y = base(keras.applications.mobilenet_v2.preprocess_input(inp))
    mnv2 = keras.Model(inp, keras.layers.Dense(5, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(y)))
    return {"tiny_64px": (tiny, 64), "mobilenet_v2_0.35_160px": (mnv2, 160)}


def latency(before_fn, after_fn, raw: bytes, reps: int) -> dict:
    feed = tf.constant([raw])
    for fn in (before_fn, after_fn):
        for _ in range(5):
            fn(image_bytes=feed)
    times = {"before": [], "after": []}
    cpu = {"before": [], "after": []}
    for i in range(reps):
        # Alternate the order so drift on a shared machine hits both alike.
        order = (("before", before_fn), ("after", after_fn))
        for name, fn in (order if i % 2 == 0 else order[::-1]):
            t, c = time.perf_counter(), time.process_time()
            fn(image_bytes=feed)["probabilities"].numpy()
            times[name].append(time.perf_counter() - t)
            cpu[name].append(time.process_time() - c)
    med = {k: statistics.median(v) for k, v in times.items()}
    med_cpu = {k: statistics.median(v) for k, v in cpu.items()}
    return {"reps": reps, "before_ms": round(med["before"] * 1e3, 3),
            "after_ms": round(med["after"] * 1e3, 3),
            "ratio": round(med["after"] / med["before"], 3),
            "before_cpu_ms": round(med_cpu["before"] * 1e3, 3),
            "after_cpu_ms": round(med_cpu["after"] * 1e3, 3),
            "cpu_ratio": round(med_cpu["after"] / max(med_cpu["before"], 1e-9), 3)}


def pipeline_rate(files: list[str], size: int, reps: int = 3) -> dict:
    def rate(fn):
        ds = tf.data.Dataset.from_tensor_slices(files).map(
            lambda f: fn(tf.io.read_file(f), size), num_parallel_calls=tf.data.AUTOTUNE)
        t = time.perf_counter()
        for _ in ds:
            pass
        return len(files) / (time.perf_counter() - t)

    out = {"before": [], "after": []}
    for _ in range(reps):
        out["before"].append(rate(old_decode_and_resize))
        out["after"].append(rate(decode_lib.decode_and_resize))
    med = {k: statistics.median(v) for k, v in out.items()}
    return {"images": len(files), "before_img_s": round(med["before"], 1),
            "after_img_s": round(med["after"], 1),
            "ratio": round(med["after"] / med["before"], 3)}


def memory(path: str, good: str, bomb: str) -> dict:
    from test_served_as_trained import MEMORY_PROBE

    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, path, good, bomb],
                          capture_output=True, text=True, timeout=900,
                          env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    return {"normal_peak_mib": round(mem["normal_peak_mib"], 1),
            "bomb_peak_mib": round(mem["bomb_peak_mib"], 1),
            "extra_peak_mib": round(mem["bomb_peak_mib"] - mem["normal_peak_mib"], 1),
            "refused": bool(mem["error"]), "served_after": mem["served_after"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=300)
    parser.add_argument("--no_control", action="store_true",
                        help="skip decoding the bomb with the 'before' export (~1 GB, seconds)")
    parser.add_argument("--out", default="", help="also write the results as JSON here")
    args = parser.parse_args()

    import odd_images
    from PIL import Image

    photo = sorted((SHARED / "flowers" / "daisy").glob("*.jpg"))[0]
    work = Path(tempfile.mkdtemp(prefix="serving_decode-"))
    big = work / "big.jpg"
    Image.open(photo).convert("RGB").resize((1600, 1200)).save(big, "JPEG", quality=90)
    results: dict = {"photo": str(photo), "latency": {}}
    exports = {}
    for name, (model, size) in models().items():
        before = export(model, size, str(work / f"{name}-before"), before=True)
        after = export(model, size, str(work / f"{name}-after"), before=False)
        exports[name] = (before, after)
        fns = [tf.saved_model.load(p).signatures["serving_default"] for p in (before, after)]
        for label, raw in (("photo", photo.read_bytes()), ("1600x1200", big.read_bytes())):
            r = latency(*fns, raw, args.reps)
            results["latency"][f"{name} {label}"] = r
            print(f"{name:26s} {label:10s} median before {r['before_ms']:8.3f} ms, after "
                  f"{r['after_ms']:8.3f} ms: ratio {r['ratio']:.3f} (CPU {r['cpu_ratio']:.3f})",
                  flush=True)

    files = sorted(str(p) for p in (SHARED / "flowers").rglob("*.jpg"))
    results["pipeline"] = pipeline_rate(files, 160)
    print(f"tf.data decode+resize of {len(files)} flowers JPEGs at 160 px: before "
          f"{results['pipeline']['before_img_s']} img/s, after "
          f"{results['pipeline']['after_img_s']} img/s: ratio {results['pipeline']['ratio']}",
          flush=True)

    bomb = odd_images.png_bomb(work / "bomb.png")
    before, after = exports["tiny_64px"]
    results["memory"] = {"after": memory(after, str(photo), str(bomb))}
    if not args.no_control:
        results["memory"]["before (control)"] = memory(before, str(photo), str(bomb))
    for k, m in results["memory"].items():
        print(f"bomb request vs normal request, {k}: peak {m['bomb_peak_mib']} vs "
              f"{m['normal_peak_mib']} MiB (+{m['extra_peak_mib']} MiB), refused "
              f"{m['refused']}, next request served {m['served_after'] == 1}", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
