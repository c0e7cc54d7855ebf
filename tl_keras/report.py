"""Evaluation metrics of a trained classifier and the readable run report.

`evaluation` turns predicted probabilities and true labels into the metrics
block that `report.json` keeps under "test" (or "val" when a run has no test
split) and `evaluation.json` under "test": accuracy, top-k accuracy,
per-class precision/recall/F1 with support, macro and weighted averages, the
confusion matrix, one-vs-rest ROC-AUC and PR-AUC, expected calibration error
and the most confident mistakes. Counting and averaging is scikit-learn's;
only ECE, which scikit-learn lacks, is computed here.

`write_run_files` / `write_evaluation_files` write `report.md` (or
`evaluation.md`) and the PNGs of `tl_keras.plots` next to the JSON.
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from sklearn import metrics as skm

from tl_keras import outputs

# How many of the most confident mistakes the report keeps and shows.
NUM_MISTAKES = 16
# Equal-width confidence bins of the expected calibration error.
ECE_BINS = 15
# How many most-confused (true, predicted) pairs the report lists.
NUM_CONFUSED_PAIRS = 5


# --------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------

def expected_calibration_error(confidence: np.ndarray, correct: np.ndarray,
                               n_bins: int = ECE_BINS) -> tuple[float, list[dict]]:
    """Expected calibration error over equal-width confidence bins.

    ECE = sum over bins b of |B_b| / N * |accuracy(B_b) - mean confidence(B_b)|,
    bins (i/n, (i+1)/n], the first one also holding confidence 0.

    Args:
        confidence: [N] the probability of each predicted label.
        correct: [N] whether that prediction was right.
        n_bins: number of bins.

    Returns:
        (ece, bins): bins lists the non-empty bins as {"lower", "upper",
        "count", "accuracy", "confidence"}.
    """
    confidence = np.asarray(confidence, dtype=np.float64)
    correct = np.asarray(correct, dtype=np.float64)
    n = len(confidence)
    if n == 0:
        return 0.0, []
    idx = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece, bins = 0.0, []
    for b in range(n_bins):
        mask = idx == b
        count = int(mask.sum())
        if not count:
            continue
        acc, conf = float(correct[mask].mean()), float(confidence[mask].mean())
        ece += count / n * abs(acc - conf)
        bins.append({"lower": b / n_bins, "upper": (b + 1) / n_bins, "count": count,
                     "accuracy": acc, "confidence": conf})
    return float(ece), bins


def one_vs_rest_auc(probs: np.ndarray, targets: np.ndarray, class_names: Sequence[str]) -> dict:
    """ROC-AUC and PR-AUC (average precision) of each class against the rest.

    Args:
        probs: [N, C] scores.
        targets: [N, C] 0/1 indicators (one-hot for single-label data).
        class_names: the C names.

    Returns:
        {"roc_auc", "pr_auc", "per_class": {name: {"roc_auc", "pr_auc"}}}.
        A class without both positives and negatives has no AUC (None) and
        is left out of the macro average. With two single-label classes the
        headline figures are those of the second class as the positive one
        (scikit-learn's binary convention); otherwise they are macro averages.
    """
    per_class = {}
    for c, name in enumerate(class_names):
        y = targets[:, c]
        if 0 < y.sum() < len(y):
            per_class[name] = {"roc_auc": float(skm.roc_auc_score(y, probs[:, c])),
                               "pr_auc": float(skm.average_precision_score(y, probs[:, c]))}
        else:
            per_class[name] = {"roc_auc": None, "pr_auc": None}
    single_label = bool(np.all(targets.sum(axis=1) == 1))
    if single_label and len(class_names) == 2:
        head = per_class[class_names[1]]
        return {"roc_auc": head["roc_auc"], "pr_auc": head["pr_auc"], "average": "binary",
                "per_class": per_class}
    out = {"average": "macro", "per_class": per_class}
    for key in ("roc_auc", "pr_auc"):
        vals = [v[key] for v in per_class.values() if v[key] is not None]
        out[key] = float(np.mean(vals)) if vals else None
    return out


def _per_class_table(targets, predicted, class_names: Sequence[str]) -> tuple[list, dict]:
    """Per-class precision/recall/F1/support and their macro and weighted averages."""
    labels = list(range(len(class_names)))
    p, r, f, s = skm.precision_recall_fscore_support(targets, predicted, labels=labels,
                                                     zero_division=0)
    rows = [{"class": name, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]),
             "support": int(s[i])} for i, name in enumerate(class_names)]
    averages = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = skm.precision_recall_fscore_support(targets, predicted, labels=labels,
                                                            average=avg, zero_division=0)
        averages[avg] = {"precision": float(ap), "recall": float(ar), "f1": float(af),
                         "support": int(np.sum(s))}
    return rows, averages


def describe_items(items: Sequence, source: str = "") -> list[str]:
    """How each example is named in reports: its file path, or its index in the source."""
    return [it if isinstance(it, str) else f"{source or 'data'}#{i}"
            for i, it in enumerate(items)]


def evaluation(probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
               top_k: int = 3, names: Optional[Sequence[str]] = None,
               threshold: float = 0.5, num_mistakes: int = NUM_MISTAKES) -> dict:
    """All evaluation metrics of a set of predictions.

    Args:
        probs: [N, C] predicted probabilities.
        labels: [N] int class ids (single-label), or [N, C] 0/1 targets
            (multi-label: each class is decided by `threshold`).
        class_names: the C class names.
        top_k: k of the top-k accuracy (capped at C; single-label only).
        names: [N] how to name each example in the mistakes list (file paths).
        threshold: decision threshold of multi-label predictions.
        num_mistakes: how many of the most confident mistakes to keep.

    Returns:
        A JSON-ready dict. Always: "accuracy" (exact match for multi-label),
        "n", "per_class" (class, precision, recall, f1, support),
        "macro_avg" / "weighted_avg", "roc_auc", "pr_auc", "auc" (per class),
        "ece", "calibration" (bins), "mistakes" (file, true, predicted,
        score, index; most confident first). Single-label also has
        "top_{k}_accuracy", "confusion_matrix" (rows true, columns
        predicted) and "most_confused" pairs; multi-label has
        "multi_label": true and "threshold".
    """
    probs = np.asarray(probs, dtype=np.float64)
    labels = np.asarray(labels)
    n_cls = len(class_names)
    if probs.ndim != 2 or probs.shape[1] != n_cls:
        raise ValueError(f"probabilities of shape {probs.shape} do not match "
                         f"{n_cls} classes")
    n = probs.shape[0]
    names = list(names) if names is not None else [f"#{i}" for i in range(n)]
    if labels.ndim == 2:
        return _multi_label_evaluation(probs, labels.astype(int), class_names, names,
                                       threshold, num_mistakes)
    labels = labels.astype(int)
    result: dict = {"accuracy": 0.0, "n": int(n)}
    if n == 0:
        return result
    pred = probs.argmax(axis=1)
    k = min(top_k, n_cls)
    result["accuracy"] = float(skm.accuracy_score(labels, pred))
    if k >= n_cls:
        topk = 1.0
    elif n_cls == 2:  # scikit-learn wants 1-D scores for two classes; k is 1 here
        topk = result["accuracy"]
    else:
        topk = float(skm.top_k_accuracy_score(labels, probs, k=k, labels=range(n_cls)))
    result[f"top_{k}_accuracy"] = topk
    result["per_class"], averages = _per_class_table(labels, pred, class_names)
    result["macro_avg"], result["weighted_avg"] = averages["macro"], averages["weighted"]
    cm = skm.confusion_matrix(labels, pred, labels=list(range(n_cls)))
    result["confusion_matrix"] = cm.astype(int).tolist()
    off = [(int(cm[t, p]), t, p) for t in range(n_cls) for p in range(n_cls)
           if t != p and cm[t, p]]
    off.sort(key=lambda x: (-x[0], x[1], x[2]))
    result["most_confused"] = [
        {"true": class_names[t], "predicted": class_names[p], "count": c,
         "fraction_of_true": c / max(int(cm[t].sum()), 1)}
        for c, t, p in off[:NUM_CONFUSED_PAIRS]]
    auc = one_vs_rest_auc(probs, np.eye(n_cls, dtype=int)[labels], class_names)
    result["roc_auc"], result["pr_auc"] = auc["roc_auc"], auc["pr_auc"]
    result["auc"] = auc
    confidence = probs[np.arange(n), pred]
    result["ece"], result["calibration"] = expected_calibration_error(confidence, pred == labels)
    wrong = np.flatnonzero(pred != labels)
    wrong = wrong[np.argsort(-confidence[wrong], kind="stable")][:num_mistakes]
    result["mistakes"] = [{"file": names[i], "true": class_names[labels[i]],
                           "predicted": class_names[pred[i]], "score": float(confidence[i]),
                           "index": int(i)} for i in wrong]
    return result


def _multi_label_evaluation(probs, targets, class_names, names, threshold, num_mistakes):
    """`evaluation` for [N, C] 0/1 targets; every class is a yes/no decision."""
    n = len(targets)
    result: dict = {"multi_label": True, "threshold": threshold, "accuracy": 0.0, "n": int(n)}
    if n == 0:
        return result
    pred = (probs >= threshold).astype(int)
    result["accuracy"] = float(skm.accuracy_score(targets, pred))  # exact match
    result["per_class"], averages = _per_class_table(targets, pred, class_names)
    result["macro_avg"], result["weighted_avg"] = averages["macro"], averages["weighted"]
    auc = one_vs_rest_auc(probs, targets, class_names)
    result["roc_auc"], result["pr_auc"] = auc["roc_auc"], auc["pr_auc"]
    result["auc"] = auc
    # Each (example, class) decision is a binary prediction with confidence
    # max(p, 1 - p); calibration is measured over all of them.
    confidence = np.where(pred == 1, probs, 1.0 - probs)
    correct = pred == targets
    result["ece"], result["calibration"] = expected_calibration_error(confidence.ravel(),
                                                                      correct.ravel())
    wrong = np.flatnonzero(~correct.all(axis=1))
    worst = np.where(correct, 0.0, confidence).max(axis=1)
    wrong = wrong[np.argsort(-worst[wrong], kind="stable")][:num_mistakes]

    def label_set(row):
        return "+".join(class_names[c] for c in np.flatnonzero(row)) or "(none)"

    result["mistakes"] = [{"file": names[i], "true": label_set(targets[i]),
                           "predicted": label_set(pred[i]), "score": float(worst[i]),
                           "index": int(i)} for i in wrong]
    return result


def headline(ev: dict) -> dict:
    """The few figures of an `evaluation` worth printing (accuracy, top-k, macro F1, AUCs, ECE, n)."""
    keys = ["accuracy"] + [k for k in ev if k.startswith("top_") and k.endswith("_accuracy")]
    out = {k: ev[k] for k in keys if k in ev}
    if "macro_avg" in ev:
        out["macro_f1"] = ev["macro_avg"]["f1"]
    out.update({k: ev[k] for k in ("roc_auc", "pr_auc", "ece", "n") if k in ev})
    return out


def evaluate_split(model, split, class_names: Sequence[str], image_size: int,
                   batch_size: int = 64, top_k: int = 3) -> dict:
    """Predicts a `data.Split` with `model` and returns its `evaluation`."""
    from tl_keras import evaluate as evaluate_lib

    probs = evaluate_lib.predict(model, split, image_size, batch_size)
    return evaluation(probs, split.labels, class_names, top_k,
                      describe_items(split.items, split.source))


# --------------------------------------------------------------------------
# report.md
# --------------------------------------------------------------------------

def _f(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}f}"


def _md_escape(s) -> str:
    return str(s).replace("|", "\\|")


def evaluation_markdown(ev: dict, title: str, images: Optional[dict] = None) -> str:
    """The evaluation block of report.md / evaluation.md.

    Args:
        ev: an `evaluation` result.
        title: the section heading, e.g. "Test (150 images)".
        images: {"confusion": file, "mistakes": file} written next to it.
    """
    images = images or {}
    lines = [f"## {title}", ""]
    if not ev.get("n"):
        return "\n".join(lines + ["No examples.", ""])
    topk = next((k for k in ev if k.startswith("top_") and k.endswith("_accuracy")), None)
    head = [("accuracy" + (" (exact match)" if ev.get("multi_label") else ""), ev["accuracy"])]
    if topk:
        head.append((f"top-{topk.split('_')[1]} accuracy", ev[topk]))
    head += [("macro F1", ev["macro_avg"]["f1"]), ("weighted F1", ev["weighted_avg"]["f1"]),
             (f"ROC-AUC ({ev['auc']['average']})", ev["roc_auc"]),
             (f"PR-AUC ({ev['auc']['average']}, average precision)", ev["pr_auc"]),
             (f"expected calibration error ({ECE_BINS} bins)", ev["ece"])]
    lines += ["| metric | value |", "|---|---|"]
    lines += [f"| {name} | {_f(v)} |" for name, v in head]
    lines += [f"| examples | {ev['n']} |", ""]

    lines += ["### Per class", "",
              "| class | precision | recall | F1 | support | ROC-AUC | PR-AUC |",
              "|---|---|---|---|---|---|---|"]
    for row in ev["per_class"]:
        auc = ev["auc"]["per_class"].get(row["class"], {})
        lines.append(f"| {_md_escape(row['class'])} | {_f(row['precision'])} | "
                     f"{_f(row['recall'])} | {_f(row['f1'])} | {row['support']} | "
                     f"{_f(auc.get('roc_auc'))} | {_f(auc.get('pr_auc'))} |")
    for avg in ("macro", "weighted"):
        a = ev[f"{avg}_avg"]
        lines.append(f"| *{avg} avg* | {_f(a['precision'])} | {_f(a['recall'])} | "
                     f"{_f(a['f1'])} | {a['support']} | | |")
    lines.append("")

    if "confusion_matrix" in ev:
        names = [r["class"] for r in ev["per_class"]]
        lines += ["### Confusion matrix", "", "Rows: true class; columns: predicted class.", "",
                  "| true \\ predicted | " + " | ".join(map(_md_escape, names)) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for name, row in zip(names, ev["confusion_matrix"]):
            lines.append(f"| **{_md_escape(name)}** | " + " | ".join(map(str, row)) + " |")
        lines.append("")
        if images.get("confusion"):
            lines += [f"![confusion matrix]({images['confusion']})", ""]
        if ev.get("most_confused"):
            lines += ["Most confused pairs:", ""]
            lines += [f"- {_md_escape(p['true'])} taken for {_md_escape(p['predicted'])}: "
                      f"{p['count']} ({p['fraction_of_true']:.0%} of {_md_escape(p['true'])})"
                      for p in ev["most_confused"]]
            lines.append("")

    if ev.get("mistakes"):
        lines += ["### Most confident mistakes", "",
                  "| # | file | true | predicted | score |", "|---|---|---|---|---|"]
        for i, m in enumerate(ev["mistakes"], 1):
            lines.append(f"| {i} | `{_md_escape(m['file'])}` | {_md_escape(m['true'])} | "
                         f"{_md_escape(m['predicted'])} | {m['score']:.3f} |")
        lines.append("")
        if images.get("mistakes"):
            lines += [f"![most confident mistakes]({images['mistakes']})", ""]
    else:
        lines += ["No mistakes.", ""]
    return "\n".join(lines)


def _stage_line(name: str, s: dict) -> str:
    if not s.get("epochs"):
        return f"| {name} | 0 | | | | |"
    return (f"| {name} | {s['epochs']} | {s.get('best_epoch', '')} | "
            f"{_f(s.get('val_accuracy'), 4)} | {_f(s.get('val_loss'), 4)} | "
            f"{s.get('seconds', '')} |")


def run_markdown(report: dict, manifest: Optional[dict], images: dict) -> str:
    """report.md of a training run: the stages, the evaluation, the manifest."""
    lines = ["# tl_keras run report", ""]
    lines += [f"- backbone: {report.get('backbone', '?')} at {report.get('image_size', '?')} px",
              f"- classes ({len(report['classes'])}): "
              + ", ".join(map(_md_escape, report["classes"]))]
    if report.get("class_counts"):
        lines.append("- images: " + ", ".join(f"{k} {sum(v)}"
                                             for k, v in report["class_counts"].items()))
    lines += [f"- kept: **{report.get('kept', '?')}**", ""]
    lines += ["## Training", "",
              "| stage | epochs | best epoch | val accuracy | val loss | seconds |",
              "|---|---|---|---|---|---|",
              _stage_line("1: head on cached features", report.get("stage1", {})),
              _stage_line("2: fine-tune " + ", ".join(report.get("stage2", {}).get("blocks", [])),
                          report.get("stage2", {})), ""]
    if images.get("curves"):
        lines += [f"![learning curves]({images['curves']})", ""]
    split = "test" if "test" in report else "val" if "val" in report else None
    if split:
        ev = report[split]
        title = (f"Test ({ev['n']} images)" if split == "test" else
                 f"Validation ({ev['n']} images; no test split, so this is the split that "
                 "chose the epochs and the stage: an optimistic estimate)")
        lines.append(evaluation_markdown(ev, title, images))
    if manifest:
        v = manifest.get("versions", {})
        lines += ["## Manifest", "",
                  f"- data hash: `{manifest.get('data', {}).get('hash', '?')}`",
                  "- versions: " + ", ".join(f"{k} {val}" for k, val in v.items()),
                  f"- device: {manifest.get('device', {}).get('summary', '?')}",
                  f"- seed: {manifest.get('seeds', {}).get('seed', '?')}",
                  "- full manifest: `manifest.json`", ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------
# Writing the files of a run
# --------------------------------------------------------------------------

CURVES_PNG = "learning_curves.png"
CONFUSION_PNG = "confusion_matrix.png"
MISTAKES_PNG = "mistakes.png"


def _evaluation_pngs(out_dir: str, ev: dict, items: Sequence, prefix: str) -> dict:
    """Writes the confusion-matrix and mistakes PNGs of `ev`; returns their file names."""
    from tl_keras import plots

    images = {}
    names = [r["class"] for r in ev.get("per_class", [])]
    if "confusion_matrix" in ev:
        images["confusion"] = prefix + CONFUSION_PNG
        plots.confusion_matrix_png(np.asarray(ev["confusion_matrix"]), names,
                                   os.path.join(out_dir, images["confusion"]))
    if ev.get("mistakes"):
        images["mistakes"] = prefix + MISTAKES_PNG
        plots.mistakes_png(ev["mistakes"], [items[m["index"]] for m in ev["mistakes"]],
                           os.path.join(out_dir, images["mistakes"]))
    # A figure this evaluation has no content for must not survive from an
    # earlier run in the same folder, where it would pass for this one's.
    for name in (CONFUSION_PNG, MISTAKES_PNG):
        if prefix + name not in images.values() and os.path.isfile(os.path.join(out_dir,
                                                                               prefix + name)):
            os.remove(os.path.join(out_dir, prefix + name))
    return images


def write_run_files(out_dir: str, report: dict, histories: Sequence[dict],
                    eval_items: Optional[Sequence] = None,
                    manifest: Optional[dict] = None) -> list[str]:
    """Writes report.md and the PNGs of a training run into `out_dir`.

    Args:
        out_dir: the run folder.
        report: the run's report (as written to report.json).
        histories: the per-epoch logs of stage 1 and (if it ran) stage 2.
        eval_items: the items (paths or bytes) of the evaluated split, in
            order, for the mistakes grid.
        manifest: the run manifest, summarised at the end of report.md.

    Returns:
        The names of the files written.
    """
    from tl_keras import plots

    images = {"curves": CURVES_PNG}
    best = report.get(report.get("kept", ""), {}).get("best_epoch")
    plots.learning_curves_png(histories, os.path.join(out_dir, CURVES_PNG), kept_epoch=best)
    split = "test" if "test" in report else "val" if "val" in report else None
    if split and eval_items is not None:
        images.update(_evaluation_pngs(out_dir, report[split], eval_items, ""))
    outputs.atomic_write_text(os.path.join(out_dir, "report.md"),
                              run_markdown(report, manifest, images))
    return ["report.md"] + list(images.values())


def write_evaluation_files(out_dir: str, result: dict, items: Sequence) -> list[str]:
    """Writes evaluation.md and its PNGs (prefixed `evaluation_`) for `tl-keras evaluate`.

    Returns:
        The names of the files written.
    """
    ev = result["test"]
    images = _evaluation_pngs(out_dir, ev, items, "evaluation_")
    text = (f"# tl_keras evaluation\n\n- data: `{result.get('data', '')}`\n\n"
            + evaluation_markdown(ev, f"Evaluation ({ev['n']} images)", images))
    outputs.atomic_write_text(os.path.join(out_dir, "evaluation.md"), text)
    return ["evaluation.md"] + list(images.values())
