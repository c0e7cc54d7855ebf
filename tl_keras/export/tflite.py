"""TFLite exports of a trained model, and running them with tf.lite.Interpreter.

Variants (`--tflite=float,dynamic,float16,int8`):
  float    float32 weights and activations: the Keras model, op for op.
  dynamic  int8 weights, float activations (dynamic-range quantization).
  float16  float16 weights, float activations.
  int8     full integer: int8 weights and activations, calibrated on a
           representative dataset of training images; uint8 pixel input,
           float32 probabilities out.

Every variant takes one image of the model's size, RGB 0..255 (float32, or
uint8 for int8), and returns float32 probabilities [1, C]: decoding and
resizing happen outside, with `data.decode_and_resize`, as in training.
With an unknown threshold (`model.open_set`), its signature also returns
`ood_score` float32 [1] and `unknown` bool [1], computed in the file from
its own probabilities.
"""

from __future__ import annotations

import os
from typing import Iterable, Optional

import keras
import numpy as np
import tensorflow as tf

from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail
from tl_keras.model import open_set

VARIANTS = ("float", "dynamic", "float16", "int8")


def parse_variants(spec: str, flag: str = "tflite") -> list[str]:
    """Parses `float,dynamic,...` into a list of known variants, in order, no repeats.

    Raises:
        ConfigError: an unknown variant name.
    """
    out: list[str] = []
    for name in (s.strip().lower() for s in spec.split(",")):
        if not name:
            continue
        if name not in VARIANTS:
            raise fail(flag, spec, f"unknown TFLite variant {name!r}; choose from "
                       f"{', '.join(VARIANTS)}")
        if name not in out:
            out.append(name)
    return out


def file_name(variant: str) -> str:
    """The file a variant is written to inside an export version folder."""
    return f"model_{variant}.tflite"


class ConversionSource:
    """What every conversion starts from: one traced, batch-1 forward pass.

    The variables are tracked by a plain tf.Module holding the backend
    tf.Variables: with the Keras model itself as the trackable object the
    converter keeps Keras 3 variables as uninitialised resource variables
    (the model then outputs NaN), and without one it falls back to a
    deprecated conversion path.
    """

    def __init__(self, model: keras.Model, image_size: int,
                 unknown_threshold: Optional[float] = None):
        spec = tf.TensorSpec([1, image_size, image_size, 3], tf.float32, name="images")

        def forward(images):
            probs = model(images, training=False)
            if unknown_threshold is None:
                return probs
            return {"probabilities": probs,
                    **open_set.graph_outputs(probs, unknown_threshold)}

        fn = tf.function(forward, input_signature=[spec])
        self.concrete = fn.get_concrete_function()
        self.trackable = tf.Module()
        self.trackable.tracked_variables = [getattr(v, "value", v) for v in model.variables]


def prepare(model: keras.Model, image_size: int,
            unknown_threshold: Optional[float] = None) -> ConversionSource:
    """Traces `model` once for any number of `convert` calls (with the
    `ood_score` and `unknown` outputs when `unknown_threshold` is given)."""
    return ConversionSource(model, image_size, unknown_threshold)


def convert(source: ConversionSource, variant: str,
            representative: Optional[np.ndarray] = None) -> bytes:
    """Converts one variant; returns the .tflite flatbuffer.

    Args:
        source: from `prepare(model, image_size)`.
        variant: one of VARIANTS.
        representative: uint8 images [N, S, S, 3] for int8 calibration.
    """
    conv = tf.lite.TFLiteConverter.from_concrete_functions([source.concrete], source.trackable)
    if variant != "float":
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
    if variant == "float16":
        conv.target_spec.supported_types = [tf.float16]
    elif variant == "int8":
        if representative is None or len(representative) == 0:
            raise ValueError("int8 needs representative images for calibration")
        images = np.asarray(representative)

        def gen():
            for i in range(len(images)):
                yield [images[i:i + 1].astype(np.float32)]

        conv.representative_dataset = gen
        # Integer-only kernels (no float fallback), so the file runs on
        # integer accelerators. Pixels are uint8 by nature: with calibration
        # over 0..255 the input quantization is the identity (scale 1, zero
        # point 0). Probabilities stay float32 (a final dequantize) so that
        # scores keep their resolution.
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        conv.inference_input_type = tf.uint8
    elif variant not in VARIANTS:
        raise ValueError(f"unknown TFLite variant {variant!r}")
    return conv.convert()


def representative_images(split: sources_lib.Split, image_size: int, n: int,
                          seed: int = 0) -> np.ndarray:
    """A seeded sample of up to `n` images of `split`, decoded and resized (uint8).

    Decoding is `data.decode_and_resize`, so calibration sees exactly the
    pixels the model sees in training and serving (no augmentation).
    """
    idx = np.random.default_rng(seed).permutation(len(split))[:max(0, n)]
    return load_pixels(split.subset(sorted(idx.tolist())), image_size)


def load_pixels(split: sources_lib.Split, image_size: int) -> np.ndarray:
    """All images of `split`, decoded and resized: uint8 [N, S, S, 3]."""
    if len(split) == 0:
        return np.zeros((0, image_size, image_size, 3), np.uint8)
    ds = data_pipeline.image_dataset(split, image_size, cache=False).map(
        tf.autograph.experimental.do_not_convert(lambda x, y: x))  # see data._decoded
    return np.stack(list(ds.as_numpy_iterator()))


class TFLiteClassifier:
    """A .tflite classifier run with tf.lite.Interpreter, one image at a time.

    Handles float and quantized inputs and outputs from the file's own
    quantization parameters, so it runs every variant written here.

    Args:
        model: a .tflite path or the flatbuffer bytes.
    """

    def __init__(self, model):
        kwargs = {"model_content": model} if isinstance(model, bytes) else {"model_path": model}
        self.interpreter = tf.lite.Interpreter(**kwargs)
        self.interpreter.allocate_tensors()
        self._in = self.interpreter.get_input_details()[0]
        outs = self.interpreter.get_output_details()
        # A file with the unknown outputs names them in its signature; the
        # probabilities are then found by name, not by position.
        named = {}
        if len(outs) > 1:
            signatures = self.interpreter.get_signature_list()
            runner = self.interpreter.get_signature_runner(next(iter(signatures)))
            by_index = {d["index"]: d for d in outs}
            named = {name: by_index[d["index"]]
                     for name, d in runner.get_output_details().items()}
        self._out = named.get("probabilities", outs[0])
        self._extra = {k: d for k, d in named.items() if k in ("ood_score", "unknown")}
        self.has_unknown = set(self._extra) == {"ood_score", "unknown"}
        shape = self._in["shape"]
        if len(shape) != 4 or shape[3] != 3 or shape[1] != shape[2]:
            raise ValueError(f"expected a square RGB image input, got shape {shape.tolist()}")
        self.image_size = int(shape[1])
        self.num_classes = int(self._out["shape"][-1])
        self.input_dtype = np.dtype(self._in["dtype"])

    def _quantize(self, images: np.ndarray) -> np.ndarray:
        dtype = self.input_dtype
        if dtype.kind == "f":
            return images.astype(dtype)
        scale, zero = self._in["quantization"]
        x = images.astype(np.float32)
        if scale:
            x = np.round(x / scale + zero)
        info = np.iinfo(dtype)
        return np.clip(x, info.min, info.max).astype(dtype)

    def _dequantize(self, y: np.ndarray) -> np.ndarray:
        if np.dtype(self._out["dtype"]).kind == "f":
            return y.astype(np.float32)
        scale, zero = self._out["quantization"]
        return ((y.astype(np.float32) - zero) * scale).astype(np.float32)

    def predict(self, images: np.ndarray) -> np.ndarray:
        """Probabilities float32 [N, C] for images [N, S, S, 3] in 0..255."""
        return self.predict_outputs(images)["probabilities"]

    def predict_outputs(self, images: np.ndarray) -> dict:
        """{"probabilities": float32 [N, C]}, with "ood_score" float32 [N] and
        "unknown" bool [N] when the file has them (`has_unknown`)."""
        images = np.asarray(images)
        if images.ndim != 4 or images.shape[1:] != (self.image_size, self.image_size, 3):
            raise ValueError(f"expected images [N, {self.image_size}, {self.image_size}, 3], "
                             f"got {list(images.shape)}")
        probs = np.zeros((len(images), self.num_classes), np.float32)
        extra = {"ood_score": np.zeros(len(images), np.float32),
                 "unknown": np.zeros(len(images), bool)} if self.has_unknown else {}
        for i in range(len(images)):
            self.interpreter.set_tensor(self._in["index"], self._quantize(images[i:i + 1]))
            self.interpreter.invoke()
            probs[i] = self._dequantize(self.interpreter.get_tensor(self._out["index"]))[0]
            for name, arr in extra.items():
                arr[i] = self.interpreter.get_tensor(self._extra[name]["index"]).reshape(-1)[0]
        return {"probabilities": probs, **extra}


def write_variants(model: keras.Model, image_size: int, variants: Iterable[str], folder: str,
                   representative: Optional[np.ndarray] = None, log=None,
                   unknown_threshold: Optional[float] = None) -> dict[str, str]:
    """Converts and writes each variant as `folder/model_<variant>.tflite`
    (with the unknown outputs when `unknown_threshold` is given).

    The folder is expected to be a temporary export folder that is renamed
    into place later, so files are written directly.

    Returns:
        {variant: path}.
    """
    variants = list(variants)
    if not variants:
        return {}
    source = prepare(model, image_size, unknown_threshold)
    paths = {}
    for v in variants:
        flat = convert(source, v, representative if v == "int8" else None)
        path = os.path.join(folder, file_name(v))
        with open(path, "wb") as f:
            f.write(flat)
        paths[v] = path
        if log:
            log(f"TFLite {v}: {len(flat) / 1e6:.2f} MB")
    return paths
