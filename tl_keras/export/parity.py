"""The parity gate: every exported artifact must predict what the Keras model predicts.

The Keras model is the reference. The SavedModel (fed the original encoded
files through `serving_default`) and each TFLite variant predict the same
validation images; for each, top-1 agreement with the reference and the
largest absolute probability difference are compared with per-variant limits
(`--parity_min_agreement`, `--parity_max_prob_diff`). Quantized variants get
looser defaults: they are approximations by design.

The sample holds the files the model trains on, which for files the
pre-flight converted are its PNGs. So the gate also feeds the SavedModel the
original bytes of every file the pre-flight converted or noted (EXIF-rotated,
transparent, 16-bit, CMYK, animated, ...: what clients send), against the
Keras model on the pixels training used ("saved_model_originals", with the
SavedModel's limits). A converted file the served model refuses (a TIFF,
HEIC, ...) is listed, not failed: such formats are refused by design. A noted
file it refuses, or predicts otherwise, fails the export.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from tl_keras.errors import fail
from tl_keras.train import loop as loop_lib

# Artifacts the gate knows: the SavedModel and the TFLite variants.
ARTIFACTS = ("saved_model", "float", "dynamic", "float16", "int8")
# The SavedModel fed the original bytes of the pre-flight's odd files.
ORIGINALS = "saved_model_originals"

# The default limits are the defaults of the flags (config.Config). Why they
# differ: the SavedModel runs the same graph on the same pixels, so it must
# match to float rounding. TFLite float reorders float arithmetic (fused
# kernels). float16 rounds weights to 11 significant bits; dynamic range
# quantizes weights and activations on the fly; int8 quantizes everything.
# Quantized variants flip near ties: on 100 validation images of the shared
# flowers (MobileNetV2-0.35, 160 px, label smoothing 0.1, so top
# probabilities are often ~0.4-0.5) dynamic agreed on 0.93 and int8 on 0.96,
# every flip on an image whose top-2 Keras margin was under 0.2, and int8 moved
# one probability by 0.40 (a second run: 0.97 and 0.97). On 15 validation
# images float16 flipped an image whose margin was 0.005: one flip there is
# 7 points. So where the probability tolerance is tight (SavedModel, float,
# float16) it already rules out flips on clear images and the agreement
# limit only has to allow a rare near-tie; for dynamic and int8 agreement is
# the real check. A broken export (wrong preprocessing or class order)
# disagrees on most images.


def _defaults(field: str) -> dict[str, float]:
    from tl_keras.config import Config

    spec = getattr(Config(), field)
    return parse_limits(spec, {name: 0.0 for name in ARTIFACTS}, field)


def parse_limits(spec: str, defaults: dict[str, float], flag: str, lo: float = 0.0,
                 hi: float = float("inf")) -> dict[str, float]:
    """Parses `NAME=VALUE,...` over `defaults`; names not given keep their default.

    A bare number (`0.9`) sets every artifact.

    Raises:
        ConfigError: unknown name, not a number, or out of [lo, hi].
    """
    limits = dict(defaults)
    spec = spec.strip()
    if not spec:
        return limits
    parts = [p.strip() for p in spec.split(",") if p.strip()]
    if len(parts) == 1 and "=" not in parts[0]:
        parts = [f"{name}={parts[0]}" for name in limits]
    for part in parts:
        name, eq, value = part.partition("=")
        name = name.strip().lower()
        if not eq or name not in limits:
            raise fail(flag, spec, f"expected NAME=VALUE pairs with NAME in "
                       f"{', '.join(limits)} (got {part!r})")
        try:
            v = float(value)
        except ValueError:
            raise fail(flag, spec, f"{value.strip()!r} is not a number") from None
        if not lo <= v <= hi:
            raise fail(flag, spec, f"{name}={v:g} is outside [{lo:g}, {hi:g}]")
        limits[name] = v
    return limits


def min_agreement_limits(spec: str = "", flag: str = "parity_min_agreement"
                         ) -> dict[str, float]:
    """Per-artifact minimum top-1 agreement: the flag's defaults overlaid with `spec`."""
    return parse_limits(spec, _defaults("parity_min_agreement"), flag, 0.0, 1.0)


def max_prob_diff_limits(spec: str = "", flag: str = "parity_max_prob_diff"
                         ) -> dict[str, float]:
    """Per-artifact maximum probability difference: the flag's defaults overlaid with `spec`."""
    return parse_limits(spec, _defaults("parity_max_prob_diff"), flag, 0.0, 1.0)


def compare(reference: np.ndarray, candidate: np.ndarray) -> dict:
    """Top-1 agreement and probability differences of `candidate` against `reference`.

    Args:
        reference, candidate: probabilities [N, C] for the same images.

    Returns:
        {"n", "top1_agreement", "max_prob_diff", "mean_abs_diff",
         "disagreements": indices whose top-1 differs}.
    """
    reference = np.asarray(reference, np.float64)
    candidate = np.asarray(candidate, np.float64)
    if reference.shape != candidate.shape:
        raise ValueError(f"shapes differ: {reference.shape} vs {candidate.shape}")
    n = len(reference)
    if n == 0:
        return {"n": 0, "top1_agreement": 1.0, "max_prob_diff": 0.0, "mean_abs_diff": 0.0,
                "disagreements": []}
    diff = np.abs(reference - candidate)
    # NaN anywhere (a broken conversion) must fail, not compare as small.
    max_diff = float("inf") if not np.isfinite(diff).all() else float(diff.max())
    same = reference.argmax(1) == candidate.argmax(1)
    return {"n": n, "top1_agreement": float(same.mean()), "max_prob_diff": max_diff,
            "mean_abs_diff": float(np.nanmean(diff)) if np.isfinite(max_diff) else float("inf"),
            "disagreements": np.flatnonzero(~same).tolist()}


def judge(name: str, result: dict, min_agreement: dict[str, float],
          max_prob_diff: dict[str, float]) -> list[str]:
    """Adds the limits and a verdict to `result`; returns why it failed (empty: passed)."""
    lo, hi = min_agreement[name], max_prob_diff[name]
    result["min_agreement"], result["max_allowed_prob_diff"] = lo, hi
    why = []
    if result["top1_agreement"] < lo:
        why.append(f"{name}: top-1 agreement {result['top1_agreement']:.4f} < {lo:g} "
                   f"(--parity_min_agreement)")
    if not result["max_prob_diff"] <= hi:
        why.append(f"{name}: max probability difference {result['max_prob_diff']:.3g} > {hi:g} "
                   f"(--parity_max_prob_diff)")
    result["passed"] = not why
    return why


def run_gate(model, saved_model, tflite_models: dict, split, image_size: int,
             class_names: list[str], min_agreement: dict[str, float],
             max_prob_diff: dict[str, float], batch_size: int = 32,
             originals: Sequence[tuple[str, object]] = (),
             reference: Optional[np.ndarray] = None) -> dict:
    """Predicts `split` with every artifact and judges each against the Keras model.

    Args:
        model: the trained Keras model (the reference).
        saved_model: an `export.SavedModelClassifier`, fed the original encoded
            bytes of each image (files are read as they are on disk).
        tflite_models: {variant: tflite.TFLiteClassifier}.
        split: the images to compare (normally a sample of the validation split).
        image_size: the model's input size.
        class_names: the training classes; the SavedModel's top-1 class names
            must be these, in this order.
        originals: (original file, item trained on) of the files the
            pre-flight converted (the item is its PNG) or noted (the file
            itself); see `check_originals`.
        reference: the Keras model's probabilities [N, C] on `split`, when
            already computed on the same pixels (the run's validation
            predictions); None: predicted here.

    Returns:
        The comparison (what `OUT/export_check.json` holds): {"n", "images",
        "artifacts": {name: compare() + limits + "passed"}, "passed", "failures"}.
    """
    from tl_keras.export import tflite as tflite_lib

    # Decoded by the training pipeline's function: what the reference and the
    # TFLite variants see (the SavedModel gets the encoded bytes).
    pixels = (tflite_lib.load_pixels(split, image_size)
              if reference is None or tflite_models else None)
    if reference is None:
        reference = loop_lib.predict(model, pixels.astype(np.float32), batch_size)
    reference = np.asarray(reference, np.float32)
    if reference.shape != (len(split), len(class_names)):
        raise ValueError(f"reference probabilities {reference.shape} for {len(split)} images "
                         f"of {len(class_names)} classes")
    encoded = [_encoded(item) for item in split.items]
    artifacts: dict[str, dict] = {}
    failures: list[str] = []

    probs, names = saved_model.predict_encoded(encoded, batch_size)
    res = compare(reference, probs)
    # The names baked into the graph must be the training classes, in order.
    top1_names = [row[0] for row in names]
    res["class_names_match"] = [class_names[i] for i in probs.argmax(1)] == top1_names
    artifacts["saved_model"] = res
    failures += judge("saved_model", res, min_agreement, max_prob_diff)
    if not res["class_names_match"]:
        failures.append("saved_model: its top-1 class names do not follow the training classes")
        res["passed"] = False

    for variant, classifier in tflite_models.items():
        res = compare(reference, classifier.predict(pixels))
        artifacts[variant] = res
        failures += judge(variant, res, min_agreement, max_prob_diff)

    if originals:
        res = check_originals(model, saved_model, originals, image_size, class_names,
                              min_agreement, max_prob_diff, batch_size)
        artifacts[ORIGINALS] = res
        failures += res.pop("failures")

    items = [item if isinstance(item, str) else f"<bytes #{i}>"
             for i, item in enumerate(split.items)]
    for name, res in artifacts.items():
        # Name each disagreement and say how sure the reference was: a flip
        # on a near tie is quantization noise, a flip on a confident image is a bug.
        if name != ORIGINALS:
            res["disagreements"] = [describe_disagreement(items[i], reference[i], class_names)
                                    for i in res["disagreements"]]
    return {"n": len(split), "images": items, "artifacts": artifacts,
            "passed": not failures, "failures": failures}


def check_originals(model, saved_model, originals: Sequence[tuple[str, object]],
                    image_size: int, class_names: list[str], min_agreement: dict[str, float],
                    max_prob_diff: dict[str, float], batch_size: int = 32) -> dict:
    """Served on the original bytes vs Keras on the pixels training used, for odd files.

    Returns:
        compare() of the files served (with the SavedModel's limits, `judge`),
        plus "files" (how many were fed), "refused": [{"image", "reason",
        "converted"}] and "failures": why the gate fails (empty: passed). A
        refused converted file is by design (its format is not served); a
        refused file the pre-flight did not convert is a failure, since
        training decoded it with the very function the server runs.
    """
    from tl_keras.data import sources as sources_lib
    from tl_keras.export import tflite as tflite_lib

    paths = [str(o) for o, _ in originals]
    trained = sources_lib.Split([t for _, t in originals], np.zeros(len(originals), np.int32),
                                "pre-flight")
    reference = np.asarray(loop_lib.predict(
        model, tflite_lib.load_pixels(trained, image_size).astype(np.float32), batch_size),
        np.float32)
    probs, reasons = saved_model.predict_each([_encoded(p) for p in paths], batch_size)
    served = [i for i, p in enumerate(probs) if p is not None]
    res = compare(reference[served], np.stack([probs[i] for i in served]) if served
                  else reference[:0])
    res["files"] = len(paths)
    res["disagreements"] = [describe_disagreement(paths[served[i]], reference[served[i]],
                                                  class_names)
                             for i in res["disagreements"]]
    res["refused"] = [{"image": paths[i], "reason": reasons[i],
                       "converted": str(originals[i][1]) != paths[i]}
                      for i, p in enumerate(probs) if p is None]
    limits = ({ORIGINALS: min_agreement["saved_model"]},
              {ORIGINALS: max_prob_diff["saved_model"]})
    failures = judge(ORIGINALS, res, *limits)
    unexpected = [r for r in res["refused"] if not r["converted"]]
    if unexpected:
        failures.append(f"{ORIGINALS}: the served model refuses {len(unexpected)} file(s) "
                        f"training decoded, e.g. {unexpected[0]['image']}: "
                        f"{unexpected[0]['reason']}")
        res["passed"] = False
    res["failures"] = failures
    return res


def odd_files(preflight_report: Optional[dict], limit: int = 0, seed: int = 0
              ) -> list[tuple[str, object]]:
    """(original file, item trained on) of every file the pre-flight converted or noted.

    Files only (items given as bytes have no original left to send). With
    `limit` > 0 and more files than that, a seeded sample that keeps one file
    of every distinct reason first.
    """
    if not preflight_report:
        return []
    found: dict[str, tuple[str, object, str]] = {}
    for source in preflight_report.get("sources", {}).values():
        for e in source.get("converted", []):
            if os.path.isfile(e["path"]) and os.path.isfile(e.get("fixed", "")):
                found.setdefault(e["path"], (e["path"], e["fixed"], e["reason"]))
        for e in source.get("notes", []):
            if os.path.isfile(e["path"]):
                found.setdefault(e["path"], (e["path"], e["path"], e["note"]))
    files = sorted(found.values())
    if limit <= 0 or len(files) <= limit:
        return [(o, t) for o, t, _ in files]
    order = np.random.default_rng(seed).permutation(len(files)).tolist()
    first_of_kind: dict[str, int] = {}
    for i in order:
        first_of_kind.setdefault(_kind(files[i][2]), i)
    keep = list(first_of_kind.values())[:limit]
    keep += [i for i in order if i not in set(keep)][:limit - len(keep)]
    return [files[i][:2] for i in sorted(keep)]


def _kind(reason: str) -> str:
    """A reason without its numbers ("EXIF orientation 6: ..." and "... 8: ..." differ)."""
    return reason.split(":")[0].split("(")[0].strip()


def describe_disagreement(image: str, reference: np.ndarray, class_names: list[str]) -> dict:
    top2 = np.argsort(-reference, kind="stable")[:2]
    margin = float(reference[top2[0]] - reference[top2[1]]) if len(top2) > 1 else 1.0
    return {"image": image, "keras_top1": class_names[int(top2[0])],
            "keras_top1_prob": round(float(reference[top2[0]]), 6),
            "keras_margin": round(margin, 6)}


def _encoded(item) -> bytes:
    """The original encoded bytes of a split item (a file path or bytes)."""
    if isinstance(item, str):
        with open(item, "rb") as f:
            return f.read()
    return bytes(item)
