"""Cached activations for stage 2.

In stage 2 everything below the first unfrozen block is frozen and in
inference mode, so its output is a function of the input image alone. We
cut the backbone there, compute the bottom part once per image view, and
train only the top part (unfrozen blocks + head) on the cached activations.
The top part shares its layers with the full model, so the full model ends
up with the trained weights.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Optional

import keras
import numpy as np

if TYPE_CHECKING:  # cut() is plain Keras, usable on any backend; extract() feeds tf.data
    import tensorflow as tf

from tl_keras.errors import one_line
from tl_keras.model import blocks as blocks_lib
from tl_keras.model.classifier import Classifier


@dataclasses.dataclass
class Cut:
    """The backbone split at the boundary below the first unfrozen block.

    Attributes:
        bottom: images (the full model's raw input) -> activations.
        trainer: activations -> probabilities, sharing layers with the model.
        shape: shape of one example's activations.
        joint: images -> [activations, pooled features] in one pass, so one
            inference per view feeds both stages' caches.
    """

    bottom: keras.Model
    trainer: keras.Model
    shape: tuple
    joint: keras.Model


def _producers(tensors) -> list:
    # `_keras_history` (the operation that made a symbolic tensor) has no
    # public equivalent in Keras 3; Keras's own graph code reads it.
    if not isinstance(tensors, (list, tuple)):
        tensors = [tensors]
    return [t for t in tensors if hasattr(t, "_keras_history")]


def cut(clf: Classifier, n_blocks: int) -> Optional[Cut]:
    """Splits the classifier below its top `n_blocks` backbone blocks.

    Returns:
        The Cut, or None where `find_cut` gives a reason instead.
    """
    return find_cut(clf, n_blocks)[0]


def find_cut(clf: Classifier, n_blocks: int) -> tuple[Optional[Cut], str]:
    """Splits the classifier below its top `n_blocks` backbone blocks.

    Returns:
        (the Cut, ""), or (None, why not) when n_blocks covers no block or
        the whole backbone (nothing frozen to cache), when the top blocks
        take other than one tensor from below (no single boundary to
        cache), or when Keras cannot build the two halves (its own error,
        on one line). Stage 2 then trains through the full model, which is
        always correct, only slower: so the reason is returned, not raised.
    """
    blocks = blocks_lib.block_map(clf.backbone, clf.family)
    if n_blocks <= 0:
        return None, "no block is unfrozen"
    if n_blocks >= len(blocks):
        return None, (f"the top {n_blocks} blocks are all {len(blocks)} of the backbone: "
                      "nothing frozen below them to cache")
    below = {name for _, names in blocks[: len(blocks) - n_blocks] for name in names}
    above = [clf.backbone.get_layer(n) for _, names in blocks[len(blocks) - n_blocks:]
             for n in names]
    boundary = {}
    for layer in above:
        for t in _producers(layer.input):
            if t._keras_history.operation.name in below:
                boundary[id(t)] = t
    if len(boundary) != 1:
        return None, (f"the top {n_blocks} blocks take {len(boundary)} tensors from the blocks "
                      "below, not one: no single boundary to cache")
    (tensor,) = boundary.values()
    try:
        top = keras.Model(tensor, clf.backbone.output, name="backbone_top")
        bottom_backbone = keras.Model(clf.backbone.input, tensor, name="backbone_bottom")
    except Exception as e:  # noqa: BLE001 - an unusual graph: the reason goes to the log
        return None, (f"Keras could not split the backbone below the top {n_blocks} blocks: "
                      f"{one_line(e)}")
    images = clf.model.input
    pre = clf.model.get_layer("preprocess")
    acts = bottom_backbone(pre(images), training=False)
    bottom = keras.Model(images, acts, name="bottom")
    pool = clf.model.get_layer("features")
    joint = keras.Model(images, [acts, pool(top(acts, training=False))], name="bottom_and_features")
    act_in = keras.Input(tuple(tensor.shape[1:]), name="activations")
    x = top(act_in, training=False)
    for name in ("features", "head_dropout", "head"):
        x = clf.model.get_layer(name)(x)
    trainer = keras.Model(act_in, x, name="top_trainer")
    return Cut(bottom, trainer, tuple(tensor.shape[1:]), joint), ""


def estimate_bytes(c: Cut, n_examples: int, views: int) -> int:
    """Bytes needed to cache float32 activations of n_examples x views."""
    return int(np.prod(c.shape)) * 4 * n_examples * views


def extract(bottom: keras.Model, images: tf.data.Dataset, batch_size: int, views: int = 1,
            augmenter=None, progress: bool = True, seed: int = 0
            ) -> tuple[np.ndarray, np.ndarray, float]:
    """Computes the bottom part's activations for K views of each image.

    Same view convention as `features.extract`: view 0 clean, the others
    augmented.
    """
    from tl_keras.train import features

    return features.extract(bottom, images, batch_size, views, augmenter, seed=seed,
                            progress=progress)
