"""Pre-trained GloVe vectors vs random word vectors on rt-polarity (sentence sentiment).

The same model and pipeline (`tl-keras train --task=text` with the settings
of flags/rt_polarity.flags), once with `--embeddings=glove.6B.50d.rt-polarity.txt`
and once with random 50-d vectors for the same vocabulary (`--embedding_init=random`), over several seeds, on one fixed split. Prints each run and the
mean ± standard deviation of test accuracy per arm.

Data: ../shared/data/text/rt-polarity.{pos,neg} (Pang & Lee v1.0, 5331 + 5331
sentences), split once, stratified and seeded (--split_seed), 80/10/10 into
train/val/test TSV files (text,label) that the runs read like any user file.
The seeds vary the model (initialization, shuffling, dropout), never the split.

Usage (from the repo root):
  python benchmarks/text_glove.py                      # 3 seeds, the defaults
  python benchmarks/text_glove.py --seeds=1,2,3,4,5 --set encoder=cnn --set dropout=0.3
  python benchmarks/text_glove.py --prepare_only       # just write the split (for
                                                       # flags/rt_polarity.flags)
  # the two arms as two processes, then one summary:
  python benchmarks/text_glove.py --arms=glove & python benchmarks/text_glove.py --arms=random
  python benchmarks/text_glove.py --summarize_only
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tl_keras.config import Config  # noqa: E402
from tl_keras.data import sources as sources_lib

TEXT_DATA = REPO.parent / "shared" / "data" / "text"
GLOVE = TEXT_DATA / "glove.6B.50d.rt-polarity.txt"
SPLIT_DIR = REPO / "runs" / "rt_polarity" / "data"
FLAGFILE = REPO / "flags" / "rt_polarity.flags"
# Set by the benchmark itself, whatever the flagfile says.
OWN_FIELDS = ("data", "val_data", "test_data", "embeddings", "embedding_init", "output_dir",
              "seed", "export")


def write_split(out_dir: Path, seed: int = 0) -> dict:
    """Writes the fixed stratified 80/10/10 split of rt-polarity as train/val/test TSVs.

    Returns:
        {"train": path, "val": path, "test": path}.
    """
    texts, labels = [], []
    for label, name in enumerate(("neg", "pos")):
        with open(TEXT_DATA / f"rt-polarity.{name}", encoding="utf-8") as f:
            for line in f:
                if line.strip():
                    texts.append(line.strip())
                    labels.append(label)
    labels = np.asarray(labels)
    test_idx, val_idx, train_idx = sources_lib.stratified_split(labels, [0.1, 0.1], seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for part, idx in (("train", train_idx), ("val", val_idx), ("test", test_idx)):
        paths[part] = out_dir / f"{part}.tsv"
        tmp = out_dir / f".{part}.tsv.{os.getpid()}.tmp"  # arms may run as parallel processes
        with open(tmp, "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, delimiter="\t")
            w.writerow(["text", "label"])
            for i in idx:
                w.writerow([texts[i], ("neg", "pos")[labels[i]]])
        os.replace(tmp, paths[part])
    return paths


def _parse_set(items: list[str]) -> dict:
    """name=value pairs, typed like the Config field of that name."""
    types = {f.name: type(getattr(Config(), f.name)) for f in dataclasses.fields(Config)}
    out = {}
    for item in items:
        name, _, value = item.partition("=")
        if name not in types:
            raise SystemExit(f"{item!r}: no Config field {name!r}")
        kind = types[name]
        out[name] = (value.lower() in ("1", "true", "yes")) if kind is bool else kind(value)
    return out


def recipe(flagfile: Path = FLAGFILE) -> dict:
    """The settings of flags/rt_polarity.flags, but those the benchmark sets itself."""
    lines = [l.strip() for l in flagfile.read_text(encoding="utf-8").splitlines()]
    pairs = [l[2:] for l in lines if l.startswith("--")]
    return {k: v for k, v in _parse_set(pairs).items() if k not in OWN_FIELDS}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", default="1,2,3", help="model seeds, comma-separated")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the fixed data split")
    p.add_argument("--arms", default="random,glove", help="which arms to run")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                   help="override a setting of flags/rt_polarity.flags for both arms "
                        "(repeatable)")
    p.add_argument("--out", default=str(REPO / "runs" / "bench_text_glove"))
    p.add_argument("--summarize_only", action="store_true",
                   help="train nothing: summarize the reports already under --out (e.g. of "
                        "the arms run as separate processes)")
    p.add_argument("--prepare_only", action="store_true",
                   help=f"only write the split to {SPLIT_DIR.relative_to(REPO)}")
    args = p.parse_args()

    paths = write_split(SPLIT_DIR, args.split_seed)
    print(f"split (seed {args.split_seed}): "
          + ", ".join(f"{k} {sum(1 for _ in open(v, encoding='utf-8')) - 1}"
                      for k, v in paths.items()), flush=True)
    if args.prepare_only:
        return

    from tl_keras.run import text as text_pipeline

    overrides = _parse_set(args.set)
    seeds = [int(s) for s in args.seeds.split(",") if s]
    arms = [a for a in args.arms.split(",") if a]
    settings = {**recipe(), **overrides}
    base = Config.for_text(data=str(paths["train"]), val_data=str(paths["val"]),
                           test_data=str(paths["test"]), embedding_dim=50, export=False)
    base = base.replace(**settings)
    print(f"settings ({FLAGFILE.relative_to(REPO)} and --set): {json.dumps(settings)}",
          flush=True)
    results: dict[str, list[dict]] = {a: [] for a in arms}
    for seed in seeds:
        for arm in arms:
            run_dir = os.path.join(args.out, f"{arm}_seed{seed}")
            if not args.summarize_only:
                # Both arms read the GloVe file, so both have the same vocabulary
                # (the training words and --embedding_vocabulary words of the
                # file): the random arm takes its words, not its vectors.
                cfg = base.replace(seed=seed, embeddings=str(GLOVE),
                                   embedding_init="pretrained" if arm == "glove" else "random",
                                   output_dir=run_dir)
                text_pipeline.train(cfg)
            with open(os.path.join(run_dir, "report.json"), encoding="utf-8") as f:
                report = json.load(f)
            row = {"seed": seed, "test": report["test"]["accuracy"], "kept": report["kept"],
                   "stage1_val": report["stage1"]["val_accuracy"],
                   "stage2_val": report["stage2"].get("val_accuracy"),
                   "seconds": report["seconds"]}
            results[arm].append(row)
            print(f"RESULT {arm:6s} seed {seed}: test {row['test']:.4f} "
                  f"(stage1 val {row['stage1_val']:.4f}, stage2 val {row['stage2_val']}, "
                  f"kept {row['kept']}, {row['seconds']}s)", flush=True)

    print("\n== test accuracy on the fixed rt-polarity split "
          f"({len(seeds)} seeds: {', '.join(map(str, seeds))})")
    summary = {}
    for arm in arms:
        acc = np.array([r["test"] for r in results[arm]])
        summary[arm] = {"mean": float(acc.mean()), "std": float(acc.std(ddof=1)) if len(acc) > 1
                        else 0.0, "min": float(acc.min()), "max": float(acc.max()),
                        "runs": results[arm]}
        s = summary[arm]
        print(f"{arm:6s}: {s['mean']:.4f} ± {s['std']:.4f} (sd)  "
              f"range {s['min']:.4f}..{s['max']:.4f}")
    if "random" in summary and "glove" in summary:
        gap = summary["glove"]["mean"] - summary["random"]["mean"]
        spread = max(summary["glove"]["std"], summary["random"]["std"])
        print(f"glove - random: {gap:+.4f} (largest seed sd {spread:.4f}; "
              f"{'beats' if gap > spread else 'does not beat'} it)")
        summary["gap"] = gap
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"settings": settings, "seeds": seeds, **summary}, f, indent=2)


if __name__ == "__main__":
    main()
