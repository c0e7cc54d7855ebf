"""The data and model steps every image driver shares, and the keyed backbone outputs.

`train` and `audit` load the same data (pre-flight scan), build the same
classifier and read or compute the same cached backbone outputs, under the
same cache keys: whichever runs first computes the features, the other reads
them (see `tl_keras.core.cache`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np
import tensorflow as tf

from tl_keras.config import Config
from tl_keras.core import cache as cache_lib
from tl_keras.core import outputs
from tl_keras.data import augment, preflight
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib
from tl_keras.model import families as families_lib
from tl_keras.model import model_files as model_files_lib
from tl_keras.run.setup import data_spec, log
from tl_keras.train import activations, copies, features
from tl_keras.train import engine as engine_lib


def resolve_family(cfg: Config):
    """The backbone family of --backbone (a name or a .keras file) and the input size.

    Returns:
        (family, size in pixels), validated against --alpha and --weights.
    """
    family = (model_files_lib.family_from_model_file(cfg.backbone, cfg.image_size, cfg.cut_layer,
                                                     cfg.block_prefixes, cfg.preprocess)
              if model_files_lib.is_model_file(cfg.backbone)
              else families_lib.get_family(cfg.backbone))
    size = cfg.image_size or family.default_size
    families_lib.validate(family, size, cfg.alpha, cfg.weights)
    return family, size


def open_cache(cfg: Config, worker_out: str) -> tuple[str, cache_lib.ArrayCache]:
    """The run's cache folder (--cache_dir, or WORKER_OUT/cache) and its ArrayCache."""
    cache_dir = outputs.ensure_writable_dir(
        cfg.cache_dir or os.path.join(worker_out, "cache"),
        "cache_dir" if cfg.cache_dir else "output_dir")
    return cache_dir, cache_lib.ArrayCache(cache_dir, cfg.cache_ram_mb)


def load_data(cfg: Config, cache_dir: str, worker_out: str, cross_validated: bool = False
              ) -> tuple[sources_lib.Dataset, dict]:
    """The pre-flight scan of the run's sources (OUT/preflight.json): (dataset, scan report).

    With `cross_validated` (the head is chosen by k-fold cross-validation),
    --val_fraction=0 holds out no validation split.
    """
    return preflight.prepare_dataset(
        data_spec(cfg, cross_validated), max_pixels=cfg.max_pixels, cache_dir=cache_dir,
        drop_leakage=cfg.drop_leakage, report_path=os.path.join(worker_out, "preflight.json"),
        log=log)


def cache_key_parts(cfg: Config, family, size: int, data, policy: str) -> dict:
    """Everything that changes cached features or activations."""
    w = cfg.weights
    weights = cache_lib.file_fingerprint(w) if os.path.isfile(w) else w.lower()
    return dict(train=cache_lib.split_fingerprint(data.train.items, data.train.labels),
                val=cache_lib.split_fingerprint(data.val.items, data.val.labels),
                backbone=family.identity or family.name, alpha=cfg.alpha, weights=weights,
                size=size,
                preprocess=family.preprocess, policy=policy, seed=cfg.seed,
                augment=[cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.translation,
                         cfg.crop_min_area])


@dataclasses.dataclass
class ModelStep:
    """The classifier and what feeds its backbone (the model step of a driver)."""

    backbone: object
    n_blocks: int
    blocks: int  # the blocks stage 2 unfreezes
    clf: model_lib.Classifier
    augmenter: object


def build_model(cfg: Config, family, size: int, n_cls: int, multi_label: bool) -> ModelStep:
    """The backbone, the blocks stage 2 unfreezes, the classifier and the augmenter."""
    backbone = families_lib.build_backbone(family, cfg.weights, size, cfg.alpha)
    n_blocks = blocks_lib.num_blocks(backbone, family)
    if cfg.finetune_blocks > n_blocks:
        raise fail("finetune_blocks", cfg.finetune_blocks,
                   f"{family.name} has only {n_blocks} blocks")
    blocks = cfg.finetune_blocks or blocks_lib.auto_finetune_blocks(n_blocks)
    clf = model_lib.build_classifier(backbone, family, n_cls, cfg.dropout,
                                     multi_label=multi_label)
    augmenter = augment.build_augmenter(cfg.flip, cfg.rotation, cfg.zoom, cfg.contrast, cfg.seed,
                                        cfg.translation, cfg.crop_min_area)
    return ModelStep(backbone, n_blocks, blocks, clf, augmenter)


def plan_cut(cfg: Config, blocks: int, clf, data):
    """The cut below the first of the `blocks` blocks stage 2 unfreezes, when
    stage 2 can train on cached activations within --cache_max_mb; None
    otherwise (said why)."""
    if not (cfg.finetune_epochs and blocks):
        return None
    cut, why = activations.find_cut(clf, blocks)
    if cut is None:
        log(f"stage 2: no cached activations ({why}); it will train through the full model")
        return None
    need = activations.estimate_bytes(cut, len(data.train), cfg.cache_views)
    need += activations.estimate_bytes(cut, len(data.val), 1)
    if need > cfg.cache_max_mb * 2 ** 20:
        log(f"stage 2: cached activations would need {need / 2 ** 20:.0f} MB "
            f"> --cache_max_mb={cfg.cache_max_mb}; it will train through the full model")
        return None
    return cut


def frozen_engine(cfg: Config, dist, policy: str, images: int, cache,
                  key_parts: dict) -> engine_lib.FrozenEngine:
    """The engine of the run's frozen passes (--frozen_engine) for `images` image views."""
    return engine_lib.FrozenEngine(cfg.frozen_engine, images, cache, key_parts, policy,
                                   dist.kind, log)


def cached_views(cfg: Config, blocks: int, clf, cut, images, split: str, views: int,
                 augmenter, cache, key_parts: dict, engine=None, copy_grid: bool = False
                 ) -> tuple[dict, bool]:
    """Backbone outputs of `views` views of a split, from the cache or one
    inference pass: pooled features ("f") for stage 1 and, with a cut, the
    activations below the unfrozen blocks ("a") for stage 2.

    The pass runs on `engine` (a `train.engine.FrozenEngine`), or with
    TensorFlow when None. With `copy_grid` (the audit), the same pass also
    outputs the copy descriptor ("g", `tl_keras.train.copies`); it is stored
    next to the others under the same key, so a later run without it reads
    the entry.

    Returns:
        ({"f": ..., "y": ..., ["a": ...], ["g": ...]}, whether the cache was used);
        arrays of no rows when `images` is None (no validation split).
    """
    names = ("a", "f") if cut is not None else ("f",)
    # --- the audit's copy grid (kept apart from the features' own path) ---
    copy_grid = copy_grid and copies.available(clf)
    names += ("g", "y") if copy_grid else ("y",)
    if images is None:  # no validation split (a cross-validated run): no rows
        return {k: np.zeros(_empty_shape(k, clf, cut), np.int64 if k == "y" else np.float32)
                for k in names}, False
    key = cache_lib.make_key(what="views", split=split, views=views,
                             blocks=blocks if cut is not None else 0, **key_parts)

    def compute():
        # Built only on a cache miss (like the images: `images` may be a
        # function that builds them).
        model = pass_model(clf, cut, copy_grid)
        ds = images() if callable(images) else images
        out, labels, _ = features.extract(model, ds,
                                          features.inference_batch_size(cfg.batch_size), views,
                                          augmenter, seed=cfg.seed, progress=split == "train",
                                          predict=engine and engine.predictor(model))
        return (*out, labels) if len(names) > 2 else (out, labels)

    arrays, hit = cache.get_or_compute(key, names, compute, log)
    return dict(zip(names, arrays)), hit


def pass_model(clf, cut, copy_grid: bool):
    """The model of a caching pass: images -> [activations below the cut
    (with one),] pooled features[, copy grid (with `copy_grid`, where the
    backbone has a spatial map)]."""
    if copy_grid and copies.available(clf):
        return copies.extraction_model(clf, cut)
    return cut.joint if cut is not None else clf.features


def _named_outputs(out, cut, grid: bool) -> dict:
    """`pass_model`'s outputs by name: "a" (with a cut), "f", "g" (with the copy grid)."""
    names = ("a",) * (cut is not None) + ("f",) + ("g",) * grid
    return dict(zip(names, out if isinstance(out, list) else [out]))


def _empty_shape(name: str, clf, cut) -> tuple:
    """The shape of a cached array of no rows (a run without a validation split)."""
    if name == "a":
        return (0, *cut.shape)
    if name == "g":
        return (0, int(copies.extraction_model(clf, cut).outputs[-1].shape[-1]))
    return (0, clf.features.output_shape[-1]) if name == "f" else (0,)


def mirror_averaged(cfg: Config) -> bool:
    """Whether the exported model averages each image with its mirror (--tta with --flip)."""
    return bool(cfg.tta and cfg.flip)


def mirrors_training_images(cfg: Config, cross_validated: bool) -> bool:
    """Whether the run passes the mirrored training images too (`mirror_features`):
    a cross-validated head whose exported model averages each image with its
    mirror (--tta with --flip)."""
    return bool(cross_validated) and mirror_averaged(cfg)


def images_to_pass(cfg: Config, data: sources_lib.Dataset, mirrored: bool) -> int:
    """The image views a run's caching passes go through (the engine's choice rests on it)."""
    return (cfg.cache_views + int(mirrored)) * len(data.train) + len(data.val)


def mirror_features(cfg: Config, clf, images, cache, key_parts: dict, engine=None, cut=None,
                    copy_grid: bool = False) -> dict:
    """Backbone outputs of the mirrored training images (cached like the views).

    The exported model averages each image's prediction with its mirror's
    (--tta), so the cross-validated head is judged, and trained, on them too,
    and the stage-2 trial's held-out probabilities (which calibrate a kept
    stage 2) are averaged the same way (the activations). Rows are
    in the training images' cached order, like the views'. The pass runs the
    model of the views' pass (`cut`, `copy_grid` as given to `cached_views`:
    no second conversion or trace) on `engine`; `images` may be a function
    that builds the dataset (only on a cache miss).

    Returns:
        {"f": pooled features [N, D]} and, with a `cut`, "a": the
        activations below it [N, ...].
    """
    key = cache_lib.make_key(what="mirror", split="train", **key_parts)
    names = ("a",) * (cut is not None) + ("f",)

    def compute():
        ds = images() if callable(images) else images
        flipped = ds.map(lambda x, y: (tf.image.flip_left_right(x), y))
        model = pass_model(clf, cut, copy_grid)
        out = features.extract(model, flipped, features.inference_batch_size(cfg.batch_size),
                               progress=False, predict=engine and engine.predictor(model))[0]
        named = _named_outputs(out, cut, copy_grid and copies.available(clf))
        return tuple(named[n] for n in names)

    arrays, _ = cache.get_or_compute(key, names, compute, log)
    return dict(zip(names, arrays))


def test_features(cfg: Config, clf, split: sources_lib.Split, size: int, cache,
                  key_parts: dict, cut=None, engine=None, mirror: bool = False) -> dict:
    """Backbone outputs of the clean test images, cached like the others.

    Pooled features ("f"), copy grids ("g", the audit's; where the backbone
    has a spatial map), with the run's `cut` the activations below it ("a")
    and, with `mirror`, the mirrored images' pooled features and activations
    ("m", "am"). The audit reads them, and so does the evaluation of a kept
    model whose lower part stayed frozen: the head on "f" (stage 1 kept) or
    stage 2's top on "a" (`cached_probabilities`), without another pass.
    Each image and its mirror go through the model in the same batches,
    decoded once (`features.extract`'s mirror).

    With the run's `cut`, the pass reuses the model (and its traced
    prediction function) that made the training and validation entries
    when the test split's activations fit in --cache_max_mb (else it keeps
    no activations): tracing a second model cost more than the 200 test
    images of the flowers. The pass runs on `engine` like `cached_views`'.
    """
    grid = copies.available(clf)
    reuse = cut is not None and grid and (
        activations.estimate_bytes(cut, 2 * len(split), 1) <= cfg.cache_max_mb * 2 ** 20)
    names = (("f", "g") if grid else ("f",)) + (("a",) if reuse else ())
    if mirror:
        names += ("m", "am") if reuse else ("m",)
    names += ("y",)
    key = cache_lib.make_key(what="views", split="test", views=1, blocks=0,
                             **({"mirror": True} if mirror else {}), **key_parts)

    def compute():
        model = pass_model(clf, cut if reuse else None, copy_grid=True)
        out, labels, _ = features.extract(
            model, data_pipeline.image_dataset(split, size, name="test"),
            features.inference_batch_size(cfg.batch_size), 1, None, seed=cfg.seed,
            progress=False, predict=engine and engine.predictor(model), mirror=mirror)
        arrays = _named_outputs(out, cut if reuse else None, grid)
        n = len(split)  # rows: the clean images, then (with mirror) their mirrors
        clean = {k: v[:n] for k, v in arrays.items()}
        if mirror:
            clean["m"] = arrays["f"][n:]
            if reuse:
                clean["am"] = arrays["a"][n:]
        clean["y"] = labels[:n]
        return tuple(clean[k] for k in names)

    return dict(zip(names, cache.get_or_compute(key, names, compute, log)[0]))


def cached_probabilities(model, arrays: dict, name: str, mirror: bool) -> np.ndarray:
    """`model`'s probabilities on the cached test rows `arrays[name]` ("f"
    for a head, "a" for stage 2's top), averaged with the mirrored images'
    rows ("m", "am") as the exported model averages them."""
    probs = np.asarray(model.predict(arrays[name], batch_size=256, verbose=0), np.float32)
    if mirror:
        other = np.asarray(model.predict(arrays["m" if name == "f" else "am"], batch_size=256,
                                         verbose=0), np.float32)
        probs = (probs + other) / 2
    return probs


def keep_rows(arrays: dict, n: int, idx: np.ndarray) -> dict:
    """The rows of images `idx` (of `n`) in cached view arrays laid out view after view."""
    views = len(arrays["y"]) // max(n, 1)
    rows = np.concatenate([v * n + np.asarray(idx, int) for v in range(views)] or
                          [np.zeros(0, int)])
    return {k: np.asarray(a[rows]) for k, a in arrays.items()}


def split_images(cfg: Config, dist, data: sources_lib.Dataset, size: int,
                 image_cache: data_pipeline.CacheBudget):
    """The decoded (and cached) training and validation images of this worker
    (validation None without a validation split).

    Training images stream in `data_pipeline.example_order(n, cfg.seed)`, so
    row i of their cached features is that order's i-th image of the split.
    """
    train_images = data_pipeline.image_dataset(dist.shard(data.train), size, budget=image_cache,
                                               name="train", order_seed=cfg.seed)
    val_images = data_pipeline.image_dataset(dist.shard(data.val), size, budget=image_cache,
                                             name="val") if len(data.val) else None
    return train_images, val_images
