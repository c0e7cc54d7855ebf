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

Usage: python benchmarks/vs_recipe.py [--data DIR] [--weights FILE] [--skip_recipe]
       [--repeats N]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras import Config
from tl_keras.data import augment  # noqa: E402
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.model import classifier as model_lib  # noqa: E402
from tl_keras.model import families as families_lib
from tl_keras.run import image as pipeline  # noqa: E402
from tl_keras.train import features  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))
SIZE, ALPHA, SEED, BATCH = 160, 0.35, 42, 32


def materialize(split: sources_lib.Split, classes: list[str], root: str) -> str:
    """Symlinks a split into ROOT/CLASS/ so image_dataset_from_directory sees it."""
    for path, label in zip(split.items, split.labels):
        d = os.path.join(root, classes[label])
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(d, os.path.basename(path)))
    return root


def recipe(dirs: dict, weights: str, n_cls: int) -> dict:
    """The TensorFlow tutorial's transfer-learning recipe, adapted to n classes.

    Its total runs from listing the files to the test accuracy (datasets,
    model, both fits, evaluation), like tl_keras's, which also writes its
    reports and model file inside its total.
    """
    t_start = time.perf_counter()
    keras.utils.set_random_seed(SEED)
    kw = dict(batch_size=BATCH, image_size=(SIZE, SIZE), seed=SEED, label_mode="int")
    train_ds = keras.utils.image_dataset_from_directory(dirs["train"], shuffle=True, **kw)
    val_ds = keras.utils.image_dataset_from_directory(dirs["val"], shuffle=False, **kw)
    test_ds = keras.utils.image_dataset_from_directory(dirs["test"], shuffle=False, **kw)
    train_ds = train_ds.prefetch(tf.data.AUTOTUNE)
    val_ds = val_ds.prefetch(tf.data.AUTOTUNE)
    augmentation = keras.Sequential([keras.layers.RandomFlip("horizontal"),
                                     keras.layers.RandomRotation(0.2)])
    base = keras.applications.MobileNetV2(input_shape=(SIZE, SIZE, 3), include_top=False,
                                          weights=weights, alpha=ALPHA)
    base.trainable = False
    inputs = keras.Input((SIZE, SIZE, 3))
    x = augmentation(inputs)
    x = keras.layers.Rescaling(1.0 / 127.5, offset=-1)(x)  # mobilenet_v2.preprocess_input
    x = base(x, training=False)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dropout(0.2)(x)
    outputs = keras.layers.Dense(n_cls, activation="softmax")(x)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(1e-4),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train_ds, epochs=10, validation_data=val_ds, verbose=0)
    t1 = time.perf_counter() - t0
    base.trainable = True
    for layer in base.layers[:100]:
        layer.trainable = False
    model.compile(optimizer=keras.optimizers.RMSprop(1e-5),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    t0 = time.perf_counter()
    model.fit(train_ds, epochs=20, initial_epoch=10, validation_data=val_ds, verbose=0)
    t2 = time.perf_counter() - t0
    _, acc = model.evaluate(test_ds, verbose=0)
    return {"stage1": t1, "stage2": t2, "total": time.perf_counter() - t_start,
            "test_accuracy": float(acc)}


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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=os.path.join(SHARED, "flowers"))
    ap.add_argument("--weights", default=os.path.join(
        SHARED, "weights", "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"))
    ap.add_argument("--skip_recipe", action="store_true")
    ap.add_argument("--repeats", type=int, default=1,
                    help="alternate the two runs this many times (medians compared)")
    args = ap.parse_args()

    work = tempfile.mkdtemp(prefix="tl_keras_bench_")
    rows: list[tuple[str, dict]] = []
    try:
        cfg = Config(data=args.data, test_fraction=0.25, backbone="mobilenet_v2", alpha=ALPHA,
                     image_size=SIZE, weights=args.weights, seed=SEED, export=False,
                     output_dir=os.path.join(work, "out"))
        data = sources_lib.load_dataset(
                                        sources_lib.DataSpec(data=cfg.data,
                                                             test_fraction=cfg.test_fraction,
                                                             val_fraction=cfg.val_fraction,
                                                             seed=cfg.seed))
        dirs = {k: materialize(getattr(data, s), data.class_names, os.path.join(work, k))
                for k, s in (("train", "train"), ("val", "val"), ("test", "test"))}
        for i in range(max(args.repeats, 1)):
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
