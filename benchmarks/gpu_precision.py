"""Images per second of both stages, float32 against mixed precision (issue 4).

For each backbone and each precision policy, the policy is set before the
model is built (as `precision.apply` does) and tl_keras's own builders make
the model: `families_lib.build_backbone`, `model.build_classifier`,
`blocks_lib.set_trainable_top_blocks` with the default share of blocks, and
`activations.cut`. Then it times:

  stage 1 caching   the one inference pass per view (`cut.joint`: activations
                    below the unfrozen blocks and pooled features), at the
                    inference batch (twice the training batch);
  stage 1 head      training steps of the head on cached features
                    (AdamW, as `train.fit_head`);
  stage 2 cached    training steps of the top part on cached activations
                    (`cut.trainer`, Adam, as `train.fit_finetune`): the
                    default stage 2;
  stage 2 full      training steps of the full model with the top blocks
                    unfrozen: the fallback when the activations do not fit.

Inputs are random and already on the device, so the figures are the model's
compute, not the input pipeline. Weights are random (`weights=None`): speed
does not depend on their values. Under mixed_float16 Keras wraps the
optimizer in a LossScaleOptimizer, as it does in tl_keras's own compile.

The script only uses Keras, so it runs on any Keras backend: the lent GPU
machine has no TensorFlow (and its wheel is far over what can be carried
there), so its figures in benchmarks/README.md come from KERAS_BACKEND=jax,
where every step is XLA-compiled.

Usage:
    KERAS_BACKEND=jax python benchmarks/gpu_precision.py [--batch 128]
        [--steps 20] [--models mobilenet_v2:0.35:160,mobilenet_v2:1.0:224]
        [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib  # noqa: E402
from tl_keras.model import families as families_lib
from tl_keras.train import activations  # noqa: E402

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
CLASSES = 5


def _device_name() -> str:
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        d = jax.devices()[0]
        return f"{d.platform}: {getattr(d, 'device_kind', d)}"
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        return "gpu" if gpus else "cpu"
    if backend == "torch":
        import torch

        return torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu"
    return backend


def _rate(fn, batch: int, steps: int, warmup: int = 2) -> float:
    """Images per second of `fn` (one batch per call, synchronous)."""
    for _ in range(warmup):  # compile and autotune outside the clock
        fn()
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return batch * steps / (time.perf_counter() - t0)


def measure(family_name: str, alpha: float, size: int, policy: str, batch: int,
            steps: int) -> dict:
    """Images/s of the four parts for one backbone under one policy."""
    keras.backend.clear_session()
    keras.mixed_precision.set_global_policy(policy)
    family = families_lib.get_family(family_name)
    backbone = families_lib.build_backbone(family, "none", size, alpha)
    clf = model_lib.build_classifier(backbone, family, CLASSES)
    n_blocks = blocks_lib.num_blocks(backbone, family)
    top = blocks_lib.auto_finetune_blocks(n_blocks)
    cut = activations.cut(clf, top)
    if cut is None:
        raise SystemExit(f"{family_name}: no single boundary below the top {top} blocks")

    rng = np.random.default_rng(0)
    inf_batch = 2 * batch
    images = keras.ops.convert_to_tensor(
        rng.integers(0, 256, (inf_batch, size, size, 3)).astype("float32"))
    train_images = images[:batch]
    y = keras.ops.convert_to_tensor(np.eye(CLASSES, dtype="float32")[
        rng.integers(0, CLASSES, batch)])
    acts = keras.ops.convert_to_tensor(
        rng.standard_normal((batch, *cut.shape)).astype("float32"))
    feats = keras.ops.convert_to_tensor(
        rng.standard_normal((batch, clf.head.input_shape[-1])).astype("float32"))

    row = {"backbone": family_name, "alpha": alpha, "size": size, "policy": policy,
           "batch": batch, "inference_batch": inf_batch, "unfrozen_blocks": top,
           "activations": list(cut.shape)}
    row["stage1_caching"] = _rate(lambda: cut.joint.predict_on_batch(images), inf_batch, steps)

    clf.head.compile(optimizer=keras.optimizers.AdamW(1e-3), loss="categorical_crossentropy")
    row["stage1_head"] = _rate(lambda: clf.head.train_on_batch(feats, y), batch, steps)

    blocks_lib.set_trainable_top_blocks(clf.backbone, family, top)
    cut.trainer.compile(optimizer=keras.optimizers.Adam(3e-4), loss="categorical_crossentropy")
    row["stage2_cached"] = _rate(lambda: cut.trainer.train_on_batch(acts, y), batch, steps)
    clf.model.compile(optimizer=keras.optimizers.Adam(3e-4), loss="categorical_crossentropy")
    row["stage2_full"] = _rate(lambda: clf.model.train_on_batch(train_images, y), batch, steps)
    out_dtype = keras.ops.convert_to_numpy(clf.model.predict_on_batch(train_images[:2])).dtype
    row["output_dtype"] = str(out_dtype)
    return row


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="mobilenet_v2:0.35:160,mobilenet_v2:1.0:224,"
                    "resnet50:0:224", help="family:alpha:size, comma-separated")
    ap.add_argument("--policies", default=",".join(POLICIES))
    ap.add_argument("--batch", type=int, default=128, help="training batch")
    ap.add_argument("--steps", type=int, default=20, help="timed batches per figure")
    ap.add_argument("--json", default="", help="also write the rows here, after each one")
    args = ap.parse_args()

    device = _device_name()
    print(f"Keras {keras.__version__}, backend {keras.backend.backend()}, device {device}; "
          f"training batch {args.batch}, inference batch {2 * args.batch}, "
          f"{args.steps} timed batches each", flush=True)
    cols = ("stage1_caching", "stage1_head", "stage2_cached", "stage2_full")
    print(f"{'backbone':<26}{'policy':<16}" + "".join(f"{c:>16}" for c in cols), flush=True)
    rows = []
    for spec in args.models.split(","):
        name, alpha, size = spec.split(":")
        base = None
        for policy in args.policies.split(","):
            t0 = time.perf_counter()
            row = measure(name, float(alpha), int(size), policy, args.batch, args.steps)
            row["seconds"] = round(time.perf_counter() - t0, 1)
            row["device"] = device
            row["backend"] = keras.backend.backend()
            rows.append(row)
            base = base or row
            label = f"{name} {alpha}@{size}"
            print(f"{label:<26}{policy:<16}" + "".join(
                f"{row[c]:>10.0f} {row[c] / base[c]:>4.2f}x" for c in cols)
                + f"  ({row['seconds']}s, output {row['output_dtype']})", flush=True)
            if args.json:
                with open(args.json, "w") as f:
                    json.dump(rows, f, indent=1)
    print("images/s; Nx: against the first policy of the same backbone", flush=True)


if __name__ == "__main__":
    main()
