"""tf.data pipelines from a `Split`: decode, resize, cache, augment, batch.

Splits (`tl_keras.data.sources`) become tf.data pipelines that decode and
resize (`tl_keras.data.decode`, exactly as the exported model does), cache (in
RAM within a budget, on disk beyond), augment (training only, after the
cache), batch and prefetch.
"""
from __future__ import annotations

import functools
import os
import shutil
import uuid
from typing import Optional

import numpy as np
import tensorflow as tf

from tl_keras.data.decode import decode_traced, resize_image
from tl_keras.data.sources import Split

AUTOTUNE = tf.data.AUTOTUNE


def steady(ds: tf.data.Dataset) -> tf.data.Dataset:
    """`ds` without tf.data's autotuning model thread.

    Releasing an iterator waits for that thread, and on the 2-core machine
    this was developed on it often slept through its optimization period
    first: the whole machine idle for 0.25-2 s at the end of caching passes
    (caught with gdb: the main thread in the iterator's destructor, the
    model thread in `Model::OptimizeLoop`'s timed wait; measured by
    benchmarks/cpu_timeline.py: 1.0-1.75 s per run in stage 1, 3 runs of 3).
    Every pipeline tl_keras builds goes through here; options pass on to
    the datasets derived from it. Parallel maps keep their starting
    parallelism (a call per core) and prefetch buffers still grow on demand
    (their own tuner).
    """
    options = tf.data.Options()
    options.autotune.enabled = False
    return ds.with_options(options)


class CacheBudget:
    """Where decoded, resized images are cached: RAM up to a budget, disk beyond.

    One budget is shared by the splits of a run (training first). What does
    not fit spills to tf.data cache files in a private folder under
    `directory`, removed by `cleanup()` (and, if a run was killed, by the next
    run that uses the same folder).

    Args:
        ram_mb: RAM budget in MiB for decoded images (`--cache_ram_mb`).
        directory: parent folder of the spill files.
    """

    def __init__(self, ram_mb: float, directory: str):
        self.ram_bytes = int(ram_mb * 2 ** 20)
        self.directory = directory
        self._folder: Optional[str] = None
        self.plan: dict[str, dict] = {}

    def take(self, name: str, count: int, image_bytes: int) -> int:
        """Reserves RAM for up to `count` images; returns how many fit."""
        fit = min(count, self.ram_bytes // max(image_bytes, 1))
        self.ram_bytes -= fit * image_bytes
        self.plan[name] = {"ram": int(fit), "disk": int(count - fit),
                           "ram_mb": round(fit * image_bytes / 2 ** 20, 1)}
        return int(fit)

    def spill_path(self, name: str) -> str:
        """A fresh tf.data cache file prefix for split `name`."""
        if self._folder is None:
            os.makedirs(self.directory, exist_ok=True)
            self._remove_stale()
            self._folder = os.path.join(self.directory,
                                        f"tfdata-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            os.makedirs(self._folder)
        return os.path.join(self._folder, name)

    def _remove_stale(self) -> None:
        # Spill folders of runs that died (their pid is gone) are garbage.
        for d in os.listdir(self.directory):
            parts = d.split("-")
            if len(parts) == 3 and parts[0] == "tfdata" and parts[1].isdigit():
                try:
                    os.kill(int(parts[1]), 0)
                except ProcessLookupError:
                    shutil.rmtree(os.path.join(self.directory, d), ignore_errors=True)
                except OSError:
                    pass

    def cleanup(self) -> None:
        """Deletes this run's spill files."""
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None


@functools.lru_cache(maxsize=None)
def _load_one(size: int, read: bool) -> tf.types.experimental.GenericFunction:
    """A file path (`read`) or encoded bytes -> size x size RGB uint8, traced once per process.

    A run builds several pipelines (training and test passes, the parity
    gate's pixels); each used to trace the whole decoder again (0.4 s). They
    call this function, which calls the decoder the pre-flight scan traced
    (`decode.decode_traced`), and resize as `decode.decode_and_resize` does.
    """

    @tf.function(input_signature=[tf.TensorSpec([], tf.string)], autograph=False)
    def load_one(item):
        # A file changed since the pre-flight scan is refused naming its path.
        data = tf.io.read_file(item) if read else item
        return resize_image(decode_traced(data, name=item if read else ""), size)

    return load_one


def _decoded(items: list, labels: np.ndarray, size: int, read: bool) -> tf.data.Dataset:
    ds = tf.data.Dataset.zip((tf.data.Dataset.from_tensor_slices(items),
                              tf.data.Dataset.from_tensor_slices(_label_array(labels))))
    load_one = _load_one(int(size), bool(read))

    # Not converted by autograph (these map functions branch on Python values
    # only): converting one cost about 50 ms, 19 of them in a small run's
    # caching and evaluation passes (0.9 s).
    @tf.autograph.experimental.do_not_convert
    def load(item, label):
        return load_one(item), label

    return steady(ds.map(load, num_parallel_calls=AUTOTUNE, deterministic=True))


def _label_array(labels: np.ndarray) -> np.ndarray:
    return labels.astype(np.float32) if labels.ndim == 2 else labels.astype(np.int32)


def example_order(n: int, order_seed: Optional[int]) -> np.ndarray:
    """The order `image_dataset` streams (and caches) `n` examples in: a seeded
    permutation, or 0..n-1 without a seed. Row i of cached features is example
    `example_order(n, seed)[i]` of the split."""
    if order_seed is None:
        return np.arange(n)
    return np.random.default_rng(order_seed).permutation(n)


def image_dataset(split: Split, size: int, cache: bool = True,
                  budget: Optional[CacheBudget] = None, name: str = "split",
                  order_seed: Optional[int] = None) -> tf.data.Dataset:
    """A dataset of (uint8 [size, size, 3] image, label), decoded in parallel.

    With `cache`, decoded images are kept after the first pass, so later
    epochs and views cost no decoding: in RAM, or, with a `budget`, in RAM as
    far as it allows and in a tf.data cache file beyond.

    Args:
        split: the examples.
        size: square output size.
        cache: cache decoded images.
        budget: RAM budget and spill folder; None: everything in RAM.
        name: the split's name (spill file name, budget plan).
        order_seed: permute the examples once with this seed before caching,
            so the cached stream is class-mixed (a shuffle buffer smaller than
            the split then still mixes classes); None keeps the split's order.
    """
    items, labels = list(split.items), split.labels
    if order_seed is not None and len(items):
        perm = example_order(len(items), order_seed)
        items, labels = [items[i] for i in perm], labels[perm]
    read = split.is_files
    if not cache:
        return _decoded(items, labels, size, read)
    if budget is None:
        return _decoded(items, labels, size, read).cache()
    n = len(items)
    n_ram = budget.take(name, n, size * size * 3)
    if n_ram == n:
        return _decoded(items, labels, size, read).cache()
    disk = _decoded(items[n_ram:], labels[n_ram:], size, read).cache(budget.spill_path(name))
    if n_ram == 0:
        return disk
    ram = _decoded(items[:n_ram], labels[:n_ram], size, read).cache()
    # Concatenated, so each part is read to its end every pass (tf.data only
    # keeps a cache whose input was read to the end). With `order_seed` both
    # parts are random samples of the split, so classes stay mixed.
    return ram.concatenate(disk)


def pad_batch(x, batch_size: int):
    """Pads a batch with zero rows up to `batch_size` (eager or in tf.data).

    A model called on a smaller last batch is traced a second time; padded,
    it is traced for one batch shape, and the caller drops the padded rows'
    outputs.
    """
    x = tf.pad(x, [[0, batch_size - tf.shape(x)[0]]] + [[0, 0]] * (len(x.shape) - 1))
    return tf.ensure_shape(x, (batch_size,) + tuple(x.shape[1:]))


def batched(ds: tf.data.Dataset, batch_size: int, num_classes: int, shuffle: bool = False,
            seed: int = 0, augment=None, one_hot: bool = True) -> tf.data.Dataset:
    """Shuffles, batches, augments (training only) and prefetches.

    Args:
        ds: (image, label) examples.
        augment: an `augment.Augment` layer (or any callable on a float32
            image batch taking training=True), or None.
        seed: seeds the shuffle and the augmentation draws: each batch gets
            its own stateless seed from a seeded random stream that changes
            every pass, so epochs differ, batches can be augmented in
            parallel, and a run repeats exactly.
        one_hot: one-hot labels (for label smoothing) instead of ints;
            multi-hot label rows are passed through as they are.
    """
    if shuffle:
        ds = ds.shuffle(4096, seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size)
    multi_hot = ds.element_spec[1].shape.rank == 2
    from tl_keras.data.augment import Augment, augment_batch, map_parallelism

    plain = tf.autograph.experimental.do_not_convert  # see _decoded
    if isinstance(augment, Augment):
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip((ds, seeds)).map(plain(lambda xy, s: (xy[0], xy[1], s)))
    else:
        ds = ds.map(plain(lambda x, y: (x, y, tf.zeros([2], tf.int64))))

    @plain
    def prep(x, y, s):
        x = augment_batch(augment, x, s)
        if one_hot and not multi_hot:
            y = tf.one_hot(y, num_classes)
        return x, y

    ds = ds.map(prep, num_parallel_calls=map_parallelism(augment), deterministic=True)
    return steady(ds.prefetch(AUTOTUNE))
