"""Image bytes to float pixels, the one way training and serving both use.

`decode_and_resize` is what the tf.data pipelines (`tl_keras.data.pipeline`)
and the exported model's bytes signature (`tl_keras.export.saved_model`) call,
so a served image is decoded and resized exactly as training saw it.
"""
from __future__ import annotations

import tensorflow as tf

# --------------------------------------------------------------------------
# Decoding (shared with the exported model: keep it one function)
# --------------------------------------------------------------------------

def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes an RGB image (any dtype, 0..255) to size x size uint8.

    Antialiased bilinear resize, then rounding to uint8: this is what both the
    training pipeline and the exported SavedModel do, so they see identical
    pixels.
    """
    x = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                        antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to an RGB uint8 [H, W, 3] (first GIF frame)."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def decode_and_resize(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded bytes -> size x size RGB uint8."""
    return resize_image(decode_image(data), size)
