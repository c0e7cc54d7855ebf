"""Seeding and TensorFlow op determinism (--seed, --deterministic).

`keras.utils.set_random_seed` fixes the Python, NumPy and TensorFlow seeds
(weight initialisation, shuffling, augmentation draws). That is not enough
for identical results: some kernels (GPU reductions, scatter ops, parallel
tf.data stages) may run in a different order each time. With
--deterministic, TensorFlow's op determinism is switched on as well, which
picks deterministic kernels or fails loudly where none exists.
"""

from __future__ import annotations

import keras
import tensorflow as tf


def apply(seed: int, deterministic: bool) -> None:
    """Seeds every random generator; with `deterministic`, also makes TF ops deterministic.

    Op determinism is process-wide and cannot be switched off again, so it
    is only ever switched on.
    """
    keras.utils.set_random_seed(seed)
    if deterministic:
        tf.config.experimental.enable_op_determinism()

