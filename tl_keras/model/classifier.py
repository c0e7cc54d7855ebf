"""The transfer model: raw pixels in, float32 probabilities out.

    images (uint8 or float, 0..255)
      -> Preprocess (the backbone family's preprocess_input)
      -> backbone(training=False)        # BatchNorm always in inference mode
      -> GlobalAveragePooling2D          # "features"
      -> Dropout -> Dense(float32, softmax)

The head's layers are shared by a small `head` model on pooled features, so
stage 1 can train on cached features and its weights are the full model's.
"""

from __future__ import annotations

import dataclasses

import keras

from tl_keras.model.families import Family
from tl_keras.model.layers import MirrorMean, MirrorStack, Preprocess, Temperature

FEATURES_LAYER = "features"
HEAD_LAYER = "head"


@dataclasses.dataclass
class Classifier:
    """The built model and its parts.

    Attributes:
        model: images -> probabilities; what stage 2 trains.
        backbone: the nested keras.applications model.
        family: the backbone family (block map, preprocessing).
        features: images -> pooled backbone features (inference mode).
        head: pooled features -> probabilities, sharing the model's head layers.
    """

    model: keras.Model
    backbone: keras.Model
    family: Family
    features: keras.Model
    head: keras.Model

    def inference_model(self, mirror_average: bool) -> keras.Model:
        """The model to evaluate, save and export.

        Args:
            mirror_average: average the probabilities of each image and its
                left-right mirror (test-time augmentation matching the flip
                augmentation); otherwise the trained model itself.
        """
        if not mirror_average:
            return self.model
        images = keras.Input(self.model.input_shape[1:], name="images")
        both = self.model(MirrorStack(name="mirror")(images))
        probs = MirrorMean(dtype="float32", name="probabilities")(both)
        return keras.Model(images, probs, name=self.model.name + "_mirror_avg")


def build_classifier(backbone: keras.Model, family: Family, num_classes: int,
                     dropout: float = 0.2, multi_label: bool = False) -> Classifier:
    """Wraps a headless backbone into the transfer model.

    Args:
        backbone: a headless backbone whose input is square RGB.
        family: its family (for its preprocessing mode).
        num_classes: number of output classes.
        dropout: dropout rate before the dense head.
        multi_label: sigmoid outputs (independent labels) instead of softmax.

    Returns:
        A Classifier. The backbone starts frozen.
    """
    size = backbone.input_shape[1]
    backbone.trainable = False
    images = keras.Input((size, size, 3), name="images")
    x = Preprocess(family.preprocess, name="preprocess")(images)
    # training=False pins BatchNorm (and any dropout) of the backbone to
    # inference mode in both stages, whatever fit() passes.
    x = backbone(x, training=False)
    # A backbone cut from a model file (backbones.family_from_model_file) may
    # end in its own flatten or global pooling: its vector is the features.
    feats = (keras.layers.GlobalAveragePooling2D(name=FEATURES_LAYER)(x) if len(x.shape) == 4
             else keras.layers.Identity(name=FEATURES_LAYER)(x))
    drop = keras.layers.Dropout(dropout, name="head_dropout")
    dense = keras.layers.Dense(num_classes, activation="sigmoid" if multi_label else "softmax",
                               dtype="float32", name=HEAD_LAYER)
    probs = dense(drop(feats))
    model = keras.Model(images, probs, name=f"tl_keras_{family.name}")

    feature_model = keras.Model(images, feats, name="feature_extractor")
    feat_in = keras.Input((feats.shape[-1],), name="pooled_features")
    head = keras.Model(feat_in, dense(drop(feat_in)), name="head")
    return Classifier(model, backbone, family, feature_model, head)


def calibrated(model: keras.Model, temperature, multi_label: bool = False) -> keras.Model:
    """`model` with a `Temperature` layer on its probabilities (same input, one graph).

    The layer is added to the model's own graph, not around a nested copy, so
    the backbone stays where `find_backbone` looks for it.
    """
    probs = Temperature(temperature, multi_label, name="calibrated")(model.output)
    return keras.Model(model.input, probs, name=model.name)


def find_backbone(model: keras.Model) -> keras.Model:
    """Returns the nested backbone of a model built by `build_classifier`
    (or of its mirror-averaging inference wrapper, which nests that model)."""
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            if layer.name.startswith("tl_keras_"):
                return find_backbone(layer)
            return layer
    raise ValueError(f"model {model.name!r} has no nested backbone")
