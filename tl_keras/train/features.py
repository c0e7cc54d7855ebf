"""Cached backbone features for stage 1.

A frozen backbone maps each image view to the same features every epoch, so
they are computed once, in inference mode. To keep augmentation, K views of
each training image are cached: view 0 is the clean image (what the model
sees at test time), views 1..K-1 are random augmentations.
"""

from __future__ import annotations

import time

import keras
import numpy as np
import tensorflow as tf

from tl_keras.data import pipeline as data_pipeline
from tl_keras.train import loop as loop_lib


def inference_batch_size(batch_size: int) -> int:
    """Batch size for caching passes: inference keeps no activations for
    gradients, so twice the training batch fits wherever training fits, and
    runs faster."""
    return 2 * batch_size


# How far the first pass may decode ahead of the model (see `_decode_ahead`).
DECODE_AHEAD_BYTES = 256 * 2 ** 20


def _decode_ahead(images: tf.data.Dataset) -> int:
    """Images the first pass may hold decoded ahead of the model.

    Its first batch traces the model: over a second on one core, with the
    second core idle once the default buffer is full. A deeper buffer lets
    decoding go on meanwhile. Up to `DECODE_AHEAD_BYTES` of images; a cached
    dataset hands the buffer the very tensors it caches, so in RAM the
    buffer costs nothing more (2000 images at 160 px: the same peak RSS
    with a buffer of 1 and of 3495).
    """
    spec = images.element_spec[0]
    if not spec.shape.is_fully_defined():
        return 64
    nbytes = max(int(np.prod(spec.shape)) * spec.dtype.size, 1)
    return int(max(1, DECODE_AHEAD_BYTES // nbytes))


def extract(feature_model: keras.Model, images: tf.data.Dataset, batch_size: int,
            views: int = 1, augmenter=None, seed: int = 0, progress: bool = True,
            predict=None, mirror: bool = False) -> tuple[np.ndarray, np.ndarray, float]:
    """Computes pooled features of every (image, label) in `images`.

    Args:
        feature_model: images -> pooled features, in inference mode.
        images: (uint8 image, int label) examples, ideally cached.
        batch_size: inference batch size.
        views: views per image; view 0 is never augmented.
        augmenter: the training augmentation (called with training=True), or
            None, which makes every view identical, so only one is computed.
        seed: seeds the augmenter's random draws per view.
        progress: print one line per view.
        predict: runs `feature_model` on a batch in its place (the LiteRT
            engine's, `train.engine.FrozenEngine.predictor`); None: Keras.
        mirror: also the left-right mirror of every image, as a second view
            (one clean view only): each image is decoded once and followed
            by its mirror in the same batches, whose size stays `batch_size`
            (no second trace).

    Returns:
        (features [N*views, D] float32, labels [N*views] int, seconds); for a
        model with several outputs, features is a list with one array per
        output.
    """
    if augmenter is None:
        views = 1
    if mirror and views > 1:
        raise ValueError("mirror=True passes one clean view and its mirror")
    from tl_keras.data.augment import augment_batch, map_parallelism

    if mirror:  # image, its mirror, image, its mirror, ...
        images = images.flat_map(_with_mirror)

    # Each batch of a view has its own seed, (seed, view, batch): with the
    # Augment layer the views are augmented in parallel and are the same on
    # every run (see `augment.map_parallelism` for other augmenters).
    t0 = time.perf_counter()
    feats, labels = [], []
    for v in range(views):
        aug = augmenter if v > 0 else None

        @tf.autograph.experimental.do_not_convert  # see data._decoded
        def prep(i, xy, aug=aug, v=v):
            seed_v = tf.stack([tf.cast(seed, tf.int64) * 1009 + v, i])
            return augment_batch(aug, xy[0], seed_v), xy[1]

        src = images.prefetch(_decode_ahead(images)) if v == 0 else images
        ds = src.batch(batch_size).enumerate().map(prep, num_parallel_calls=map_parallelism(aug))
        ds = ds.prefetch(data_pipeline.AUTOTUNE)
        fs, ys = [], []
        for x, y in ds:
            n = int(x.shape[0])
            if n < batch_size:  # one traced shape: padding is cheaper than a retrace
                x = data_pipeline.pad_batch(x, batch_size)
            # model.predict_on_batch, or split over this worker's replicas.
            out = (predict(x) if predict is not None
                   else loop_lib.predict_on_batch(feature_model, x))
            outs = out if isinstance(out, (list, tuple)) else [out]
            fs.append([np.asarray(o[:n], dtype=np.float32) for o in outs])
            ys.append(y.numpy())
        feats.append([np.concatenate(parts) for parts in zip(*fs)])
        labels.append(np.concatenate(ys))
        if progress:
            print(f"  cached features: view {v + 1}/{views} "
                  f"({len(labels[-1])} images, {time.perf_counter() - t0:.1f}s)", flush=True)
    merged = [np.concatenate(parts) for parts in zip(*feats)]
    labels = np.concatenate(labels)
    if mirror:  # interleaved rows -> the clean view, then the mirrored one
        merged = [np.concatenate([m[0::2], m[1::2]]) for m in merged]
        labels = np.concatenate([labels[0::2], labels[1::2]])
    return (merged if len(merged) > 1 else merged[0]), labels, time.perf_counter() - t0


@tf.autograph.experimental.do_not_convert  # see data._decoded
def _with_mirror(x, y):
    """One (image, label) -> a dataset of it and its left-right mirror."""
    return tf.data.Dataset.from_tensor_slices(
        (tf.stack([x, tf.image.flip_left_right(x)]), tf.stack([y, y])))
