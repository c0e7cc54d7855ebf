"""Data sources and tf.data pipelines.

A source (a folder of class subfolders, or `tfds:NAME[:SPLIT]`) becomes a
`Split`: encoded images (file paths or bytes) with integer labels. Splits
become tf.data pipelines that decode, resize (exactly as the exported model
does: `decode_and_resize`), cache, augment (training only), batch and
prefetch.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import numpy as np
import tensorflow as tf

from tl_keras.config import ConfigError, fail

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
AUTOTUNE = tf.data.AUTOTUNE


@dataclasses.dataclass
class Split:
    """Encoded images and their labels.

    Attributes:
        items: file paths (str) or encoded image bytes, one per example.
        labels: int class ids, shape (N,).
        source: where the split came from (for messages and reports).
    """

    items: list
    labels: np.ndarray
    source: str = ""

    def __len__(self) -> int:
        return len(self.items)

    @property
    def is_files(self) -> bool:
        return bool(self.items) and isinstance(self.items[0], str)

    def subset(self, idx: Sequence[int]) -> "Split":
        return Split([self.items[i] for i in idx], self.labels[np.asarray(idx, dtype=int)],
                     self.source)

    def class_counts(self, num_classes: int) -> list[int]:
        return np.bincount(self.labels, minlength=num_classes).astype(int).tolist()


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


def _folder_split(root: str, flag: str, class_names: Optional[list[str]]) -> tuple[list[str], Split]:
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
    return class_names, Split(items, np.asarray(labels, dtype=np.int64), root)


def _tfds_split(spec: str, flag: str, default_split: str, data_dir: str,
                class_names: Optional[list[str]]) -> tuple[list[str], Split]:
    """Loads `tfds:NAME[:SPLIT]` as encoded bytes (decoded later, like files)."""
    import tensorflow_datasets as tfds

    rest = spec[len("tfds:"):]
    name, _, split = rest.partition(":")
    split = split or default_split
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except Exception as e:  # noqa: BLE001
        raise fail(flag, spec, f"unknown TFDS dataset: {' '.join(str(e).split())[:200]}") from None
    feats = builder.info.features
    image_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.Image)), None)
    label_key = next((k for k, v in feats.items() if isinstance(v, tfds.features.ClassLabel)), None)
    if image_key is None or label_key is None:
        raise fail(flag, spec, "TFDS dataset has no image feature with a class label")
    try:
        builder.download_and_prepare()
        ds = builder.as_dataset(split=split,
                                decoders={image_key: tfds.decode.SkipDecoding()})
    except Exception as e:  # noqa: BLE001
        msg = " ".join(str(e).split())
        if any(s in msg.lower() for s in ("connection", "resolve", "urlopen", "network", "download",
                                          "name or service", "http")):
            raise fail(flag, spec, f"could not download TFDS dataset {name!r} (no network?); "
                       "point --data=DIR at a local folder of class subfolders, or "
                       "--tfds_data_dir at a prepared copy") from None
        raise fail(flag, spec, f"could not load: {msg[:300]}") from None
    names = list(feats[label_key].names)
    items, labels = [], []
    for ex in ds.as_numpy_iterator():
        items.append(bytes(ex[image_key]))
        labels.append(int(ex[label_key]))
    labels = np.asarray(labels, dtype=np.int64)
    if class_names is not None and names != class_names:
        remap = {i: class_names.index(n) for i, n in enumerate(names) if n in class_names}
        if len(remap) < len(set(labels.tolist())):
            raise fail(flag, spec, "its classes differ from the training data's")
        labels = np.asarray([remap[int(l)] for l in labels], dtype=np.int64)
        names = class_names
    return names, Split(items, labels, spec)


def load_source(spec: str, flag: str, class_names: Optional[list[str]] = None,
                tfds_split: str = "train", tfds_data_dir: str = "") -> tuple[list[str], Split]:
    """Reads one data source named by a flag.

    Args:
        spec: a folder of class subfolders, or `tfds:NAME[:SPLIT]`.
        flag: the flag it came from, for error messages.
        class_names: the training classes (None when reading training data).
        tfds_split: TFDS split used when the spec names none.
        tfds_data_dir: where TFDS keeps its data.

    Returns:
        (class names, split).
    """
    if spec.startswith("tfds:"):
        return _tfds_split(spec, flag, tfds_split, tfds_data_dir, class_names)
    return _folder_split(spec, flag, class_names)


def stratified_split(labels: np.ndarray, fractions: Sequence[float], seed: int
                     ) -> list[np.ndarray]:
    """Splits example indices into len(fractions)+1 parts, class by class.

    Each class is shuffled with `seed`; part i gets round(n * fractions[i])
    of it (at least one example when the class has more than parts), the
    last part the rest. Returns sorted index arrays.
    """
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(len(fractions) + 1)]
    for c in np.unique(labels):
        idx = np.flatnonzero(labels == c)
        rng.shuffle(idx)
        start = 0
        for i, f in enumerate(fractions):
            k = int(round(len(idx) * f))
            if f > 0 and k == 0 and len(idx) > len(fractions):
                k = 1
            parts[i].extend(idx[start:start + k].tolist())
            start += k
        parts[-1].extend(idx[start:].tolist())
    return [np.asarray(sorted(p), dtype=int) for p in parts]


def load_dataset(data: str, val_data: str = "", test_data: str = "", val_fraction: float = 0.2,
                 test_fraction: float = 0.0, seed: int = 42, tfds_split: str = "train",
                 tfds_data_dir: str = "") -> Dataset:
    """Resolves the train/val/test splits of a run.

    Without `val_data`, a seeded stratified `val_fraction` of the training
    data validates; without `test_data`, `test_fraction` of it (taken first)
    is held out for testing.
    """
    class_names, train = load_source(data, "data", None, tfds_split, tfds_data_dir)
    test = None
    if test_data:
        _, test = load_source(test_data, "test_data", class_names, tfds_split, tfds_data_dir)
    elif test_fraction > 0:
        test_idx, rest = stratified_split(train.labels, [test_fraction], seed)
        test, train = train.subset(test_idx), train.subset(rest)
    if val_data:
        _, val = load_source(val_data, "val_data", class_names, tfds_split, tfds_data_dir)
    else:
        val_idx, rest = stratified_split(train.labels, [val_fraction], seed + 1)
        val, train = train.subset(val_idx), train.subset(rest)
    ds = Dataset(class_names, train, val, test)
    check_dataset(ds)
    return ds


def check_dataset(ds: Dataset) -> None:
    """Stops with one line when the data cannot train a classifier."""
    if len(ds.class_names) < 2:
        raise fail("data", ds.train.source,
                   f"found {len(ds.class_names)} class(es); a classifier needs at least 2")
    counts = ds.train.class_counts(len(ds.class_names))
    for name, n in zip(ds.class_names, counts):
        if n == 0:
            raise fail("data", ds.train.source, f"class {name!r} has no training images")
    if len(ds.val) == 0:
        raise fail("val_data" if ds.val.source != ds.train.source else "val_fraction",
                   ds.val.source, "validation split is empty")


# --------------------------------------------------------------------------
# Decoding (shared with the exported model: keep it one function)
# --------------------------------------------------------------------------

def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes an RGB image (any dtype, 0..255) to size x size uint8.

    Antialiased bilinear resize, then rounding to uint8: this is what both the
    training pipeline and the exported SavedModel do, so they see identical
    pixels.
    """
    x = tf.image.resize(tf.cast(image, tf.float32), [size, size], method="bilinear",
                        antialias=True)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def decode_image(data: tf.Tensor) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP bytes to an RGB uint8 [H, W, 3] (first GIF frame)."""
    img = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    img.set_shape([None, None, 3])
    return img


def decode_and_resize(data: tf.Tensor, size: int) -> tf.Tensor:
    """Encoded bytes -> size x size RGB uint8."""
    return resize_image(decode_image(data), size)


def image_dataset(split: Split, size: int, cache: bool = True) -> tf.data.Dataset:
    """A dataset of (uint8 [size, size, 3] image, int label), decoded in parallel.

    With `cache`, decoded images are kept in memory after the first pass, so
    later epochs and views cost no decoding.
    """
    items = tf.data.Dataset.from_tensor_slices(split.items)
    labels = tf.data.Dataset.from_tensor_slices(split.labels.astype(np.int32))
    ds = tf.data.Dataset.zip((items, labels))
    read = split.is_files

    def load(item, label):
        data = tf.io.read_file(item) if read else item
        return decode_and_resize(data, size), label

    ds = ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True)
    return ds.cache() if cache else ds


def batched(ds: tf.data.Dataset, batch_size: int, num_classes: int, shuffle: bool = False,
            seed: int = 0, augment=None, one_hot: bool = True) -> tf.data.Dataset:
    """Shuffles, batches, augments (training only) and prefetches.

    Args:
        ds: (image, label) examples.
        augment: a callable on a float32 image batch (training=True), or None.
        one_hot: one-hot labels (for label smoothing) instead of ints.
    """
    if shuffle:
        ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)

    def prep(x, y):
        x = tf.cast(x, tf.float32)
        if augment is not None:
            x = augment(x, training=True)
        if one_hot:
            y = tf.one_hot(y, num_classes)
        return x, y

    ds = ds.map(prep, num_parallel_calls=AUTOTUNE)
    return ds.prefetch(AUTOTUNE)
