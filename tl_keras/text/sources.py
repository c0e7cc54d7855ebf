"""Text sources: folders of class subfolders of .txt files, CSV/TSV tables, TFDS.

Each becomes texts with integer labels; unreadable files and rows without a
label are skipped with one warning line each, never crash a run.
"""
from __future__ import annotations

import csv
import os
import sys
from typing import Optional

import numpy as np

from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail

TEXT_EXTENSIONS = (".txt",)
TABLE_DELIMITERS = {".csv": ",", ".tsv": "\t", ".tab": "\t"}


def warn(msg: str) -> None:
    print(f"[tl_keras] warning: {msg}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------
# Sources: a folder of class subfolders of .txt files, a CSV/TSV, tfds:NAME
# --------------------------------------------------------------------------

def _read_text_file(path: str) -> Optional[str]:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError as e:
        warn(f"skipped {path}: not UTF-8 text ({e.reason} at byte {e.start})")
    except OSError as e:
        warn(f"skipped {path}: {e.strerror or e}")
    return None


def _folder_source(root: str, flag: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of ROOT/CLASS/**/*.txt, one example per file."""
    if not os.path.isdir(root):
        raise fail(flag, root, "no such folder or file")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    texts, labels = [], []
    for c in classes:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            for name in sorted(filenames):
                if name.startswith(".") or not name.lower().endswith(TEXT_EXTENSIONS):
                    continue
                text = _read_text_file(os.path.join(dirpath, name))
                if text is not None:
                    texts.append(text)
                    labels.append(c)
    if not texts:
        raise fail(flag, root, "no class subfolders with .txt files "
                   "(expected ROOT/CLASS/file.txt, or a .csv/.tsv file with text,label columns)")
    return texts, labels


def _table_source(path: str, flag: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of a CSV/TSV whose header names `text` and `label` columns."""
    delimiter = TABLE_DELIMITERS[os.path.splitext(path)[1].lower()]
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))  # long documents in one field
    texts, labels, bad = [], [], []
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = csv.reader(f, delimiter=delimiter)
            header = [h.strip().lower() for h in next(rows, [])]
            if "text" not in header or "label" not in header:
                raise fail(flag, path, f"its header {header[:6]} lacks a 'text' and a 'label' "
                           "column (the first row must name them)")
            ti, li = header.index("text"), header.index("label")
            for row in rows:
                if not row:
                    continue  # blank line
                if len(row) <= max(ti, li) or not row[li].strip():
                    bad.append(rows.line_num)
                    continue
                texts.append(row[ti])
                labels.append(row[li].strip())
    except UnicodeDecodeError as e:
        raise fail(flag, path, f"not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise fail(flag, path, f"not a readable {delimiter!r}-separated file: {e}") from None
    if bad:
        warn(f"{path}: skipped {len(bad)} row(s) without a label, first at line {bad[0]}")
    if not texts:
        raise fail(flag, path, "no rows with a text and a label")
    return texts, labels


def _tfds_source(spec: str, flag: str, default_split: str,
                 data_dir: str) -> tuple[list[str], list[str]]:
    """(texts, label names) of `tfds:NAME[:SPLIT]` with a Text and a ClassLabel feature."""
    import tensorflow_datasets as tfds

    builder, split = sources_lib.tfds_builder(spec, flag, default_split, data_dir)
    feats = builder.info.features
    text_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.Text)), None)
    label_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.ClassLabel)), None)
    if text_key is None or label_key is None:
        raise fail(flag, spec, "TFDS dataset has no text feature with a class label")
    ds = sources_lib.tfds_prepare(builder, split, spec, flag,
                               "--data at a local folder or .csv/.tsv file")
    names = list(feats[label_key].names)
    texts, labels = [], []
    for ex in ds.as_numpy_iterator():
        texts.append(ex[text_key].decode("utf-8", errors="replace"))
        labels.append(names[int(ex[label_key])])
    if not texts:
        raise fail(flag, spec, f"split {split!r} is empty")
    return texts, labels


def load_text_source(spec: str, flag: str, class_names: Optional[list[str]] = None,
                     tfds_split: str = "train", tfds_data_dir: str = ""
                     ) -> tuple[list[str], sources_lib.Split]:
    """Reads one labelled text source named by a flag.

    Args:
        spec: a folder of class subfolders of `.txt` files (one example per
            file), a `.csv`/`.tsv` file with a header naming `text` and `label`
            columns, or `tfds:NAME[:SPLIT]`.
        flag: the flag it came from, for error messages.
        class_names: the training classes (None when reading training data:
            then the sorted label names found).
        tfds_split: TFDS split used when the spec names none.
        tfds_data_dir: where TFDS keeps its data.

    Returns:
        (class names, split whose items are the texts).
    """
    if not spec:
        raise fail(flag, spec, "required: a folder of class subfolders of .txt files, "
                   "a .csv/.tsv file with text,label columns, or tfds:NAME")
    if spec.startswith("tfds:"):
        texts, labels = _tfds_source(spec, flag, tfds_split, tfds_data_dir)
    elif os.path.splitext(spec)[1].lower() in TABLE_DELIMITERS:
        if not os.path.isfile(spec):
            raise fail(flag, spec, "no such file")
        texts, labels = _table_source(spec, flag)
    else:
        texts, labels = _folder_source(spec, flag)
    found = sorted(set(labels))
    if class_names is None:
        class_names = found
    else:
        unknown = [c for c in found if c not in class_names]
        if unknown:
            raise fail(flag, spec, f"class {unknown[0]!r} does not occur in the training data")
    index = {c: i for i, c in enumerate(class_names)}
    return class_names, sources_lib.Split(texts, np.asarray([index[l] for l in labels], np.int64),
                                       spec)


def load_text_dataset(data: str, val_data: str = "", test_data: str = "",
                      val_fraction: float = 0.2, test_fraction: float = 0.0, seed: int = 42,
                      tfds_split: str = "train", tfds_data_dir: str = "") -> sources_lib.Dataset:
    """Resolves the train/val/test splits of a text run.

    Held-out splits are made exactly as `data.load_dataset` makes them for
    images: without `test_data`, a stratified `test_fraction` (seed) first;
    without `val_data`, a stratified `val_fraction` of the rest (seed + 1).
    """
    class_names, train = load_text_source(data, "data", None, tfds_split, tfds_data_dir)
    test = None
    if test_data:
        _, test = load_text_source(test_data, "test_data", class_names, tfds_split,
                                   tfds_data_dir)
    elif test_fraction > 0:
        test_idx, rest = sources_lib.stratified_split(train.labels, [test_fraction], seed)
        test, train = train.subset(test_idx), train.subset(rest)
    if val_data:
        _, val = load_text_source(val_data, "val_data", class_names, tfds_split, tfds_data_dir)
    else:
        val_idx, rest = sources_lib.stratified_split(train.labels, [val_fraction], seed + 1)
        val, train = train.subset(val_idx), train.subset(rest)
    if len(class_names) < 2:
        raise fail("data", data, f"found {len(class_names)} class(es); "
                   "a classifier needs at least 2")
    for name, n in zip(class_names, train.class_counts(len(class_names))):
        if n == 0:
            raise fail("data", data, f"class {name!r} has no training texts")
    if len(val) == 0:
        raise fail("val_data" if val_data else "val_fraction", val_data or val_fraction,
                   "validation split is empty")
    return sources_lib.Dataset(class_names, train, val, test)
