"""Training-time augmentation from Keras preprocessing layers.

Applied to training batches only, after any cache of decoded images, so each
pass draws new random variants.
"""

from __future__ import annotations

from typing import Optional

import keras


def build_augmenter(flip: bool = True, rotation: float = 10.0, zoom: float = 0.1,
                    contrast: float = 0.1, seed: int = 42) -> Optional[keras.Sequential]:
    """Builds a seeded augmentation pipeline for float32 images in 0..255.

    Args:
        flip: random horizontal flips.
        rotation: maximum rotation in degrees (converted to Keras's fraction
            of a full turn).
        zoom: maximum zoom in or out, as a fraction of the image size.
        contrast: maximum contrast change factor.
        seed: base seed; each layer gets its own derived seed.

    Returns:
        A keras.Sequential to call with `training=True`, or None when every
        augmentation is off.
    """
    layers = []
    if flip:
        layers.append(keras.layers.RandomFlip("horizontal", seed=seed))
    if rotation:
        layers.append(keras.layers.RandomRotation(rotation / 360.0, fill_mode="reflect",
                                                  seed=seed + 1))
    if zoom:
        layers.append(keras.layers.RandomZoom((-zoom, zoom), fill_mode="reflect", seed=seed + 2))
    if contrast:
        layers.append(keras.layers.RandomContrast(contrast, value_range=(0, 255), seed=seed + 3))
    if not layers:
        return None
    return keras.Sequential(layers, name="augment")
