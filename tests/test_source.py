"""Source models: `tl-keras pretrain`, and any .keras file as the backbone of `train`.

One real CLI chain on flowers_mini (pretrain a compact CNN at 32 px for one
epoch -> train --backbone=that.keras -> SavedModel) carries the end-to-end
checks; cut points, blocks, preprocessing and refusals are checked on small
hand-built models through the library.
"""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from conftest import FLOWERS_MINI, run_cli
from tl_keras.model.layers import LocalResponseNormalization, Preprocess

from tl_keras.config import Config, validate
from tl_keras.data import decode as decode_lib
from tl_keras.data import sources as sources_lib
from tl_keras.errors import ConfigError
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier as model_lib
from tl_keras.model import families as families_lib
from tl_keras.model import model_files as model_files_lib
from tl_keras.model import source_models
from tl_keras.run import evaluate as runs
from tl_keras.run import image as pipeline
from tl_keras.run import pretrain

# ---------------------------------------------------------------------------
# The real chain: pretrain -> train --backbone=PATH.keras -> export
# ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def source_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("source") / "out"
    proc = run_cli("pretrain", f"--data={FLOWERS_MINI}", "--image_size=32", "--pretrain_epochs=1",
                   "--pretrain_batch_size=32", "--noexport", "--notensorboard",
                   f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return out


@pytest.fixture(scope="module")
def transfer_run(source_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("transfer") / "out"
    proc = run_cli("train", f"--data={FLOWERS_MINI}", f"--backbone={source_run / 'model.keras'}",
                   "--test_fraction=0.2", "--val_fraction=0.2", "--head_epochs=3",
                   "--finetune_epochs=1",
                   "--finetune_blocks=1", "--cache_views=1", "--notensorboard",
                   f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return out, proc.stdout


def test_pretrain_writes_model_block_map_and_reports(source_run):
    for f in ("model.keras", "model.blocks.json", "labels.txt", "config.json", "report.json",
              "manifest.json", "preflight.json", "report.md", "learning_curves.png"):
        assert (source_run / f).is_file(), f
    report = json.loads((source_run / "report.json").read_text())
    assert report["architecture"] == "compact_cnn" and report["image_size"] == 32
    assert report["pretrain"]["epochs"] == 1 and len(report["pretrain"]["history"]["loss"]) == 1
    assert (source_run / "labels.txt").read_text().split() == report["classes"]
    doc = json.loads((source_run / "model.blocks.json").read_text())
    assert doc["cut_layer"] == source_models.POOL_LAYER and doc["preprocess"] == "tf"
    assert [b["name"] for b in doc["blocks"]] == ["stem", "block1", "block2", "block3", "block4"]
    assert report["blocks"] == [b["name"] for b in doc["blocks"]]
    # The model file carries its preprocessing and reloads in safe mode.
    model, classes, cfg = runs.load_run(str(source_run))
    pre = model.get_layer(source_models.PREPROCESS_LAYER)
    assert isinstance(pre, Preprocess) and pre.mode == "tf"
    assert cfg.image_size == 32 and classes == report["classes"]


def test_train_on_the_pretrained_file_keeps_its_weights_and_exports(source_run, transfer_run):
    out, stdout = transfer_run
    for f in ("model.keras", "labels.txt", "config.json", "report.json",
              "export/1/saved_model.pb"):
        assert (out / f).exists(), f
    assert "cut at layer 'source_pool'" in stdout and "5 blocks from block map" in stdout
    report = json.loads((out / "report.json").read_text())
    assert report["stage2"]["blocks"] == ["block4"]
    assert report["image_size"] == 32

    source, _, _ = runs.load_run(str(source_run))
    model, classes, cfg = runs.load_run(str(out))
    backbone = model_lib.find_backbone(model)
    # Frozen blocks hold exactly the pretrained weights: the transfer is real.
    for name in ("stem_conv", "block1_1_conv", "block3_2_conv", "block3_2_bn"):
        for a, b in zip(backbone.get_layer(name).weights, source.get_layer(name).weights):
            np.testing.assert_array_equal(a.numpy(), b.numpy(), err_msg=name)

    # The SavedModel serves raw JPEG bytes exactly like the Keras model.
    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data=cfg.data,
                                                       test_fraction=cfg.test_fraction,
                                                       seed=cfg.seed, val_fraction=cfg.val_fraction))
    raw = [open(p, "rb").read() for p in ds.test.items[:8]]
    served = tf.saved_model.load(str(out / "export" / "1")).signatures["serving_default"](
        image_bytes=tf.constant(raw))
    images = np.stack([decode_lib.decode_and_resize(tf.constant(r), 32).numpy() for r in raw])
    want = model.predict(images, verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), want, atol=1e-5)
    assert [c.decode() for c in served["classes"].numpy()[:, 0]] == [
        classes[i] for i in want.argmax(1)]


def test_a_lambda_layer_is_refused_in_one_line_and_never_run(tmp_path):
    marker = tmp_path / "lambda_ran"
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(4, 3)(inp)
    # The function leaves a marker whenever it is called, including while a
    # loader rebuilds the graph.
    x = keras.layers.Lambda(lambda t, m=str(marker): (open(m, "w").close(), t)[1],
                            name="sneaky")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    model = keras.Model(inp, keras.layers.Dense(2)(x))
    model.save(tmp_path / "lambda.keras")
    marker.unlink()
    with pytest.raises(ConfigError) as e:
        pipeline.train(Config(data=str(FLOWERS_MINI), backbone=str(tmp_path / "lambda.keras"),
                              output_dir=str(tmp_path / "out")))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"--backbone='{tmp_path / 'lambda.keras'}'")
    assert "Lambda layer ('sneaky')" in msg and "safe mode" in msg
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------------------
# Cut points, blocks and preprocessing of hand-built models
# ---------------------------------------------------------------------------

def _residual_model(head: str = "gap") -> keras.Model:
    """block1 conv-bn-relu, block2 residual unit + pool, block3 conv; then a dense classifier."""
    inp = keras.Input((32, 32, 3), name="images")
    x = keras.layers.Conv2D(8, 3, padding="same", name="block1_conv")(inp)
    x = keras.layers.BatchNormalization(name="block1_bn")(x)
    x = keras.layers.ReLU(name="block1_relu")(x)
    y = keras.layers.Conv2D(8, 3, padding="same", name="block2_conv")(x)
    x = keras.layers.Add(name="block2_add")([x, y])
    x = keras.layers.MaxPooling2D(name="block2_pool")(x)
    x = keras.layers.Conv2D(16, 3, padding="same", activation="relu", name="block3_conv")(x)
    if head == "gap":
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    else:
        x = keras.layers.Flatten(name="flatten")(x)
    x = keras.layers.Dense(32, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(0.5, name="drop")(x)
    return keras.Model(inp, keras.layers.Dense(3, activation="softmax", name="pred")(x))


def _save(model: keras.Model, path) -> str:
    model.save(path)
    return str(path)


def _blocks(family: families_lib.Family, size: int = 0) -> list[tuple[str, list[str]]]:
    bb = families_lib.build_backbone(family, "imagenet", size or family.default_size)
    return blocks_lib.block_map(bb, family)


def test_cut_is_the_last_pooling_or_flatten_before_the_dense_classifier(tmp_path):
    gap = _residual_model("gap")
    assert model_files_lib.find_cut(gap) == "pool"
    assert model_files_lib.find_cut(_residual_model("flatten")) == "flatten"
    # A headless model is kept whole.
    headless = keras.Model(gap.input, gap.get_layer("block3_conv").output)
    assert model_files_lib.find_cut(headless) == "block3_conv"
    # Dense layers straight on a reshaped map: no pooling/flatten to cut at.
    inp = keras.Input((8, 8, 3))
    x = keras.layers.Reshape((192,))(keras.layers.Conv2D(3, 1)(inp))
    odd = keras.Model(inp, keras.layers.Dense(2)(x))
    with pytest.raises(ConfigError, match=r"--cut_layer=''.*stopped at layer 'reshape"):
        model_files_lib.find_cut(odd)

    fam = model_files_lib.family_from_model_file(_save(gap, tmp_path / "gap.keras"))
    bb = families_lib.build_backbone(fam, "imagenet", 32)
    assert bb.output.shape[1:] == (16,) and bb.layers[-1].name == "pool"
    # The features are the model's own pooled vector; the old dense layers are gone.
    clf = model_lib.build_classifier(bb, fam, 2)
    assert isinstance(clf.model.get_layer("features"), keras.layers.Identity)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clf.features.predict(x, verbose=0),
                               keras.Model(gap.input, gap.get_layer("pool").output)
                               .predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_blocks_from_merge_points_and_from_block_prefixes(tmp_path):
    path = _save(_residual_model(), tmp_path / "res.keras")
    fam = model_files_lib.family_from_model_file(path)
    # The residual add closes a unit; everything before it is the stem,
    # everything after it (pool, block3) joins it.
    assert [b for b, _ in _blocks(fam)] == ["stem", "block2_add"]
    assert any("merge layers" in n for n in fam.notes)

    fam = model_files_lib.family_from_model_file(path, block_prefixes="block1,block2,block3")
    blocks = _blocks(fam)
    assert [b for b, _ in blocks] == ["block1", "block2", "block3"]
    assert blocks[1][1] == ["block2_conv", "block2_add", "block2_pool"]
    bb = families_lib.build_backbone(fam, "imagenet", 32)
    assert blocks_lib.set_trainable_top_blocks(bb, fam, 1) == ["block3"]
    assert [l.name for l in bb.layers if l.trainable and l.weights] == ["block3_conv"]

    with pytest.raises(ConfigError, match=r"--block_prefixes='block9'.*starts with 'block9'"):
        model_files_lib.family_from_model_file(path, block_prefixes="block9")
    # Blocks that would not be contiguous ("block" again after "block2") are refused.
    with pytest.raises(ConfigError, match=r"--block_prefixes='block,block2'.*contiguous"):
        model_files_lib.family_from_model_file(path, block_prefixes="block,block2")


def test_cut_layer_flag_and_conv_blocks_of_an_auto_named_sequential(tmp_path):
    seq = keras.Sequential([keras.Input((24, 24, 3)), keras.layers.Conv2D(4, 3),
                            keras.layers.BatchNormalization(), keras.layers.ReLU(),
                            keras.layers.MaxPooling2D(), keras.layers.Conv2D(8, 3),
                            keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)])
    path = _save(seq, tmp_path / "seq.keras")
    fam = model_files_lib.family_from_model_file(path)
    blocks = _blocks(fam)
    # Auto-generated names carry no block structure: one block per conv layer.
    assert len(blocks) == 2
    assert [type(seq.get_layer(n)).__name__ for n in blocks[0][1] if n in
            [l.name for l in seq.layers]] == ["Conv2D", "BatchNormalization", "ReLU",
                                             "MaxPooling2D"]
    # --cut_layer: the pooled map of the first block; the classifier adds its own pooling.
    pool = [l.name for l in seq.layers if isinstance(l, keras.layers.MaxPooling2D)][0]
    fam = model_files_lib.family_from_model_file(path, cut_layer=pool)
    bb = families_lib.build_backbone(fam, "imagenet", 24)
    assert bb.output.shape[1:] == (11, 11, 4)
    clf = model_lib.build_classifier(bb, fam, 2)
    assert isinstance(clf.model.get_layer("features"), keras.layers.GlobalAveragePooling2D)
    with pytest.raises(ConfigError, match=r"--cut_layer='nope'.*no such layer"):
        model_files_lib.family_from_model_file(path, cut_layer="nope")


def test_preprocessing_is_known_or_asked_for(tmp_path):
    plain = _save(_residual_model(), tmp_path / "plain.keras")
    assert model_files_lib.family_from_model_file(plain).preprocess == "none"
    assert model_files_lib.family_from_model_file(plain, preprocess="caffe").preprocess == "caffe"

    inp = keras.Input((32, 32, 3))
    x = Preprocess("torch", name="prep")(inp)
    x = keras.layers.Conv2D(4, 3, name="block1_conv")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    own = _save(keras.Model(inp, keras.layers.Dense(2)(x)), tmp_path / "own.keras")
    # It preprocesses itself: nothing more outside, and no contradicting flag.
    assert model_files_lib.family_from_model_file(own).preprocess == "none"
    with pytest.raises(ConfigError, match=r"--preprocess='tf'.*'prep'.*'torch'"):
        model_files_lib.family_from_model_file(own, preprocess="tf")
    with pytest.raises(ConfigError, match=r"--cut_layer='pool'.*only applies to --backbone=PATH"):
        validate(Config(data="x", backbone="mobilenet_v2", cut_layer="pool"))


def test_other_sizes_and_fresh_weights(tmp_path):
    path = _save(_residual_model("gap"), tmp_path / "gap.keras")
    src = keras.models.load_model(path)
    fam = model_files_lib.family_from_model_file(path, image_size=48)
    bb = families_lib.build_backbone(fam, "imagenet", 48)
    assert bb.input_shape == (None, 48, 48, 3)
    np.testing.assert_array_equal(bb.get_layer("block3_conv").kernel.numpy(),
                                  src.get_layer("block3_conv").kernel.numpy())
    fresh = families_lib.build_backbone(fam, "none", 48)
    assert not np.allclose(fresh.get_layer("block3_conv").kernel.numpy(),
                           src.get_layer("block3_conv").kernel.numpy())
    # A flatten before dense layers fixes the size: said, with the size that works.
    flat = _save(_residual_model("flatten"), tmp_path / "flat.keras")
    fam = model_files_lib.family_from_model_file(flat, image_size=48, cut_layer="fc1")
    with pytest.raises(ConfigError, match=r"--image_size=48.*use 32"):
        families_lib.build_backbone(fam, "imagenet", 48)
    with pytest.raises(ConfigError, match=r"--weights=.*brings its own weights"):
        families_lib.validate(fam, 32, 0.0, "/some/weights.h5")


# ---------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------

def test_lrn_matches_tensorflow_and_alexnet_keeps_its_shapes(tmp_path):
    x = np.random.default_rng(0).normal(0, 30, (2, 5, 5, 16)).astype("float32")
    want = tf.nn.local_response_normalization(x, depth_radius=2, bias=2.0, alpha=1e-4, beta=0.75)
    np.testing.assert_allclose(LocalResponseNormalization()(x).numpy(), want.numpy(), rtol=1e-5)
    # The paper's geometry at 227 px: conv1 55x55x96, pool5 6x6x256 (9216 into fc6).
    body = source_models.alexnet(input_shape=(227, 227, 3))
    assert body.get_layer("conv1").output.shape[1:] == (55, 55, 96)
    assert body.output.shape[1:] == (6, 6, 256)
    # Smaller inputs still build (pools pad once the map is smaller than 3x3).
    assert source_models.alexnet(input_shape=(32, 32, 3)).output.shape[1:] == (1, 1, 256)

    # As a source model file: cut at the flatten before fc6, one block per conv layer,
    # the LRN layers reload in safe mode.
    fam = source_models.get_architecture("alexnet")
    model, cut = source_models.build_source_model(fam, 3, 32, alpha=0.25)
    model.save(tmp_path / "model.keras")
    body = keras.Model(model.input, model.get_layer(cut).output)
    pretrain.write_block_map(str(tmp_path / "model.blocks.json"), body, fam, cut, 32)
    loaded = model_files_lib.family_from_model_file(str(tmp_path / "model.keras"))
    assert [b for b, _ in _blocks(loaded)] == ["conv1", "conv2", "conv3", "conv4", "conv5"]
    clf = model_lib.build_classifier(families_lib.build_backbone(loaded, "imagenet", 32), loaded, 2)
    assert clf.features.output.shape[1:] == (64,)  # flattened 1x1x(256 * 0.25)
    x = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(clf.features.predict(x, verbose=0),
                               body.predict(x, verbose=0), rtol=1e-5, atol=1e-6)


def test_a_keras_applications_source_model_keeps_its_family_blocks(tmp_path):
    fam = source_models.get_architecture("mobilenet_v2")
    model, cut = source_models.build_source_model(fam, 3, 32, alpha=0.35)
    out = tmp_path / "src"
    out.mkdir()
    model.save(out / "model.keras")
    body = keras.Model(model.input, model.get_layer(cut).output)
    doc = pretrain.write_block_map(str(out / "model.blocks.json"), body, fam, cut, 32)
    want = [b["name"] for b in doc["blocks"]]
    assert want[:2] == ["stem", "block_1"] and want[-1] == "top" and len(want) == 18

    loaded = model_files_lib.family_from_model_file(str(out / "model.keras"))
    assert [b for b, _ in _blocks(loaded)] == want

    with pytest.raises(ConfigError, match=r"--architecture='vgg99'.*compact_cnn, alexnet"):
        source_models.get_architecture("vgg99")
