"""The run manifest: what exactly produced a model.

The resolved config, the versions of tl_keras and its main dependencies, the
device, a hash of the data (which examples with which labels in each split)
with class counts, and the seed. Written to `OUT/manifest.json` and into the
SavedModel's `assets.extra/manifest.json`, so a served model can be traced
back to its run.
"""

from __future__ import annotations

import datetime
import hashlib
import os
import platform
from typing import Optional

from tl_keras.data import sources as sources_lib


def split_hash(split: sources_lib.Split) -> str:
    """SHA-256 of a split's sorted (example, label) pairs.

    A file example is its path relative to the split's source folder plus its
    size in bytes (cheap: contents are not read, so the hash is the same
    wherever the folder lives, and an edited photo of the same name and size
    goes unnoticed); an in-memory example (TFDS) is the SHA-256 of its bytes.
    """
    root = split.source if split.is_files and os.path.isdir(split.source) else None
    entries = []
    for item, label in zip(split.items, split.labels.tolist()):
        if isinstance(item, str):
            name = os.path.relpath(item, root) if root else item
            try:
                size = os.path.getsize(item)
            except OSError:
                size = -1
            key = f"{name.replace(os.sep, '/')}:{size}"
        else:
            key = "sha256:" + hashlib.sha256(bytes(item)).hexdigest()
        # Multi-label rows (issue 3) are multi-hot lists.
        lab = ",".join(str(int(v)) for v in label) if isinstance(label, list) else int(label)
        entries.append(f"{key}\t{lab}")
    digest = hashlib.sha256()
    for e in sorted(entries):
        digest.update(e.encode("utf-8") + b"\n")
    return digest.hexdigest()


def data_manifest(dataset: sources_lib.Dataset) -> dict:
    """Hashes and class counts of each split of a run, and one hash over all.

    Returns:
        {"hash": overall, "splits": {name: {"source", "n", "hash",
        "class_counts": {class: count}}}}.
    """
    n_cls = len(dataset.class_names)
    splits = {}
    for name in ("train", "val", "test"):
        split = getattr(dataset, name)
        if split is None:
            continue
        splits[name] = {"source": split.source, "n": len(split), "hash": split_hash(split),
                        "class_counts": dict(zip(dataset.class_names,
                                                 split.class_counts(n_cls)))}
    overall = hashlib.sha256()
    overall.update(("\n".join(dataset.class_names) + "\n").encode("utf-8"))
    for name, s in splits.items():
        overall.update(f"{name}\t{s['hash']}\n".encode("utf-8"))
    return {"hash": overall.hexdigest(), "splits": splits}


def versions() -> dict:
    """Versions of tl_keras, Python and the libraries that decide the numbers."""
    import keras
    import numpy
    import sklearn
    import tensorflow as tf

    import tl_keras

    return {"tl_keras": tl_keras.__version__, "python": platform.python_version(),
            "tensorflow": tf.__version__, "keras": keras.__version__,
            "numpy": numpy.__version__, "scikit-learn": sklearn.__version__}


def device() -> dict:
    """The accelerators TensorFlow sees, or the CPU it runs on."""
    import tensorflow as tf

    gpus = []
    for d in tf.config.list_physical_devices("GPU"):
        try:
            details = tf.config.experimental.get_device_details(d)
        except (ValueError, RuntimeError):
            details = {}
        gpus.append({"name": d.name, "model": details.get("device_name", ""),
                     "compute_capability": list(details.get("compute_capability", ()) or ())})
    cpu = platform.processor() or platform.machine()
    try:  # platform.processor() is often empty on Linux
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), cpu)
    except OSError:
        pass
    summary = (", ".join(g["model"] or g["name"] for g in gpus) if gpus
               else f"CPU: {cpu} ({os.cpu_count()} cores)")
    return {"summary": summary, "gpus": gpus, "cpu": cpu, "cpu_count": os.cpu_count(),
            "platform": platform.platform()}


def build(config: dict, dataset: sources_lib.Dataset, extra: Optional[dict] = None) -> dict:
    """The manifest of a run.

    Args:
        config: the resolved config (`Config.to_dict()` after the family
            defaults were filled in).
        dataset: the run's splits.
        extra: further entries to record (e.g. what the run chose).

    Returns:
        A JSON-ready dict: created, config, versions, device,
        data, seeds (+ extra).
    """
    out = {
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "config": dict(config),
        "versions": versions(),
        "device": device(),
        "data": data_manifest(dataset),
        # Every random choice of a run (splits, augmentation, shuffling,
        # initialisation) derives from this one seed.
        "seeds": {"seed": config.get("seed")},
    }
    out.update(extra or {})
    return out
