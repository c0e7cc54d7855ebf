"""`tl-keras audit`, and the audit `train` runs on its cached features.

Both read (or compute) the backbone features of every image under the keyed
cache that training uses (`tl_keras.run.views`): whichever of `audit` and
`train` runs first computes them, the other reads them. The analysis and the
files are `tl_keras.report.audit`'s.
"""

from __future__ import annotations

import os
import time
from typing import Optional

import numpy as np

from tl_keras.config import Config
from tl_keras.core import determinism, outputs, precision
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.report import audit as audit_lib
from tl_keras.run import views
from tl_keras.run.setup import log, validate
from tl_keras.train import strategy as strategy_lib


def audit(cfg: Config) -> dict:
    """Audits the data of a `train` command line: label issues, near-duplicates, outliers.

    Writes OUT/audit.json, OUT/audit.md (with pictures), OUT/label_issues.csv
    and OUT/relabelled.csv; features go to (or come from) the same cache
    `train` uses with the same flags.

    Returns:
        The audit (as in audit.json), with "seconds" and "caching_seconds".
    """
    validate(cfg)
    strategy_lib.require_one_device(cfg.strategy, cfg.tpu, "audit")
    dist = strategy_lib.create(cfg.strategy, cfg.tpu, cfg.replica_scaling)
    with dist.scope():
        return _audit(cfg, dist)


def _audit(cfg: Config, dist) -> dict:
    t_start = time.perf_counter()
    family, size = views.resolve_family(cfg)
    out = outputs.ensure_writable_dir(cfg.output_dir)
    # Precision and the strategy are part of the cache key: the same as train's.
    policy = precision.apply(dist.precision(cfg.precision))
    determinism.apply(cfg.seed, cfg.deterministic)
    scaled = dist.scale(cfg)
    cache_dir, cache = views.open_cache(cfg, out)
    # The splits train makes (none held out where its head is cross-validated),
    # so that the cache entries are shared.
    data, _ = views.load_data(cfg, cache_dir, out, cross_validated=cfg.head_fit == "cv_logistic")
    step = views.build_model(cfg, family, size, len(data.class_names), data.train.multi_label)
    image_cache = data_pipeline.CacheBudget(cfg.cache_ram_mb, cache_dir)
    built: list = []
    build_seconds = [0.0]

    def images(i: int):
        # Decoding pipelines are built only on a cache miss (seconds to build);
        # their building is not part of the caching pass (train builds them
        # before its pass, too).
        def make():
            if not built:
                t = time.perf_counter()
                built.extend(views.split_images(cfg, dist, data, size, image_cache))
                build_seconds[0] += time.perf_counter() - t
            return built[i]
        return make

    key_parts = {**views.cache_key_parts(cfg, family, size, data, policy), **dist.cache_key()}
    t0 = time.perf_counter()
    # The very entries train computes (with its stage-2 activations when it
    # would cache them), so that train after audit reads them.
    cut = views.plan_cut(cfg, step.blocks, step.clf, data)
    tr, hit = views.cached_views(scaled, step.blocks, step.clf, cut, images(0), "train",
                                 cfg.cache_views, step.augmenter, cache, key_parts,
                                 copy_grid=True)
    va, _ = views.cached_views(scaled, step.blocks, step.clf, cut,
                               images(1) if len(data.val) else None, "val", 1, None,
                               cache, key_parts, copy_grid=True)
    t_cache = time.perf_counter() - t0 - build_seconds[0]
    log(f"audit: backbone features {'read from cache' if hit else 'computed'} in {t_cache:.1f}s")
    result = on_features(cfg, data, tr, va, step.clf, size, cache, key_parts, out, cut)
    image_cache.cleanup()
    result["caching_seconds"] = round(t_cache, 2)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, audit_lib.AUDIT_JSON), result)
    return result


def clean_features(cfg: Config, data: sources_lib.Dataset, tr: dict, va: dict, clf, size: int,
                   cache, key_parts: dict, cut=None) -> tuple[dict, Optional[dict]]:
    """Clean-view pooled features and copy grids, {split: rows in the split's order}.

    For train, val and test. Training rows are cached in
    `data_pipeline.example_order`; they are put back in the split's order.
    Test rows are cached like the others.

    Returns:
        (features, copy grids; None where the pass made none: a backbone
        without a spatial map).
    """
    n = len(data.train)
    order = data_pipeline.example_order(n, cfg.seed)
    test = (views.test_features(cfg, clf, data.test, size, cache, key_parts, cut)
            if data.test is not None and len(data.test) else None)
    out = []
    for name in ("f", "g"):
        if name not in tr or name not in va or (test is not None and name not in test):
            out.append(None)
            continue
        f = np.empty((n, tr[name].shape[1]), np.float32)
        f[order] = np.asarray(tr[name][:n], np.float32)
        feats = {"train": f, "val": np.asarray(va[name], np.float32)}
        if test is not None:
            feats["test"] = np.asarray(test[name], np.float32)
        out.append(feats)
    return out[0], out[1]


def on_features(cfg: Config, data: sources_lib.Dataset, tr: dict, va: dict, clf, size: int,
                cache, key_parts: dict, out: str, cut=None) -> dict:
    """Audits a run's data on its cached features and writes the audit's files to `out`.

    Args:
        cfg: the run's settings (--seed, --audit_similarity, --data, ...).
        data: the run's dataset (after the pre-flight scan).
        tr, va: `views.cached_views` of train and val.
        clf, size, cache, key_parts, cut: for the test split's features (the
            cut of tr's and va's pass, whose model the test pass reuses).
        out: the output folder.

    Returns:
        The audit (`tl_keras.report.audit.analyse`).
    """
    t0 = time.perf_counter()
    # Copies are found on the copy grids where the pass made them (pooled
    # features otherwise: a backbone without a spatial map).
    feats, grids = clean_features(cfg, data, tr, va, clf, size, cache, key_parts, cut)
    splits = {"train": data.train, "val": data.val}
    if "test" in feats:
        splits["test"] = data.test
    items = {k: list(s.items) for k, s in splits.items()}
    result = audit_lib.analyse(feats, {k: s.labels for k, s in splits.items()}, items,
                               data.class_names, seed=cfg.seed, threshold=cfg.audit_similarity,
                               copy_features=grids)
    # relabelled.csv lists the images of the --data source: train, and the
    # held-out splits cut from it.
    from_data = [k for k in splits if k == "train" or not getattr(cfg, f"{k}_data")]
    rows = audit_lib.relabelled_rows(
        [p for k in from_data for p in splits[k].items],
        np.concatenate([splits[k].labels for k in from_data]), data.class_names, result,
        from_data)
    result["relabelled_splits"] = from_data
    written = audit_lib.write_files(out, result, items, rows)
    # Everything the audit adds to the caching pass: test features, analysis, files.
    result["audit_seconds"] = round(time.perf_counter() - t0, 2)
    s = result["summary"]
    log(f"audit: {s['label_issues']} likely label error(s), {s['near_duplicate_pairs']} "
        f"near-duplicate pair(s) ({s['across_splits']} across splits), {s['outliers']} "
        f"outlier(s) in {result['audit_seconds']:.1f}s; wrote {', '.join(written)}")
    return result


def drop_copies(result: dict, data: sources_lib.Dataset, tr: dict, va: dict, seed: int):
    """Drops the training-side copies of cross-split near-duplicates (--drop_leakage).

    Returns:
        (the dataset without them, tr and va without their rows, {split: count dropped}).
    """
    drop = audit_lib.training_side_copies(result)
    dropped = {k: len(v) for k, v in drop.items() if k in ("train", "val") and v}
    if not dropped:
        return data, tr, va, {}
    n = len(data.train)
    gone = set(drop.get("train", []))
    kept = [j for j in range(n) if j not in gone]
    # Row i of cached training arrays is image example_order(n, seed)[i] of the
    # split; the kept rows are reordered so that this holds for the smaller split
    # too (the mirror pass, the folds and the held-out predictions rely on it).
    row_of = {j: i for i, j in enumerate(data_pipeline.example_order(n, seed).tolist())}
    tr = views.keep_rows(tr, n, [row_of[kept[k]] for k in
                                 data_pipeline.example_order(len(kept), seed).tolist()])
    train = data.train.subset(kept)
    gone_val = set(drop.get("val", []))
    keep_val = [j for j in range(len(data.val)) if j not in gone_val]
    va = views.keep_rows(va, len(data.val), keep_val)
    data = sources_lib.Dataset(data.class_names, train, data.val.subset(keep_val), data.test)
    log("audit: --drop_leakage dropped near-duplicate copies of held-out images: "
        + ", ".join(f"{v} from {k}" for k, v in dropped.items()))
    return data, tr, va, dropped
