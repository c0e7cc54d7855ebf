"""The data audit: label issues, near-duplicates (leakage) and outliers, from cached features.

Every image's pooled backbone features are already computed (and cached) for
training; with them the audit is nearly free:

* **label issues**: out-of-fold probabilities of k-fold logistic heads
  (`tl_keras.train.kfold.cross_validate`, the one k-fold machinery) on the
  features' top principal directions (trained on every cached view of the
  training images and their mirror pass), filtered by cleanlab
  (`cleanlab.filter.find_label_issues`, `LABEL_FILTER`; scores from
  `cleanlab.rank.get_label_quality_scores`); multi-label data through
  cleanlab's multi-label versions;
* **near-duplicates**: exact cosine similarity of centred copy descriptors (a
  5x5 grid of a middle block's activations, `tl_keras.train.copies`, from the
  same frozen pass), within a split and across train/val/test (resized,
  re-encoded and lightly cropped copies, which the byte-identical pre-flight
  check cannot see);
* **outliers**: cleanlab's out-of-distribution scores on the features
  (`cleanlab.outlier.OutOfDistribution`, k nearest neighbours), against all
  images and against the image's own class.

`analyse` does the work on arrays; `write_files` writes OUT/audit.json,
OUT/audit.md with its pictures, OUT/label_issues.csv and OUT/relabelled.csv.
"""

from __future__ import annotations

import csv
import io
import os
from typing import Optional, Sequence

import numpy as np

from tl_keras.core import outputs
from tl_keras.train import kfold

# Cosine similarity of centred copy descriptors (`tl_keras.train.copies`) at or
# above which two images are near-duplicates. Chosen on 500 flowers128 photos
# that are not in flowers/ (data the benchmark does not report;
# `benchmarks/audit_quality.py --tune`), with 25 altered copies (10% crop, 70%
# size, JPEG q60): midway between the 24th most similar copy (0.755) and the
# most similar distinct photos after one natural duplicate (0.673). Pooled
# features could not separate them (copies 0.56-0.92, distinct photos up to
# 0.81). benchmarks/README.md reports what this finds on the flowers.
DUPLICATE_SIMILARITY = 0.72
# Folds of the out-of-fold heads behind the label audit. Their regularisation
# is chosen from kfold's full grid, and they train on every view the run
# cached of the training images (its augmented views and mirror pass): on the
# label-tuning photos below, mean F1 0.398 against 0.350 with the clean view
# and a 3-value grid, better on each of the three plantings (+0.04 to +0.05).
# A held-out image is predicted from the mean over all its views (test-time
# augmentation), not its clean view and mirror alone: mean F1 0.413 against
# 0.399 there, better on each planting (+0.010 to +0.019), at no extra cost.
AUDIT_FOLDS = 5
# cleanlab's filter of likely label errors: as many images as confident
# learning estimates are mislabelled, those whose given label has the lowest
# out-of-fold probability. Chosen on data no reported number uses (1600
# flowers128 photos not in flowers/, 5% of labels flipped, three plantings:
# `benchmarks/audit_quality.py --tune_labels`, results/audit_tune_labels.json):
# the highest mean F1 of cleanlab's seven filters (0.413; "low_normalized_margin"
# 0.391, the default "prune_by_noise_rate" 0.317, "predicted_neq_given" 0.239).
LABEL_FILTER = "low_self_confidence"
# Principal directions the label and outlier audits work on (as kfold's heads).
PRINCIPAL_DIM = 256
# Fraction of the images listed as outliers (the lowest OOD scores).
OUTLIER_FRACTION = 0.01
# Images shown per picture.
SHOWN = 16

AUDIT_JSON, AUDIT_MD = "audit.json", "audit.md"
LABEL_ISSUES_CSV, RELABELLED_CSV = "label_issues.csv", "relabelled.csv"
LABELS_PNG, DUPLICATES_PNG, OUTLIERS_PNG = ("audit_labels.png", "audit_duplicates.png",
                                            "audit_outliers.png")
SPLITS = ("train", "val", "test")


def _normalised(features: np.ndarray) -> np.ndarray:
    """Centred, unit-length rows: cosine similarity is then a dot product.

    Centring removes what every photo shares (pooled ReLU features are all
    positive, so raw cosine similarities of unrelated photos are high).
    """
    x = np.asarray(features, np.float32)
    x = x - x.mean(axis=0)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def near_duplicates(features: np.ndarray, threshold: float = DUPLICATE_SIMILARITY,
                    block: int = 2048) -> list[tuple[int, int, float]]:
    """Pairs of images whose features have cosine similarity >= threshold.

    Exact search in blocks of rows (memory block x N): seconds for tens of
    thousands of images; beyond, an approximate index (faiss, ScaNN) over the
    same normalised features.

    Returns:
        (i, j, similarity) with i < j, most similar first.
    """
    x = _normalised(features)
    pairs = []
    for start in range(0, len(x), block):
        sim = x[start:start + block] @ x.T
        rows, cols = np.nonzero(sim >= threshold)
        for r, c in zip(rows.tolist(), cols.tolist()):
            i = start + r
            if i < c:
                pairs.append((i, c, float(sim[r, c])))
    return sorted(pairs, key=lambda p: -p[2])


def _groups(n: int, pairs: Sequence[tuple[int, int, float]]) -> np.ndarray:
    """A group id per image: connected components of the near-duplicate pairs."""
    parent = list(range(n))

    def find(i):
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    for i, j, _ in pairs:
        parent[find(i)] = find(j)
    return np.array([find(i) for i in range(n)])


def label_issues(features: np.ndarray, labels: np.ndarray, num_classes: int, seed: int,
                 groups: Optional[np.ndarray] = None, folds: int = AUDIT_FOLDS,
                 views: Sequence[np.ndarray] = (), mirror: Optional[np.ndarray] = None) -> dict:
    """Likely label errors: cleanlab on out-of-fold probabilities of logistic heads.

    Args:
        features: [N, D] clean-view features.
        labels: [N] class ids, or [N, C] multi-hot rows.
        num_classes: C.
        seed: the folds' seed.
        groups: near-duplicate groups, kept in one fold (a copy does not
            vouch for its own label).
        folds: k.
        views: more training rows for the heads, [N, D] each (augmented
            views; an image without one repeats its clean view).
        mirror: [N, D] features of the mirrored images, or None: a
            training view. A held-out image is predicted from the mean over
            all its views.

    Returns:
        {"issues": [indices, most likely first], "scores": [N] label quality
        (low: suspicious), "suggested": [N] class ids (multi-hot rows for
        multi-label data), "oof_accuracy", "c"}.
    """
    import cleanlab.filter
    import cleanlab.rank

    labels = np.asarray(labels)
    multi = labels.ndim == 2
    counts = labels.sum(axis=0) if multi else np.bincount(labels.astype(int),
                                                           minlength=num_classes)
    k = int(min(folds, max(2, min(c for c in counts if c > 0))))
    targets = (labels.astype(np.float32) if multi
               else np.eye(num_classes, dtype=np.float32)[labels.astype(int)])
    fid = kfold.fold_ids(labels, k, seed, groups=None if groups is None else groups.tolist())
    cv = kfold.cross_validate([features, *views], targets, fid, mirror=mirror, multi_label=multi,
                              max_dim=PRINCIPAL_DIM, held_out_views=True)
    probs = np.clip(cv.oof_probs.astype(np.float64), 1e-6, 1.0)
    if multi:
        from cleanlab.multilabel_classification import filter as mfilter
        from cleanlab.multilabel_classification import rank as mrank

        given = [np.flatnonzero(r > 0.5).tolist() for r in labels]
        scores = mrank.get_label_quality_scores(given, probs)
        issues = mfilter.find_label_issues(given, probs, return_indices_ranked_by="self_confidence",
                                           n_jobs=1)
        suggested = (probs >= 0.5).astype(np.float32)
    else:
        probs = probs / probs.sum(axis=1, keepdims=True)
        y = labels.astype(int)
        scores = cleanlab.rank.get_label_quality_scores(y, probs)
        issues = cleanlab.filter.find_label_issues(  # n_jobs=1: no process pool for this
            y, probs, filter_by=LABEL_FILTER, return_indices_ranked_by="self_confidence",
            n_jobs=1)
        suggested = probs.argmax(axis=1)
    return {"issues": np.asarray(issues, int), "scores": np.asarray(scores, np.float64),
            "suggested": suggested, "oof_accuracy": cv.accuracy(labels), "c": cv.c,
            "probs": probs}


def outlier_scores(features: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """cleanlab's out-of-distribution scores (kNN on features; low: unusual).

    Returns:
        (score against all images, score against the image's own class;
        1.0 where a class is too small to score).
    """
    from cleanlab.outlier import OutOfDistribution

    x = _normalised(features)
    k_all = int(min(10, len(x) - 1))
    overall = OutOfDistribution(params={"k": k_all}).fit_score(features=x, verbose=False)
    strata = np.asarray(labels)
    strata = strata.argmax(axis=1) if strata.ndim == 2 else strata.astype(int)
    own = np.ones(len(x))
    for c in np.unique(strata):
        idx = np.flatnonzero(strata == c)
        if len(idx) > 3:
            ood = OutOfDistribution(params={"k": int(min(10, len(idx) - 1))})
            own[idx] = ood.fit_score(features=x[idx], verbose=False)
    return np.asarray(overall, np.float64), own


def _name(item, split: str, i: int) -> str:
    return item if isinstance(item, str) else f"{split}[{i}]"


def _label_text(label, class_names: Sequence[str]) -> str:
    lab = np.asarray(label)
    if lab.ndim == 1 and lab.size == len(class_names) and lab.dtype.kind == "f":
        return "|".join(class_names[i] for i in np.flatnonzero(lab > 0.5))
    return class_names[int(lab)]


def analyse(features: dict, labels: dict, items: dict, class_names: Sequence[str], seed: int = 0,
            threshold: float = DUPLICATE_SIMILARITY,
            outlier_fraction: float = OUTLIER_FRACTION,
            copy_features: Optional[dict] = None,
            train_views: Sequence[np.ndarray] = (),
            train_mirror: Optional[np.ndarray] = None) -> dict:
    """Audits the labelled images of every split together.

    Its matrices are small (images x a few hundred), so BLAS runs on one
    thread: threads of a multi-threaded BLAS wait on each other on a busy
    machine (measured: 45 s instead of 2 s on 2 cores under load).

    Args:
        features: {split: [N_split, D] clean-view features} for train/val/test.
        labels: {split: [N_split] class ids or [N_split, C] multi-hot rows},
            in the same order.
        items: {split: paths (or encoded bytes)} in the same order.
        class_names: C names.
        seed: the folds' seed.
        threshold: near-duplicate cosine similarity.
        outlier_fraction: the share of images listed as outliers.
        copy_features: {split: [N_split, G] copy descriptors} in the same
            order, for the near-duplicates; None: the features.
        train_views: augmented views of the training images ([N_train, D]
            each, in the training split's order): more rows for the label
            audit's heads, and averaged into their held-out predictions.
        train_mirror: [N_train, D] features of the mirrored training images,
            or None: a view like those.

    Returns:
        The audit (JSON-able; `write_files` writes it): label issues,
        near-duplicate pairs (`within` a split or `across` splits, with the
        copy the training side can drop), outliers, counts.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1):
        return _analyse(features, labels, items, class_names, seed, threshold, outlier_fraction,
                        copy_features, train_views, train_mirror)


def _analyse(features, labels, items, class_names, seed, threshold, outlier_fraction,
             copy_features, train_views, train_mirror) -> dict:
    names = [s for s in SPLITS if s in features and len(features[s])]
    x = np.concatenate([np.asarray(features[s], np.float32) for s in names])
    y = np.concatenate([np.asarray(labels[s]) for s in names])
    where = [(s, i) for s in names for i in range(len(features[s]))]
    files = [_name(items[s][i], s, i) for s, i in where]
    multi = y.ndim == 2

    pairs = near_duplicates(x if copy_features is None else np.concatenate(
        [np.asarray(copy_features[s], np.float32) for s in names]), threshold)
    dup = []
    for a, b, sim in pairs:
        (sa, ia), (sb, ib) = where[a], where[b]
        across = sa != sb
        # The copy on the training side (train before val before test) can be dropped.
        drop = (sa, ia) if across and SPLITS.index(sa) < SPLITS.index(sb) else \
            (sb, ib) if across else None
        dup.append({"a": files[a], "b": files[b], "split_a": sa, "split_b": sb,
                    "similarity": round(sim, 4), "kind": "across" if across else "within",
                    "drop": {"split": drop[0], "index": drop[1]} if drop else None})

    proj = kfold.Projection.fit(x, PRINCIPAL_DIM)
    z = proj(x)

    def all_rows(train_rows):  # images of the other splits repeat their clean view
        return proj(np.concatenate([np.asarray(train_rows, np.float32) if s == "train"
                                    else np.asarray(features[s], np.float32) for s in names]))

    lab = label_issues(z, y, len(class_names), seed, groups=_groups(len(x), pairs),
                       views=[all_rows(v) for v in train_views],
                       mirror=None if train_mirror is None else all_rows(train_mirror))
    issues = []
    for i in lab["issues"].tolist():
        s, j = where[i]
        issues.append({"file": files[i], "split": s, "index": j,
                       "given": _label_text(y[i], class_names),
                       "suggested": _label_text(lab["suggested"][i], class_names),
                       "score": round(float(lab["scores"][i]), 4)})

    overall, own = outlier_scores(z, y)
    score = np.minimum(overall, own)
    n_out = max(1, int(round(outlier_fraction * len(x))))
    outliers = [{"file": files[i], "split": where[i][0], "index": where[i][1],
                 "label": _label_text(y[i], class_names),
                 "score_all": round(float(overall[i]), 4),
                 "score_class": round(float(own[i]), 4)}
                for i in np.argsort(score, kind="stable")[:n_out].tolist()]
    return {"images": {s: len(features[s]) for s in names}, "classes": list(class_names),
            "multi_label": bool(multi),
            "label_audit": ("per label (cleanlab multi-label)" if multi else "per image"),
            "oof_accuracy": round(lab["oof_accuracy"], 4), "c": lab["c"],
            "duplicate_similarity": threshold, "label_issues": issues,
            "near_duplicates": dup, "outliers": outliers,
            "summary": {"label_issues": len(issues),
                        "near_duplicate_pairs": len(dup),
                        "across_splits": sum(d["kind"] == "across" for d in dup),
                        "outliers": len(outliers),
                        "oof_accuracy": round(lab["oof_accuracy"], 4),
                        "duplicate_similarity": threshold}}


def training_side_copies(result: dict) -> dict:
    """{split: sorted indices} of near-duplicate copies on the training side of a cross-split pair
    (what --drop_leakage drops: from train when in val or test, from val when in test)."""
    out: dict = {}
    for d in result["near_duplicates"]:
        if d["drop"]:
            out.setdefault(d["drop"]["split"], set()).add(d["drop"]["index"])
    return {k: sorted(v) for k, v in out.items()}


# --- files -------------------------------------------------------------------

def _csv_text(rows: Sequence[Sequence]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows(rows)
    return buf.getvalue()


def relabelled_rows(items: Sequence, labels: np.ndarray, class_names: Sequence[str],
                    result: dict, splits: Sequence[str] = ("train",)) -> list[list[str]]:
    """Rows of the `--data` list format (header `path,label`) with the suggested labels applied.

    Args:
        items, labels: the images (paths) of the --data source and their labels.
        result: `analyse`'s audit; its label issues of `splits` are applied
            by path.
    """
    fix = {d["file"]: d["suggested"] for d in result["label_issues"] if d["split"] in splits}
    rows = [["path", "label"]]
    for item, lab in zip(items, labels):
        if isinstance(item, str):
            path = os.path.abspath(item)
            rows.append([path, fix.get(item, _label_text(lab, class_names))])
    return rows


def write_files(out_dir: str, result: dict, items: dict, relabelled: list[list[str]]) -> list[str]:
    """Writes audit.json, audit.md (with its PNGs), label_issues.csv and relabelled.csv.

    Args:
        out_dir: the output folder.
        result: `analyse`'s audit.
        items: {split: images} as given to `analyse` (for the pictures).
        relabelled: `relabelled_rows`.

    Returns:
        The names of the files written.
    """
    from tl_keras.report import montage

    written = []
    outputs.atomic_write_json(os.path.join(out_dir, AUDIT_JSON), result)
    issues = result["label_issues"]
    outputs.atomic_write_text(os.path.join(out_dir, LABEL_ISSUES_CSV), _csv_text(
        [["path", "split", "given", "suggested", "score"]]
        + [[d["file"], d["split"], d["given"], d["suggested"], d["score"]] for d in issues]))
    outputs.atomic_write_text(os.path.join(out_dir, RELABELLED_CSV), _csv_text(relabelled))
    written += [AUDIT_JSON, LABEL_ISSUES_CSV, RELABELLED_CSV]
    images = {}
    if issues:
        shown = issues[:SHOWN]
        montage.grid_png([items[d["split"]][d["index"]] for d in shown],
                             [f"{_short(d['file'])}\ngiven: {d['given']}\n"
                              f"suggested: {d['suggested']} ({d['score']:.2f})" for d in shown],
                             os.path.join(out_dir, LABELS_PNG), "likely label errors")
        images["labels"] = LABELS_PNG
    dups = result["near_duplicates"]
    if dups:
        shown = sorted(dups, key=lambda d: d["kind"] != "across")[:SHOWN // 2]
        pics, titles = [], []
        for d in shown:
            for side in ("a", "b"):
                s = d["split_" + side]
                pics.append(_item(items, s, d[side]))
                titles.append(f"{_short(d[side])}\n{s} ({d['kind']})\ncosine {d['similarity']:.3f}")
        montage.grid_png(pics, titles, os.path.join(out_dir, DUPLICATES_PNG),
                             "near-duplicate pairs (side by side)")
        images["duplicates"] = DUPLICATES_PNG
    if result["outliers"]:
        shown = result["outliers"][:SHOWN]
        montage.grid_png([items[d["split"]][d["index"]] for d in shown],
                             [f"{_short(d['file'])}\n{d['label']}\nall {d['score_all']:.2f} "
                              f"class {d['score_class']:.2f}" for d in shown],
                             os.path.join(out_dir, OUTLIERS_PNG), "outliers")
        images["outliers"] = OUTLIERS_PNG
    outputs.atomic_write_text(os.path.join(out_dir, AUDIT_MD), markdown(result, images))
    return written + [AUDIT_MD] + list(images.values())


def _item(items: dict, split: str, name: str):
    seq = items[split]
    if name.startswith(f"{split}[") and name.endswith("]"):
        return seq[int(name[len(split) + 1:-1])]
    return name


def _short(name: str) -> str:
    name = os.path.basename(str(name))
    return name if len(name) <= 34 else name[:15] + "..." + name[-16:]


def summary_markdown(summary: dict) -> str:
    """The audit's few lines for audit.md and report.md (from its "summary")."""
    dropped = ", ".join(f"{v} from {k}" for k, v in summary.get("dropped", {}).items())
    return "\n".join([
        "## Data audit", "",
        f"- likely label errors: **{summary['label_issues']}** (cleanlab on out-of-fold "
        f"probabilities; out-of-fold accuracy {summary['oof_accuracy']:.3f})",
        f"- near-duplicate pairs: **{summary['near_duplicate_pairs']}**, of which "
        f"**{summary['across_splits']}** across train/val/test (cosine >= "
        f"{summary['duplicate_similarity']})" + (f"; dropped {dropped}" if dropped else ""),
        f"- outliers listed: {summary['outliers']}",
        "- details and pictures: [audit.md](audit.md); label_issues.csv; relabelled.csv "
        "(the suggested labels applied, for --data)", ""])


def markdown(result: dict, images: dict) -> str:
    """audit.md: the summary, then each finding as a table and a picture."""
    lines = ["# tl_keras data audit", "",
             "- images: " + ", ".join(f"{k} {v}" for k, v in result["images"].items()),
             f"- label audit: {result['label_audit']}", "", summary_markdown(result["summary"])]
    lines += ["## Likely label errors", "",
              "Ranked by cleanlab (lowest label quality first). Check each; "
              "`relabelled.csv` applies the suggestions and can be edited and passed back "
              "as `--data=relabelled.csv` (with `--allow_external_paths`: it lists absolute "
              "paths).", ""]
    if images.get("labels"):
        lines += [f"![likely label errors]({images['labels']})", ""]
    lines += ["| file | split | given | suggested | score |", "|---|---|---|---|---|"]
    lines += [f"| `{d['file']}` | {d['split']} | {d['given']} | {d['suggested']} | "
              f"{d['score']:.3f} |" for d in result["label_issues"][:100]]
    lines += ["", "## Near-duplicates and leakage", "",
              "Resized, re-encoded or cropped copies of one photo. Pairs `across` splits "
              "inflate the evaluation: `--drop_leakage` drops the training-side copy.", ""]
    if images.get("duplicates"):
        lines += [f"![near-duplicate pairs]({images['duplicates']})", ""]
    lines += ["| a | b | splits | cosine |", "|---|---|---|---|"]
    lines += [f"| `{d['a']}` | `{d['b']}` | {d['split_a']}/{d['split_b']} | "
              f"{d['similarity']:.3f} |" for d in result["near_duplicates"][:100]]
    lines += ["", "## Outliers", "",
              "Lowest out-of-distribution scores (cleanlab, kNN on features) against all "
              "images and against the image's own class.", ""]
    if images.get("outliers"):
        lines += [f"![outliers]({images['outliers']})", ""]
    lines += ["| file | split | label | score (all) | score (class) |", "|---|---|---|---|---|"]
    lines += [f"| `{d['file']}` | {d['split']} | {d['label']} | {d['score_all']:.3f} | "
              f"{d['score_class']:.3f} |" for d in result["outliers"]]
    return "\n".join(lines) + "\n"
