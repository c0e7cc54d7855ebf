"""SavedModel export of a text model for TF Serving: raw strings in, class names out.

Signature:
  serving_default(text: string[N])
returning probabilities float32[N, C], classes string[N, k] and scores
float32[N, k] (top-k). The model itself standardizes, splits and looks up
the words (its TextVectorization layer), so serving needs nothing else.
"""

from __future__ import annotations

import os

import keras
import tensorflow as tf

from tl_keras import outputs


def export_text_saved_model(model: keras.Model, class_names: list[str], path: str,
                            top_k: int = 3) -> str:
    """Writes a SavedModel whose `serving_default` classifies a batch of strings, atomically.

    Args:
        model: the trained text model (strings [N] -> probabilities [N, C]).
        class_names: class names, baked into the graph and written to
            `assets/labels.txt`.
        path: the version folder, e.g. OUT/export/1.
        top_k: how many classes and scores each prediction returns.

    Returns:
        `path`.
    """
    names = tf.constant(list(class_names))
    k = max(1, min(int(top_k), len(class_names)))

    def serve(text):
        probs = tf.cast(model(text, training=False), tf.float32)
        scores, idx = tf.math.top_k(probs, k=k)
        return {"probabilities": probs, "classes": tf.gather(names, idx), "scores": scores}

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint("serving_default", serve,
                         input_signature=[tf.TensorSpec([None], tf.string, name="text")])
    with outputs.atomic_path(path) as tmp:
        archive.write_out(tmp, verbose=False)
        os.makedirs(os.path.join(tmp, "assets"), exist_ok=True)
        with open(os.path.join(tmp, "assets", "labels.txt"), "w", encoding="utf-8") as f:
            f.write("\n".join(class_names) + "\n")
    return path
