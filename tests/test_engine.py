"""The LiteRT frozen-pass engine computes what TensorFlow computes (issue 24).

Real MobileNetV2-0.35 weights, real flowers_mini photos. Tolerance: max abs
difference <= 3e-4 on the pooled features (which lie in [0, 6]: ReLU6) and on
the activations at the stage-2 cut, i.e. 5e-5 of the features' range: float32
in another summation order (XNNPACK's kernels, batch norms folded into the
convolutions). Measured: 1.1e-4 here, 1.9e-4 over 2000 flowers128 photos
(benchmarks/frozen_pass.py).
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
from conftest import FLOWERS_MINI, WEIGHTS_MNV2_035

from tl_keras.config import Config, validate
from tl_keras.core import cache as cache_lib
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.errors import ConfigError
from tl_keras.model import classifier as model_lib
from tl_keras.model import families as families_lib
from tl_keras.train import activations, engine, features
from tl_keras.train import stages as train_lib

SIZE = 128
ABS_TOL = 3e-4
KEY = {"backbone": "mobilenet_v2", "alpha": 0.35, "weights": str(WEIGHTS_MNV2_035),
       "size": SIZE, "train": "data-hash", "augment": [True]}


def _clf(seed=0):
    keras.utils.set_random_seed(seed)
    fam = families_lib.get_family("mobilenet_v2")
    bb = families_lib.build_backbone(fam, str(WEIGHTS_MNV2_035), SIZE, 0.35)
    return model_lib.build_classifier(bb, fam, 5, dropout=0.0)


def _split(part: str) -> sources_lib.Split:
    """flowers_mini: the first 14 photos of each class (train) or the other 6 (test)."""
    classes = sorted(p.name for p in FLOWERS_MINI.iterdir() if p.is_dir())
    items, labels = [], []
    for i, name in enumerate(classes):
        photos = sorted(str(p) for p in (FLOWERS_MINI / name).iterdir())
        chosen = photos[:14] if part == "train" else photos[14:]
        items += chosen
        labels += [i] * len(chosen)
    return sources_lib.Split(items, np.asarray(labels, np.int64), part)


class _Log(list):
    def __call__(self, line):
        self.append(line)


@pytest.fixture(scope="module")
def passes(tmp_path_factory):
    """Both engines' pass over train (2 views: clean + augmented) and test photos."""
    from tl_keras.data import augment

    clf = _clf()
    cut = activations.cut(clf, 4)
    assert cut is not None
    aug = augment.build_augmenter(True, 10.0, 0.1, 0.1, 7)
    cache = cache_lib.ArrayCache(str(tmp_path_factory.mktemp("cache")))
    log = _Log()
    eng = engine.FrozenEngine("litert", 0, cache, KEY, log=log)
    out = {}
    for name, predict in (("tensorflow", None), ("litert", eng.predictor(cut.joint))):
        out[name] = {}
        for part, views in (("train", 2), ("test", 1)):
            images = data_pipeline.image_dataset(_split(part), SIZE)
            (a, f), y, _ = features.extract(cut.joint, images, 32, views,
                                            aug if views > 1 else None, seed=3,
                                            progress=False, predict=predict)
            out[name][part] = (a, f, y)
    return clf, cut, cache, log, out


def test_litert_gives_tensorflows_features_and_activations(passes):
    _, cut, _, log, out = passes
    assert any("converted" in line for line in log), log
    for part in ("train", "test"):
        (a_tf, f_tf, y_tf), (a_lt, f_lt, y_lt) = out["tensorflow"][part], out["litert"][part]
        np.testing.assert_array_equal(y_lt, y_tf)
        assert a_lt.shape == a_tf.shape and a_lt.shape[1:] == cut.shape
        assert f_lt.shape == f_tf.shape == (len(y_tf), 1280)
        # Not trivially equal: the features vary over a real range.
        assert np.abs(f_tf).max() > 1.0 and np.abs(a_tf).max() > 1.0
        for tf_out, lt_out in ((f_tf, f_lt), (a_tf, a_lt)):
            diff = np.abs(lt_out - tf_out).max()
            assert diff <= ABS_TOL, (part, diff)


def test_head_trained_on_litert_features_is_tensorflows(passes):
    _, _, _, _, out = passes
    spec = train_lib.StageSpec(epochs=15, learning_rate=1e-2, batch_size=16, patience=100,
                               label_smoothing=0.1, seed=1, jit_compile=False)
    heads = {}
    for name in ("tensorflow", "litert"):
        clf = _clf(seed=5)  # the same initial head for both
        _, f, y = out[name]["train"]
        _, f_val, y_val = out[name]["test"]
        train_lib.fit_head(clf.head, f, keras.utils.to_categorical(y, 5), f_val,
                           keras.utils.to_categorical(y_val, 5), spec, verbose=0)
        heads[name] = clf.head
    f_test = out["tensorflow"]["test"][1]
    probs = {n: h.predict(f_test, verbose=0) for n, h in heads.items()}
    np.testing.assert_array_equal(probs["litert"].argmax(1), probs["tensorflow"].argmax(1))
    assert (probs["tensorflow"].argmax(1) == out["tensorflow"]["test"][2]).mean() >= 0.6
    for a, b in zip(heads["tensorflow"].weights, heads["litert"].weights):
        np.testing.assert_allclose(b.numpy(), a.numpy(), atol=1e-4, err_msg=a.path)
    np.testing.assert_allclose(probs["litert"], probs["tensorflow"], atol=1e-4)


def test_a_second_engine_reads_the_conversion_from_the_cache(passes):
    _, cut, cache, _, out = passes
    before = engine.conversions
    log = _Log()
    # Other data and augmentation, the same model: the conversion serves.
    key = {**KEY, "train": "other-data", "augment": [False]}
    predict = engine.FrozenEngine("litert", 0, cache, key, log=log).predictor(cut.joint)
    assert engine.conversions == before
    assert not any("converted" in line for line in log), log
    x = data_pipeline.image_dataset(_split("test"), SIZE).batch(30)
    _, f = predict(next(iter(x))[0])
    np.testing.assert_array_equal(f, out["litert"]["test"][1])
    # Another model (the features alone) is another conversion.
    engine.FrozenEngine("litert", 0, cache, key, log=log).predictor(passes[0].features)
    assert engine.conversions == before + 1


class _Inverse(keras.layers.Layer):
    """A layer whose op (MatrixInverse) has no TFLite builtin kernel."""

    def call(self, x):
        import tensorflow as tf

        m = tf.reshape(x[:, :2, :2, 0], [-1, 2, 2]) + tf.eye(2)
        return tf.reshape(tf.linalg.inv(m), [-1, 4])


def test_a_model_that_does_not_convert_falls_back_to_tensorflow_saying_why(tmp_path):
    inp = keras.Input((8, 8, 3))
    model = keras.Model(inp, _Inverse()(inp), name="inverse")
    log = _Log()
    eng = engine.FrozenEngine("auto", 10 ** 6, cache_lib.ArrayCache(str(tmp_path)), KEY,
                              log=log)
    assert eng.predictor(model) is None
    assert eng.chosen == "tensorflow"
    (line,) = log
    assert line == ("frozen passes: TensorFlow, inverse did not convert to LiteRT ('tf.Matrix"
                    "Inverse' op is neither a custom op nor a flex op)"), line
    assert eng.predictor(model) is None and len(log) == 1  # decided once, said once


@pytest.mark.skipif(bool(engine.accelerators()), reason="auto keeps TensorFlow on GPUs/TPUs")
def test_auto_converts_only_where_it_pays(tmp_path, passes):
    _, cut, cache, _, _ = passes
    n = engine.BREAK_EVEN_IMAGES
    cases = [  # (images, policy, strategy kind, cache, expected, words of the reason)
        (n - 1, "float32", "default", cache_lib.ArrayCache(str(tmp_path)), "tensorflow",
         f"{n - 1} images to pass"),
        (n, "float32", "default", cache_lib.ArrayCache(str(tmp_path)), "litert",
         f"{n} images to pass >= {n}"),
        (10, "float32", "default", cache, "litert", "conversion is cached"),
        (10 ** 6, "mixed_bfloat16", "default", cache, "tensorflow", "mixed_bfloat16 policy"),
        (10 ** 6, "float32", "mirrored", cache, "tensorflow", "mirrored strategy"),
        (10 ** 6, "float32", "default", cache, "tensorflow", "resnet50 was not measured faster"),
    ]
    for images, policy, kind, c, expected, why in cases:
        log = _Log()
        key = {**KEY, "backbone": "resnet50"} if "resnet50" in why else KEY
        eng = engine.FrozenEngine("auto", images, c, key, policy, kind, log=log)
        eng.predictor(cut.joint)
        assert eng.chosen == expected, (images, policy, kind, log)
        assert why in log[0], log
    log = _Log()
    eng = engine.FrozenEngine("tensorflow", 10 ** 6, cache, KEY, log=log)
    assert eng.predictor(cut.joint) is None and log == []


def test_frozen_engine_flag_is_validated():
    validate(Config(data="x", output_dir="y", frozen_engine="litert"))
    with pytest.raises(ConfigError, match=r"--frozen_engine.*'xnnpack'.*auto, tensorflow, "
                                          r"litert"):
        validate(Config(data="x", output_dir="y", frozen_engine="xnnpack"))


def test_train_caches_on_litert_and_a_rerun_reuses_the_conversion(tmp_path):
    """`tl-keras train --frozen_engine=litert` end to end (stage 2 on cached activations,
    so the joint two-output model); a rerun with other cached views converts nothing."""
    from conftest import run_cli

    args = (f"--data={FLOWERS_MINI}", "--test_fraction=0.3", "--backbone=mobilenet_v2",
            "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=64",
            "--val_fraction=0.2", "--finetune_epochs=1", "--finetune_blocks=1", "--export=false",
            "--noaudit",
            "--tensorboard=false", "--frozen_engine=litert", f"--cache_dir={tmp_path / 'cache'}",
            f"--output_dir={tmp_path / 'out'}")
    first = run_cli("train", *args)
    assert first.returncode == 0, first.stderr[-3000:] + first.stdout[-3000:]
    assert ("frozen passes: LiteRT with XNNPACK" in first.stdout
            and "bottom_and_features converted in" in first.stdout), first.stdout[-3000:]
    assert "stage 2: training the top on cached activations" in first.stdout
    second = run_cli("train", *args, "--restart", "--cache_views=1")
    assert second.returncode == 0, second.stderr[-3000:] + second.stdout[-3000:]
    assert "bottom_and_features conversion read from the cache" in second.stdout, \
        second.stdout[-3000:]
    assert "converted in" not in second.stdout
