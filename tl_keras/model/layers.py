"""Serializable layers that live inside tl_keras models.

They are registered with Keras so that `model.keras` files reload in safe mode
(no Lambda layers, no pickled Python code).
"""

from __future__ import annotations

import keras
from keras import ops

# ImageNet statistics used by keras.applications' preprocess_input.
_CAFFE_MEAN_BGR = (103.939, 116.779, 123.68)
_TORCH_MEAN = (0.485, 0.456, 0.406)
_TORCH_STD = (0.229, 0.224, 0.225)

PREPROCESS_MODES = ("tf", "caffe", "torch", "none")


@keras.saving.register_keras_serializable(package="tl_keras")
class Preprocess(keras.layers.Layer):
    """A backbone family's `preprocess_input`, as a layer.

    Takes RGB images in 0..255 of any numeric dtype (uint8 or float) and
    returns what the backbone expects, in the layer's compute dtype.

    Args:
        mode: "tf" (scale to -1..1), "caffe" (RGB->BGR, minus ImageNet mean),
            "torch" (0..1, ImageNet mean/std) or "none" (pass 0..255 through).
    """

    def __init__(self, mode: str = "tf", **kwargs):
        super().__init__(**kwargs)
        if mode not in PREPROCESS_MODES:
            raise ValueError(f"Preprocess mode {mode!r} is not one of {PREPROCESS_MODES}")
        self.mode = mode

    def call(self, images):
        x = ops.cast(images, self.compute_dtype)
        if self.mode == "tf":
            return x / 127.5 - 1.0
        if self.mode == "caffe":
            x = ops.flip(x, axis=-1)
            return x - ops.convert_to_tensor(_CAFFE_MEAN_BGR, dtype=self.compute_dtype)
        if self.mode == "torch":
            mean = ops.convert_to_tensor(_TORCH_MEAN, dtype=self.compute_dtype)
            std = ops.convert_to_tensor(_TORCH_STD, dtype=self.compute_dtype)
            return (x / 255.0 - mean) / std
        return x

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="tl_keras")
class FlipLeftRight(keras.layers.Layer):
    """Mirrors images [N, H, W, C] left to right.

    Kept so that models saved before mirror averaging moved to `MirrorStack`
    / `MirrorMean` (which run the model once instead of twice) still load.
    """

    def call(self, images):
        return ops.flip(images, axis=2)

    def compute_output_shape(self, input_shape):
        return input_shape


@keras.saving.register_keras_serializable(package="tl_keras")
class MirrorStack(keras.layers.Layer):
    """Stacks a batch [N, H, W, C] with its left-right mirror: [2N, H, W, C].

    With `MirrorMean` after the model, mirror averaging runs the wrapped model
    once on a doubled batch instead of twice: one copy of its graph to trace,
    save and serve instead of two.
    """

    def call(self, images):
        return ops.concatenate([images, ops.flip(images, axis=2)], axis=0)

    def compute_output_shape(self, input_shape):
        n = input_shape[0]
        return (None if n is None else 2 * n,) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="tl_keras")
class MirrorMean(keras.layers.Layer):
    """Averages the two halves of a [2N, C] batch made by `MirrorStack`: [N, C]."""

    def call(self, probs):
        n = ops.shape(probs)[0] // 2
        return 0.5 * (probs[:n] + probs[n:])

    def compute_output_shape(self, input_shape):
        n = input_shape[0]
        return (None if n is None else n // 2,) + tuple(input_shape[1:])


@keras.saving.register_keras_serializable(package="tl_keras")
class LocalResponseNormalization(keras.layers.Layer):
    """AlexNet's local response normalization across channels.

    b[..., c] = a[..., c] / (bias + alpha * sum(a[..., c']^2 for |c' - c| <= radius))^beta,
    with the paper's constants as defaults (n = 5 neighbouring channels,
    k = 2, alpha = 1e-4, beta = 0.75; alpha is not divided by n, as in the
    paper and tf.nn.local_response_normalization). Written with keras.ops so
    it saves, reloads in safe mode and exports like any built-in layer.
    """

    def __init__(self, radius: int = 2, bias: float = 2.0, alpha: float = 1e-4,
                 beta: float = 0.75, **kwargs):
        super().__init__(**kwargs)
        self.radius, self.bias, self.alpha, self.beta = int(radius), bias, alpha, beta

    def call(self, x):
        sq = ops.square(x)
        channels = x.shape[-1]
        padded = ops.pad(sq, [[0, 0]] * (len(x.shape) - 1) + [[self.radius, self.radius]])
        window = sum(padded[..., i:i + channels] for i in range(2 * self.radius + 1))
        return x / ops.power(self.bias + self.alpha * window, self.beta)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "radius": self.radius, "bias": self.bias,
                "alpha": self.alpha, "beta": self.beta}


@keras.saving.register_keras_serializable(package="tl_keras")
class Temperature(keras.layers.Layer):
    """Calibrates probabilities with a temperature (Guo et al., 2017).

    Single-label: softmax(log(p) / T), the softmax of the logits divided by T
    (log(p) differs from the logits by a constant per row, which the softmax
    ignores). Multi-label: sigmoid(logit(p_c) / T_c), one temperature per
    label. T > 1 softens over-confident probabilities; the ranking of the
    classes (the argmax) never changes. `tl_keras.report.calibration` fits T
    and applies the same formula to arrays.

    Args:
        temperature: T (single-label), or one T per label (multi-label).
        multi_label: sigmoid outputs, calibrated label by label.
    """

    def __init__(self, temperature=1.0, multi_label: bool = False, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.temperature = ([float(t) for t in temperature] if multi_label
                            else float(temperature))
        self.multi_label = bool(multi_label)

    def call(self, probs):
        # The same clipping as calibration.apply_temperature (float32).
        p = ops.clip(ops.cast(probs, "float32"), 1e-7, 1.0 - 1e-7)
        t = ops.convert_to_tensor(self.temperature, dtype="float32")
        if self.multi_label:
            return ops.sigmoid((ops.log(p) - ops.log1p(-p)) / t)
        return ops.softmax(ops.log(p) / t, axis=-1)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        return {**super().get_config(), "temperature": self.temperature,
                "multi_label": self.multi_label}
