"""The SavedModel serves raw encoded images and matches the Keras model."""

from __future__ import annotations

import json

import numpy as np
import tensorflow as tf

from tl_keras.data import decode as decode_lib
from tl_keras.data import sources as sources_lib
from tl_keras.run import evaluate as runs


def test_saved_model_matches_keras_on_original_jpeg_bytes(trained_run):
    model, classes, cfg = runs.load_run(str(trained_run))
    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data=cfg.data,
                                                       test_fraction=cfg.test_fraction,
                                                       seed=cfg.seed, val_fraction=cfg.val_fraction))
    paths = ds.test.items[:12]
    raw = [open(p, "rb").read() for p in paths]
    loaded = tf.saved_model.load(str(trained_run / "export" / "1"))
    out = loaded.signatures["serving_default"](image_bytes=tf.constant(raw))
    images = np.stack([decode_lib.decode_and_resize(tf.constant(r), cfg.image_size).numpy()
                       for r in raw])
    want = model.predict(images, verbose=0)
    got = out["probabilities"].numpy()
    assert got.dtype == np.float32 and got.shape == (len(raw), len(classes))
    np.testing.assert_allclose(got, want, atol=1e-5)
    top1 = [c.decode() for c in out["classes"].numpy()[:, 0]]
    assert top1 == [classes[i] for i in want.argmax(1)]
    np.testing.assert_allclose(out["scores"].numpy()[:, 0], want.max(1), atol=1e-5)


def test_serve_images_takes_any_size_uint8_and_float(trained_run):
    loaded = tf.saved_model.load(str(trained_run / "export" / "1"))
    img = np.random.default_rng(0).integers(0, 256, (2, 211, 157, 3), dtype=np.uint8)
    a = loaded.signatures["serve_images_uint8"](images=tf.constant(img))["probabilities"]
    b = loaded.signatures["serve_images"](images=tf.constant(img.astype("float32")))["probabilities"]
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6)
    labels = (trained_run / "export" / "1" / "assets" / "labels.txt").read_text().split()
    assert labels == json.loads((trained_run / "report.json").read_text())["classes"]
