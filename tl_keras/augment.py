"""Training-time augmentation from Keras preprocessing layers.

Applied to training batches only, after any cache of decoded images, so each
pass draws new random variants. Every layer is seeded (from one base seed),
so a run's sequence of augmented batches is reproducible.
"""

from __future__ import annotations

import math
from typing import Optional

import keras
import tensorflow as tf


def degrees_to_turn_fraction(degrees: float) -> float:
    """Keras's RandomRotation takes a fraction of a full turn: 36 degrees -> 0.1."""
    return float(degrees) / 360.0


@keras.saving.register_keras_serializable(package="tl_keras")
class RandomResizedCrop(keras.layers.Layer):
    """Crops a random box of each image and resizes it back to the input size.

    The box covers a fraction of the area drawn from [min_area, 1] with an
    aspect ratio (width / height) drawn log-uniformly from `ratio`, placed
    uniformly inside the image (the Inception-style crop). Each image of a
    batch gets its own box. Identity when called with training=False.

    Args:
        min_area: smallest fraction of the image area a crop keeps, in (0, 1).
        ratio: (low, high) aspect ratios of the crop box.
        seed: seeds the draws.
    """

    def __init__(self, min_area: float = 0.5, ratio=(3 / 4, 4 / 3), seed: Optional[int] = None,
                 **kwargs):
        super().__init__(**kwargs)
        self.min_area = float(min_area)
        self.ratio = (float(ratio[0]), float(ratio[1]))
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)

    def call(self, images, training=True):
        if not training:
            return images
        shape = tf.shape(images)
        n = shape[0]
        area = keras.random.uniform((n,), self.min_area, 1.0, seed=self.seed_generator)
        log_r = keras.random.uniform((n,), math.log(self.ratio[0]), math.log(self.ratio[1]),
                                     seed=self.seed_generator)
        r = tf.exp(log_r)
        # Box sides as fractions of the image's height and width.
        h = tf.minimum(tf.sqrt(area / r), 1.0)
        w = tf.minimum(tf.sqrt(area * r), 1.0)
        y0 = keras.random.uniform((n,), 0.0, 1.0, seed=self.seed_generator) * (1.0 - h)
        x0 = keras.random.uniform((n,), 0.0, 1.0, seed=self.seed_generator) * (1.0 - w)
        boxes = tf.stack([y0, x0, y0 + h, x0 + w], axis=1)
        out = tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes,
                                       tf.range(n, dtype=tf.int32), shape[1:3])
        return tf.cast(out, images.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "min_area": self.min_area, "ratio": list(self.ratio),
                "seed": self.seed}


def build_augmenter(flip: bool = True, rotation: float = 10.0, zoom: float = 0.1,
                    contrast: float = 0.1, seed: int = 42, translation: float = 0.0,
                    crop_min_area: float = 0.0) -> Optional[keras.Sequential]:
    """Builds a seeded augmentation pipeline for float32 images in 0..255.

    Args:
        flip: random horizontal flips.
        rotation: maximum rotation in degrees (converted to Keras's fraction
            of a full turn).
        zoom: maximum zoom in or out, as a fraction of the image size.
        contrast: maximum contrast change factor.
        seed: base seed; each layer gets its own derived seed.
        translation: maximum shift, as a fraction of height and width.
        crop_min_area: random resized crop keeping at least this fraction of
            the area (0: off).

    Returns:
        A keras.Sequential to call with `training=True`, or None when every
        augmentation is off.
    """
    layers = []
    if crop_min_area:
        layers.append(RandomResizedCrop(crop_min_area, seed=seed + 5, name="random_resized_crop"))
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        layers.append(keras.layers.RandomRotation(degrees_to_turn_fraction(rotation),
                                                  fill_mode="reflect", seed=seed + 1))
    if zoom:
        layers.append(keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect", seed=seed + 2))
    if translation:
        layers.append(keras.layers.RandomTranslation(translation, translation,
                                                     fill_mode="reflect", seed=seed + 4))
    if contrast:
        layers.append(keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 3))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")
