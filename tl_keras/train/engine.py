"""The engine that runs frozen inference passes (caching features and activations).

A caching pass runs the frozen part of the model once over every view of
every image. On a CPU, TensorFlow's graph runs these networks several times
slower than the same network converted to TFLite and run by the XNNPACK
delegate (MobileNetV2-0.35 at 160 px: 5.6x on an idle 2-core CPU, 2.5x in CPU
seconds under load; benchmarks/frozen_pass.py). So on
CPU-only machines the frozen model is converted once (the TFLite converter
the export uses, float32, no optimizations: the same computation) and run
through `ai_edge_litert`, with one thread per core.

`--frozen_engine`:
  tensorflow  the Keras model, as before (any device, strategy, precision).
  litert      the converted model on the CPU; float32 policies only.
  auto        litert on CPU-only machines, one process on the default
              strategy, float32, for the backbone families measured faster
              there (`LITERT_FAMILIES`), when the images to pass make the
              conversion pay (`BREAK_EVEN_IMAGES`, or a conversion already on
              disk); tensorflow otherwise.

A conversion is cached on disk like the features it computes (the run's
ArrayCache, keyed by what determines the model), so a rerun with other data
or augmentation does not convert again. The cached features do not record
which engine computed them: the two agree within float rounding (max abs
difference <= 3e-4 on features in [0, 6], tests/test_engine.py), as
TensorFlow's own results differ between CPUs. A model the converter or the
interpreter rejects (an op without a TFLite kernel) falls back to TensorFlow
with one log line saying why: correct, only slower.
"""

from __future__ import annotations

import os
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tl_keras.core import cache as cache_lib
from tl_keras.errors import one_line

ENGINES = ("auto", "tensorflow", "litert")

# `auto` converts when a run passes at least this many images (all views of
# all splits together). benchmarks/frozen_pass.py measures, per backbone, the
# break-even in CPU work: (conversion + LiteRT's first batch - TensorFlow's
# first, tracing, batch) / (TensorFlow's - LiteRT's CPU seconds per image).
# Of the families below it was 146-281 images (EfficientNetB0 the largest,
# MobileNetV2-0.35 at 160 px 149). The conversion runs on about one core while
# the pass uses them all, so in wall time on 2 cores it is up to twice that:
# 600 covers both.
BREAK_EVEN_IMAGES = 600

# Backbone families whose frozen pass `auto` runs on LiteRT: those measured at
# least 1.3x faster there than on TensorFlow in CPU seconds per image
# (benchmarks/frozen_pass.py, 2-core x86 CPU with AVX-512): MobileNet 0.25
# 2.4x, MobileNetV2 2.4-2.5x, MobileNetV3-small 2.5x, EfficientNetB0 1.4x.
# Dense convolutions run about as fast in TensorFlow's oneDNN kernels
# (ResNet50 0.97x, EfficientNetV2-B0 1.1x), and families not measured keep
# TensorFlow (--frozen_engine=litert runs any of them).
LITERT_FAMILIES = ("mobilenet", "mobilenet_v2", "mobilenet_v3_small", "efficientnet_b0")

# Conversions run in this process (tests check that a rerun reads the cache).
conversions = 0

# Key parts that do not change the frozen model: a conversion serves any data.
_DATA_PARTS = ("train", "val", "augment")


def cpu_threads() -> int:
    """The cores this process may run on (XNNPACK's thread count)."""
    try:
        return max(len(os.sched_getaffinity(0)), 1)
    except AttributeError:  # not on Linux
        return max(os.cpu_count() or 1, 1)


def litert_missing() -> str:
    """Why `ai_edge_litert` cannot be used here ("" when it can)."""
    try:
        from ai_edge_litert import interpreter  # noqa: F401
    except ImportError as e:  # e.g. a platform without its wheels
        return f"ai_edge_litert is not importable ({one_line(e)})"
    return ""


def accelerators() -> list[str]:
    """The GPUs and TPUs TensorFlow sees (the frozen pass runs there with TensorFlow)."""
    return [d.device_type for kind in ("GPU", "TPU") for d in tf.config.list_physical_devices(kind)]


def convert(model: keras.Model) -> bytes:
    """Converts a Keras image model to a float32 TFLite flatbuffer with a free batch size.

    Traced once with the batch dimension unknown, so the interpreter can be
    resized to any batch. The variables are tracked by a plain tf.Module
    (see `tl_keras.export.tflite.ConversionSource` for why), and frozen into
    the graph directly: the converter's default round trip through a
    temporary SavedModel (`experimental_lower_to_saved_model`) gives the same
    flatbuffer ops and outputs for twice the CPU time (MobileNetV2-0.35: 1.4
    against 3.1 CPU s), most of it tracing the SavedModel's save functions.

    Raises:
        Exception: whatever the converter raises for a model it cannot convert.
    """
    global conversions
    shape = [None, *model.input_shape[1:]]
    spec = tf.TensorSpec(shape, tf.float32, name="images")
    fn = tf.function(lambda images: model(images, training=False), input_signature=[spec])
    trackable = tf.Module()
    trackable.tracked_variables = [getattr(v, "value", v) for v in model.variables]
    converter = tf.lite.TFLiteConverter.from_concrete_functions([fn.get_concrete_function()],
                                                                trackable)
    converter.experimental_lower_to_saved_model = False
    flat = converter.convert()
    conversions += 1
    return flat


def _output_order(name: str) -> int:
    """The Keras output index of a frozen graph's output tensor: Identity, Identity_1, ..."""
    base, _, index = name.partition(":")[0].rpartition("_")
    return int(index) if base and index.isdigit() else 0


class LiteRTModel:
    """A converted model run by `ai_edge_litert` with the XNNPACK delegate.

    Args:
        flatbuffer: from `convert`.
        num_threads: XNNPACK's threads (default: one per core).
    """

    def __init__(self, flatbuffer: bytes, num_threads: Optional[int] = None):
        from ai_edge_litert import interpreter as litert

        self.num_threads = num_threads or cpu_threads()
        # The default op resolver applies the XNNPACK delegate to every float op it covers.
        self.interpreter = litert.Interpreter(model_content=bytes(flatbuffer),
                                              num_threads=self.num_threads)
        (self._input,) = self.interpreter.get_input_details()
        self._outputs = [d["index"] for d in sorted(self.interpreter.get_output_details(),
                                                    key=lambda d: _output_order(d["name"]))]
        self._shape = None

    def predict_on_batch(self, x):
        """What the Keras model's `predict_on_batch(x)` returns: an array, or a list for
        several outputs. Keep the batch size fixed: a new one reallocates."""
        x = np.asarray(x, dtype=np.float32)
        if x.shape != self._shape:
            self.interpreter.resize_tensor_input(self._input["index"], x.shape)
            self.interpreter.allocate_tensors()
            self._shape = x.shape
        self.interpreter.set_tensor(self._input["index"], x)
        self.interpreter.invoke()
        arrays = [self.interpreter.get_tensor(i) for i in self._outputs]
        return arrays if len(arrays) > 1 else arrays[0]


class FrozenEngine:
    """Chooses and runs the engine of a run's frozen passes (`--frozen_engine`).

    The choice is made once, at the first pass that needs computing (a run
    whose outputs are all cached converts nothing), and said in one line.

    Args:
        requested: one of ENGINES.
        images: images the run's passes go through (every view of every split).
        cache: where conversions are kept (the features' ArrayCache).
        key_parts: the features' cache-key parts (`run.views.cache_key_parts`).
        precision_policy: the Keras dtype policy the model was built under.
        distribution: the strategy's kind ("default" for one process, one device).
        log: where the choice and any fallback are said.

    The backbone family is key_parts["backbone"].
    """

    def __init__(self, requested: str, images: int, cache: cache_lib.ArrayCache,
                 key_parts: dict, precision_policy: str = "float32",
                 distribution: str = "default", log: Callable[[str], None] = print):
        if requested not in ENGINES:
            raise ValueError(f"unknown frozen engine {requested!r}")
        self.requested = requested
        self.images = int(images)
        self.cache = cache
        self.key_parts = {k: v for k, v in key_parts.items() if k not in _DATA_PARTS}
        self.precision_policy = precision_policy
        self.distribution = distribution
        self.log = log
        self.chosen = "tensorflow" if requested == "tensorflow" else ""
        self.convert_seconds = 0.0

    def _key(self, model: keras.Model) -> str:
        return cache_lib.make_key(what="litert", name=model.name,
                                  inputs=str(model.input_shape),
                                  outputs=[str(o.shape) for o in model.outputs],
                                  **self.key_parts)

    def _cached(self, key: str) -> bool:
        return bool(self.cache.folder) and os.path.isfile(
            os.path.join(self.cache.folder, f"{key}.litert.npy"))

    def _choose(self, key: str) -> tuple[str, str]:
        """(engine, why) for a run that has not chosen yet."""
        if self.precision_policy != "float32":
            return "tensorflow", (f"the {self.precision_policy} policy computes in reduced "
                                  "precision; the converted model is float32")
        missing = litert_missing()
        if missing:
            return "tensorflow", missing
        if self.requested == "litert":
            return "litert", "--frozen_engine=litert"
        if self.distribution != "default":
            return "tensorflow", f"the {self.distribution} strategy runs the pass"
        devices = accelerators()
        if devices:
            return "tensorflow", f"the pass runs on the {devices[0]}"
        family = self.key_parts.get("backbone", "")
        if family not in LITERT_FAMILIES:
            return "tensorflow", (f"{family or 'this backbone'} was not measured faster on "
                                  "LiteRT; --frozen_engine=litert to use it")
        if self._cached(key):
            return "litert", "its conversion is cached"
        if self.images < BREAK_EVEN_IMAGES:
            return "tensorflow", (f"{self.images} images to pass: converting pays from "
                                  f"{BREAK_EVEN_IMAGES}")
        return "litert", f"{self.images} images to pass >= {BREAK_EVEN_IMAGES}"

    def predictor(self, model: keras.Model) -> Optional[Callable]:
        """A `predict_on_batch` for the frozen `model` on the chosen engine.

        Returns:
            The LiteRT model's predict_on_batch, or None for TensorFlow (the
            caller runs the Keras model as before).
        """
        if self.chosen == "tensorflow":
            return None
        key = self._key(model)
        why = ""
        if not self.chosen:
            chosen, why = self._choose(key)
            if chosen == "tensorflow":
                self.chosen = chosen
                self.log(f"frozen passes: TensorFlow ({why})")
                return None
        t0 = time.perf_counter()
        try:
            (flat,), hit = self.cache.get_or_compute(
                key, ("litert",), lambda: (np.frombuffer(convert(model), np.uint8),), self.log)
            runner = LiteRTModel(np.asarray(flat).tobytes())
            # One image through it: an op the interpreter cannot run fails here, not mid-pass.
            runner.predict_on_batch(np.zeros((1, *model.input_shape[1:]), np.float32))
        except Exception as e:  # noqa: BLE001 - any converter/interpreter error: fall back
            self.chosen = "tensorflow"
            self.log(f"frozen passes: TensorFlow, {model.name} did not convert to LiteRT "
                     f"({_reason(e)})")
            return None
        self.chosen = "litert"
        seconds = time.perf_counter() - t0
        self.convert_seconds += seconds
        done = ("conversion read from the cache" if hit else f"converted in {seconds:.1f}s")
        if why:
            self.log(f"frozen passes: LiteRT with XNNPACK, {runner.num_threads} threads ({why}); "
                     f"{model.name} {done}")
        elif not hit:
            self.log(f"frozen passes: {model.name} {done}")
        return runner.predict_on_batch


def _reason(e: BaseException) -> str:
    """The converter's own error line (`error: 'tf.X' op is neither a custom op nor a
    flex op`) without the MLIR locations and source lines around it; else the exception."""
    errors = [line.split("error: ", 1)[1].strip() for line in str(e).splitlines()
              if "error: " in line]
    text = errors[0] if errors else one_line(e)
    return text if len(text) <= 200 else text[:197] + "..."
