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
        The audit (as in audit.json), with "seconds", "caching_seconds" (the
        training and validation images' passes), "test_pass_seconds" and
        "audit_seconds" (the analysis and its files).
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
    cross_validated = cfg.head_fit == "cv_logistic"
    data, _ = views.load_data(cfg, cache_dir, out, cross_validated=cross_validated)
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
    # would cache them, and its mirror pass), on the engine it would choose,
    # so that train after audit computes nothing again.
    cut = views.plan_cut(cfg, step.blocks, step.clf, data)
    mirrored = views.mirrors_training_images(cfg, cross_validated)
    engine = views.frozen_engine(cfg, dist, policy, views.images_to_pass(cfg, data, mirrored),
                                 cache, key_parts)
    tr, hit = views.cached_views(scaled, step.blocks, step.clf, cut, images(0), "train",
                                 cfg.cache_views, step.augmenter, cache, key_parts, engine,
                                 copy_grid=True)
    va, _ = views.cached_views(scaled, step.blocks, step.clf, cut,
                               images(1) if len(data.val) else None, "val", 1, None,
                               cache, key_parts, engine, copy_grid=True)
    mirror = (views.mirror_features(scaled, step.clf, images(0), cache, key_parts, engine, cut,
                                    copy_grid=True)["f"] if mirrored else None)
    t_cache = time.perf_counter() - t0 - build_seconds[0]
    log(f"audit: backbone features {'read from cache' if hit else 'computed'} in {t_cache:.1f}s")
    # The test split's pass (train evaluates its kept head on the same entry).
    t0 = time.perf_counter()
    if data.test is not None and len(data.test):
        views.test_features(scaled, step.clf, data.test, size, cache, key_parts, cut, engine,
                            mirror=views.mirror_averaged(cfg))
    t_test = time.perf_counter() - t0
    result = on_features(cfg, data, tr, va, step.clf, size, cache, key_parts, out, cut, engine,
                         mirror)
    image_cache.cleanup()
    result["caching_seconds"] = round(t_cache, 2)
    result["test_pass_seconds"] = round(t_test, 2)
    result["seconds"] = round(time.perf_counter() - t_start, 2)
    outputs.atomic_write_json(os.path.join(out, audit_lib.AUDIT_JSON), result)
    return result


def clean_features(cfg: Config, data: sources_lib.Dataset, tr: dict, va: dict, clf, size: int,
                   cache, key_parts: dict, cut=None, engine=None
                   ) -> tuple[dict, Optional[dict]]:
    """Clean-view pooled features and copy grids, {split: rows in the split's order}.

    For train, val and test. Training rows are cached in
    `data_pipeline.example_order`; they are put back in the split's order.
    Test rows are cached like the others (their pass runs on `engine`), with
    the mirrored images' features that train's evaluation reads.

    Returns:
        (features, copy grids; None where the pass made none: a backbone
        without a spatial map).
    """
    n = len(data.train)
    order = data_pipeline.example_order(n, cfg.seed)
    test = (views.test_features(cfg, clf, data.test, size, cache, key_parts, cut, engine,
                                mirror=views.mirror_averaged(cfg))
            if data.test is not None and len(data.test) else None)
    out = []
    for name in ("f", "g"):
        if name not in tr or name not in va or (test is not None and name not in test):
            out.append(None)
            continue
        feats = {"train": _in_split_order(tr[name][:n], order),
                 "val": np.asarray(va[name], np.float32)}
        if test is not None:
            feats["test"] = np.asarray(test[name], np.float32)
        out.append(feats)
    return out[0], out[1]


def _in_split_order(rows: np.ndarray, order: np.ndarray) -> np.ndarray:
    """Cached training rows (in `data_pipeline.example_order`) put back in the split's order."""
    out = np.empty((len(order), rows.shape[1]), np.float32)
    out[order] = np.asarray(rows, np.float32)
    return out


def on_features(cfg: Config, data: sources_lib.Dataset, tr: dict, va: dict, clf, size: int,
                cache, key_parts: dict, out: str, cut=None, engine=None,
                mirror: Optional[np.ndarray] = None) -> dict:
    """Audits a run's data on its cached features and writes the audit's files to `out`.

    Args:
        cfg: the run's settings (--seed, --audit_similarity, --data, ...).
        data: the run's dataset (after the pre-flight scan).
        tr, va: `views.cached_views` of train and val.
        clf, size, cache, key_parts, cut, engine: for the test split's
            features (the cut of tr's and va's pass, whose model the test
            pass reuses, and the run's frozen-pass engine).
        mirror: the mirrored training images' features
            (`views.mirror_features`), or None: with tr's augmented views,
            more training rows for the label audit's heads.
        out: the output folder.

    Returns:
        The audit (`tl_keras.report.audit.analyse`).
    """
    t0 = time.perf_counter()
    # Copies are found on the copy grids where the pass made them (pooled
    # features otherwise: a backbone without a spatial map).
    feats, grids = clean_features(cfg, data, tr, va, clf, size, cache, key_parts, cut, engine)
    splits = {"train": data.train, "val": data.val}
    if "test" in feats:
        splits["test"] = data.test
    items = {k: list(s.items) for k, s in splits.items()}
    n = len(data.train)
    order = data_pipeline.example_order(n, cfg.seed)
    result = audit_lib.analyse(
        feats, {k: s.labels for k, s in splits.items()}, items, data.class_names,
        seed=cfg.seed, threshold=cfg.audit_similarity, copy_features=grids,
        train_views=[_in_split_order(tr["f"][v * n:(v + 1) * n], order)
                     for v in range(1, len(tr["f"]) // max(n, 1))],
        train_mirror=None if mirror is None else _in_split_order(mirror, order))
    # relabelled.csv lists the images of the --data source: train, and the
    # held-out splits cut from it.
    from_data = [k for k in splits if k == "train" or not getattr(cfg, f"{k}_data")]
    rows = audit_lib.relabelled_rows(
        [p for k in from_data for p in splits[k].items],
        np.concatenate([splits[k].labels for k in from_data]), data.class_names, result,
        from_data)
    result["relabelled_splits"] = from_data
    written = audit_lib.write_files(out, result, items, rows)
    # The analysis and its files (and the test split's pass where none made it before).
    result["audit_seconds"] = round(time.perf_counter() - t0, 2)
    s = result["summary"]
    log(f"audit: {s['label_issues']} likely label error(s), {s['near_duplicate_pairs']} "
        f"near-duplicate pair(s) ({s['across_splits']} across splits), {s['outliers']} "
        f"outlier(s) in {result['audit_seconds']:.1f}s; wrote {', '.join(written)}")
    return result


def drop_copies(result: dict, data: sources_lib.Dataset, tr: dict, va: dict, seed: int,
                mirror: Optional[dict] = None):
    """Drops the training-side copies of cross-split near-duplicates (--drop_leakage).

    Args:
        result: the audit.
        data: the run's dataset.
        tr, va: `views.cached_views` of train and val.
        seed: the run's seed (the cached training rows' order).
        mirror: the mirrored training images' outputs (`views.mirror_features`), or None.

    Returns:
        (the dataset without them, tr, va and mirror without their rows,
        {split: count dropped}).
    """
    drop = audit_lib.training_side_copies(result)
    dropped = {k: len(v) for k, v in drop.items() if k in ("train", "val") and v}
    if not dropped:
        return data, tr, va, mirror, {}
    n = len(data.train)
    gone = set(drop.get("train", []))
    kept = [j for j in range(n) if j not in gone]
    # Row i of cached training arrays is image example_order(n, seed)[i] of the
    # split; the kept rows are reordered so that this holds for the smaller split
    # too (the mirror pass, the folds and the held-out predictions rely on it).
    row_of = {j: i for i, j in enumerate(data_pipeline.example_order(n, seed).tolist())}
    rows = [row_of[kept[k]] for k in data_pipeline.example_order(len(kept), seed).tolist()]
    tr = views.keep_rows(tr, n, rows)
    if mirror is not None:
        mirror = {k: np.asarray(a)[rows] for k, a in mirror.items()}
    train = data.train.subset(kept)
    gone_val = set(drop.get("val", []))
    keep_val = [j for j in range(len(data.val)) if j not in gone_val]
    va = views.keep_rows(va, len(data.val), keep_val)
    data = sources_lib.Dataset(data.class_names, train, data.val.subset(keep_val), data.test)
    log("audit: --drop_leakage dropped near-duplicate copies of held-out images: "
        + ", ".join(f"{v} from {k}" for k, v in dropped.items()))
    return data, tr, va, mirror, dropped
