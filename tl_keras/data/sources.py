"""Data sources and splits.

A source (a folder of class subfolders, a CSV/TSV list of `path,label` rows,
or `tfds:NAME[:SPLIT]`) becomes a `Split`: encoded images (file paths or
bytes) with integer labels, or multi-hot label rows for multi-label lists
(`a|b`). Without explicit validation or test sources, seeded stratified
splits are held out; class weights and training targets come from the labels.
"""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import os
from typing import Optional, Sequence

import numpy as np

from tl_keras.core import untrusted as untrusted_lib
from tl_keras.errors import fail, network_failure, one_line

# Listed from class folders. Formats TensorFlow cannot decode (TIFF) are still
# listed: the pre-flight scan converts them or reports why it cannot.
# HEIC/HEIF (iPhones) and AVIF are read by the pre-flight (pillow-heif, Pillow)
# and converted to PNG for training, like TIFF.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".gif", ".bmp", ".webp", ".tif",
                    ".tiff", ".heic", ".heif", ".avif")
LIST_EXTENSIONS = (".csv", ".tsv", ".txt")
MULTI_LABEL_SEPARATOR = "|"


@dataclasses.dataclass
class Split:
    """Encoded images and their labels.

    Attributes:
        items: file paths (str) or encoded image bytes, one per example.
        labels: int class ids, shape (N,); or, for multi-label data,
            multi-hot float32 rows, shape (N, C).
        source: where the split came from (for messages and reports).
    """

    items: list
    labels: np.ndarray
    source: str = ""
    # Content key per item (the pre-flight scan's SHA-1), or None: lets splits
    # keep byte-identical copies together and reports name leakage.
    keys: Optional[list] = None

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_files(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], str)

    def subset(self, idx: Sequence[int]) -> "Split":
        keys = [self.keys[i] for i in idx] if self.keys is not None else None
        return Split([self.items[i] for i in idx], self.labels[np.asarray(idx, dtype=int)],
                     self.source, keys)

    @property
    def multi_label(self) -> bool:
        return self.labels.ndim == 2

    def class_counts(self, num_classes: int) -> list[int]:
        """Images per class (for multi-label data: images carrying each label)."""
        if self.multi_label:
            return self.labels.sum(axis=0).astype(int).tolist()
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()

    def strata(self) -> np.ndarray:
        """One stratum per example for stratified splits: its class, or for
        multi-label rows its rarest label (-1 for rows without labels)."""
        if not self.multi_label:
            return self.labels
        freq = self.labels.sum(axis=0)
        rarity = np.where(self.labels > 0, freq[None, :], np.inf)
        return np.where(self.labels.any(axis=1), rarity.argmin(axis=1), -1)


@dataclasses.dataclass
class Dataset:
    """The resolved data of a run."""

    class_names: list[str]
    train: Split
    val: Split
    test: Optional[Split]


# --------------------------------------------------------------------------
# Sources
# --------------------------------------------------------------------------

def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def list_class_folder(root: str, flag: str) -> tuple[list[str], dict[str, list[str]]]:
    """Lists a folder of class subfolders (images may sit in nested subfolders).

    Returns:
        (class names sorted, {class name: sorted file paths}).
    """
    if not os.path.isdir(root):
        raise fail(flag, root, "no such folder")
    classes = sorted(d for d in os.listdir(root)
                     if os.path.isdir(os.path.join(root, d)) and not d.startswith("."))
    files: dict[str, list[str]] = {}
    for c in classes:
        found = []
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, c)):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            found += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
        files[c] = found
    if not classes or not any(files.values()):
        raise fail(flag, root, "no class subfolders with images (expected ROOT/CLASS/image.jpg)")
    return classes, files


def _as_multi_hot(labels: np.ndarray, num_classes: int) -> np.ndarray:
    return np.eye(num_classes, dtype=np.float32)[labels]


def _folder_split(root: str, flag: str, class_names: Optional[list[str]],
                  multi_label: bool = False) -> tuple[list[str], Split]:
    classes, files = list_class_folder(root, flag)
    if class_names is None:
        class_names = [c for c in classes if files[c]]
        empty = [c for c in classes if not files[c]]
        if empty:
            raise fail(flag, root, f"class folder {empty[0]!r} has no images")
    else:
        unknown = [c for c in classes if files[c] and c not in class_names]
        if unknown:
            raise fail(flag, root, f"class {unknown[0]!r} does not occur in the training data")
    items, labels = [], []
    for i, c in enumerate(class_names):
        for p in files.get(c, []):
            items.append(p)
            labels.append(i)
    labels = np.asarray(labels, dtype=np.int64)
    if multi_label:
        labels = _as_multi_hot(labels, len(class_names))
    return class_names, Split(items, labels, root)


_PATH_HEADERS = ("path", "file", "filename", "file_name", "filepath", "image", "image_path", "img")
_LABEL_HEADERS = ("label", "labels", "class", "classes", "category", "tags", "target")


def _sniff_delimiter(text: str) -> str:
    lines = [ln for ln in text.splitlines() if ln.strip()][:50]
    sample = "\n".join(lines)
    try:
        return csv.Sniffer().sniff(sample, delimiters=",\t;").delimiter
    except csv.Error:
        first = lines[0] if lines else ""
        for d in ("\t", ",", ";"):
            if d in first:
                return d
        return ","


def read_list_file(path: str, flag: str, allow_external_paths: bool = False
                   ) -> tuple[list[str], list[list[str]], bool]:
    """Reads a CSV/TSV list of `path<delimiter>label` rows.

    The delimiter (comma, tab or semicolon) is detected; a header row is
    optional (recognised by its column names, or by a first row whose path
    does not exist while the next one's does). Relative paths are taken from
    the list file's folder. A label field `a|b` gives several labels.

    Args:
        path: the list file.
        flag: the flag that named it, for error messages.
        allow_external_paths: let rows name files outside the list's folder
            (absolute paths, `..`, links that lead out); by default such a
            row is refused, so a downloaded list cannot make a run read
            arbitrary files.

    Returns:
        (image paths, label names per row, whether any row has several or no
        labels, i.e. whether the list is multi-label).
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise fail(flag, path, f"cannot read the list: {e}") from None
    delim = _sniff_delimiter(text)
    rows = [(i + 1, r) for i, r in enumerate(csv.reader(text.splitlines(), delimiter=delim))
            if r and any(c.strip() for c in r)]
    if not rows:
        raise fail(flag, path, "the list is empty (expected rows of PATH,LABEL)")
    base = os.path.dirname(os.path.abspath(path))

    def resolve(p: str) -> str:
        p = os.path.expanduser(p.strip())
        return p if os.path.isabs(p) else os.path.join(base, p)

    path_col, label_col = 0, 1
    head = [c.strip().lower() for c in rows[0][1]]
    named = [c for c in head if c in _PATH_HEADERS + _LABEL_HEADERS]
    looks_like_header = (bool(named) and not os.path.exists(resolve(rows[0][1][0]))) or (
        len(rows) > 1 and not os.path.exists(resolve(rows[0][1][0]))
        and os.path.exists(resolve(rows[1][1][0])))
    if looks_like_header:
        path_col = next((i for i, c in enumerate(head) if c in _PATH_HEADERS), 0)
        label_col = next((i for i, c in enumerate(head) if c in _LABEL_HEADERS),
                         1 if path_col == 0 else 0)
        rows = rows[1:]
    paths, labels = [], []
    multi = False
    for line, r in rows:
        if len(r) <= max(path_col, label_col):
            raise fail(flag, path, f"line {line}: expected PATH{delim!r}LABEL, got {r!r}")
        names = [n.strip() for n in r[label_col].split(MULTI_LABEL_SEPARATOR)]
        names = [n for n in names if n]
        if not r[path_col].strip():
            raise fail(flag, path, f"line {line}: empty path")
        multi = multi or len(names) != 1
        paths.append(untrusted_lib.check_inside(os.path.expanduser(r[path_col].strip()), base, flag,
                                            path, allow_external_paths, f"line {line}"))
        labels.append(names)
    if not paths:
        raise fail(flag, path, "the list has a header but no rows")
    return paths, labels, multi


def _list_split(path: str, flag: str, class_names: Optional[list[str]],
                multi_label: Optional[bool], allow_external_paths: bool = False
                ) -> tuple[list[str], Split]:
    paths, names, multi = read_list_file(path, flag, allow_external_paths)
    multi = multi if multi_label is None else multi_label
    if class_names is None:
        class_names = sorted({n for row in names for n in row})
    index = {n: i for i, n in enumerate(class_names)}
    for row in names:
        for n in row:
            if n not in index:
                raise fail(flag, path, f"label {n!r} does not occur in the training data")
    if multi:
        labels = np.zeros((len(paths), len(class_names)), dtype=np.float32)
        for i, row in enumerate(names):
            labels[i, [index[n] for n in row]] = 1.0
    else:
        bad = next((i for i, row in enumerate(names) if len(row) != 1), None)
        if bad is not None:
            raise fail(flag, path, f"row {bad + 1} ({paths[bad]!r}) has {len(names[bad])} labels; "
                       "the training data has one label per image")
        labels = np.asarray([index[row[0]] for row in names], dtype=np.int64)
    return class_names, Split(paths, labels, path)


def _pick_feature(feats: dict, kind, preferred: str) -> Optional[str]:
    keys = [k for k, v in feats.items() if isinstance(v, kind)]
    return preferred if preferred in keys else (keys[0] if keys else None)


def tfds_builder(spec: str, flag: str, default_split: str, data_dir: str):
    """(builder, split) of `tfds:NAME[:SPLIT]`; an unknown name is a one-line error."""
    import tensorflow_datasets as tfds

    name, _, split = spec[len("tfds:"):].partition(":")
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise fail(flag, spec, f"unknown TFDS dataset: {' '.join(str(e).split())[:200]}") from None
    except Exception as e:  # noqa: BLE001 - a known dataset whose builder fails: say how
        raise fail(flag, spec, f"could not open TFDS dataset {name!r}: {one_line(e)}") from None
    return builder, split or default_split


# TFDS retries a failed download 10 times with exponential backoff (0.2 s,
# doubling): offline, the one-line error below came after 204 s. Three
# retries still ride out a brief glitch.
TFDS_DOWNLOAD_RETRIES = 3


@contextlib.contextmanager
def _tfds_download_retries(n: int):
    """TFDS's downloader retries a failed request `n` times while inside."""
    from tensorflow_datasets.core.download import downloader

    before = downloader.MAX_RETRIES  # read by each request as it opens
    downloader.MAX_RETRIES = n
    try:
        yield
    finally:
        downloader.MAX_RETRIES = before


def tfds_prepare(builder, split: str, spec: str, flag: str, local_hint: str, decoders=None):
    """Downloads and prepares a TFDS builder's data and returns the split's dataset.

    A failed download (a network error, told by its type) is one line naming
    the dataset, the error and how to point at local data instead
    (`local_hint`, e.g. "--data=DIR at a local folder of class subfolders",
    or --tfds_data_dir at a prepared copy), after `TFDS_DOWNLOAD_RETRIES`
    retries; any other failure is one line with its own message.
    """
    try:
        with _tfds_download_retries(TFDS_DOWNLOAD_RETRIES):
            builder.download_and_prepare()
        return builder.as_dataset(split=split, decoders=decoders)
    except Exception as e:  # noqa: BLE001
        # A network failure by the exception's type (anywhere in its chain),
        # not by its wording: a manual-download dataset's missing folder
        # speaks of "download" and is not one.
        failed = network_failure(e)
        if failed is not None:
            name = spec[len("tfds:"):].partition(":")[0]
            raise fail(flag, spec, f"could not download TFDS dataset {name!r} "
                       f"({one_line(failed, 200)}); point {local_hint}, or --tfds_data_dir at a "
                       "prepared copy") from None
        raise fail(flag, spec, f"could not load: {one_line(e)}") from None


def _tfds_split(spec: str, flag: str, default_split: str, data_dir: str,
                class_names: Optional[list[str]], multi_label: bool = False
                ) -> tuple[list[str], Split]:
    """Loads `tfds:NAME[:SPLIT]` as encoded bytes (decoded later, like files).

    The image and label features are found from the builder's info (the
    features named `image` and `label` when there are several).
    """
    import tensorflow_datasets as tfds

    builder, split = tfds_builder(spec, flag, default_split, data_dir)
    feats = builder.info.features
    image_key = _pick_feature(feats, tfds.features.Image, "image")
    label_key = _pick_feature(feats, tfds.features.ClassLabel, "label")
    if image_key is None or label_key is None:
        raise fail(flag, spec, "TFDS dataset has no image feature with a class label")
    ds = tfds_prepare(builder, split, spec, flag, "--data=DIR at a local folder of class subfolders",
                      decoders={image_key: tfds.decode.SkipDecoding()})
    names = list(feats[label_key].names)
    items, labels = [], []
    for ex in ds.as_numpy_iterator():
        items.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
    if not items:
        raise fail(flag, spec, f"split {split!r} is empty")
    labels = np.asarray(labels, dtype=np.int64)
    if class_names is not None and names != class_names:
        remap = {i: class_names.index(n) for i, n in enumerate(names) if n in class_names}
        if any(int(l) not in remap for l in set(labels.tolist())):
            raise fail(flag, spec, "its classes differ from the training data's")
        labels = np.asarray([remap[int(l)] for l in labels], dtype=np.int64)
        names = class_names
    if multi_label:
        labels = _as_multi_hot(labels, len(names))
    return names, Split(items, labels, spec)


def is_list_file(spec: str) -> bool:
    """Whether a data flag names a CSV/TSV list rather than a folder."""
    return os.path.isfile(spec) or (not os.path.isdir(spec)
                                    and spec.lower().endswith(LIST_EXTENSIONS))


def load_source(spec: str, flag: str, class_names: Optional[list[str]] = None,
                tfds_split: str = "train", tfds_data_dir: str = "",
                multi_label: Optional[bool] = None,
                allow_external_paths: bool = False) -> tuple[list[str], Split]:
    """Reads one data source named by a flag.

    Args:
        spec: a folder of class subfolders, a CSV/TSV list file, or
            `tfds:NAME[:SPLIT]`.
        flag: the flag it came from, for error messages.
        class_names: the training classes (None when reading training data).
        tfds_split: TFDS split used when the spec names none.
        tfds_data_dir: where TFDS keeps its data.
        multi_label: whether labels must be multi-hot rows (the training
            data's kind); None: as the source says (lists with `a|b` rows
            are multi-label, everything else single-label).
        allow_external_paths: let a list file name images outside its own
            folder (see `read_list_file`).

    Returns:
        (class names, split).
    """
    if spec.startswith("tfds:"):
        return _tfds_split(spec, flag, tfds_split, tfds_data_dir, class_names, bool(multi_label))
    if is_list_file(spec):
        if not os.path.isfile(spec):
            raise fail(flag, spec, "no such list file")
        return _list_split(spec, flag, class_names, multi_label, allow_external_paths)
    return _folder_split(spec, flag, class_names, bool(multi_label))


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int,
                     groups: Optional[Sequence] = None) -> list[np.ndarray]:
    """Splits example indices into len(fractions)+1 parts, class by class.

    Each class is shuffled with `seed`; part i gets round(n * fractions[i])
    of it (at least one example when the class has more than parts), the
    last part the rest. Returns sorted index arrays.

    Args:
        labels: one stratum per example (class ids; see `Split.strata`).
        groups: optional key per example (e.g. a content hash); examples with
            the same key land in the same part, so byte-identical copies never
            straddle train and test. Each group counts once, under the
            stratum of its first member.
    """
    labels = np.asarray(labels)
    if groups is None:
        units = [np.asarray([i]) for i in range(len(labels))]
    else:
        first: dict = {}
        members: list[list[int]] = []
        for i, g in enumerate(groups):
            if g not in first:
                first[g] = len(members)
                members.append([])
            members[first[g]].append(i)
        units = [np.asarray(m) for m in members]
    unit_labels = np.asarray([labels[u[0]] for u in units])
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(unit_labels):
        idx = np.flatnonzero(unit_labels == c)
        rng.shuffle(idx)
        start = 0
        for i, f in enumerate(fractions):
            k = int(round(len(idx) * f))
            if f > 0 and k == 0 and len(idx) > len(fractions):
                k = 1
            for u in idx[start:start + k]:
                parts[i].extend(units[u].tolist())
            start += k
        for u in idx[start:]:
            parts[-1].extend(units[u].tolist())
    return [np.asarray(sorted(p), dtype=int) for p in parts]


@dataclasses.dataclass(frozen=True)
class DataSpec:
    """Where a run's images come from and how the missing splits are held out.

    Attributes:
        data: --data: a folder of class subfolders, a CSV/TSV list or tfds:NAME.
        val_data / test_data: explicit validation / test sources ("" for none).
        val_fraction: held out of `data` for validation without `val_data`;
            0: none (an empty validation split: the run cross-validates).
        test_fraction: held out of `data` for testing without `test_data`.
        seed: of the stratified hold-outs.
        tfds_split / tfds_data_dir: the TFDS split and folder.
        allow_external_paths: let list files name images outside their folder.
    """

    data: str
    val_data: str = ""
    test_data: str = ""
    val_fraction: float = 0.2
    test_fraction: float = 0.0
    seed: int = 42
    tfds_split: str = "train"
    tfds_data_dir: str = ""
    allow_external_paths: bool = False


def load_sources(data: str, val_data: str = "", test_data: str = "", tfds_split: str = "train",
                 tfds_data_dir: str = "", allow_external_paths: bool = False
                 ) -> tuple[list[str], dict[str, Split]]:
    """Reads the sources named by --data, --val_data and --test_data, unsplit.

    Args:
        allow_external_paths: let list files name images outside their folder.

    Returns:
        (class names, {"train": ..., and "val"/"test" where given}).
    """
    class_names, train = load_source(data, "data", None, tfds_split, tfds_data_dir,
                                     allow_external_paths=allow_external_paths)
    sources = {"train": train}
    for name, spec in (("val", val_data), ("test", test_data)):
        if spec:
            _, sources[name] = load_source(spec, f"{name}_data", class_names, tfds_split,
                                           tfds_data_dir, multi_label=train.multi_label,
                                           allow_external_paths=allow_external_paths)
    return class_names, sources


def split_sources(class_names: list[str], sources: dict[str, Split], val_fraction: float = 0.2,
                  test_fraction: float = 0.0, seed: int = 42) -> Dataset:
    """Makes the run's splits: given ones as they are, missing ones held out.

    Without a "test" source, `test_fraction` of the training data (taken
    first) is held out for testing; without "val", a seeded stratified
    `val_fraction` of the rest validates (0: none, an empty split).

    When the training split has content keys (`Split.keys`), byte-identical
    copies are kept on the same side of each held-out split.
    """
    train = sources["train"]
    test = sources.get("test")
    if test is None and test_fraction > 0:
        test_idx, rest = stratified_split(train.strata(), [test_fraction], seed, train.keys)
        test, train = train.subset(test_idx), train.subset(rest)
    val = sources.get("val")
    if val is None and not val_fraction:  # no holdout: k-fold cross-validation instead
        val = train.subset(np.zeros(0, int))
    elif val is None:
        val_idx, rest = stratified_split(train.strata(), [val_fraction], seed + 1, train.keys)
        val, train = train.subset(val_idx), train.subset(rest)
    return Dataset(class_names, train, val, test)


def load_dataset(spec: DataSpec) -> Dataset:
    """Resolves the train/val/test splits of a run (no pre-flight scan).

    Without `val_data`, a seeded stratified `val_fraction` of the training
    data validates; without `test_data`, `test_fraction` of it (taken first)
    is held out for testing. `tl_keras.data.preflight.prepare_dataset` does the
    same with the scan in between.
    """
    class_names, sources = load_sources(spec.data, spec.val_data, spec.test_data,
                                        spec.tfds_split, spec.tfds_data_dir,
                                        spec.allow_external_paths)
    ds = split_sources(class_names, sources, spec.val_fraction, spec.test_fraction, spec.seed)
    check_dataset(ds, spec.val_fraction)
    return ds


def check_dataset(ds: Dataset, val_fraction: float = 0.2) -> None:
    """Stops with one line when the data cannot train a classifier.

    An empty validation split is refused unless none was asked for
    (`val_fraction` 0 without a validation source: a cross-validated run).
    """
    if len(ds.class_names) < 2:
        raise fail("data", ds.train.source,
                   f"found {len(ds.class_names)} class(es); a classifier needs at least 2")
    counts = ds.train.class_counts(len(ds.class_names))
    for name, n in zip(ds.class_names, counts):
        if n == 0:
            raise fail("data", ds.train.source, f"class {name!r} has no training images")
    if len(ds.val) == 0 and (val_fraction or ds.val.source != ds.train.source):
        raise fail("val_data" if ds.val.source != ds.train.source else "val_fraction",
                   ds.val.source, "validation split is empty")


def class_weights(split: Split, num_classes: int, mode: str) -> Optional[dict[int, float]]:
    """Keras `class_weight` for `--class_weight`.

    Args:
        mode: "auto": balanced weights n / (C * n_c), so every class
            contributes equally to the loss; "none": None.

    Returns:
        {class id: weight}, or None (mode "none", or multi-label data, whose
        rows have no single class to weight).
    """
    if mode == "none" or split.multi_label or len(split) == 0:
        return None
    counts = np.asarray(split.class_counts(num_classes), dtype=np.float64)
    w = len(split) / (num_classes * np.maximum(counts, 1.0))
    return {i: float(round(w[i], 6)) for i in range(num_classes)}


def targets(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Training targets: one-hot rows for class ids, multi-hot rows as they are."""
    if labels.ndim == 2:
        return labels.astype(np.float32)
    return np.eye(num_classes, dtype=np.float32)[labels]
