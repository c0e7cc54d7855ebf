"""Transfer from your own source model vs the same architecture from scratch.

Offline, on the shared flowers128 photos (5 classes, 128 px):

1. Source task A: `tl_keras.pretrain` trains the compact CNN from scratch
   on all images of three classes (a tenth held out for validation).
2. Target task B, the other two classes, with 10 labelled images per class
   (8 train + 2 validation), drawn anew for each seed; every other image of
   the two classes is the test set:
   (a) transfer: `tl_keras.run.image.train --backbone=A/model.keras` with its
       defaults, i.e. a linear probe on the frozen source features (stage 1),
       then stage 2 on its top blocks (kept only if it validates better);
   (b) scratch: the same architecture trained from scratch on the same
       labelled images by `tl_keras.pretrain` (batch 4, 40 epochs), same
       augmentation, keeping the epoch that validates best.
   Both are evaluated without test-time mirroring (pretrain has none).
3. Prints each seed's test accuracies, then the mean, standard deviation and
   range of both and the gain.

Usage:
  python benchmarks/source_transfer.py [--data DIR] [--source_classes daisy,dandelion,rose]
      [--seeds 5] [--shots 10] [--image_size 64] [--pretrain_epochs 6] [--work DIR]
      [--verbose]

Measured (docs/source_transfer.md): transfer 0.771 +- 0.011, scratch 0.660 +- 0.044,
gain +0.111 +- 0.037 over 5 seeds.

With --work, the source model is kept and reused by later runs with the same
settings (delete the folder to pretrain again).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import keras  # noqa: E402
import numpy as np  # noqa: E402

from tl_keras import Config
from tl_keras.data import sources as sources_lib
from tl_keras.run import image as pipeline  # noqa: E402
from tl_keras.run import pretrain  # noqa: E402

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.normpath(os.path.join(HERE, "..", "..", "shared", "data"))


def link_split(paths: list[str], labels: np.ndarray, classes: list[str], root: str) -> str:
    """Symlinks images into ROOT/CLASS/ (a class-folder source tl_keras reads)."""
    for path, label in zip(paths, labels):
        d = os.path.join(root, classes[label])
        os.makedirs(d, exist_ok=True)
        os.symlink(os.path.abspath(path), os.path.join(d, os.path.basename(path)))
    return root


def quiet(fn, *args, verbose: bool = False):
    """Runs fn, keeping its per-epoch log out of the benchmark's output."""
    if verbose:
        return fn(*args)
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):
            return fn(*args)
    except BaseException:
        print(buf.getvalue()[-3000:])
        raise


def summary(xs: list[float]) -> str:
    a = np.asarray(xs)
    return (f"{a.mean():.3f} +- {a.std(ddof=1) if len(a) > 1 else 0.0:.3f} "
            f"(range {a.min():.3f}-{a.max():.3f})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", default=os.path.join(SHARED, "flowers128"))
    p.add_argument("--source_classes", default="daisy,dandelion,rose")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--shots", type=int, default=10, help="labelled images per target class")
    p.add_argument("--image_size", type=int, default=64)
    p.add_argument("--architecture", default="compact_cnn")
    p.add_argument("--pretrain_epochs", type=int, default=Config().pretrain_epochs)
    p.add_argument("--scratch_epochs", type=int, default=40)
    p.add_argument("--scratch_batch_size", type=int, default=4,
                   help="4 makes 4 steps per epoch on the 16 training images")
    p.add_argument("--finetune_epochs", type=int, default=10,
                   help="stage 2 of the transfer runs (0: linear probe only)")
    p.add_argument("--work", default="", help="keep (and reuse) the source model here")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()

    work = args.work or tempfile.mkdtemp(prefix="tl_source_transfer_")
    os.makedirs(work, exist_ok=True)
    classes, split = sources_lib.load_source(args.data, "data")
    source = [c.strip() for c in args.source_classes.split(",") if c.strip()]
    unknown = [c for c in source if c not in classes]
    if unknown:
        sys.exit(f"--source_classes: {unknown[0]!r} is not a class of {args.data} ({classes})")
    target = [c for c in classes if c not in source]
    print(f"data {args.data}: source task {source}, target task {target}, "
          f"{args.shots} labelled images per target class, {args.seeds} seeds, "
          f"{args.architecture} at {args.image_size}px")

    # --- 1. the source model ----------------------------------------------------
    tag = f"{args.architecture}_{args.image_size}px_{args.pretrain_epochs}ep_" + "_".join(source)
    src_out = os.path.join(work, "source", tag)
    model_file = os.path.join(src_out, pretrain.MODEL_FILE)
    if not os.path.isfile(model_file):
        idx = [i for i, l in enumerate(split.labels) if classes[l] in source]
        src_data = os.path.join(work, "source_data", tag)
        shutil.rmtree(src_data, ignore_errors=True)
        link_split([split.items[i] for i in idx], split.labels[idx], classes, src_data)
        cfg = Config(data=src_data, val_fraction=0.1, architecture=args.architecture,
                     image_size=args.image_size, pretrain_epochs=args.pretrain_epochs,
                     output_dir=src_out, cache_dir=os.path.join(work, "cache"), export=False,
                     tensorboard=False)
        t0 = time.perf_counter()
        rep = quiet(pretrain.pretrain, cfg, verbose=args.verbose)
        keras.backend.clear_session()
        print(f"pretrained on {sum(rep['class_counts']['train'])} images in "
              f"{time.perf_counter() - t0:.0f}s ({rep['pretrain']['images_per_second']:.0f} "
              f"images/s): source val accuracy {rep['pretrain']['val_accuracy']:.3f}")
    else:
        rep = json.load(open(os.path.join(src_out, "report.json")))
        print(f"reusing {model_file} (source val accuracy {rep['pretrain']['val_accuracy']:.3f})")

    # --- 2. the target task, per seed -----------------------------------------
    tgt_idx = np.asarray([i for i, l in enumerate(split.labels) if classes[l] in target])
    tgt_labels = np.asarray([target.index(classes[l]) for l in split.labels[tgt_idx]])
    rows = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        few = np.concatenate([rng.choice(np.flatnonzero(tgt_labels == c), args.shots,
                                         replace=False) for c in range(len(target))])
        rest = np.setdiff1d(np.arange(len(tgt_idx)), few)
        run = os.path.join(work, f"seed{seed}")
        shutil.rmtree(run, ignore_errors=True)
        items = [split.items[i] for i in tgt_idx]
        few_dir = link_split([items[i] for i in few], tgt_labels[few], target,
                             os.path.join(run, "few"))
        test_dir = link_split([items[i] for i in rest], tgt_labels[rest], target,
                              os.path.join(run, "test"))
        # Both evaluated the same way: no test-time mirroring (pretrain has none).
        common = dict(data=few_dir, test_data=test_dir, val_fraction=0.2, seed=seed,
                      image_size=args.image_size, export=False, tensorboard=False, tta=False,
                      cache_dir=os.path.join(work, "cache"))
        t0 = time.perf_counter()
        tr = quiet(pipeline.train, Config(backbone=model_file, weights="imagenet",
                                          finetune_epochs=args.finetune_epochs,
                                          output_dir=os.path.join(run, "transfer"), **common),
                   verbose=args.verbose)
        keras.backend.clear_session()
        t1 = time.perf_counter()
        sc = quiet(pretrain.pretrain, Config(architecture=args.architecture,
                                             pretrain_epochs=args.scratch_epochs,
                                             pretrain_batch_size=args.scratch_batch_size,
                                             patience=0,
                                             output_dir=os.path.join(run, "scratch"), **common),
                   verbose=args.verbose)
        keras.backend.clear_session()
        t2 = time.perf_counter()
        row = {"seed": seed, "n_test": tr["test"]["n"],
               "transfer_linear_probe_val": tr["stage1"]["val_accuracy"],
               "transfer_kept": tr["kept"], "transfer": tr["test"]["accuracy"],
               "scratch": sc["test"]["accuracy"],
               "transfer_s": round(t1 - t0, 1), "scratch_s": round(t2 - t1, 1)}
        rows.append(row)
        print(f"seed {seed}: transfer {row['transfer']:.3f} (kept {row['transfer_kept']}, "
              f"{row['transfer_s']:.0f}s)  scratch {row['scratch']:.3f} "
              f"({row['scratch_s']:.0f}s)  on {row['n_test']} test images")

    # --- 3. summary ----------------------------------------------------------------
    t = [r["transfer"] for r in rows]
    s = [r["scratch"] for r in rows]
    gain = np.asarray(t) - np.asarray(s)
    print(f"transfer from the source model: {summary(t)}")
    print(f"same architecture from scratch: {summary(s)}")
    print(f"gain: {gain.mean():+.3f}" + (f" +- {gain.std(ddof=1):.3f}" if len(gain) > 1 else "")
          + f" (per seed {', '.join(f'{g:+.3f}' for g in gain)}); spread (largest std) "
          f"{max(np.std(t, ddof=1), np.std(s, ddof=1)) if len(t) > 1 else 0.0:.3f}")
    with open(os.path.join(work, "results.json"), "w") as f:
        json.dump({"args": vars(args), "source_report": {k: rep[k] for k in
                   ("classes", "pretrain", "architecture", "image_size")}, "rows": rows}, f,
                  indent=2, default=str)
    print(f"details: {os.path.join(work, 'results.json')}")


if __name__ == "__main__":
    main()
