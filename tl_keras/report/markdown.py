"""The readable run report: `report.md` / `evaluation.md` and their PNGs.

`write_run_files` / `write_evaluation_files` write `report.md` (or
`evaluation.md`) and the PNGs of `tl_keras.report.plots` next to the JSON.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

from tl_keras.core import outputs
from tl_keras.report import evaluations
from tl_keras.report.metrics import ECE_BINS

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
             (f"expected calibration error ({ECE_BINS} bins)"
              + (", calibrated" if "ece_uncalibrated" in ev else ""), ev["ece"])]
    if "ece_uncalibrated" in ev:
        head.append(("expected calibration error, uncalibrated", ev["ece_uncalibrated"]))
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
    if ev.get("selective"):
        sel = ev["selective"]
        lines += ["### Selective prediction", ""]
        if sel["threshold"] is None:
            lines += [f"No confidence threshold reached the target accuracy "
                      f"{sel['target_accuracy']:.2f} on validation: answer none, or lower "
                      "--target_accuracy.", ""]
        else:
            lines += [f"Answering only at confidence >= {sel['threshold']:.4f} (chosen on "
                      f"validation for accuracy {sel['target_accuracy']:.2f}: there "
                      f"{_f(sel['validation']['accuracy'])} on "
                      f"{sel['validation']['coverage']:.0%} of the images): here "
                      f"{_f(sel['accuracy'])} on {sel['coverage']:.0%} of the images "
                      f"({sel['answered']} answered, the rest left to a person).", ""]
        if images.get("coverage"):
            lines += [f"![accuracy against coverage]({images['coverage']})", ""]
    if images.get("reliability"):
        lines += ["### Calibration", "",
                  "Accuracy against confidence in equal-width bins: a calibrated model's bars "
                  "follow the diagonal.", "", f"![reliability diagram]({images['reliability']})",
                  ""]
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
    if s.get("cross_validation"):  # the logistic head: no epochs, out-of-fold figures
        cv = s["cross_validation"]
        return (f"| {name}: logistic, C={cv['c']} by {cv['folds']}-fold cross-validation | "
                f"| | {_f(s.get('val_accuracy'), 4)} (out of fold) | "
                f"{_f(s.get('val_loss'), 4)} | {s.get('seconds', '')} |")
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
    if report.get("stage2_trial"):
        t = report["stage2_trial"]
        lines += [f"Without a validation split, stage 2 was first tried on {t['images']} "
                  f"held-out images (fold(s) {', '.join(map(str, t['folds']))}): accuracy "
                  f"{_f(t['head_accuracy'], 4)} with the logistic head, "
                  f"{_f(t['finetune_accuracy'], 4)} fine-tuned; "
                  + ("fine-tuning was kept." if t["finetune_kept"] else
                     "the head was kept, stage 2 did not run on all images."), ""]
    if report.get("stage2_skipped"):
        lines += [f"Stage 2 did not run: {report['stage2_skipped']}.", ""]
    split = evaluations.evaluated_split(report)
    if split:
        ev = report[split]
        title = (f"Test ({ev['n']} images)" if split == "test" else
                 f"Validation ({ev['n']} images; no test split, so this is the split that "
                 "chose the epochs and the stage: an optimistic estimate)" if split == "val" else
                 f"Cross-validated estimate ({ev['n']} images: held-out predictions of the "
                 "folds, no test split; give --test_data or --test_fraction for a test)")
        lines.append(evaluation_markdown(ev, title, images))
        if report.get("open_set") and ev.get("open_set"):
            o, here = report["open_set"], ev["open_set"]
            lines += ["### None of the above", "",
                      f"The export also returns `ood_score` (the entropy of the probabilities "
                      f"over log C: 0 sure of one class, 1 spread evenly) and `unknown` = "
                      f"ood_score > {o['threshold']:.4f}, a threshold that keeps "
                      f"{o['known_kept']:.0%} of {o['n']} {o['chosen_on']} (--unknown_keep="
                      f"{o['keep']}). Here it calls {here['unknown']} of {here['n']} images "
                      f"unknown ({here['unknown_rate']:.1%}), all of them from known classes. "
                      "It flags images unlike any class the model is sure of; an image of a "
                      "class close to a known one can still get that class with confidence.",
                      ""]
    if report.get("audit"):
        from tl_keras.report import audit as audit_lib

        lines.append(audit_lib.summary_markdown(report["audit"]))
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
RELIABILITY_PNG = "reliability.png"
COVERAGE_PNG = "coverage.png"


def evaluation_pngs(out_dir: str, ev: dict, items: Sequence, prefix: str) -> dict:
    """Writes the confusion-matrix and mistakes PNGs of `ev`; returns their file names."""
    from tl_keras.report import plots

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
    if ev.get("calibration"):
        images["reliability"] = prefix + RELIABILITY_PNG
        plots.reliability_png(ev["calibration"], ev.get("calibration_uncalibrated"),
                              os.path.join(out_dir, images["reliability"]))
    # A figure this evaluation has no content for must not survive from an
    # earlier run in the same folder, where it would pass for this one's.
    if ev.get("coverage_curve"):
        images["coverage"] = prefix + COVERAGE_PNG
        plots.coverage_png(ev["coverage_curve"], ev.get("selective"),
                           os.path.join(out_dir, images["coverage"]))
    for name in (CONFUSION_PNG, MISTAKES_PNG, RELIABILITY_PNG, COVERAGE_PNG):
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
    from tl_keras.report import plots

    images = {"curves": CURVES_PNG}
    best = report.get(report.get("kept", ""), {}).get("best_epoch")
    plots.learning_curves_png(histories, os.path.join(out_dir, CURVES_PNG), kept_epoch=best)
    split = evaluations.evaluated_split(report)
    if split and eval_items is not None:
        images.update(evaluation_pngs(out_dir, report[split], eval_items, ""))
    outputs.atomic_write_text(os.path.join(out_dir, "report.md"),
                              run_markdown(report, manifest, images))
    return ["report.md"] + list(images.values())


def write_evaluation_files(out_dir: str, result: dict, items: Sequence) -> list[str]:
    """Writes evaluation.md and its PNGs (prefixed `evaluation_`) for `tl-keras evaluate`.

    Returns:
        The names of the files written.
    """
    ev = result["test"]
    images = evaluation_pngs(out_dir, ev, items, "evaluation_")
    text = (f"# tl_keras evaluation\n\n- data: `{result.get('data', '')}`\n\n"
            + evaluation_markdown(ev, f"Evaluation ({ev['n']} images)", images))
    outputs.atomic_write_text(os.path.join(out_dir, "evaluation.md"), text)
    return ["evaluation.md"] + list(images.values())
