"""Exports for serving: OUT/export/<version>/, TF Serving's layout.

A version folder holds
  saved_model.pb, variables/      the SavedModel (signatures below)
  assets/labels.txt               class names, one per line, in class-id order
  assets.extra/tf_serving_warmup_requests
                                  PredictionLog records TF Serving replays on load
  assets.extra/decoding.json      the pixel cap (--max_pixels) baked into the graph,
                                  the formats it decodes and where it differs from Pillow
  model_<variant>.tflite          the TFLite variants asked for (see `tflite`)

Signatures:
  serving_default(image_bytes: string[N])      encoded JPEG/PNG/WebP (GIF, BMP)
  serve_images(images: float32[N, H, W, 3])     pixels 0..255, any H, W
  serve_images_uint8(images: uint8[N, H, W, 3])
each returning probabilities float32[N, C], classes string[N, k] and
scores float32[N, k] (top-k); with an unknown threshold (`model.open_set`,
stored in assets.extra/open_set.json) also ood_score float32[N] and
unknown bool[N] ("none of the above"). Decoding and resizing are `data.decode_and_resize`
and `data.resize_image`, the very functions the training pipeline used: EXIF
orientation, transparency on white, 16-bit PNGs and GIF frames as in training.
Each image's header is read before it is decoded: empty, truncated, non-image
and unsupported bytes, and images over the export's --max_pixels, fail that
request with InvalidArgument "assertion failed: [image I: REASON]" (I: the
image's index in the request), which TF Serving returns to the client as the
error text; nothing is allocated for the refused image, and the server goes on.

`export_version` writes everything into a hidden temporary folder, runs the
parity gate (`parity`) and only then renames it to the next version number,
so TF Serving (which polls for numeric folders) never sees a partial or
rejected export, and earlier versions are never touched unless asked to.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import re
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tl_keras.core import outputs
from tl_keras.data import decode as decode_lib
from tl_keras.data import sources as sources_lib
from tl_keras.errors import ConfigError, fail
from tl_keras.export import parity
from tl_keras.export import tflite as tflite_lib
from tl_keras.model import open_set
from tl_keras.report import metrics as metrics_lib
from tl_keras.train import loop as loop_lib

LABELS_ASSET = os.path.join("assets", "labels.txt")
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")
DECODING_FILE = os.path.join("assets.extra", "decoding.json")
OPEN_SET_FILE = os.path.join("assets.extra", "open_set.json")
# The flag's default (config.Config.max_pixels).
DEFAULT_MAX_PIXELS = 100_000_000
SIGNATURES = ("serving_default", "serve_images", "serve_images_uint8")


class ExportRejected(ConfigError):
    """The parity gate failed; nothing was published. `result` holds the details."""

    def __init__(self, message: str, result: dict):
        super().__init__(message)
        self.result = result


# --------------------------------------------------------------------------
# The SavedModel
# --------------------------------------------------------------------------

def _endpoints(model: keras.Model, class_names: list[str], image_size: int, top_k: int,
               max_pixels: int = DEFAULT_MAX_PIXELS, unknown_threshold: Optional[float] = None):
    names = tf.constant(list(class_names))
    k = max(1, min(int(top_k), len(class_names)))

    # Every signature ends in this one function, traced once: tracing the
    # Keras model is the slow part of writing a SavedModel, and the
    # exporter would otherwise trace it twice per signature.
    @tf.function(input_signature=[tf.TensorSpec([None, image_size, image_size, 3], tf.uint8)])
    def predict(images_uint8):
        # An empty batch (e.g. TF Serving's columnar `"inputs": []`) gets empty
        # outputs; some kernels reject a zero batch dimension.
        probs = tf.cond(
            tf.shape(images_uint8)[0] > 0,
            lambda: tf.cast(model(images_uint8, training=False), tf.float32),
            lambda: tf.zeros([0, len(class_names)], tf.float32))
        scores, idx = tf.math.top_k(probs, k=k)
        out = {"probabilities": probs, "classes": tf.gather(names, idx), "scores": scores}
        if unknown_threshold is not None:
            out.update(open_set.graph_outputs(probs, unknown_threshold))
        return out

    def serve_bytes(image_bytes):
        # Each image with its index, which a refusal names.
        def one(item):
            index, data = item
            return decode_lib.decode_and_resize(data, image_size, max_pixels, name=index)

        indices = tf.range(tf.shape(image_bytes)[0])
        images = tf.map_fn(one, (indices, image_bytes),
                           fn_output_signature=tf.TensorSpec([image_size, image_size, 3],
                                                             tf.uint8))
        return predict(images)

    def serve_images(images):
        return predict(decode_lib.resize_image(images, image_size))

    return [
        ("serving_default", serve_bytes, [tf.TensorSpec([None], tf.string, name="image_bytes")]),
        ("serve_images", serve_images,
         [tf.TensorSpec([None, None, None, 3], tf.float32, name="images")]),
        ("serve_images_uint8", serve_images,
         [tf.TensorSpec([None, None, None, 3], tf.uint8, name="images")]),
    ]


def _save_signatures(model: keras.Model, endpoints, path: str) -> None:
    """Writes the SavedModel of `endpoints` ((name, fn, input signature)): the
    model's variables and one concrete function per signature, each traced once.

    Only concrete functions are saved, not `tf.function` attributes:
    `tf.saved_model.save` traces every `tf.function` it finds again inside its
    save context (a different tracing context), and Keras's `ExportArchive`
    also walks the whole model looking for lookup tables (this model has
    none; a resource a signature used but the module did not track fails the
    save loudly). Both doubled the export's tracing: the same signatures,
    variables and outputs, written in half the CPU time (benchmarks/README.md).
    """
    module = tf.Module()
    module.model_variables = list(model.variables)
    signatures = {name: tf.function(fn, input_signature=sig, autograph=False)
                  .get_concrete_function() for name, fn, sig in endpoints}
    tf.saved_model.save(module, path, signatures=signatures)


def write_saved_model(model: keras.Model, class_names: list[str], image_size: int, path: str,
                      top_k: int = 3, extra_files: dict | None = None,
                      max_pixels: int = DEFAULT_MAX_PIXELS,
                      unknown_threshold: Optional[float] = None) -> str:
    """Writes the SavedModel, its labels asset and its warmup requests into `path`.

    Not atomic by itself: `path` should be a temporary folder renamed into
    place afterwards, as `export_version` does.

    Args:
        max_pixels: `serving_default` refuses images whose header claims more
            pixels (baked into the graph; also in assets.extra/decoding.json).
        unknown_threshold: every signature also returns `ood_score` and
            `unknown` (`open_set`); the threshold is baked into the graph and
            written to assets.extra/open_set.json. None: no such outputs.
    """
    _save_signatures(model, _endpoints(model, class_names, image_size, top_k, max_pixels,
                                       unknown_threshold), path)
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, LABELS_ASSET), "w", encoding="utf-8") as f:
        f.write("\n".join(class_names) + "\n")
    write_warmup_requests(path, image_size)
    decoding = {"max_pixels": int(max_pixels), "formats": ["JPEG", "PNG", "WebP", "GIF", "BMP"],
                "function": "tl_keras.data.decode.decode_image (as in training)",
                "limits": list(decode_lib.GRAPH_LIMITS)}
    extra_files = {os.path.basename(DECODING_FILE): json.dumps(decoding, indent=2),
                   **(extra_files or {})}
    if unknown_threshold is not None:
        extra_files[os.path.basename(OPEN_SET_FILE)] = json.dumps(
            {"score": open_set.SCORE, "threshold": float(unknown_threshold),
             "unknown": "ood_score > threshold",
             "function": "tl_keras.model.open_set.score"}, indent=2)
    for name, text in extra_files.items():
        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        with open(os.path.join(path, "assets.extra", name), "w", encoding="utf-8") as f:
            f.write(text)
    return path


def _warmup_image(size: int) -> np.ndarray:
    """A smooth synthetic RGB image (no user photo is shipped inside the export)."""
    y, x = np.mgrid[0:size, 0:size].astype(np.float32) / max(1, size - 1)
    return (np.stack([x, y, 1.0 - (x + y) / 2], axis=-1) * 255).round().astype(np.uint8)


def write_warmup_requests(path: str, image_size: int) -> str:
    """Writes `assets.extra/tf_serving_warmup_requests` for the SavedModel at `path`.

    One PredictionLog per signature, built with the tensorflow-serving-api
    protos: TF Serving replays them when it loads the version, so the first
    real request does not pay for graph initialisation. The image is a
    synthetic one, JPEG-encoded for `serving_default`, at 1.5x the model's
    size so that decoding and resizing both run.
    """
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    side = max(2, int(image_size * 1.5))
    image = _warmup_image(side)
    jpeg = tf.io.encode_jpeg(image, quality=90).numpy()
    feeds = {
        "serving_default": {"image_bytes": tf.make_tensor_proto([jpeg], dtype=tf.string)},
        "serve_images": {"images": tf.make_tensor_proto(image[None].astype(np.float32))},
        "serve_images_uint8": {"images": tf.make_tensor_proto(image[None])},
    }
    out = os.path.join(path, WARMUP_FILE)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with tf.io.TFRecordWriter(out) as writer:
        for signature, inputs in feeds.items():
            request = predict_pb2.PredictRequest()
            request.model_spec.signature_name = signature
            for key, proto in inputs.items():
                request.inputs[key].CopyFrom(proto)
            log = prediction_log_pb2.PredictionLog(
                predict_log=prediction_log_pb2.PredictLog(request=request))
            writer.write(log.SerializeToString())
    return out


def read_labels(path: str) -> list[str]:
    """Class names of an export version folder (its `assets/labels.txt`)."""
    with open(os.path.join(path, LABELS_ASSET), encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def _stored(path: str, name: str, key: str, kind):
    """`kind(value)` of `key` in the export's JSON file `name`, or None if it has none."""
    try:
        with open(os.path.join(path, name), encoding="utf-8") as f:
            return kind(json.load(f)[key])
    except (OSError, ValueError, KeyError):
        return None


class SavedModelClassifier:
    """A loaded export, called through `serving_default` on encoded bytes.

    Args:
        path: an export version folder (OUT/export/<version>).
    """

    def __init__(self, path: str, flag: str = "model"):
        self.path = path
        self.loaded = tf.saved_model.load(path)
        self.serve = self.loaded.signatures.get("serving_default")
        inputs = self.serve.structured_input_signature[1] if self.serve is not None else {}
        if set(inputs) != {"image_bytes"}:
            raise fail(flag, path, "not an image classifier export: its serving_default takes "
                       f"{sorted(inputs) or 'nothing'}, not image_bytes")
        if not os.path.isfile(os.path.join(path, LABELS_ASSET)):
            raise fail(flag, path, f"no {LABELS_ASSET} in this export")
        self.class_names = read_labels(path)
        # None: an export from before the cap was stored; one without the unknown output.
        self.max_pixels = _stored(path, DECODING_FILE, "max_pixels", int)
        self.unknown_threshold = _stored(path, OPEN_SET_FILE, "threshold", float)

    def predict_each(self, encoded: list[bytes], batch_size: int = 32
                     ) -> tuple[list[Optional[np.ndarray]], list[str]]:
        """Probabilities per image, or why the model refused it (one bad image spares the rest).

        Each batch is sent as one request; a refused batch is sent again one
        image at a time, as a client must do with TF Serving.

        Returns:
            ([probabilities [C] or None per image], [refusal reason or "" per image]).
        """
        probs: list[Optional[np.ndarray]] = [None] * len(encoded)
        reasons = [""] * len(encoded)
        for i in range(0, len(encoded), batch_size):
            chunk = list(range(i, min(i + batch_size, len(encoded))))
            try:
                p, _ = self.predict_encoded([encoded[j] for j in chunk], batch_size)
                for j, row in zip(chunk, p):
                    probs[j] = row
                continue
            except tf.errors.InvalidArgumentError:
                pass
            for j in chunk:
                try:
                    probs[j] = self.predict_encoded([encoded[j]])[0][0]
                except tf.errors.InvalidArgumentError as e:
                    reasons[j] = re.sub(r"^image 0: ", "", decode_lib.refusal_reason(e))
        return probs, reasons

    def predict_encoded(self, encoded: list[bytes], batch_size: int = 32
                        ) -> tuple[np.ndarray, list[list[str]]]:
        """Probabilities [N, C] and top-k class names for encoded images.

        Raises:
            tf.errors.InvalidArgumentError: a batch holds bytes that do not decode.
        """
        probs, names = [], []
        for i in range(0, len(encoded), batch_size):
            out = self.serve(image_bytes=tf.constant(list(encoded[i:i + batch_size]),
                                                     dtype=tf.string))
            probs.append(out["probabilities"].numpy())
            names += [[c.decode("utf-8") for c in row] for row in out["classes"].numpy()]
        if not probs:
            return np.zeros((0, len(self.class_names)), np.float32), []
        return np.concatenate(probs).astype(np.float32), names


# --------------------------------------------------------------------------
# Versions, the gate, publishing
# --------------------------------------------------------------------------

def versions(export_dir: str) -> list[int]:
    """The version numbers present in `export_dir` (numeric folder names), sorted."""
    if not os.path.isdir(export_dir):
        return []
    return sorted(int(d) for d in os.listdir(export_dir)
                  if d.isdigit() and os.path.isdir(os.path.join(export_dir, d)))


def _publish(tmp: str, export_dir: str, overwrite: bool) -> int:
    """Renames the finished `tmp` folder to a version folder; returns the version.

    Without `overwrite`: the next free number; a number taken meanwhile (a
    concurrent export) is skipped, since renaming onto a non-empty folder
    fails. With `overwrite`: the newest version is replaced (1 if none), the
    old folder moved aside first and deleted only after the swap.
    """
    existing = versions(export_dir)
    if overwrite and existing:
        version = existing[-1]
        final = os.path.join(export_dir, str(version))
        aside = tempfile.mkdtemp(dir=export_dir, prefix=".replaced-")
        os.rmdir(aside)
        os.replace(final, aside)
        try:
            os.replace(tmp, final)
        except BaseException:
            os.replace(aside, final)
            raise
        shutil.rmtree(aside, ignore_errors=True)
        return version
    version = (existing[-1] if existing else 0) + 1
    while True:
        try:
            os.rename(tmp, os.path.join(export_dir, str(version)))
            return version
        except OSError as e:
            if e.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
            version += 1


def _metrics(probs: np.ndarray, split: sources_lib.Split, class_names: list[str],
             top_k: int) -> dict:
    """The report's headline figures (accuracy, top-k, macro F1, AUCs, ECE, n).

    Multi-label splits are decided at 0.5 here, for Keras and every variant
    alike, so the figures compare the artifacts with each other.
    """
    return metrics_lib.headline(metrics_lib.evaluation(np.asarray(probs), split.labels,
                                                     class_names, top_k))


def _sample(split: sources_lib.Split, n: int, seed: int) -> list[int]:
    """The indices of the gate's seeded sample of `n` images of `split` (all when n <= 0)."""
    if n <= 0 or n >= len(split):
        return list(range(len(split)))
    return sorted(np.random.default_rng(seed).permutation(len(split))[:n].tolist())


def gate_and_publish(tmp: str, export_dir: str, overwrite: bool, result: dict,
                     check: Optional[dict], check_path: Optional[str],
                     log: Callable[[str], None] = lambda s: None) -> dict:
    """The end of every export: publish the finished `tmp` folder only if the gate passed.

    Shared by image (`export_version`) and text (`text_export.export_text_version`)
    exports: a failed gate writes the comparison to `check_path` and raises
    ExportRejected with nothing published; a passed (or absent) gate renames
    `tmp` to the next version (or replaces the newest, `overwrite`).

    Returns:
        `result` with "published", "version" and "path".
    """
    if check is not None and not check["passed"]:
        check.update(published=False, version=None, export_dir=export_dir)
        if check_path:
            outputs.atomic_write_json(check_path, check)
        where = f"; details in {check_path}" if check_path else ""
        result.update(published=False, rejected=check["failures"])
        raise ExportRejected(
            f"export rejected by the parity gate: {'; '.join(check['failures'])}. "
            f"Nothing was written to {export_dir}{where}", result)

    version = _publish(tmp, export_dir, overwrite)
    path = os.path.join(export_dir, str(version))
    result.update(published=True, version=version, path=path)
    if check is not None:
        check.update(published=True, version=version, export_dir=export_dir)
        if check_path:
            outputs.atomic_write_json(check_path, check)
    log(f"exported version {version} to {path}")
    return result


@dataclasses.dataclass(frozen=True)
class ExportSpec:
    """How a version is exported and gated (the --export, --tflite and --parity_* flags).

    Attributes:
        top_k: classes and scores each SavedModel prediction returns.
        overwrite: replace the newest version instead of adding one.
        tflite_variants: subset of `tflite.VARIANTS` to write.
        parity_images: images the gate compares (a seeded sample; 0: all).
        min_agreement, max_prob_diff: per-artifact limits (see `parity`);
            None: the flags' defaults.
        batch_size: prediction batch size.
        seed: for the parity sample.
        max_pixels: the pixel cap baked into `serving_default` (--max_pixels).
        unknown_threshold: the SavedModel and TFLite files also return
            `ood_score` and `unknown` (`open_set`); None: they do not.
    """

    top_k: int = 3
    overwrite: bool = False
    tflite_variants: tuple = ()
    parity_images: int = 100
    min_agreement: Optional[dict] = None
    max_prob_diff: Optional[dict] = None
    batch_size: int = 32
    seed: int = 0
    max_pixels: int = DEFAULT_MAX_PIXELS
    unknown_threshold: Optional[float] = None


def export_version(model: keras.Model, class_names: list[str], image_size: int,
                   export_dir: str, spec: ExportSpec = ExportSpec(), *,
                   calibration_images: Optional[np.ndarray] = None,
                   parity_split: Optional[sources_lib.Split] = None,
                   parity_reference: Optional[np.ndarray] = None,
                   eval_split: Optional[sources_lib.Split] = None, eval_name: str = "test",
                   check_path: Optional[str] = None, extra_files: Optional[dict] = None,
                   originals: Sequence[tuple[str, object]] = (),
                   log: Callable[[str], None] = lambda s: None) -> dict:
    """Exports a new version: SavedModel + TFLite variants, parity-gated, renamed into place.

    Args:
        model: the trained Keras model.
        class_names: the training classes, in class-id order.
        image_size: the model's input size.
        export_dir: OUT/export; versions are numbered folders inside.
        spec: top-k, overwrite, TFLite variants, parity sample and limits.
        calibration_images: uint8 [N, S, S, 3] training images, for int8.
        parity_split: images the gate compares (a seeded sample of
            `spec.parity_images` of them). None: no gate.
        parity_reference: the Keras model's probabilities [N, C] on every
            image of `parity_split`, in order, when the run has them already
            (its validation predictions): the gate compares the served
            model with those rows instead of predicting the sample again.
            None: the gate predicts them.
        eval_split: labelled images on which each TFLite variant's accuracy
            is measured with tf.lite.Interpreter (reported, not gated).
        eval_name: what `eval_split` is called in the result ("test"/"val").
        check_path: where the gate's comparison is written (OUT/export_check.json).
        extra_files: {file name: text} written to `assets.extra/` (e.g. the
            run manifest), which TF Serving keeps but does not load.
        originals: (original file, item trained on) of the files the
            pre-flight converted or noted (`parity.odd_files`): the gate also
            serves their original bytes (`parity.check_originals`).
        log: progress messages.

    Returns:
        {"version", "path", "signatures", "tflite": {variant: {"file", "bytes",
        eval_name: metrics}}, "keras": {eval_name: metrics}, "parity": summary}.

    Raises:
        ExportRejected: the gate failed. No version folder was created or
            replaced; the comparison is in `check_path` and the exception's
            `result`.
    """
    top_k, tflite_variants, batch_size = spec.top_k, spec.tflite_variants, spec.batch_size
    min_agreement = spec.min_agreement or parity.min_agreement_limits()
    max_prob_diff = spec.max_prob_diff or parity.max_prob_diff_limits()
    os.makedirs(export_dir, exist_ok=True)
    # Hidden, non-numeric name in the same folder: TF Serving ignores it and
    # the final rename is atomic.
    # Named as outputs.py names temporaries, so a rerun removes one a killed export left.
    tmp = tempfile.mkdtemp(dir=export_dir, prefix=f"{outputs.TMP_PREFIX}{os.getpid()}.export-")
    try:
        write_saved_model(model, class_names, image_size, tmp, top_k, extra_files,
                          spec.max_pixels, spec.unknown_threshold)
        log("wrote the SavedModel; converting TFLite variants" if tflite_variants
            else "wrote the SavedModel")
        paths = tflite_lib.write_variants(model, image_size, tflite_variants, tmp,
                                          calibration_images, log, spec.unknown_threshold)
        lites = {v: tflite_lib.TFLiteClassifier(p) for v, p in paths.items()}
        result: dict = {"signatures": list(SIGNATURES), "top_k": top_k, "tflite": {}}
        if spec.unknown_threshold is not None:
            result["unknown_threshold"] = float(spec.unknown_threshold)
        for v, p in paths.items():
            result["tflite"][v] = {"file": os.path.basename(p), "bytes": os.path.getsize(p)}

        if eval_split is not None and len(eval_split) and lites:
            pixels = tflite_lib.load_pixels(eval_split, image_size)
            ref = loop_lib.predict(model, pixels.astype(np.float32), batch_size)
            result["keras"] = {eval_name: _metrics(np.asarray(ref), eval_split, class_names,
                                                   top_k)}
            for v, lite in lites.items():
                m = _metrics(lite.predict(pixels), eval_split, class_names, top_k)
                result["tflite"][v][eval_name] = m
                log(f"TFLite {v}: {eval_name} accuracy {m['accuracy']:.4f} "
                    f"(Keras {result['keras'][eval_name]['accuracy']:.4f}) on {m['n']} images")

        check = None
        if parity_split is not None:
            idx = _sample(parity_split, spec.parity_images, spec.seed)
            check = parity.run_gate(
                model, SavedModelClassifier(tmp), lites, parity_split.subset(idx), image_size,
                class_names, min_agreement, max_prob_diff, batch_size, originals,
                reference=None if parity_reference is None else np.asarray(parity_reference)[idx])
            result["parity"] = {
                "n": check["n"], "passed": check["passed"],
                "artifacts": {name: {k: a[k] for k in ("top1_agreement", "max_prob_diff",
                                                        "passed")}
                              for name, a in check["artifacts"].items()}}
            if parity.ORIGINALS in check["artifacts"]:
                fed = check["artifacts"][parity.ORIGINALS]
                result["parity"]["originals"] = {"files": fed["files"], "served": fed["n"],
                                                 "refused": len(fed["refused"])}
        lites.clear()
        return gate_and_publish(tmp, export_dir, spec.overwrite, result, check, check_path, log)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
