"""Served = trained (issue 21): the exported model decodes every odd file as training
did, and refuses bad bytes naming the item and the reason, before decoding them.

One small real export (a tiny position-sensitive Keras model, real photos and
the odd files of `odd_images`, through the pre-flight scan, the parity gate
and `export_version`) serves every test here, as TF Serving's REST API would
run it (`tf_serving_rest`).
"""

from __future__ import annotations

import base64
import io
import json
import os
import shutil
import struct
import subprocess
import sys

import keras
import numpy as np
import odd_images
import pytest
import tensorflow as tf
import tf_serving_rest as rest
from conftest import FLOWERS_MINI
from PIL import Image
from tl_keras.model.layers import Preprocess

from tl_keras.data import decode as decode_lib
from tl_keras.data import image_header
from tl_keras.data import preflight
from tl_keras.data import sources as sources_lib
from tl_keras.export import parity
from tl_keras.export import saved_model as export_lib

SIZE = 48
MAX_PIXELS = 50_000_000  # not the flag's default: the export must keep the run's value
# Kinds decoded differently before issue 21 (tf.io.decode_image alone).
FIXED_KINDS = {"exif_rotated_jpeg", "rgba_png", "la_png", "palette_transparent_png",
               "transparent_gif", "png_16bit_rgba", "webp_alpha",
               *(f"exif_orientation_{o}" for o in (2, 3, 4, 5, 7, 8))}


def _b64(raw: bytes) -> dict:
    return {"b64": base64.b64encode(raw).decode("ascii")}


def _photos(cls: str, n: int, start: int = 0):
    return sorted((FLOWERS_MINI / cls).glob("*.jpg"))[start:start + n]


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """A run's data folder with odd files of every kind, scanned, and its gated export."""
    root = tmp_path_factory.mktemp("served")
    for cls in ("daisy", "rose"):
        (root / "data" / cls).mkdir(parents=True)
        for p in _photos(cls, 6):
            shutil.copy(p, root / "data" / cls)
    odds = odd_images.make_odd_files(_photos("daisy", 6, start=6), root / "data" / "daisy")
    ds, report = preflight.prepare_dataset(
        sources_lib.DataSpec(data=str(root / "data"), val_fraction=0.25),
        max_pixels=MAX_PIXELS, cache_dir=str(root / "cache"), progress=False,
        log=lambda *_: None)
    keras.utils.set_random_seed(1)
    images = keras.Input((SIZE, SIZE, 3))
    x = Preprocess("tf")(images)
    x = keras.layers.Conv2D(4, 5, strides=4, activation="tanh")(x)
    # Flatten, not pooling: a turned or mirrored image must change the output.
    x = keras.layers.Flatten()(x)
    model = keras.Model(images, keras.layers.Dense(2, activation="softmax")(
        keras.layers.Dense(16, activation="tanh")(x)))
    originals = parity.odd_files(report)
    result = export_lib.export_version(
        model, ds.class_names, SIZE, str(root / "export"),
        export_lib.ExportSpec(max_pixels=MAX_PIXELS), parity_split=ds.val,
        originals=originals, check_path=str(root / "export_check.json"))
    path = result["path"]
    trained = {}  # original file -> the item training decoded
    for entry in report["sources"]["train"]["converted"]:
        trained[entry["path"]] = entry["fixed"]
    for entry in report["sources"]["train"]["notes"]:
        trained[entry["path"]] = entry["path"]
    return {"root": root, "odds": odds, "report": report, "model": model, "path": path,
            "loaded": tf.saved_model.load(path), "sigs": rest.signature_defs(path),
            "result": result, "trained": trained, "originals": originals}


def _request(served, raws: list[bytes]):
    body = json.dumps({"instances": [_b64(r) for r in raws]})
    request, _ = rest.json_to_request(body, served["sigs"])
    return rest.run_request(served["loaded"], request, served["sigs"])


def _refusal(served, raws: list[bytes]) -> str:
    """The error text a REST client receives for this request (it must fail)."""
    with pytest.raises(tf.errors.InvalidArgumentError) as err:
        _request(served, raws)
    return json.loads(rest.error_json(err.value))["error"]


def _keras(model, items: list) -> np.ndarray:
    """The Keras model on the pixels training decodes from these items (files)."""
    pixels = np.stack([decode_lib.decode_and_resize(tf.io.read_file(i), SIZE).numpy()
                       for i in items])
    return model.predict(pixels.astype(np.float32), verbose=0)


def test_every_odd_kind_is_served_as_training_saw_it(served):
    odds = {o.kind: o for o in served["odds"]}
    usable = [o for o in served["odds"] if o.status != "skipped"]
    servable = [o for o in usable if served["trained"].get(str(o.path), str(o.path))
                == str(o.path)]
    converted = [o for o in usable if o not in servable]
    # Every kind the issue names is served from its original bytes, and every
    # usable one is in the pre-flight's report (converted or noted) but plain BMP/WebP.
    assert FIXED_KINDS | {"png_16bit", "animated_gif", "cmyk_jpeg", "grayscale_jpeg", "bmp",
                          "webp", "palette_png"} <= {o.kind for o in servable}
    assert {o.kind for o in converted} >= {"tiff", "palette_bmp", "heic"}
    assert {str(o.path) for o in usable if o.kind not in ("bmp", "webp")} <= \
        set(served["trained"])

    raws = [o.path.read_bytes() for o in servable]
    got = _request(served, raws)["probabilities"]
    want = _keras(served["model"], [served["trained"].get(str(o.path), str(o.path))
                                    for o in servable])
    for o, g, w in zip(servable, got, want):
        np.testing.assert_allclose(g, w, atol=2e-6, err_msg=o.kind)

    # And the pixels training decodes are what a person sees (Pillow's view).
    for o in servable:
        pixels = decode_lib.decode_bytes(o.path.read_bytes())
        assert pixels.shape == o.expected.shape, o.kind
        assert np.abs(pixels.astype(int) - o.expected.astype(int)).mean() <= o.tolerance, o.kind

    # The test has teeth: the decoding served before issue 21 gives other answers.
    for kind in FIXED_KINDS:
        raw = odds[kind].path.read_bytes()
        try:
            old = tf.io.decode_image(raw, channels=3, expand_animations=False).numpy()
        except tf.errors.InvalidArgumentError:
            continue  # not even decoded
        old_probs = served["model"].predict(
            decode_lib.resize_image(old, SIZE).numpy()[None].astype(np.float32), verbose=0)
        new = got[[o.kind for o in servable].index(kind)]
        assert np.abs(old_probs[0] - new).max() > 1e-3, kind

    # Formats the graph does not decode are refused, naming the reason; training
    # used the pre-flight's PNG of them.
    for o in converted:
        error = _refusal(served, [raws[0], o.path.read_bytes()])
        assert error.startswith("assertion failed: [image 1: "), (o.kind, error)
        assert ("not JPEG, PNG, GIF, BMP or WebP" in error or "unsupported BMP" in error), error


def test_the_gate_fed_the_original_bytes_of_every_converted_and_noted_file(served):
    check = json.loads((served["root"] / "export_check.json").read_text())
    fed = check["artifacts"][parity.ORIGINALS]
    assert check["passed"] and fed["passed"]
    assert fed["files"] == len(served["originals"]) == len(served["trained"])
    assert fed["n"] + len(fed["refused"]) == fed["files"]
    assert fed["max_prob_diff"] <= 1e-5 and fed["top1_agreement"] == 1.0
    assert fed["refused"] and all(r["converted"] for r in fed["refused"])
    assert served["result"]["parity"]["originals"]["refused"] == len(fed["refused"])
    decoding = json.loads((served["root"] / "export" / "1" / "assets.extra" /
                           "decoding.json").read_text())
    assert decoding["max_pixels"] == MAX_PIXELS
    # preflight.json says what the graph cannot do like Pillow.
    assert served["report"]["decoding"]["limits"] == list(decode_lib.GRAPH_LIMITS)


class _Model:
    """A SavedModelClassifier stand-in that serves some files differently."""

    def __init__(self, real, broken: set):
        self.real, self.broken = real, broken

    def predict_each(self, encoded, batch_size=32):
        probs, reasons = self.real.predict_each(encoded, batch_size)
        for i, raw in enumerate(encoded):
            if raw in self.broken and probs[i] is not None:
                probs[i] = probs[i][::-1].copy()  # another class
        return probs, reasons


def test_the_gate_fails_where_served_and_trained_differ(served):
    clf = export_lib.SavedModelClassifier(served["path"])
    originals = served["originals"]
    limits = (parity.min_agreement_limits(), parity.max_prob_diff_limits())
    ok = parity.check_originals(served["model"], clf, originals, SIZE, ["daisy", "rose"],
                                *limits)
    assert ok["passed"] and not ok["failures"]
    # One served file predicted otherwise than training saw it: rejected, named.
    noted = [o for o, t in originals if o == t]
    broken = _Model(clf, {open(noted[0], "rb").read()})
    res = parity.check_originals(served["model"], broken, originals, SIZE, ["daisy", "rose"],
                                 *limits)
    assert not res["passed"]
    assert any("saved_model_originals" in f and "--parity_max_prob_diff" in f
               for f in res["failures"])
    # A file training decoded that the server refuses fails too.
    refusing = export_lib.SavedModelClassifier(served["path"])
    refusing.predict_each = lambda encoded, batch_size=32: (
        [None] * len(encoded), ["image 0: refused"] * len(encoded))
    res = parity.check_originals(served["model"], refusing, [(noted[0], noted[0])], SIZE,
                                 ["daisy", "rose"], *limits)
    assert not res["passed"] and "refuses 1 file(s) training decoded" in res["failures"][-1]


# Peak memory of serving one request, sampled from /proc while it runs (the
# high-water mark ru_maxrss would also hold TensorFlow's start-up peak).
MEMORY_PROBE = r"""
import json, sys, threading, time
import tensorflow as tf

def rss_mib():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2 ** 20

def peak_during(fn):
    peak, done = [rss_mib()], threading.Event()
    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], rss_mib())
            time.sleep(0.001)
    t = threading.Thread(target=sample)
    t.start()
    start = rss_mib()
    try:
        fn()
        error = ""
    except tf.errors.InvalidArgumentError as e:
        error = e.message
    finally:
        done.set()
        t.join()
    return peak[0] - start, peak[0], error

path, good, bomb = sys.argv[1:4]
serve = tf.saved_model.load(path).signatures["serving_default"]
good, bomb = open(good, "rb").read(), open(bomb, "rb").read()
normal = lambda: serve(image_bytes=tf.constant([good, good, good]))
for _ in range(3):
    normal()
normal_rise, normal_peak, _ = peak_during(normal)
with_bomb = lambda: serve(image_bytes=tf.constant([good, bomb, good]))
bomb_rise, bomb_peak, error = peak_during(with_bomb)
after = serve(image_bytes=tf.constant([good]))["probabilities"].shape[0]
print(json.dumps({"normal_peak_mib": normal_peak, "bomb_peak_mib": bomb_peak,
                  "normal_rise_mib": normal_rise, "bomb_rise_mib": bomb_rise,
                  "error": error, "served_after": after}))
"""


def test_bad_bytes_are_refused_naming_the_item_and_the_server_goes_on(served, tmp_path):
    good = [p.read_bytes() for p in _photos("tulip", 3)]
    jpeg = good[0]
    bomb = odd_images.png_bomb(tmp_path / "bomb.png")
    assert 0.5e6 < bomb.stat().st_size < 1.5e6
    with preflight._no_pillow_pixel_limit(), Image.open(bomb) as im:  # Pillow reads its header
        assert im.size == (16000, 16000) and im.mode == "RGB"
    small = odd_images.png_bomb(tmp_path / "small.png", side=64)  # made the same way:
    assert np.asarray(Image.open(small)).shape == (64, 64, 3)     # a valid PNG
    bad = {
        "empty": (b"", "empty (0 bytes)"),
        "truncated": (jpeg[:len(jpeg) // 2], "truncated JPEG: the data ends before the "
                      "image does"),
        "text": (b"<html><body>404 Not Found</body></html>\n",
                 "not an image: looks like text: <html><body>404 Not Found</body>]"),
        "bomb": (bomb.read_bytes(), "16000x16000 = 256000000 pixels is over "
                 "--max_pixels=50000000 (decompression bomb?); not decoded]"),
    }
    for i, (what, (raw, reason)) in enumerate(bad.items()):
        batch = good[:i % 3 + 1] + [raw] + good[:1]
        index = i % 3 + 1
        error = _refusal(served, batch)
        # What a TF Serving REST client reads: the message first, then the node.
        assert error.startswith(f"assertion failed: [image {index}: {reason}"), (what, error)
        assert "\n" not in error.split("]\n")[0], error
    # The process is alive and serves the next request.
    assert _request(served, good)["probabilities"].shape == (3, 2)

    # Peak memory of the bomb request against a normal one, in a fresh process.
    proc = subprocess.run([sys.executable, "-c", MEMORY_PROBE, served["path"],
                           str(_photos("tulip", 1)[0]), str(bomb)], capture_output=True,
                          text=True, timeout=600, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    mem = json.loads(proc.stdout.strip().splitlines()[-1])
    print("memory (MiB):", mem)
    assert "image 1: 16000x16000" in mem["error"] and mem["served_after"] == 1
    assert mem["bomb_peak_mib"] - mem["normal_peak_mib"] < 100, mem
    assert mem["bomb_rise_mib"] < 100, mem


# --------------------------------------------------------------------------
# The header reader on its own (no model)
# --------------------------------------------------------------------------

def test_header_sizes_and_problems(tmp_path):
    odds = odd_images.make_odd_files(_photos("rose", 6), tmp_path)
    for o in odds:
        raw = o.path.read_bytes()
        h = image_header.read_header(tf.constant(raw))
        if o.kind in ("zero_byte", "text_named_jpg", "tiff", "heic", "avif"):
            assert int(h["problem"]) in (image_header.EMPTY, image_header.NOT_IMAGE), o.kind
            continue
        if o.kind in ("truncated_jpeg",):
            assert int(h["problem"]) == image_header.TRUNCATED, o.kind
            continue
        if o.kind == "decompression_bomb":
            assert (int(h["width"]), int(h["height"])) == (50000, 50000)
            capped = image_header.read_header(tf.constant(raw), max_pixels=10 ** 8)
            assert int(capped["problem"]) == image_header.TOO_MANY_PIXELS
            continue
        with Image.open(io.BytesIO(raw)) as im:
            assert (int(h["width"]), int(h["height"])) == im.size, o.kind
        if o.kind == "palette_bmp":
            assert int(h["problem"]) == image_header.UNSUPPORTED
        elif o.kind != "corrupt_png":  # its header is sound; its data is not
            assert int(h["problem"]) == image_header.OK, o.kind
    # Cut anywhere inside the header: refused as truncated, never read past the end.
    photo = _photos("rose", 1)[0].read_bytes()
    for cut in (3, 20, 200, 600):
        problem = int(image_header.read_header(tf.constant(photo[:cut]))["problem"])
        assert problem in (image_header.TRUNCATED_HEADER, image_header.TRUNCATED), cut


def test_exif_orientation_in_either_byte_order():
    upright = Image.open(_photos("rose", 1)[0]).convert("RGB")

    def tiff(order: bytes, orientation: int) -> bytes:
        fmt = "<" if order == b"II" else ">"
        entry = struct.pack(fmt + "HHIHH", 0x0112, 3, 1, orientation, 0)
        return (b"Exif\0\0" + order + struct.pack(fmt + "HI", 42, 8) + struct.pack(fmt + "H", 1)
                + entry + struct.pack(fmt + "I", 0))

    for order in (b"II", b"MM"):
        for orientation in (3, 6):
            stored = upright.transpose(odd_images._UNDO[orientation])
            buf = io.BytesIO()
            stored.save(buf, "JPEG", quality=95, exif=tiff(order, orientation))
            raw = buf.getvalue()
            with Image.open(io.BytesIO(raw)) as im:  # Pillow reads the same tag
                assert im.getexif().get(0x0112) == orientation
            h = image_header.read_header(tf.constant(raw))
            assert int(h["orientation"]) == orientation, order
            got = decode_lib.decode_bytes(raw)
            assert got.shape == np.asarray(upright).shape
            assert np.abs(got.astype(int) - np.asarray(upright, int)).mean() < 4


def test_alpha_is_composited_exactly_as_pillow_does():
    c, a = np.meshgrid(np.arange(256), np.arange(256), indexing="ij")
    rgba = np.stack([c, 255 - c, c // 2, a], -1).astype(np.uint8)
    src = Image.fromarray(rgba, "RGBA")
    want = np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, "white"), src)
                      .convert("RGB"))
    got = decode_lib.composite_on_white(tf.constant(rgba[..., :3], tf.int32),
                                        tf.constant(rgba[..., 3:], tf.int32)).numpy()
    np.testing.assert_array_equal(got, want)
