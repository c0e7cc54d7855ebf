"""The transfer model: frozen really means frozen, raw pixels in, float32 out."""

from __future__ import annotations

import keras
import numpy as np
import pytest
from tl_keras.model.layers import Preprocess

from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib
from tl_keras.model import families as families_lib


def _tiny(num_classes=3, size=32, dropout=0.0, weights="none"):
    keras.utils.set_random_seed(0)
    fam = families_lib.get_family("mobilenet_v2")
    bb = families_lib.build_backbone(fam, weights, size, 0.35)
    return model_lib.build_classifier(bb, fam, num_classes, dropout)


def _bn_layers(model):
    return [l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)]


def test_stage2_step_changes_only_unfrozen_blocks_and_keeps_bn_statistics():
    clf = _tiny()
    fam = clf.family
    unfrozen = blocks_lib.set_trainable_top_blocks(clf.backbone, fam, 2)
    blocks = dict(blocks_lib.block_map(clf.backbone, fam))
    unfrozen_layers = {n for b in unfrozen for n in blocks[b]}
    before = {w.path: w.numpy().copy() for w in clf.model.weights}

    clf.model.compile(optimizer=keras.optimizers.SGD(0.5), loss="categorical_crossentropy")
    rng = np.random.default_rng(0)
    # Images far from ImageNet statistics: BN in training mode would move its statistics.
    x = rng.uniform(200, 255, size=(16, 32, 32, 3)).astype("float32")
    y = keras.utils.to_categorical(rng.integers(0, 3, 16), 3)
    clf.model.fit(x, y, batch_size=8, epochs=1, verbose=0)

    changed_unfrozen = 0
    for layer in clf.backbone.layers:
        for w in layer.weights:
            same = np.array_equal(before[w.path], w.numpy())
            if layer.name in unfrozen_layers and not isinstance(layer, keras.layers.BatchNormalization):
                changed_unfrozen += not same
            else:
                assert same, f"frozen weight {w.path} changed"
    assert changed_unfrozen > 0, "the unfrozen blocks did not train"
    for bn in _bn_layers(clf.backbone):
        assert not bn.trainable
        assert np.array_equal(before[bn.moving_mean.path], bn.moving_mean.numpy())
        assert np.array_equal(before[bn.moving_variance.path], bn.moving_variance.numpy())
    head = clf.model.get_layer(model_lib.HEAD_LAYER)
    assert not np.array_equal(before[head.bias.path], head.bias.numpy())


def test_uint8_and_float_inputs_give_identical_predictions():
    clf = _tiny()
    img = np.random.default_rng(1).integers(0, 256, size=(4, 32, 32, 3), dtype=np.uint8)
    p_uint8 = clf.model.predict(img, verbose=0)
    p_float = clf.model.predict(img.astype("float32"), verbose=0)
    np.testing.assert_array_equal(p_uint8, p_float)
    assert p_uint8.dtype == np.float32
    np.testing.assert_allclose(p_uint8.sum(axis=1), 1.0, rtol=1e-5)


def test_output_is_float32_under_mixed_precision():
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        clf = _tiny()
        assert clf.backbone.layers[2].compute_dtype == "float16"
        out = clf.model.predict(np.zeros((2, 32, 32, 3), "uint8"), verbose=0)
        assert out.dtype == np.float32
        assert clf.model.output.dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_head_model_shares_weights_with_full_model():
    clf = _tiny()
    x = np.random.default_rng(2).uniform(0, 255, (3, 32, 32, 3)).astype("float32")
    feats = clf.features.predict(x, verbose=0)
    np.testing.assert_allclose(clf.head.predict(feats, verbose=0), clf.model.predict(x, verbose=0),
                               rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mode", ["tf", "caffe", "torch", "none"])
def test_preprocess_layer_matches_keras_applications(mode):
    from keras.applications import imagenet_utils

    x = np.random.default_rng(3).uniform(0, 255, (2, 8, 8, 3)).astype("float32")
    got = np.asarray(Preprocess(mode)(x))
    want = x if mode == "none" else imagenet_utils.preprocess_input(x.copy(), mode=mode)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


def test_model_file_reloads_in_safe_mode(tmp_path):
    clf = _tiny()
    path = tmp_path / "m.keras"
    clf.model.save(path)
    again = keras.models.load_model(path, safe_mode=True)
    x = np.random.default_rng(4).integers(0, 256, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(again.predict(x, verbose=0), clf.model.predict(x, verbose=0),
                               rtol=1e-6, atol=1e-6)


def test_mirror_average_inference_model(tmp_path):
    from conftest import WEIGHTS_MNV2_035

    clf = _tiny(weights=str(WEIGHTS_MNV2_035))
    x = np.random.default_rng(5).integers(0, 256, (3, 32, 32, 3)).astype("float32")
    inf = clf.inference_model(mirror_average=True)
    want = 0.5 * (clf.model.predict(x, verbose=0) + clf.model.predict(x[:, :, ::-1], verbose=0))
    got = inf.predict(x, verbose=0)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32
    assert not np.allclose(got, clf.model.predict(x, verbose=0), atol=1e-7)
    assert clf.inference_model(mirror_average=False) is clf.model
    inf.save(tmp_path / "m.keras")
    again = keras.models.load_model(tmp_path / "m.keras", safe_mode=True)
    np.testing.assert_allclose(again.predict(x, verbose=0), got, rtol=1e-6, atol=1e-7)
    assert model_lib.find_backbone(again).name.startswith("mobilenet")


def test_predicting_an_array_traces_once_whatever_its_length(monkeypatch):
    # A last batch smaller than the others used to make Keras trace the
    # predict function again (0.5 s for MobileNetV2 at 160 px, in the parity
    # gate's reference); the array is padded to whole batches instead.
    from tl_keras.train import loop as loop_lib

    inp = keras.Input((6,))
    model = keras.Model(inp, keras.layers.Dense(4, activation="softmax")(
        keras.layers.Dense(8, activation="relu")(inp)))
    x = np.random.default_rng(0).normal(size=(70, 6)).astype(np.float32)
    want = np.asarray(model(x, training=False))
    out = loop_lib.predict(model, x, 32)
    assert out.shape == (70, 4)
    assert model.predict_function.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(out, want, atol=1e-6)
    # A large array is not copied whole: its whole batches, then the padded
    # last one, through the same traced function.
    monkeypatch.setattr(loop_lib, "PAD_COPY_BYTES", 0)
    out = loop_lib.predict(model, x, 32)
    assert model.predict_function.experimental_get_tracing_count() == 1
    np.testing.assert_allclose(out, want, atol=1e-6)
