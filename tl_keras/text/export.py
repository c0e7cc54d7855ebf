"""SavedModel export of a text model for TF Serving: raw strings in, class names out.

The same versioned, parity-gated export as images (`export.export_version`):
everything is written into a hidden temporary folder inside OUT/export, the
SavedModel is reloaded and must predict what the Keras model predicts on a
sample of validation texts, and only then is the folder renamed to the next
version number (`export.gate_and_publish`). A version folder holds

  saved_model.pb, variables/      the SavedModel (signature below)
  assets/labels.txt               class names, one per line, in class-id order
  assets.extra/tf_serving_warmup_requests
                                  a PredictionLog TF Serving replays on load

Signature:
  serving_default(text: string[N])
returning probabilities float32[N, C], classes string[N, k] and scores
float32[N, k] (top-k). The model itself standardizes, splits and looks up
the words (its TextVectorization layer), so serving needs nothing else.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Callable, Optional, Sequence

import keras
import numpy as np
import tensorflow as tf

from tl_keras.export import parity
from tl_keras.export import saved_model as export_lib

SIGNATURES = ("serving_default",)
INPUT_KEY = "text"
# What the warmup request sends (no user text is shipped inside the export).
WARMUP_TEXTS = ("a warm , funny and moving film .", "")


def write_text_saved_model(model: keras.Model, class_names: list[str], path: str,
                           top_k: int = 3, extra_files: Optional[dict] = None) -> str:
    """Writes the SavedModel, its labels asset and its warmup request into `path`.

    Not atomic by itself: `path` should be a temporary folder renamed into
    place afterwards, as `export_text_version` does.
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
                         input_signature=[tf.TensorSpec([None], tf.string, name=INPUT_KEY)])
    archive.write_out(path, verbose=False)
    os.makedirs(os.path.join(path, "assets"), exist_ok=True)
    with open(os.path.join(path, export_lib.LABELS_ASSET), "w", encoding="utf-8") as f:
        f.write("\n".join(class_names) + "\n")
    write_text_warmup_requests(path)
    for name, text in (extra_files or {}).items():
        os.makedirs(os.path.join(path, "assets.extra"), exist_ok=True)
        with open(os.path.join(path, "assets.extra", name), "w", encoding="utf-8") as f:
            f.write(text)
    return path


def write_text_warmup_requests(path: str) -> str:
    """Writes `assets.extra/tf_serving_warmup_requests`: one serving_default request."""
    from tensorflow_serving.apis import predict_pb2, prediction_log_pb2

    out = os.path.join(path, export_lib.WARMUP_FILE)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    request = predict_pb2.PredictRequest()
    request.model_spec.signature_name = "serving_default"
    request.inputs[INPUT_KEY].CopyFrom(
        tf.make_tensor_proto([t.encode("utf-8") for t in WARMUP_TEXTS], dtype=tf.string))
    log = prediction_log_pb2.PredictionLog(
        predict_log=prediction_log_pb2.PredictLog(request=request))
    with tf.io.TFRecordWriter(out) as writer:
        writer.write(log.SerializeToString())
    return out


def predict_saved_model(path_or_loaded, texts: Sequence[str], batch_size: int = 256
                        ) -> tuple[np.ndarray, list[list[str]]]:
    """Probabilities [N, C] and top-k class names of a text export's serving_default."""
    loaded = (tf.saved_model.load(path_or_loaded) if isinstance(path_or_loaded, str)
              else path_or_loaded)
    serve = loaded.signatures["serving_default"]
    probs, names = [], []
    for i in range(0, len(texts), batch_size):
        out = serve(**{INPUT_KEY: tf.constant(list(texts[i:i + batch_size]), dtype=tf.string)})
        probs.append(out["probabilities"].numpy())
        names += [[c.decode("utf-8") for c in row] for row in out["classes"].numpy()]
    if not probs:
        return np.zeros((0, 0), np.float32), []
    return np.concatenate(probs).astype(np.float32), names


def run_text_gate(model: keras.Model, saved_model_path: str, texts: Sequence[str],
                  class_names: list[str], min_agreement: dict[str, float],
                  max_prob_diff: dict[str, float], batch_size: int = 256) -> dict:
    """The parity gate of a text export: the reloaded SavedModel against the Keras model.

    Same verdicts and limits as for images (`parity.compare`, `parity.judge`,
    the "saved_model" entries of --parity_min_agreement/--parity_max_prob_diff),
    on raw strings fed to `serving_default`.

    Returns:
        {"n", "texts", "artifacts": {"saved_model": ...}, "passed", "failures"}.
    """
    from tl_keras.text import model as text_model

    texts = list(texts)
    reference = text_model.predict_texts(model, texts, batch_size)
    probs, names = predict_saved_model(saved_model_path, texts, batch_size)
    res = parity.compare(reference, probs)
    res["class_names_match"] = [class_names[i] for i in probs.argmax(1)] == [r[0] for r in names]
    failures = parity.judge("saved_model", res, min_agreement, max_prob_diff)
    if not res["class_names_match"]:
        failures.append("saved_model: its top-1 class names do not follow the training classes")
        res["passed"] = False
    res["disagreements"] = [parity.describe_disagreement(texts[i], reference[i], class_names)
                            for i in res["disagreements"]]
    return {"n": len(texts), "texts": texts, "artifacts": {"saved_model": res},
            "passed": not failures, "failures": failures}


def export_text_version(model: keras.Model, class_names: list[str], export_dir: str,
                        spec: export_lib.ExportSpec = export_lib.ExportSpec(batch_size=256), *,
                        parity_texts: Optional[Sequence[str]] = None,
                        check_path: Optional[str] = None, extra_files: Optional[dict] = None,
                        log: Callable[[str], None] = lambda s: None) -> dict:
    """Exports a new version of a text model: SavedModel, parity-gated, renamed into place.

    Args:
        model: the trained string model (texts [N] -> probabilities [N, C]).
        class_names: the training classes, in class-id order.
        export_dir: OUT/export; versions are numbered folders inside.
        spec: top-k, overwrite, parity sample size and limits (only
            "saved_model" applies), batch size, seed (`tflite_variants` does
            not apply to text models).
        parity_texts: texts the gate compares (a seeded sample of
            `spec.parity_images` of them; 0: all). None: no gate.
        check_path: where the gate's comparison is written (OUT/export_check.json).
        extra_files: {file name: text} written to `assets.extra/`.

    Returns:
        {"version", "path", "signatures", "top_k", "published", "parity": summary}.

    Raises:
        export.ExportRejected: the gate failed; no version folder was created
            or replaced.
    """
    top_k, batch_size = spec.top_k, spec.batch_size
    min_agreement = spec.min_agreement or parity.min_agreement_limits()
    max_prob_diff = spec.max_prob_diff or parity.max_prob_diff_limits()
    os.makedirs(export_dir, exist_ok=True)
    tmp = tempfile.mkdtemp(dir=export_dir, prefix=".tmp-export-")
    try:
        write_text_saved_model(model, class_names, tmp, top_k, extra_files)
        log("wrote the SavedModel")
        result: dict = {"signatures": list(SIGNATURES), "top_k": top_k}
        check = None
        if parity_texts is not None:
            texts = list(parity_texts)
            if 0 < spec.parity_images < len(texts):
                idx = np.random.default_rng(spec.seed).permutation(len(texts))[:spec.parity_images]
                texts = [texts[i] for i in sorted(idx.tolist())]
            check = run_text_gate(model, tmp, texts, class_names, min_agreement,
                                  max_prob_diff, batch_size)
            result["parity"] = {
                "n": check["n"], "passed": check["passed"],
                "artifacts": {name: {k: a[k] for k in ("top1_agreement", "max_prob_diff",
                                                        "passed")}
                              for name, a in check["artifacts"].items()}}
        return export_lib.gate_and_publish(tmp, export_dir, spec.overwrite, result, check,
                                           check_path, log)
    finally:
        if os.path.isdir(tmp):
            shutil.rmtree(tmp, ignore_errors=True)
