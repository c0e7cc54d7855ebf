"""Keyed caches of computed arrays (features, activations).

An entry is keyed by a hash of everything that changes its content (data
manifest, backbone, weights file, image size, preprocessing, augmentation
settings and seed, views, cut point), so a rerun reuses it and any change
misses. Entries are `.npy` files written atomically; arrays that fit the RAM
budget are loaded into memory, larger ones are memory-mapped from disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Callable, Optional

import numpy as np

from tl_keras.core import outputs


def file_fingerprint(path: str) -> list:
    """(path, size, mtime) of a file; cheap and changes whenever the file does."""
    st = os.stat(path)
    return [os.path.abspath(path), st.st_size, int(st.st_mtime_ns)]


def split_fingerprint(items: list, labels: np.ndarray) -> str:
    """A hash of a split's examples and labels (paths by fingerprint, bytes by content)."""
    h = hashlib.sha256()
    for item, label in zip(items, labels.tolist()):
        if isinstance(item, str):
            h.update(json.dumps(file_fingerprint(item)).encode())
        else:
            h.update(hashlib.sha256(item).digest())
        h.update(str(label).encode())
    return h.hexdigest()


def make_key(**parts) -> str:
    """A short stable hash of JSON-able key parts."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:24]


class ArrayCache:
    """A folder of keyed arrays with a RAM budget.

    Args:
        folder: where entries live ("" disables the disk: compute every time).
        ram_budget_mb: arrays larger than this are memory-mapped, not loaded.
    """

    def __init__(self, folder: str, ram_budget_mb: int = 2048):
        self.folder = folder
        self.ram_budget = int(ram_budget_mb) * 2 ** 20
        if folder:
            os.makedirs(folder, exist_ok=True)

    def _path(self, key: str, name: str) -> str:
        return os.path.join(self.folder, f"{key}.{name}.npy")

    def _load(self, path: str) -> np.ndarray:
        mmap = "r" if os.path.getsize(path) > self.ram_budget else None
        return np.load(path, mmap_mode=mmap)

    def get_or_compute(self, key: str, names: tuple[str, ...],
                       compute: Callable[[], tuple[np.ndarray, ...]],
                       log: Optional[Callable[[str], None]] = None) -> tuple[tuple, bool]:
        """Returns the cached arrays for `key`, computing and storing them if missing.

        A corrupt or partial entry (e.g. after a crash) is recomputed.

        Returns:
            (arrays, hit) where hit says whether the cache was used.
        """
        if self.folder:
            paths = [self._path(key, n) for n in names]
            if all(os.path.isfile(p) for p in paths):
                try:
                    arrays = tuple(self._load(p) for p in paths)
                    if len({len(a) for a in arrays}) == 1:
                        return arrays, True
                except (OSError, ValueError) as e:
                    if log:
                        log(f"cache entry {key} unreadable ({e}); recomputing")
        arrays = compute()
        if self.folder:
            for n, a in zip(names, arrays):
                with outputs.atomic_path(self._path(key, n)) as tmp:
                    with open(tmp, "wb") as f:
                        np.save(f, a)
            arrays = tuple(self._load(self._path(key, n)) for n in names)
        return arrays, False
