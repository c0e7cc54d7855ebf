"""Architectures for source models trained from scratch (`tl-keras pretrain`).

Two built-in architectures that keras.applications lacks, with the
constructor signature of keras.applications (include_top=False, weights,
input_tensor, input_shape, alpha) so they slot into the same `Family`
machinery as the applications themselves:

* `compact_cnn`: a small VGG-style CNN with BatchNorm, made to pretrain in
  minutes on a CPU at 64 px: a stride-2 stem, then four blocks of two 3x3
  conv-BN-ReLU layers, max-pooling between blocks (about 60 M multiply-adds per
  64 px image at alpha 1).
* `alexnet`: Krizhevsky et al. 2012 in one tower (the paper split conv2, 4
  and 5 over two GPUs): conv 11x11/4 (96), LRN, max-pool 3/2, conv 5x5 (256),
  LRN, max-pool, conv 3x3 (384, 384, 256), max-pool, then fc6/fc7 (4096,
  dropout 0.5) as its classifier. It adapts to the input size: a max-pool
  whose input is smaller than its 3x3 window pads ("same") instead of
  failing, and the flatten before fc6 takes whatever map is left (6x6 at
  227 px, as in the paper).

`build_source_model` puts a family's body between the family's
preprocessing (a tl_keras `Preprocess` layer, so the model file carries it)
and a classifier, all in one flat functional graph, so that a saved source
model can later be cut and used as a backbone (`model_files_lib.family_from_model_file`).
"""

from __future__ import annotations

from typing import Optional

import keras

from tl_keras.errors import fail
from tl_keras.model import families as families_lib
from tl_keras.model.families import Family
from tl_keras.model.layers import LocalResponseNormalization, Preprocess

# Layer names of the source classifier around the family's body.
PREPROCESS_LAYER = "source_preprocess"
POOL_LAYER = "source_pool"
DROPOUT_LAYER = "source_dropout"
PREDICTIONS_LAYER = "predictions"
FLATTEN_LAYER = "flatten"  # AlexNet's, before fc6


def _inputs(input_tensor, input_shape, default_size: int):
    """The functional input (a new Input, or the given tensor) like keras.applications."""
    if input_tensor is not None:
        return input_tensor
    return keras.Input(input_shape or (default_size, default_size, 3), name="input_layer")


def _finish(inputs, x, weights, name: str) -> keras.Model:
    """Wraps the graph from the source inputs of `inputs` to `x`; loads a weights file."""
    source = keras.utils.get_source_inputs(inputs)
    model = keras.Model(source[0] if len(source) == 1 else source, x, name=name)
    if weights not in (None, "none"):
        # A Keras weights file of this very architecture (e.g. saved by
        # model.save_weights); there are no published weights to download.
        model.load_weights(weights)
    return model


def _check_top(include_top: bool, name: str) -> None:
    if include_top:
        raise ValueError(f"{name}: build the classifier with build_source_model "
                         "(include_top=True is not supported)")


def compact_cnn(include_top: bool = False, weights: Optional[str] = None, input_tensor=None,
                input_shape=None, alpha: float = 1.0) -> keras.Model:
    """The compact CPU-friendly CNN body: images (preprocessed) -> last feature map.

    Args:
        include_top: must be False (the classifier is added by `build_source_model`).
        weights: None, or a path to a weights file of this architecture.
        input_tensor: optional tensor to build on (keeps the graph flat).
        input_shape: (size, size, 3) when no input_tensor is given.
        alpha: width multiplier (channels 24, 32, 64, 128, 256 at 1.0).

    Returns:
        A functional model; layer names are `stem_*` and `block{1..4}_*`.
    """
    _check_top(include_top, "compact_cnn")
    inputs = _inputs(input_tensor, input_shape, 64)
    width = [max(8, int(round(c * alpha))) for c in (24, 32, 64, 128, 256)]

    def conv_bn_relu(x, filters, stride, prefix):
        x = keras.layers.Conv2D(filters, 3, strides=stride, padding="same", use_bias=False,
                                kernel_initializer="he_normal", name=f"{prefix}conv")(x)
        # Momentum 0.9, not Keras's 0.99: a few hundred steps of pretraining
        # (or a few dozen on a small set) must be enough for the moving
        # statistics that inference, and every later transfer, relies on.
        x = keras.layers.BatchNormalization(momentum=0.9, name=f"{prefix}bn")(x)
        return keras.layers.ReLU(name=f"{prefix}relu")(x)

    x = conv_bn_relu(inputs, width[0], 2, "stem_")
    for i, filters in enumerate(width[1:], start=1):
        x = conv_bn_relu(x, filters, 1, f"block{i}_1_")
        x = conv_bn_relu(x, filters, 1, f"block{i}_2_")
        if i < len(width) - 1 and x.shape[1] >= 2:  # the last block feeds global pooling
            x = keras.layers.MaxPooling2D(2, name=f"block{i}_pool")(x)
    return _finish(inputs, x, weights, "compact_cnn")


def _alexnet_pool(x, name: str):
    # The paper's overlapping 3x3/2 pooling; "same" where the map is smaller
    # than the window (small inputs), so any size >= min_size builds.
    padding = "valid" if min(x.shape[1], x.shape[2]) >= 3 else "same"
    return keras.layers.MaxPooling2D(3, strides=2, padding=padding, name=name)(x)


def alexnet(include_top: bool = False, weights: Optional[str] = None, input_tensor=None,
            input_shape=None, alpha: float = 1.0) -> keras.Model:
    """AlexNet's convolutional body: images (preprocessed) -> pool5 feature map.

    Args: as `compact_cnn` (alpha scales every layer's width, 1.0 = the paper).

    Returns:
        A functional model with layers conv1..conv5, lrn1/2, pool1/2/5.
    """
    _check_top(include_top, "alexnet")
    inputs = _inputs(input_tensor, input_shape, 227)

    def conv(x, filters, kernel, name, strides=1, padding="same"):
        return keras.layers.Conv2D(max(8, int(round(filters * alpha))), kernel, strides=strides,
                                   padding=padding, activation="relu", name=name)(x)

    x = conv(inputs, 96, 11, "conv1", strides=4, padding="valid")
    x = _alexnet_pool(LocalResponseNormalization(name="lrn1")(x), "pool1")
    x = conv(x, 256, 5, "conv2")
    x = _alexnet_pool(LocalResponseNormalization(name="lrn2")(x), "pool2")
    x = conv(x, 384, 3, "conv3")
    x = conv(x, 384, 3, "conv4")
    x = conv(x, 256, 3, "conv5")
    x = _alexnet_pool(x, "pool5")
    return _finish(inputs, x, weights, "alexnet")


def alexnet_classifier(x, alpha: float = 1.0, dropout: float = 0.5):
    """AlexNet's fc6/fc7 on its pool5 map (the paper's dropout 0.5)."""
    units = max(8, int(round(4096 * alpha)))
    x = keras.layers.Flatten(name=FLATTEN_LAYER)(x)
    x = keras.layers.Dense(units, activation="relu", name="fc6")(x)
    x = keras.layers.Dropout(dropout, name="drop6")(x)
    x = keras.layers.Dense(units, activation="relu", name="fc7")(x)
    return keras.layers.Dropout(dropout, name="drop7")(x)


ARCHITECTURES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="compact_cnn", constructor=compact_cnn, preprocess="tf", default_size=64,
            min_size=32, alphas=(1.0,), default_alpha=1.0,
            block_rules=((PREPROCESS_LAYER + r"|stem_.*", "stem"), (r"(block\d+)_.*", "{0}")),
        ),
        Family(
            # Inputs are scaled to -1..1 in place of the paper's mean-image
            # subtraction, so that default initializers train without tuning.
            name="alexnet", constructor=alexnet, preprocess="tf", default_size=227,
            min_size=32, alphas=(1.0,), default_alpha=1.0,
            # One block per conv layer with its LRN and pooling; the
            # preprocessing joins conv1.
            block_rules=((PREPROCESS_LAYER, "conv1"), (r"(?:conv|lrn|pool)(\d)", "conv{0}")),
        ),
    ]
}


def get_architecture(name: str) -> Family:
    """A built-in architecture or a keras.applications family, by CLI name."""
    key = name.strip().lower()
    if key in ARCHITECTURES:
        return ARCHITECTURES[key]
    if key in families_lib.FAMILIES:
        return families_lib.FAMILIES[key]
    raise fail("architecture", name, "unknown architecture; choose compact_cnn, alexnet or a "
               "keras.applications family: " + ", ".join(sorted(families_lib.FAMILIES)))


def build_source_model(family: Family, num_classes: int, image_size: int, alpha: float = 0.0,
                       dropout: float = 0.2) -> tuple[keras.Model, str]:
    """The source classifier, trained from scratch by `pretrain`.

    images (0..255) -> Preprocess(family) -> body -> classifier -> float32 softmax,
    one flat graph. The classifier is AlexNet's fc6/fc7 for alexnet, and
    global average pooling + dropout for every other architecture.

    Args:
        family: from `get_architecture`.
        num_classes: classes of the source task.
        image_size: square input size (0: the family default).
        alpha: width multiplier (0: the family default).
        dropout: dropout before the last dense layer (AlexNet keeps 0.5 in
            fc6/fc7 and uses this before its output layer as well).

    Returns:
        (model, name of the cut layer: where a backbone made from the model
        file ends, i.e. the input of the old classifier's dense layers).
    """
    size = image_size or family.default_size
    images = keras.Input((size, size, 3), name="images")
    x = Preprocess(family.preprocess, name=PREPROCESS_LAYER)(images)
    kwargs = dict(include_top=False, weights=None, input_tensor=x, input_shape=(size, size, 3))
    kwargs.update(dict(family.extra_kwargs))
    a = families_lib.resolve_alpha(family, alpha)
    if a is not None:
        kwargs["alpha"] = a
    body = family.constructor(**kwargs)
    if family.name == "alexnet":
        x = alexnet_classifier(body.output, a or 1.0)
        cut = FLATTEN_LAYER
    else:
        x = keras.layers.GlobalAveragePooling2D(name=POOL_LAYER)(body.output)
        cut = POOL_LAYER
    x = keras.layers.Dropout(dropout, name=DROPOUT_LAYER)(x)
    probs = keras.layers.Dense(num_classes, activation="softmax", dtype="float32",
                               name=PREDICTIONS_LAYER)(x)
    return keras.Model(images, probs, name=f"source_{family.name}"), cut
