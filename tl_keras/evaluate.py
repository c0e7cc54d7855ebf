"""Evaluation of a trained model on a split."""

from __future__ import annotations

import keras
import numpy as np
import tensorflow as tf

from tl_keras import data as data_lib
from tl_keras import distribute


def predict(model: keras.Model, split: data_lib.Split, image_size: int,
            batch_size: int = 64) -> np.ndarray:
    """Probabilities [N, C] for every example of `split`, in order.

    The last batch is padded to `batch_size`: the model is traced for one
    batch shape, where a smaller last batch would trace it a second time.
    """
    plain = tf.autograph.experimental.do_not_convert  # see data._decoded
    ds = data_lib.image_dataset(split, image_size, cache=False).map(plain(lambda x, y: x))
    ds = ds.batch(batch_size).map(plain(lambda x: data_lib.pad_batch(x, batch_size)))
    ds = ds.prefetch(data_lib.AUTOTUNE)
    probs = np.asarray(distribute.predict(model, ds), dtype=np.float32)
    return probs[:len(split)]


def metrics(probs: np.ndarray, labels: np.ndarray, top_k: int = 3) -> dict:
    """Accuracy, top-k accuracy and count for single-label predictions."""
    n = int(len(labels))
    if n == 0:
        return {"accuracy": 0.0, "n": 0}
    pred = probs.argmax(axis=1)
    k = min(top_k, probs.shape[1])
    topk = np.argsort(-probs, axis=1)[:, :k]
    return {
        "accuracy": float(np.mean(pred == labels)),
        f"top_{k}_accuracy": float(np.mean([labels[i] in topk[i] for i in range(n)])),
        "n": n,
    }


def evaluate(model: keras.Model, split: data_lib.Split, image_size: int, batch_size: int = 64,
             top_k: int = 3) -> dict:
    """Predicts `split` and returns its metrics (see `metrics`)."""
    return metrics(predict(model, split, image_size, batch_size), split.labels, top_k)
