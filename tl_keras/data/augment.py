"""Training-time augmentation: one fused, seeded Keras preprocessing layer.

Flip, rotation, zoom, translation and random resized crop are all affine
maps, so `Augment` composes them into one matrix per image and resamples
once (`ImageProjectiveTransformV3`, reflect fill, bilinear), then applies a
random contrast change. Stacking Keras's RandomFlip / RandomRotation /
RandomZoom / RandomTranslation resamples once per layer; on 2 CPU cores that
made augmentation slower than the training step it feeds (see
benchmarks/input_pipeline.py). Ranges follow Keras's conventions: rotation
as a fraction of a full turn (the flag is in degrees), zoom and translation
as fractions of the image size.

Applied to training batches only, after any cache of decoded images, so each
pass draws new random variants. Reproducible: called with a per-batch `seed`
(what `data.batched` does, from a seeded `tf.data.Dataset.random`), draws are
stateless, so batches can be augmented in parallel and a run repeats exactly;
without one, draws come from the layer's own seeded generator.
"""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf


def degrees_to_turn_fraction(degrees: float) -> float:
    """Keras's rotation factor is a fraction of a full turn: 36 degrees -> 0.1."""
    return float(degrees) / 360.0


@keras.saving.register_keras_serializable(package="tl_keras")
class Augment(keras.layers.Layer):
    """Random flip, rotation, zoom, translation, resized crop and contrast.

    Args:
        flip: mirror left-right with probability 0.5.
        rotation: maximum rotation as a fraction of a full turn (Keras's
            RandomRotation factor); 0.1 is +-36 degrees.
        zoom: maximum zoom in or out as a fraction of the size (RandomZoom).
        translation: maximum shift as a fraction of height and width.
        crop_min_area: random resized crop keeping a box of at least this
            fraction of the area, aspect ratio in [3/4, 4/3]; 0: off.
        contrast: maximum contrast change (RandomContrast's factor).
        seed: seeds the layer's own generator (used when no seed is passed).
    """

    CROP_RATIO = (3 / 4, 4 / 3)

    def __init__(self, flip: bool = True, rotation: float = 0.0, zoom: float = 0.0,
                 translation: float = 0.0, crop_min_area: float = 0.0, contrast: float = 0.0,
                 seed: Optional[int] = None, **kwargs):
        super().__init__(**kwargs)
        self.flip = bool(flip)
        self.rotation = float(rotation)
        self.zoom = float(zoom)
        self.translation = float(translation)
        self.crop_min_area = float(crop_min_area)
        self.contrast = float(contrast)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    @property
    def warps(self) -> bool:
        """Whether a resample is needed (a flip alone is a cheap reversal)."""
        return bool(self.rotation or self.zoom or self.translation or self.crop_min_area)

    def _uniform(self, shape, low, high, seed, i):
        if seed is None:
            return keras.random.uniform(shape, low, high, seed=self.seed_generator)
        # Stateless: a distinct stream per parameter from the batch's seed.
        s = tf.cast(seed, tf.int64) + tf.constant([0, 1], tf.int64) * (i + 1) * 7919
        return tf.random.stateless_uniform(shape, s, low, high)

    def transforms(self, n, height, width, seed=None) -> tf.Tensor:
        """Per-image [n, 8] projective transforms (output -> input pixel coordinates)."""
        one, zero = tf.ones([n]), tf.zeros([n])
        h = tf.cast(height, tf.float32)
        w = tf.cast(width, tf.float32)
        # Linear part A (2x2, acting on centred (x, y)) and offset t, composed
        # from the output side: flip, zoom, rotation, crop box, translation.
        a00, a01, a10, a11 = one, zero, zero, one
        tx, ty = zero, zero
        if self.flip:
            f = tf.where(self._uniform([n], 0.0, 1.0, seed, 0) < 0.5, -1.0, 1.0)
            a00 = a00 * f
        if self.zoom:
            s = 1.0 + self._uniform([n], -self.zoom, self.zoom, seed, 1)
            a00, a01, a10, a11 = a00 * s, a01 * s, a10 * s, a11 * s
        if self.rotation:
            th = self._uniform([n], -1.0, 1.0, seed, 2) * self.rotation * 2.0 * math.pi
            c, si = tf.cos(th), tf.sin(th)
            a00, a01, a10, a11 = (c * a00 - si * a10, c * a01 - si * a11,
                                  si * a00 + c * a10, si * a01 + c * a11)
        if self.crop_min_area:
            area = self._uniform([n], self.crop_min_area, 1.0, seed, 3)
            r = tf.exp(self._uniform([n], math.log(self.CROP_RATIO[0]),
                                     math.log(self.CROP_RATIO[1]), seed, 4))
            bw = tf.minimum(tf.sqrt(area * r), 1.0)
            bh = tf.minimum(tf.sqrt(area / r), 1.0)
            # Box centre, anywhere the box stays inside the image (pixel
            # centres run from 0 to size - 1).
            tx = tx + (self._uniform([n], -0.5, 0.5, seed, 5) * (1.0 - bw)) * (w - 1.0)
            ty = ty + (self._uniform([n], -0.5, 0.5, seed, 6) * (1.0 - bh)) * (h - 1.0)
            a00, a01, a10, a11 = a00 * bw, a01 * bw, a10 * bh, a11 * bh
        if self.translation:
            tx = tx + self._uniform([n], -self.translation, self.translation, seed, 7) * w
            ty = ty + self._uniform([n], -self.translation, self.translation, seed, 8) * h
        cx, cy = (w - 1.0) / 2.0, (h - 1.0) / 2.0
        # input = A @ (output - c) + c + t
        a2 = cx + tx - (a00 * cx + a01 * cy)
        b2 = cy + ty - (a10 * cx + a11 * cy)
        return tf.stack([a00, a01, a2, a10, a11, b2, zero, zero], axis=1)

    def call(self, images, training=True, seed=None):
        if not training:
            return images
        x = tf.cast(images, tf.float32)
        shape = tf.shape(x)
        n = shape[0]
        if self.warps:
            x = tf.raw_ops.ImageProjectiveTransformV3(
                images=x, transforms=self.transforms(n, shape[1], shape[2], seed),
                output_shape=shape[1:3], fill_value=0.0, interpolation="BILINEAR",
                fill_mode="REFLECT")
        elif self.flip:
            flip = self._uniform([n, 1, 1, 1], 0.0, 1.0, seed, 0) < 0.5
            x = tf.where(flip, tf.reverse(x, axis=[2]), x)
        if self.contrast:
            # (x - mean) * k + mean, as RandomContrast, in one multiply-add.
            k = self._uniform([n, 1, 1, 1], 1.0 - self.contrast, 1.0 + self.contrast, seed, 9)
            mean = tf.reduce_mean(x, axis=[1, 2], keepdims=True)
            x = tf.clip_by_value(x * k + mean * (1.0 - k), 0.0, 255.0)
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "flip": self.flip, "rotation": self.rotation,
                "zoom": self.zoom, "translation": self.translation,
                "crop_min_area": self.crop_min_area, "contrast": self.contrast,
                "seed": self.seed}


def augment_batch(augmenter, images, seed):
    """A training batch as `augmenter` makes it: float32, 0..255.

    Args:
        augmenter: an `Augment` layer, any callable on a float32 batch taking
            training=True, or None (no augmentation).
        images: the batch.
        seed: the batch's own stateless seed (int64 [2]); only an `Augment`
            layer takes one, any other augmenter draws from its own generator.
    """
    x = tf.cast(images, tf.float32)
    if isinstance(augmenter, Augment):
        return augmenter(x, training=True, seed=seed)
    return x if augmenter is None else augmenter(x, training=True)


def map_parallelism(augmenter):
    """`num_parallel_calls` for a tf.data map that applies `augmenter`.

    Parallel with an `Augment` layer (per-batch seeds) or none. Any other
    augmenter draws from one stateful generator, which parallel calls would
    hand out in whatever order the threads run, so the same seed would give
    different batches from run to run: it maps on one thread.
    """
    return tf.data.AUTOTUNE if augmenter is None or isinstance(augmenter, Augment) else None


def build_augmenter(flip: bool = True, rotation: float = 10.0, zoom: float = 0.1,
                    contrast: float = 0.1, seed: int = 42, translation: float = 0.0,
                    crop_min_area: float = 0.0) -> Optional[Augment]:
    """Builds the seeded augmentation layer for float32 images in 0..255.

    Args:
        flip: random horizontal flips.
        rotation: maximum rotation in degrees (converted to Keras's fraction
            of a full turn).
        zoom: maximum zoom in or out, as a fraction of the image size.
        contrast: maximum contrast change factor.
        seed: seeds the layer's own generator.
        translation: maximum shift, as a fraction of height and width.
        crop_min_area: random resized crop keeping at least this fraction of
            the area (0: off).

    Returns:
        An `Augment` layer to call with `training=True` (and optionally a
        per-batch `seed`), or None when every augmentation is off.
    """
    if not (flip or rotation or zoom or contrast or translation or crop_min_area):
        return None
    return Augment(flip, degrees_to_turn_fraction(rotation), zoom, translation, crop_min_area,
                   contrast, seed=seed, name="augment")
