"""PNG figures of a run: learning curves, confusion matrix, reliability, coverage, worst mistakes.

Figures are drawn with matplotlib's object API on the non-interactive Agg
canvas (no pyplot, no global backend state, no display needed) and written
atomically. Sizes are fixed by the figure size in inches times `DPI` (no
tight bounding box), so a figure's pixel size is known in advance. The
mistakes grid is photos with captions, pasted with Pillow (`montage`).
"""

from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tl_keras.core import outputs

DPI = 100
CURVES_SIZE = (15.0, 4.5)  # inches: loss, accuracy, learning rate side by side
# Above this many classes the confusion matrix cells are too small for numbers.
ANNOTATE_MAX_CLASSES = 30


def _new_figure(size: tuple[float, float], layout: Optional[str] = "constrained") -> Figure:
    fig = Figure(figsize=size, dpi=DPI, layout=layout)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: str) -> str:
    # zlib level 1, not Pillow's 6: a grid of 16 photos encoded in 1.0-1.2 s
    # instead of 1.4-1.5 s, 11% larger (2.1 MB instead of 1.9 MB).
    with outputs.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=DPI, pil_kwargs={"compress_level": 1})
    return path


def confusion_figsize(num_classes: int) -> tuple[float, float]:
    """Figure size in inches of the confusion matrix of `num_classes` classes."""
    # Multiples of half an inch: exact in binary, so pixels = inches * DPI exactly.
    side = min(4.0 + 0.5 * num_classes, 20.0)
    return side + 1.0, side  # the extra inch holds the colour bar


def learning_curves_png(histories: Sequence[dict], path: str,
                        kept_epoch: Optional[int] = None) -> str:
    """Loss, accuracy and learning rate per epoch across the stages.

    Args:
        histories: per-epoch logs of each stage in order (keys loss,
            accuracy, val_loss, val_accuracy, lr); epochs are numbered on
            across stages, as in the report.
        path: the PNG to write (CURVES_SIZE * DPI pixels).
        kept_epoch: the 1-based epoch whose weights the run kept, marked.

    Returns:
        `path`.
    """
    # Fixed margins, as in the mistakes grid: the constrained layout's solve
    # took about half of this figure's time.
    fig = _new_figure(CURVES_SIZE, layout=None)
    w, h = CURVES_SIZE
    fig.subplots_adjust(left=0.7 / w, right=1 - 0.2 / w, bottom=0.55 / h, top=1 - 0.75 / h,
                        wspace=0.25)
    axes = fig.subplots(1, 3)
    panels = [("loss", "loss", False), ("accuracy", "accuracy", False),
              ("lr", "learning rate", True)]
    colors = {"": "tab:blue", "val_": "tab:orange"}
    start = 0
    bounds = []
    for stage, hist in enumerate(histories, 1):
        n = len(hist.get("loss", []))
        epochs = np.arange(start + 1, start + n + 1)
        for ax, (key, _, _) in zip(axes, panels):
            prefixes = ("",) if key == "lr" else ("", "val_")
            for prefix in prefixes:
                values = hist.get(prefix + key)
                if values is None or not n:
                    continue
                label = None
                if stage == 1:
                    label = ("validation" if prefix else "train") if key != "lr" else None
                ax.plot(epochs, values, marker="o", markersize=3, color=colors[prefix],
                        linestyle="-" if stage == 1 else "--", label=label)
        start += n
        bounds.append(start)
    for ax, (key, title, log_scale) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.grid(True, alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if log_scale and any(v > 0 for h in histories for v in h.get("lr", [])):
            # Schedules end at 0: hide those points rather than draw a cliff.
            ax.set_yscale("log", nonpositive="mask")
        for b in bounds[:-1]:
            ax.axvline(b + 0.5, color="gray", linestyle=":", linewidth=1.5)
            ax.text(b + 0.5, 0.98, " stage 2", transform=ax.get_xaxis_transform(),
                    va="top", ha="left", color="gray", fontsize=9)
        if kept_epoch:
            ax.axvline(kept_epoch, color="tab:green", linewidth=1, alpha=0.6)
    if axes[0].get_legend_handles_labels()[0]:
        axes[0].legend(loc="best", fontsize=9)
    fig.suptitle("solid: stage 1 (head on cached features), dashed: stage 2 (fine-tuning)"
                 + (f"; green: kept epoch {kept_epoch}" if kept_epoch else ""), fontsize=10)
    return _save(fig, path)


def confusion_matrix_png(cm: np.ndarray, class_names: Sequence[str], path: str) -> str:
    """The confusion matrix normalised by row (each true class sums to 1).

    Each cell shows the fraction of the true class and, below it, the count.

    Args:
        cm: [C, C] counts, rows true, columns predicted.
        class_names: the C names.
        path: the PNG to write (`confusion_figsize(C)` * DPI pixels).

    Returns:
        `path`.
    """
    cm = np.asarray(cm, dtype=np.int64)
    n = len(class_names)
    rows = cm.sum(axis=1, keepdims=True)
    norm = np.divide(cm, rows, out=np.zeros(cm.shape, dtype=np.float64), where=rows > 0)
    fig = _new_figure(confusion_figsize(n))
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of the true class")
    ax.set_xticks(range(n), labels=list(class_names), rotation=45, ha="right",
                  rotation_mode="anchor")
    ax.set_yticks(range(n), labels=list(class_names))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"confusion matrix ({int(cm.sum())} examples, normalised by row)")
    if n <= ANNOTATE_MAX_CLASSES:
        size = 10 if n <= 10 else 7
        for t in range(n):
            for p in range(n):
                ax.text(p, t, f"{norm[t, p]:.0%}\n({cm[t, p]})", ha="center", va="center",
                        fontsize=size, color="white" if norm[t, p] > 0.5 else "black")
    return _save(fig, path)


def reliability_png(bins: Sequence[dict], uncalibrated: Optional[Sequence[dict]],
                    path: str) -> str:
    """Reliability diagram: accuracy against mean confidence per confidence bin.

    Args:
        bins: the evaluation's "calibration" bins (`metrics.expected_calibration_error`).
        uncalibrated: the same bins before calibration, drawn beside them; or None.
        path: the PNG to write.

    Returns:
        `path`.
    """
    fig = _new_figure((5.2, 4.6))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=1, label="perfect calibration")
    for series, label, color in ((uncalibrated, "uncalibrated", "#d62728"),
                                 (bins, "calibrated" if uncalibrated else "model", "#1f77b4")):
        if not series:
            continue
        conf = [b["confidence"] for b in series]
        acc = [b["accuracy"] for b in series]
        sizes = [max(8.0, 400.0 * b["count"] / sum(x["count"] for x in series)) for b in series]
        ax.plot(conf, acc, color=color, linewidth=1.2, alpha=0.8)
        ax.scatter(conf, acc, s=sizes, color=color, alpha=0.7, label=label)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("mean confidence in bin")
    ax.set_ylabel("accuracy in bin")
    ax.set_title("reliability (marker area: images in bin)")
    ax.legend(loc="upper left", fontsize=8)
    return _save(fig, path)


def coverage_png(curve: Sequence[dict], chosen: Optional[dict], path: str) -> str:
    """Accuracy of the answered images against the share answered (most confident first).

    Args:
        curve: `selective.coverage_curve` points.
        chosen: the evaluation's "selective" block (threshold, coverage, accuracy), marked.
        path: the PNG to write.

    Returns:
        `path`.
    """
    fig = _new_figure((5.2, 4.2))
    ax = fig.subplots()
    ax.plot([p["coverage"] for p in curve], [p["accuracy"] for p in curve], marker="o",
            markersize=3, color="#1f77b4", label="most confident first")
    if chosen and chosen.get("threshold") is not None and chosen.get("accuracy") is not None:
        ax.scatter([chosen["coverage"]], [chosen["accuracy"]], s=60, color="#d62728", zorder=3,
                   label=f"confidence >= {chosen['threshold']:.3f}")
        ax.axhline(chosen["target_accuracy"], color="grey", linestyle="--", linewidth=1,
                   label=f"target {chosen['target_accuracy']:.2f}")
    ax.set_xlim(0, 1.02)
    ax.set_xlabel("coverage (share of images answered)")
    ax.set_ylabel("accuracy of the answered images")
    ax.set_title("selective prediction")
    ax.legend(loc="lower left", fontsize=8)
    return _save(fig, path)


def mistakes_png(mistakes: Sequence[dict], items: Sequence, path: str) -> str:
    """A grid of the most confident mistakes: each image with true and predicted labels.

    Drawn with Pillow (`montage.grid_png`, as the audit's pictures): as a
    matplotlib figure of 16 titled images it took 0.7 s of a run's reports.

    Args:
        mistakes: entries of `report.evaluation(...)["mistakes"]` (file,
            true, predicted, score).
        items: the image of each mistake, a file path or encoded bytes.
        path: the PNG to write.

    Returns:
        `path`.
    """
    from tl_keras.report import montage

    titles = []
    for m in mistakes:
        name = os.path.basename(str(m["file"]))
        if len(name) > 34:
            name = name[:15] + "..." + name[-16:]
        titles.append(f"{name}\ntrue: {m['true']}\npredicted: {m['predicted']} ({m['score']:.2f})")
    return montage.grid_png(items, titles, path, "most confident mistakes")
