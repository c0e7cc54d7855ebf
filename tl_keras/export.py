"""SavedModel export for TF Serving: raw images in, class names out.

Signatures:
  serving_default(image_bytes: string[N])      encoded JPEG/PNG/GIF/BMP
  serve_images(images: float32[N, H, W, 3])     pixels 0..255, any H, W
  serve_images_uint8(images: uint8[N, H, W, 3])
each returning probabilities float32[N, C], classes string[N, k] and
scores float32[N, k] (top-k). Decoding and resizing are `data.decode_and_resize`
and `data.resize_image`, the very functions the training pipeline used.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tl_keras import data as data_lib
from tl_keras import outputs


def _endpoints(model: keras.Model, class_names: list[str], image_size: int, top_k: int):
    names = tf.constant(list(class_names))
    k = max(1, min(int(top_k), len(class_names)))

    def predict(images_uint8):
        probs = tf.cast(model(images_uint8, training=False), tf.float32)
        scores, idx = tf.math.top_k(probs, k=k)
        return {"probabilities": probs, "classes": tf.gather(names, idx), "scores": scores}

    def serve_bytes(image_bytes):
        images = tf.map_fn(lambda b: data_lib.decode_and_resize(b, image_size), image_bytes,
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                             tf.uint8))
        return predict(images)

    def serve_images(images):
        return predict(data_lib.resize_image(images, image_size))

    return [
        ("serving_default", serve_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")]),
        ("serve_images", serve_images,
         [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]),
        ("serve_images_uint8", serve_images,
         [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]),
    ]


def export_saved_model(model: keras.Model, class_names: list[str], image_size: int,
                       path: str, top_k: int = 3, extra_files: dict | None = None) -> str:
    """Writes a SavedModel that TF Serving can load, atomically.

    Args:
        model: the trained Keras model (images 0..255 -> probabilities).
        class_names: class names, baked into the graph and written to
            `assets/labels.txt`.
        image_size: the square size the model was trained at.
        path: the version folder, e.g. OUT/export/1.
        top_k: how many classes and scores each prediction returns.
        extra_files: {file name: text} written to `assets.extra/` (e.g. the
            run manifest), which TF Serving keeps but does not load.

    Returns:
        `path`.
    """
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, fn, sig in _endpoints(model, class_names, image_size, top_k):
        archive.add_endpoint(name, fn, input_signature=sig)
    with outputs.atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
        with open(os.path.join(tmp, "assets", "labels.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(class_names) + "\n")
        for name, text in (extra_files or {}).items():
            os.makedirs(os.path.join(tmp, "assets.extra"), exist_ok=True)
            with open(os.path.join(tmp, "assets.extra", name), "w", encoding="utf-8") as f:
                f.write(text)
    return path


def load_saved_model(path: str):
    """Loads an exported SavedModel (for checks and `evaluate`)."""
    return tf.saved_model.load(path)
