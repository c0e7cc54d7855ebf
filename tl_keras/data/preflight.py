"""Pre-flight scan: every image is checked before any training starts.

Real folders hold empty files, truncated downloads, HTML pages saved as
`.jpg`, TIFFs, CMYK JPEGs, phone photos that are upright only through their
EXIF orientation, transparent PNGs and the odd 30,000 x 30,000 pixel file. A
long run must not die on one of them, nor silently learn from pixels that are
not what a person sees. So, before training, each file is:

* read and hashed (SHA-1): byte-identical copies are reported within a split
  and, across train/val/test, as leakage (`--drop_leakage` drops them from
  the training side; automatic splits keep copies on one side);
* opened with Pillow: not an image, over `--max_pixels` (decompression bomb),
  truncated or corrupt -> skipped, with the reason;
* decoded both by Pillow (the reference: EXIF orientation applied, first
  frame, 16-bit reduced to 8, transparency composited on white) and by
  `data.decode_image`, the very function the training pipeline and the
  exported model's `serving_default` use, which does the same in the graph.
  Where that function refuses the file (TIFF, HEIC/HEIF, AVIF, palette BMPs,
  ...), the reference is written as a PNG into a cache of fixed files and the
  run trains on that (the served model refuses such files: clients send JPEG,
  PNG or WebP). Otherwise the original file is used as it is, so training
  sees exactly what serving sees; where those pixels differ from Pillow's
  (`decode.GRAPH_LIMITS`), the file is noted, never silently.

HEIC/HEIF photos (iPhones) are read through pillow-heif, AVIF through
Pillow's own plugin.

The result of each file is cached under `cache_dir`, keyed by path, size and
modification time, so a rerun starts at once. Skipped and converted files
are listed in `OUT/preflight.json`. The run only stops (one line) when a
class is left with no images or fewer than two classes remain.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import functools
import hashlib
import io
import json
import os
import sys
import threading
import time
import warnings
from typing import Optional

import numpy as np

from tl_keras.core import outputs
from tl_keras.data import decode as decode_lib
from tl_keras.data import sources as sources_lib
from tl_keras.errors import fail

# 2: files the model's decoder reads are no longer converted (issue 21).
CACHE_VERSION = 2
CACHE_FILE = "scan_cache.json"
FIXED_FOLDER = "fixed"
# Mean absolute difference (0..255) between TensorFlow's and Pillow's pixels
# above which TensorFlow's decoding is taken as wrong. Two JPEG decoders agree
# to well under 1; wrong colours (CMYK) or dropped transparency are far above.
PIXEL_TOLERANCE = 4.0
_EXIF_ORIENTATION = 0x0112
# What OUT/preflight.json says about decoding: one function for training and
# serving, and where it cannot do what Pillow does.
DECODING = {
    "function": "tl_keras.data.decode.decode_image: the tf.data pipelines and the exported "
                "model's serving_default decode with it, in the graph",
    "converted": "only files it refuses (TIFF, HEIC/HEIF, AVIF, palette BMPs, ...): trained on "
                 "the PNG in the cache; the served model refuses such files",
    "differs_from_pillow": "files it reads but whose pixels differ from Pillow's are trained on "
                           "its pixels (as served) and noted",
    "limits": list(decode_lib.GRAPH_LIMITS),
}


@dataclasses.dataclass
class FileResult:
    """What the scan decided about one image.

    Attributes:
        status: "ok" (train on it as it is), "converted" (train on `fixed`)
            or "skipped".
        reason: why it was skipped or converted; for "ok", a note on anything
            odd that TensorFlow handles correctly ("grayscale", ...) or "".
        sha1: hex digest of the file's bytes ("" when unreadable).
        width, height: from the header (0 when unknown).
        bomb: skipped only for being over the pixel limit (rescanned when the
            limit is raised).
        fixed: the converted PNG's path, for "converted" files.
        differs: "ok", but the model's decoder (training and serving alike)
            gives pixels that differ from Pillow's reference.
    """

    status: str
    reason: str = ""
    sha1: str = ""
    width: int = 0
    height: int = 0
    bomb: bool = False
    fixed: str = ""
    differs: bool = False

    @property
    def pixels(self) -> int:
        return self.width * self.height


def _bomb(width: int, height: int, sha1: str, max_pixels: int) -> FileResult:
    return FileResult("skipped", f"{width}x{height} = {width * height} pixels is over "
                      f"--max_pixels={max_pixels} (decompression bomb?)", sha1, width, height,
                      bomb=True)


def _describe_non_image(data: bytes) -> str:
    head = data[:64]
    try:
        text = head.decode("utf-8")
        printable = sum(c.isprintable() or c in "\r\n\t" for c in text) / max(len(text), 1)
    except UnicodeDecodeError:
        printable = 0.0
    if printable > 0.95:
        snippet = " ".join(text.split())[:32]
        return f"not an image: looks like text ({snippet!r})"
    return f"not an image: unknown format (starts with {head[:8].hex(' ')})"


def _reference_rgb(im) -> tuple[np.ndarray, list[str]]:
    """What a person sees, as RGB uint8, and notes on how it was obtained."""
    from PIL import Image, ImageOps

    notes = []
    frames = getattr(im, "n_frames", 1)
    if frames > 1:
        im.seek(0)
        notes.append(f"animated {im.format}: first of {frames} frames used")
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation not in (0, 1):
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode in ("L", "RGB") and "transparency" in im.info:
        # A colour key (PNG tRNS): its pixels are transparent, as with a palette.
        im = im.convert("RGBA")
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        # 16-bit PNGs hold 0..65535; Pillow's own convert("L") would clip.
        if a.max(initial=0) > 255:
            a = a / 257.0
        im = Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8), "L")
        notes.append("16-bit: reduced to 8 bits")
    if mode == "P":
        notes.append("palette image")
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
    if im.mode in ("LA", "PA"):
        im = im.convert("RGBA")
    if im.mode == "RGBA":
        alpha = np.asarray(im.getchannel("A"))
        if alpha.min() < 255:
            white = Image.new("RGBA", im.size, (255, 255, 255, 255))
            im = Image.alpha_composite(white, im)
            notes.append("transparent: composited on white")
        else:
            notes.append("alpha channel fully opaque: dropped")
    if mode in ("L", "1") or im.mode == "L":
        notes.append("grayscale: expanded to RGB")
    if mode == "CMYK":
        notes.append("CMYK JPEG")
    return np.asarray(im.convert("RGB")), notes


@functools.cache
def register_openers() -> None:
    """Lets Pillow open HEIC/HEIF (pillow-heif); AVIF is Pillow's own plugin."""
    import pillow_heif

    pillow_heif.register_heif_opener()


def inspect_bytes(data: bytes, max_pixels: int) -> tuple[FileResult, Optional[np.ndarray]]:
    """Checks one encoded image.

    Returns:
        (result, fixed RGB pixels when the result is "converted", else None).
    """
    from PIL import Image, UnidentifiedImageError

    register_openers()
    if not data:
        return FileResult("skipped", "empty file (0 bytes)"), None
    sha1 = hashlib.sha1(data).hexdigest()
    try:
        im = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        im = None
    except Exception as e:  # noqa: BLE001  (Pillow raises many kinds on garbage)
        return FileResult("skipped", f"unreadable image header: {_short(e)}", sha1), None
    if im is None:
        tf_img, tf_err = _tf_decode(data, max_pixels)
        if tf_err is None:
            # A format TensorFlow reads and Pillow does not know: trust TF.
            return FileResult("ok", "decoded by TensorFlow only", sha1, tf_img.shape[1],
                              tf_img.shape[0]), None
        return FileResult("skipped", _describe_non_image(data), sha1), None
    fmt = im.format or "image"
    w, h = (int(v) for v in im.size)
    if w * h > max_pixels:
        return _bomb(w, h, sha1, max_pixels), None
    try:
        im.load()
        ref, notes = _reference_rgb(im)
    except Exception as e:  # noqa: BLE001
        return FileResult("skipped", f"truncated or corrupt {fmt}: {_short(e)}", sha1, w,
                          h), None
    tf_img, tf_err = _tf_decode(data, max_pixels)
    if tf_err is not None:
        return FileResult("converted", f"{fmt}: TensorFlow cannot decode it ({tf_err}); "
                          "converted to PNG (a served model refuses it: clients send JPEG, "
                          "PNG or WebP)", sha1, w, h), ref
    # The model's decoder reads it: training uses the original bytes, decoded
    # as serving decodes them. Say what was done, and where it differs from Pillow.
    orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    if orientation in range(2, 9):  # what ImageOps.exif_transpose turns
        notes.insert(0, f"EXIF orientation {orientation}: " + (
            "turned upright" if fmt == "JPEG" else
            f"not applied (the model reads orientation from JPEGs only, not {fmt})"))
    if tf_img.shape != ref.shape:
        why = (f"it decodes {tf_img.shape[1]}x{tf_img.shape[0]}, "
               f"Pillow {ref.shape[1]}x{ref.shape[0]}")
    else:
        diff = float(np.mean(np.abs(tf_img.astype(np.int16) - ref.astype(np.int16))))
        why = f"mean |diff| {diff:.1f}" if diff > PIXEL_TOLERANCE else ""
    if why:
        notes.append(f"the model's decoder differs from Pillow ({why}): trained on its "
                     "pixels, as served")
    return FileResult("ok", "; ".join(notes), sha1, w, h, differs=bool(why)), None


def _short(e: Exception) -> str:
    return " ".join(str(e).split())[:160] or type(e).__name__


def _tf_decode(data: bytes, max_pixels: int):
    """The model's own decoding of `data` (as training and serving do it), or why it refuses."""
    import tensorflow as tf

    try:
        return decode_lib.decode_bytes(data, max_pixels), None
    except (tf.errors.InvalidArgumentError, tf.errors.UnimplementedError) as e:
        reason = decode_lib.refusal_reason(e)
        return None, reason.removeprefix("image: ")[:160]


@contextlib.contextmanager
def _no_pillow_pixel_limit():
    # The scan applies --max_pixels itself, from the header, before decoding;
    # Pillow's own global limit would refuse (or warn about) files under it.
    from PIL import Image

    old = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = old


def over_pixel_limit(path: str, max_pixels: int) -> Optional[str]:
    """Why the image file at `path` must not be decoded, from its header alone; else None.

    Only the header is read (Pillow opens images lazily), so a decompression
    bomb is refused without allocating its pixels. Files Pillow cannot
    identify return None: their decoder reports them.
    """
    from PIL import Image, UnidentifiedImageError

    register_openers()
    try:
        with _no_pillow_pixel_limit(), Image.open(path) as im:
            w, h = (int(v) for v in im.size)
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError):
        return None
    if w * h > max_pixels:
        return _bomb(w, h, "", max_pixels).reason + "; not decoded"
    return None


class Scanner:
    """Scans items with a persistent cache of results and fixed files.

    Args:
        max_pixels: images with more pixels are skipped (from the header).
        cache_dir: holds `scan_cache.json` and `fixed/*.png`.
        progress: show a tqdm progress bar on stderr.
        workers: decoding threads (Pillow and TensorFlow release the GIL).
    """

    def __init__(self, max_pixels: int, cache_dir: str, progress: bool = True,
                 workers: int = 0):
        self.max_pixels = int(max_pixels)
        self.cache_dir = cache_dir
        self.progress = progress
        self.workers = workers or max(2, os.cpu_count() or 2)
        self.cache_path = os.path.join(cache_dir, CACHE_FILE)
        self.entries: dict[str, dict] = {}
        self.from_cache = 0
        self.scanned = 0
        self._dirty = False
        self._lock = threading.Lock()
        try:
            with open(self.cache_path, encoding="utf-8") as f:
                saved = json.load(f)
            if saved.get("version") == CACHE_VERSION:
                self.entries = saved.get("entries", {})
        except (OSError, ValueError):
            pass  # no cache yet, or an unreadable one: scan afresh

    def _cached(self, path: str, st: os.stat_result) -> Optional[FileResult]:
        e = self.entries.get(path)
        if not e or e.get("size") != st.st_size or e.get("mtime_ns") != st.st_mtime_ns:
            return None
        r = FileResult(**e["result"])
        if r.pixels > self.max_pixels:
            # Decided from the cached header size, under the current limit.
            return _bomb(r.width, r.height, r.sha1, self.max_pixels)
        if r.bomb:
            return None  # the limit was raised: this one must be decoded now
        if r.status == "converted" and not os.path.isfile(r.fixed):
            return None
        return r

    def _fixed_path(self, sha1: str) -> str:
        return os.path.join(self.cache_dir, FIXED_FOLDER, sha1 + ".png")

    def _scan_file(self, path: str) -> FileResult:
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return FileResult("skipped", "missing file")
        except OSError as e:
            return FileResult("skipped", f"cannot read: {e.strerror or e}")
        hit = self._cached(path, st)
        if hit is not None:
            with self._lock:
                self.from_cache += 1
            return hit
        try:
            with open(path, "rb") as f:
                raw = f.read()
        except OSError as e:
            return FileResult("skipped", f"cannot read: {e.strerror or e}")
        result, fixed = inspect_bytes(raw, self.max_pixels)
        if fixed is not None:
            result.fixed = self._fixed_path(result.sha1)
            if not os.path.isfile(result.fixed):
                _write_png(fixed, result.fixed)
        with self._lock:
            self.entries[path] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns,
                                  "result": dataclasses.asdict(result)}
            self._dirty = True
            self.scanned += 1
        return result

    def _scan_bytes(self, raw: bytes) -> tuple[FileResult, Optional[bytes]]:
        result, fixed = inspect_bytes(raw, self.max_pixels)
        with self._lock:
            self.scanned += 1
        if fixed is None:
            return result, None
        buf = io.BytesIO()
        from PIL import Image

        Image.fromarray(fixed).save(buf, "PNG")
        return result, buf.getvalue()

    def scan(self, items: list, desc: str = "scan") -> list[tuple[FileResult, object]]:
        """Scans items (paths or bytes) in parallel.

        Returns:
            One (result, item to train on or None) per item, in order: the
            original item, its fixed PNG (path or bytes), or None if skipped.
        """
        from tqdm import tqdm

        def one(item):
            if isinstance(item, str):
                r = self._scan_file(os.path.abspath(item))
                use = None if r.status == "skipped" else (r.fixed or item)
                return r, use
            r, fixed = self._scan_bytes(item)
            return r, (None if r.status == "skipped" else (fixed or item))

        out: list = [None] * len(items)
        bar = tqdm(total=len(items), desc=f"pre-flight {desc}", unit="img", file=sys.stderr,
                   disable=not self.progress, mininterval=0.5, dynamic_ncols=True)
        with _no_pillow_pixel_limit(), \
                concurrent.futures.ThreadPoolExecutor(self.workers) as pool:
            futures = {pool.submit(one, it): i for i, it in enumerate(items)}
            for fut in concurrent.futures.as_completed(futures):
                out[futures[fut]] = fut.result()
                bar.update(1)
        bar.close()
        return out

    def save(self) -> None:
        """Writes the result cache (atomically), if anything new was scanned."""
        if self._dirty:
            outputs.atomic_write_json(self.cache_path, {"version": CACHE_VERSION,
                                                        "entries": self.entries})
            self._dirty = False


def _write_png(rgb: np.ndarray, path: str) -> None:
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    with outputs.atomic_path(path) as tmp:
        Image.fromarray(rgb).save(tmp, "PNG")


# --------------------------------------------------------------------------
# Whole splits and the run's dataset
# --------------------------------------------------------------------------

def _label_names(split: sources_lib.Split, i: int, class_names: list[str]) -> str:
    if split.multi_label:
        return "|".join(class_names[j] for j in np.flatnonzero(split.labels[i]))
    return class_names[int(split.labels[i])]


def clean_split(split: sources_lib.Split, name: str, class_names: list[str], scanner: Scanner
                ) -> tuple[sources_lib.Split, dict]:
    """Scans a split: drops skipped items, swaps in converted ones.

    Returns:
        (the usable split with `keys` set to each item's SHA-1, its report:
        skipped, converted, notes and duplicate groups).
    """
    cleaned, report, _ = _clean_split(split, name, class_names, scanner)
    return cleaned, report


def _clean_split(split: sources_lib.Split, name: str, class_names: list[str], scanner: Scanner
                 ) -> tuple[sources_lib.Split, dict, dict]:
    results = scanner.scan(split.items, name)
    keep, items, keys = [], [], []
    report: dict = {"files": len(split), "skipped": [], "converted": [], "notes": [],
                    "duplicates": []}
    origin: dict = {}
    for i, (r, use) in enumerate(results):
        shown = split.items[i] if split.is_files else f"{split.source}#{i}"
        entry = {"path": shown, "label": _label_names(split, i, class_names)}
        if r.status == "skipped":
            report["skipped"].append({**entry, "reason": r.reason})
            continue
        if r.status == "converted":
            report["converted"].append({**entry, "reason": r.reason, "fixed": r.fixed or "bytes"})
        elif r.reason:
            report["notes"].append({**entry, "note": r.reason,
                                    **({"differs_from_pillow": True} if r.differs else {})})
        keep.append(i)
        items.append(use)
        keys.append(r.sha1)
        origin.setdefault(r.sha1, []).append(entry)
    for sha1, entries in origin.items():
        if len(entries) > 1:
            report["duplicates"].append({"sha1": sha1, "files": entries})
    labels = split.labels[np.asarray(keep, dtype=int)] if keep else split.labels[:0]
    origins = {k: [e["path"] for e in v] for k, v in origin.items()}
    return sources_lib.Split(items, labels, split.source, keys), report, origins


def _leakage(ds: sources_lib.Dataset, origins: dict, drop: bool) -> tuple[sources_lib.Dataset, list]:
    """Finds byte-identical images in more than one of train/val/test.

    With `drop`, copies are removed from the training side: from train when
    in val or test, from val when in test (the evaluation data stays as the
    user gave it).
    """
    splits = {"train": ds.train, "val": ds.val}
    if ds.test is not None:
        splits["test"] = ds.test
    where: dict[str, set] = {}
    for name, s in splits.items():
        for k in s.keys or []:
            where.setdefault(k, set()).add(name)
    leaked = {k: v for k, v in where.items() if len(v) > 1}
    report = []
    for k, names in sorted(leaked.items(), key=lambda kv: sorted(kv[1])):
        order = [n for n in ("train", "val", "test") if n in names]
        report.append({"sha1": k, "splits": order,
                       "files": {n: sorted(set(origins.get(n, {}).get(k, []))) for n in order},
                       "dropped_from": order[:-1] if drop else []})
    if drop and leaked:
        later = {"train": ("val", "test"), "val": ("test",)}
        for name in ("train", "val"):
            s = splits[name]
            idx = [i for i, k in enumerate(s.keys or [])
                   if not any(n in where.get(k, ()) for n in later[name])]
            splits[name] = s.subset(idx)
    return sources_lib.Dataset(ds.class_names, splits["train"], splits["val"],
                            splits.get("test")), report


def _counts(ds: sources_lib.Dataset) -> dict:
    n = len(ds.class_names)
    out = {"train": ds.train.class_counts(n), "val": ds.val.class_counts(n)}
    if ds.test is not None:
        out["test"] = ds.test.class_counts(n)
    return out


def prepare_dataset(spec: sources_lib.DataSpec, *, max_pixels: int = 100_000_000,
                    cache_dir: str = "", drop_leakage: bool = False, report_path: str = "",
                    progress: bool = True, log=print) -> tuple[sources_lib.Dataset, dict]:
    """Loads the run's sources, scans them, splits them and checks the result.

    Args:
        spec: the sources and hold-out fractions (as `sources.load_dataset`).
        max_pixels: the decompression-bomb limit.
        cache_dir: the scan cache and fixed files.
        drop_leakage: drop cross-split copies from the training side.
        report_path: where to write the report (OUT/preflight.json); it is
            written before any error about the data is raised.
        log: prints one summary line per split and the class counts.

    Returns:
        (the dataset to train on, the report).
    """
    t0 = time.perf_counter()
    class_names, sources = sources_lib.load_sources(spec.data, spec.val_data, spec.test_data,
                                                    spec.tfds_split, spec.tfds_data_dir,
                                                    spec.allow_external_paths)
    scanner = Scanner(max_pixels, cache_dir, progress)
    report: dict = {"max_pixels": int(max_pixels), "decoding": DECODING, "sources": {}}
    cleaned, origins = {}, {}
    try:
        for name, split in sources.items():
            cleaned[name], report["sources"][name], origins[name] = _clean_split(
                split, name, class_names, scanner)
            r = report["sources"][name]
            log(f"pre-flight {name} ({split.source}): {r['files']} files, "
                f"{len(r['skipped'])} skipped, {len(r['converted'])} converted, "
                f"{len(r['duplicates'])} duplicate group(s)")
    finally:
        scanner.save()
    ds = sources_lib.split_sources(class_names, cleaned, spec.val_fraction, spec.test_fraction,
                                   spec.seed)
    # Held-out splits were cut from "train": attribute their files to it.
    for name in ("val", "test"):
        origins.setdefault(name, origins["train"])
    ds, report["leakage"] = _leakage(ds, origins, drop_leakage)
    if report["leakage"]:
        log(f"pre-flight: {len(report['leakage'])} image(s) occur in more than one of "
            f"train/val/test" + (" (dropped from the training side)" if drop_leakage else
                                 "; --drop_leakage drops them from the training side"))
    report["class_counts"] = _counts(ds)
    report["summary"] = {
        "files": sum(r["files"] for r in report["sources"].values()),
        "skipped": sum(len(r["skipped"]) for r in report["sources"].values()),
        "converted": sum(len(r["converted"]) for r in report["sources"].values()),
        "differs_from_pillow": sum(sum(bool(e.get("differs_from_pillow")) for e in r["notes"])
                                   for r in report["sources"].values()),
        "duplicate_groups": sum(len(r["duplicates"]) for r in report["sources"].values()),
        "leaked": len(report["leakage"]),
        "scanned": scanner.scanned, "from_cache": scanner.from_cache,
        "seconds": round(time.perf_counter() - t0, 2)}
    if report_path:
        outputs.atomic_write_json(report_path, report)
    log_class_counts(ds, log)
    _check(ds, report, report_path, spec.val_fraction)
    return ds, report


def log_class_counts(ds: sources_lib.Dataset, log=print) -> None:
    """Prints one line per class with its train/val/test counts."""
    counts = _counts(ds)
    cols = list(counts)
    log("class counts (" + "/".join(cols) + "):")
    width = max(len(c) for c in ds.class_names)
    for i, c in enumerate(ds.class_names):
        log(f"  {c:<{width}}  " + "/".join(str(counts[k][i]) for k in cols))


def _check(ds: sources_lib.Dataset, report: dict, report_path: str,
           val_fraction: float) -> None:
    where = f"; see {report_path}" if report_path else ""
    skipped: dict[str, int] = {}
    for e in report["sources"]["train"]["skipped"]:
        for lab in e["label"].split("|"):
            skipped[lab] = skipped.get(lab, 0) + 1
    counts = ds.train.class_counts(len(ds.class_names))
    for name, n in zip(ds.class_names, counts):
        if n == 0 and skipped.get(name):
            raise fail("data", ds.train.source,
                       f"class {name!r} has no usable training images (the pre-flight scan "
                       f"skipped {skipped[name]}{where})")
    sources_lib.check_dataset(ds, val_fraction)


def scan_for_evaluation(split: sources_lib.Split, class_names: list[str], max_pixels: int,
                        cache_dir: str, progress: bool = True) -> tuple[sources_lib.Split, dict]:
    """Scans labelled data given to `evaluate`: bad files are skipped, odd ones converted."""
    scanner = Scanner(max_pixels, cache_dir, progress)
    try:
        return clean_split(split, "evaluate", class_names, scanner)
    finally:
        scanner.save()
