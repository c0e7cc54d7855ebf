"""How well the data audit finds planted label errors and leaked copies (issue 22).

Real photos, fixed seeds, the MobileNetV2-0.35 weights file at 160 px:

* default: all 1000 photos of the shared flowers, split per class 80/20 into a
  training folder (--data; the run holds out its own validation images) and a
  test folder (--test_data). 5% of the training folder's photos are moved to
  another class (flipped labels); 25 test photos are copied into the training
  folders altered (10% crop, resized to 70%, JPEG quality 60) under new names.
  Prints precision and recall of the flagged labels against the flipped ones,
  recall of the cross-split copy pairs, the false pairs among untouched photos,
  and the audit's time as a ratio of the caching pass it shares with training
  (then a second audit, which reads the cached features).
* --tune: the same planting on photos of flowers128 that are not in flowers/
  (data no number in benchmarks/README.md reports), with a low similarity
  threshold, to print where copies and distinct photos fall: how
  --audit_similarity was chosen.

  python benchmarks/audit_quality.py [--tune] [--work=/tmp/audit_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time

import numpy as np
from PIL import Image

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
WEIGHTS = os.path.join(DATA, "weights",
                       "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")


def altered_copy(src: str, dst: str) -> None:
    """A 10% crop (5% off each side), resized to 70%, saved as JPEG quality 60."""
    with Image.open(src) as im:
        im = im.convert("RGB")
        w, h = im.size
        im = im.crop((int(0.05 * w), int(0.05 * h), w - int(0.05 * w), h - int(0.05 * h)))
        im = im.resize((max(1, int(0.7 * im.width)), max(1, int(0.7 * im.height))),
                       Image.BICUBIC)
        im.save(dst, "JPEG", quality=60)


def plant(photos: dict, work: str, seed: int, flip_fraction: float, copies: int) -> dict:
    """Writes work/train and work/test with flipped labels and altered copies; returns the truth."""
    rng = np.random.default_rng(seed)
    classes = sorted(photos)
    shutil.rmtree(work, ignore_errors=True)
    train, test = [], []
    for c in classes:
        files = sorted(photos[c])
        files = [files[i] for i in rng.permutation(len(files))]
        cut = int(0.8 * len(files))
        train += [(f, c) for f in files[:cut]]
        test += [(f, c) for f in files[cut:]]
    flipped = set(rng.choice(len(train), int(round(flip_fraction * len(train))), replace=False))
    truth = {"flipped": [], "copies": {}, "classes": classes}
    for i, (f, c) in enumerate(train):
        given = c
        if i in flipped:
            given = classes[(classes.index(c) + 1 + rng.integers(len(classes) - 1))
                            % len(classes)]
        dst = os.path.join(work, "train", given, os.path.basename(f))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(f, dst)
        if i in flipped:
            truth["flipped"].append(os.path.abspath(dst))
    for f, c in test:
        dst = os.path.join(work, "test", c, os.path.basename(f))
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copy(f, dst)
    for j in rng.choice(len(test), copies, replace=False).tolist():
        f, c = test[j]
        dst = os.path.join(work, "train", c, f"copy_{j:04d}.jpg")
        altered_copy(f, dst)
        truth["copies"][os.path.abspath(dst)] = os.path.abspath(
            os.path.join(work, "test", c, os.path.basename(f)))
    return truth


def run_audit(work: str, out: str, size: int, similarity: float) -> dict:
    from tl_keras.config import Config
    from tl_keras.run import audit

    cfg = Config(data=os.path.join(work, "train"), test_data=os.path.join(work, "test"),
                 backbone="mobilenet_v2", alpha=0.35, weights=WEIGHTS, image_size=size,
                 output_dir=out, audit_similarity=similarity, seed=42)
    return audit.audit(cfg)


# Pairs of untouched flowers photos that are near-duplicates in fact (looked at
# side by side, benchmarks/README.md): the same Flickr photo at two sizes, two
# shots of one scene seconds apart, one sunflower reframed, one photo and its
# filtered edit. Counted apart from the false pairs.
NATURAL_DUPLICATES = {
    frozenset({"7166552648_28b6dce578.jpg", "7166552648_28b6dce578_n.jpg"}),
    frozenset({"6606813305_c992231d29_m.jpg", "6606809995_edee55b770_m.jpg"}),
    frozenset({"14925398301_55a180f919_n.jpg", "14741866338_bdc8bfc8d5_n.jpg"}),
    frozenset({"14925397351_c7f209d804_n.jpg", "14925397651_97dcddc383_n.jpg"}),
}


def score(result: dict, truth: dict) -> dict:
    flipped = set(truth["flipped"])
    flagged = {d["file"] for d in result["label_issues"] if d["split"] in ("train", "val")}
    hit = flagged & flipped
    copies = truth["copies"]
    found = set()
    false_pairs = []
    for d in result["near_duplicates"]:
        a, b = os.path.abspath(d["a"]), os.path.abspath(d["b"])
        if copies.get(a) == b or copies.get(b) == a:
            if d["kind"] == "across":
                found.add(a if a in copies else b)
        elif a not in copies and b not in copies:
            false_pairs.append(d)
    natural = [d for d in false_pairs
               if frozenset({os.path.basename(d["a"]), os.path.basename(d["b"])})
               in NATURAL_DUPLICATES]
    return {"flipped": len(flipped), "flagged": len(flagged), "flagged_flipped": len(hit),
            "precision": round(len(hit) / max(1, len(flagged)), 3),
            "recall": round(len(hit) / max(1, len(flipped)), 3),
            "natural_flags": [(d["file"], d["given"], d["suggested"], d["score"])
                              for d in result["label_issues"]
                              if d["split"] in ("train", "val") and d["file"] not in flipped][:8],
            "copies": len(copies), "copy_pairs_found": len(found),
            "copy_recall": round(len(found) / max(1, len(copies)), 3),
            "pairs_among_untouched": len(false_pairs),
            "natural_duplicates_found": len(natural),
            "false_pairs": len(false_pairs) - len(natural),
            "false_pair_list": [(d["a"], d["b"], d["similarity"]) for d in false_pairs][:10]}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tune", action="store_true")
    ap.add_argument("--work", default="/tmp/audit_bench")
    ap.add_argument("--size", type=int, default=160)
    args = ap.parse_args()
    if args.tune:  # flowers128 photos not in flowers/: 100 a class
        rng = np.random.default_rng(7)
        photos = {}
        for c in sorted(os.listdir(os.path.join(DATA, "flowers128"))):
            used = set(os.listdir(os.path.join(DATA, "flowers", c)))
            files = sorted(f for f in os.listdir(os.path.join(DATA, "flowers128", c))
                           if f not in used)
            photos[c] = [os.path.join(DATA, "flowers128", c, files[i])
                         for i in rng.choice(len(files), 100, replace=False)]
        similarity = 0.6
    else:
        photos = {c: [os.path.join(DATA, "flowers", c, f)
                      for f in os.listdir(os.path.join(DATA, "flowers", c))]
                  for c in sorted(os.listdir(os.path.join(DATA, "flowers")))}
        similarity = 0.0  # the default below
    data_dir, out = os.path.join(args.work, "data"), os.path.join(args.work, "out")
    truth = plant(photos, data_dir, seed=0, flip_fraction=0.05, copies=25)
    shutil.rmtree(out, ignore_errors=True)
    from tl_keras.config import Config

    sim = similarity or Config().audit_similarity
    t0 = time.perf_counter()
    first = run_audit(data_dir, out, args.size, sim)
    t_first = time.perf_counter() - t0
    t0 = time.perf_counter()
    second = run_audit(data_dir, out, args.size, sim)  # the cache is warm now
    t_second = time.perf_counter() - t0
    res = score(first, truth)
    res.update({"images": first["images"], "oof_accuracy": first["oof_accuracy"],
                "similarity": sim,
                "caching_seconds": first["caching_seconds"],
                "audit_on_features_seconds": first["audit_seconds"],
                "audit_ratio_to_caching": round(
                    (first["caching_seconds"] + first["audit_seconds"])
                    / first["caching_seconds"], 3),
                "command_seconds_cold": round(t_first, 1),
                "command_seconds_warm_cache": round(t_second, 1),
                "warm_caching_seconds": second["caching_seconds"]})
    if args.tune:
        copies = truth["copies"]
        sims_true, sims_false = [], []
        for d in first["near_duplicates"]:
            a, b = os.path.abspath(d["a"]), os.path.abspath(d["b"])
            (sims_true if copies.get(a) == b or copies.get(b) == a
             else sims_false).append(d["similarity"])
        res["copy_similarities"] = sorted(sims_true)
        res["other_pair_similarities_desc"] = sorted(sims_false, reverse=True)[:20]
    print(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
