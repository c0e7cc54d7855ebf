"""Data sources, splits, class weights, the image cache and augmentation, on real photos."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import tensorflow as tf
from conftest import FLOWERS_MINI

from tl_keras.data import augment
from tl_keras.data import decode as decode_lib
from tl_keras.data import pipeline as data_pipeline
from tl_keras.data import sources as sources_lib
from tl_keras.errors import ConfigError

CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def _photos(cls: str, n: int = 20, start: int = 0) -> list[Path]:
    return sorted((FLOWERS_MINI / cls).glob("*.jpg"))[start:start + n]


# --------------------------------------------------------------------------
# Folders and splits
# --------------------------------------------------------------------------

def test_class_folders_may_nest_and_explicit_splits_keep_the_training_classes(tmp_path):
    for cls in ("daisy", "rose"):
        for i, p in enumerate(_photos(cls, 4)):
            sub = tmp_path / "train" / cls / ("a/b" if i % 2 else "")
            sub.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, sub)
        (tmp_path / "val" / cls).mkdir(parents=True)
        shutil.copy(_photos(cls, 1, start=10)[0], tmp_path / "val" / cls)
    (tmp_path / "train" / "rose" / "notes.txt").write_text("not listed: no image extension")
    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data=str(tmp_path / "train"),
                                                       val_data=str(tmp_path / "val"),
                                                       test_data=str(tmp_path / "val")))
    assert ds.class_names == ["daisy", "rose"]
    assert ds.train.class_counts(2) == [4, 4]
    assert any("/a/b/" in p for p in ds.train.items)
    assert ds.val.class_counts(2) == [1, 1] and ds.test.class_counts(2) == [1, 1]
    (tmp_path / "val" / "tulip").mkdir()
    shutil.copy(_photos("tulip", 1)[0], tmp_path / "val" / "tulip")
    with pytest.raises(ConfigError, match="'tulip' does not occur in the training data"):
        sources_lib.load_dataset(
                                 sources_lib.DataSpec(data=str(tmp_path / "train"),
                                                      val_data=str(tmp_path / "val")))


def test_one_folder_gets_a_seeded_stratified_train_val_test_split():
    a = sources_lib.load_dataset(
                                 sources_lib.DataSpec(data=str(FLOWERS_MINI), val_fraction=0.2,
                                                      test_fraction=0.25, seed=7))
    assert a.test.class_counts(5) == [5] * 5
    assert a.val.class_counts(5) == [3] * 5  # 20% of the 15 left
    assert a.train.class_counts(5) == [12] * 5
    parts = [set(a.train.items), set(a.val.items), set(a.test.items)]
    assert sum(map(len, parts)) == len(set.union(*parts)) == 100
    b = sources_lib.load_dataset(
                                 sources_lib.DataSpec(data=str(FLOWERS_MINI), val_fraction=0.2,
                                                      test_fraction=0.25, seed=7))
    c = sources_lib.load_dataset(
                                 sources_lib.DataSpec(data=str(FLOWERS_MINI), val_fraction=0.2,
                                                      test_fraction=0.25, seed=8))
    assert a.test.items == b.test.items and a.val.items == b.val.items
    assert a.test.items != c.test.items


def test_grouped_split_equals_plain_split_when_nothing_is_duplicated():
    labels = np.repeat(np.arange(4), 9)
    plain = sources_lib.stratified_split(labels, [0.3], seed=3)
    grouped = sources_lib.stratified_split(labels, [0.3], seed=3, groups=[f"k{i}" for i in range(36)])
    assert all(np.array_equal(p, g) for p, g in zip(plain, grouped))
    # Copies (same key) go together.
    keys = [f"k{i // 3}" for i in range(36)]
    held, rest = sources_lib.stratified_split(labels, [0.3], seed=3, groups=keys)
    assert not {keys[i] for i in held} & {keys[i] for i in rest}


# --------------------------------------------------------------------------
# CSV / TSV lists
# --------------------------------------------------------------------------

def _copy_flat(tmp_path: Path, classes=("daisy", "rose", "tulip"), n=4) -> list[tuple[str, str]]:
    rows = []
    for cls in classes:
        for p in _photos(cls, n):
            dst = tmp_path / "imgs" / f"{cls}_{p.name}"
            dst.parent.mkdir(exist_ok=True)
            shutil.copy(p, dst)
            rows.append((f"imgs/{dst.name}", cls))
    return rows


@pytest.mark.parametrize("fmt", ["csv_header", "tsv_plain", "semicolon_header_swapped"])
def test_list_files_with_detected_delimiter_and_optional_header(tmp_path, fmt):
    rows = _copy_flat(tmp_path)
    if fmt == "csv_header":
        text = "filename,label\n" + "".join(f"{p},{c}\n" for p, c in rows)
        name = "list.csv"
    elif fmt == "tsv_plain":
        text = "".join(f"{p}\t{c}\n" for p, c in rows)
        name = "list.tsv"
    else:
        text = "class;path\n" + "".join(f"{c};{p}\n" for p, c in rows)
        name = "list.txt"
    (tmp_path / name).write_text(text)
    names, split = sources_lib.load_source(str(tmp_path / name), "data")
    assert names == ["daisy", "rose", "tulip"]
    assert not split.multi_label
    assert split.class_counts(3) == [4, 4, 4]
    # Paths are relative to the list's folder.
    assert all(os.path.isfile(p) and p.startswith(str(tmp_path)) for p in split.items)
    assert split.labels.tolist() == [names.index(c) for _, c in rows]


def test_multi_label_rows_make_multi_hot_labels(tmp_path):
    rows = _copy_flat(tmp_path, n=2)
    text = "path,labels\n" + "".join(
        f"{p},{c}|{'red' if c == 'rose' else 'white' if c == 'daisy' else ''}\n" for p, c in rows)
    (tmp_path / "tags.csv").write_text(text)
    names, split = sources_lib.load_source(str(tmp_path / "tags.csv"), "data")
    assert names == ["daisy", "red", "rose", "tulip", "white"]
    assert split.multi_label and split.labels.shape == (6, 5)
    assert split.class_counts(5) == [2, 2, 2, 2, 2]
    assert split.labels[0].tolist() == [1, 0, 0, 0, 1]  # daisy|white
    assert split.labels[-1].tolist() == [0, 0, 0, 1, 0]  # tulip only
    # A folder given as --val_data for a multi-label run gets multi-hot rows too.
    (tmp_path / "val" / "rose").mkdir(parents=True)
    shutil.copy(_photos("rose", 1)[0], tmp_path / "val" / "rose")
    _, val = sources_lib.load_source(str(tmp_path / "val"), "val_data", names, multi_label=True)
    assert val.labels.tolist() == [[0, 0, 1, 0, 0]]


@pytest.mark.parametrize("text,needle", [
    ("a.jpg\n", "line 1: expected PATH"),
    ("", "the list is empty"),
    ("path,label\n", "header but no rows"),
    ("a.jpg,daisy\n,rose\n", "line 2: empty path"),
])
def test_bad_list_files_give_one_line_errors_naming_the_line(tmp_path, text, needle):
    (tmp_path / "l.csv").write_text(text)
    with pytest.raises(ConfigError) as e:
        sources_lib.load_source(str(tmp_path / "l.csv"), "data")
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert str(e.value).startswith(f"--data={str(tmp_path / 'l.csv')!r}")


def test_val_list_must_match_the_training_labels(tmp_path):
    (tmp_path / "v.csv").write_text("x.jpg,cactus\n")
    with pytest.raises(ConfigError, match="label 'cactus' does not occur"):
        sources_lib.load_source(str(tmp_path / "v.csv"), "val_data", ["daisy", "rose"])
    (tmp_path / "w.csv").write_text("x.jpg,daisy|rose\n")
    with pytest.raises(ConfigError, match="has 2 labels"):
        sources_lib.load_source(str(tmp_path / "w.csv"), "val_data", ["daisy", "rose"],
                             multi_label=False)
    with pytest.raises(ConfigError, match="no such list file"):
        sources_lib.load_source(str(tmp_path / "missing.csv"), "val_data", ["daisy"])


# --------------------------------------------------------------------------
# TFDS: a real builder, prepared locally (no download), odd feature names
# --------------------------------------------------------------------------

def test_tfds_split_expressions_and_detected_feature_names(tmp_path):
    import tensorflow_datasets as tfds

    class TlKerasTinyFlowers(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "caption": tfds.features.Text(),
                "picture": tfds.features.Image(),
                "kind": tfds.features.ClassLabel(names=["daisy", "rose"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            for c in ("daisy", "rose"):
                for p in _photos(c, 10):
                    yield f"{c}/{p.name}", {"picture": str(p), "kind": c, "caption": p.name}

    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data="tfds:tl_keras_tiny_flowers",
                                                       val_data="tfds:tl_keras_tiny_flowers:train[80%:]",
                                                       tfds_split="train[:80%]",
                                                       tfds_data_dir=str(tmp_path)))
    assert ds.class_names == ["daisy", "rose"]
    assert len(ds.train) == 16 and len(ds.val) == 4
    assert isinstance(ds.train.items[0], bytes)
    img = decode_lib.decode_and_resize(tf.constant(ds.val.items[0]), 32)
    assert img.shape == (32, 32, 3)
    with pytest.raises(ConfigError, match="--data='tfds:no_such_dataset_xyz'"):
        sources_lib.load_source("tfds:no_such_dataset_xyz", "data", tfds_data_dir=str(tmp_path))


def test_a_tfds_download_that_fails_is_one_line_after_a_few_retries(tmp_path):
    # No network, as a user behind a firewall sees it: every request fails.
    # A local server answers 503 to each; TFDS's downloader would retry 10
    # times with doubling backoff (204 s offline); tl_keras gives it
    # TFDS_DOWNLOAD_RETRIES, then one line that says what to do instead.
    import http.server
    import threading

    import tensorflow_datasets as tfds
    from tensorflow_datasets.core.download import downloader

    requests = []

    class Unavailable(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            requests.append(self.path)
            self.send_response(503)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Unavailable)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/flowers.tgz"

    class TlKerasUnreachable(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=["daisy", "rose"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(dl_manager.download(url))}

        def _generate_examples(self, path):
            yield from ()

    before = downloader.MAX_RETRIES
    try:
        with pytest.raises(ConfigError) as e:
            sources_lib.load_dataset(
                                     sources_lib.DataSpec(data="tfds:tl_keras_unreachable",
                                                          tfds_data_dir=str(tmp_path)))
    finally:
        server.shutdown()
    msg = str(e.value)
    assert msg.startswith("--data='tfds:tl_keras_unreachable': could not download TFDS dataset "
                          "'tl_keras_unreachable'") and "\n" not in msg
    assert "--data=DIR" in msg and "--tfds_data_dir" in msg
    assert "RetryError" in msg and "503" in msg, msg  # the failure itself, in its own words
    assert len(requests) == 1 + sources_lib.TFDS_DOWNLOAD_RETRIES
    assert downloader.MAX_RETRIES == before  # TFDS's own setting is back


def test_tfds_failures_that_are_not_an_unknown_name_or_the_network_say_what_they_are(tmp_path):
    # A known dataset whose builder fails is not "unknown"; a manual-download
    # dataset whose folder is empty speaks of downloads but is no network
    # failure. Each message keeps TFDS's own words, on one line.
    import tensorflow_datasets as tfds

    class TlKerasConfigured(tfds.core.GeneratorBasedBuilder):
        VERSION = tfds.core.Version("1.0.0")
        BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="small")]

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(),
                "label": tfds.features.ClassLabel(names=["daisy", "rose"])}))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples()}

        def _generate_examples(self):
            yield from ()

    class TlKerasManual(TlKerasConfigured):
        BUILDER_CONFIGS = []
        MANUAL_DOWNLOAD_INSTRUCTIONS = "Download flowers.tgz into the manual folder."

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(dl_manager.manual_dir / "flowers.tgz")}

        def _generate_examples(self, path):
            yield from ()

    with pytest.raises(ConfigError) as e:
        sources_lib.load_dataset(sources_lib.DataSpec("tfds:tl_keras_configured/nope",
                                                      tfds_data_dir=str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("--data='tfds:tl_keras_configured/nope': could not open TFDS dataset "
                          "'tl_keras_configured/nope': ValueError: ") and "\n" not in msg
    assert "BuilderConfig nope not found" in msg and "unknown TFDS dataset" not in msg

    with pytest.raises(ConfigError) as e:
        sources_lib.load_dataset(sources_lib.DataSpec("tfds:tl_keras_manual",
                                                      tfds_data_dir=str(tmp_path)))
    msg = str(e.value)
    assert msg.startswith("--data='tfds:tl_keras_manual': could not load: AssertionError: Manual "
                          "directory ") and "\n" not in msg
    assert "Download flowers.tgz into the manual folder." in msg
    assert "no network" not in msg and "could not download" not in msg

    # The unknown name is still said so.
    with pytest.raises(ConfigError, match=r"^--data='tfds:no_such_dataset_xyz': unknown TFDS "
                                          r"dataset: Dataset no_such_dataset_xyz not found"):
        sources_lib.load_source("tfds:no_such_dataset_xyz", "data", tfds_data_dir=str(tmp_path))


# --------------------------------------------------------------------------
# Class weights
# --------------------------------------------------------------------------

def test_auto_class_weights_balance_the_classes():
    split = sources_lib.Split(["x"] * 40, np.asarray([0] * 30 + [1] * 10))
    w = sources_lib.class_weights(split, 2, "auto")
    assert w == {0: pytest.approx(40 / 60), 1: pytest.approx(2.0)}
    # Weighted counts are equal: each class carries the same total loss.
    assert 30 * w[0] == pytest.approx(10 * w[1])
    assert sources_lib.class_weights(split, 2, "none") is None


# --------------------------------------------------------------------------
# Image cache (RAM within a budget, disk beyond) and augmentation
# --------------------------------------------------------------------------

def _mini_split(n_per_class=4) -> sources_lib.Split:
    items, labels = [], []
    for i, c in enumerate(CLASSES):
        for p in _photos(c, n_per_class):
            items.append(str(p))
            labels.append(i)
    return sources_lib.Split(items, np.asarray(labels))


def _all(ds) -> tuple[np.ndarray, np.ndarray]:
    xs, ys = zip(*[(x.numpy(), y.numpy()) for x, y in ds])
    return np.stack(xs), np.asarray(ys)


@pytest.mark.parametrize("ram_images", [0, 7])
def test_images_beyond_the_ram_budget_are_cached_on_disk_unchanged(tmp_path, ram_images):
    originals = _mini_split()
    (tmp_path / "src").mkdir()
    items = []
    for i, p in enumerate(originals.items):
        items.append(str(tmp_path / "src" / f"{i}.jpg"))
        shutil.copy(p, items[-1])
    split = sources_lib.Split(items, originals.labels)
    size = 48
    ram_mb = ram_images * size * size * 3 / 2 ** 20
    budget = data_pipeline.CacheBudget(ram_mb, str(tmp_path / "cache"))
    ds = data_pipeline.image_dataset(split, size, budget=budget, name="train")
    assert budget.plan["train"] == {"ram": ram_images, "disk": 20 - ram_images,
                                    "ram_mb": round(ram_mb, 1)}
    assert int(ds.cardinality()) == 20
    first, labels = _all(ds)
    spill = [f for f in os.listdir(budget._folder) if f.startswith("train")]
    assert spill, "nothing was written to the disk cache"
    reference, ref_labels = _all(data_pipeline.image_dataset(split, size, cache=False))
    shutil.rmtree(tmp_path / "src")  # later passes must come from RAM and disk caches
    for _ in range(2):
        again, labels2 = _all(ds)
        np.testing.assert_array_equal(first, again)
        np.testing.assert_array_equal(labels, labels2)
    # Same images, RAM and disk parts interleaved: compare as sets of (label, image).
    key = lambda x, y: sorted((int(l), im.tobytes()) for im, l in zip(x, y))  # noqa: E731
    assert key(first, labels) == key(reference, ref_labels)
    folder = budget._folder
    budget.cleanup()
    assert not os.path.exists(folder)


def test_spill_folders_of_dead_runs_are_removed(tmp_path):
    stale = tmp_path / "tfdata-999999999-deadbeef"
    stale.mkdir()
    (stale / "train.index").write_text("x")
    budget = data_pipeline.CacheBudget(0, str(tmp_path))
    budget.spill_path("train")
    assert not stale.exists()
    budget.cleanup()


def test_rotation_is_given_in_degrees():
    assert augment.degrees_to_turn_fraction(36) == pytest.approx(0.1)
    aug = augment.build_augmenter(flip=False, rotation=36, zoom=0, contrast=0)
    assert aug.rotation == pytest.approx(0.1)  # Keras's fraction of a turn
    # The drawn angles stay within +-36 degrees and use the range.
    t = aug.transforms(2000, 100, 100, seed=tf.constant([3, 4], tf.int64)).numpy()
    angles = np.degrees(np.arctan2(t[:, 3], t[:, 0]))
    assert np.abs(angles).max() <= 36.0 + 1e-3 and np.abs(angles).max() > 35.0
    assert augment.build_augmenter(False, 0, 0, 0, translation=0, crop_min_area=0) is None


def test_flip_is_an_exact_mirror_and_zoom_keeps_the_centre():
    img = _all(data_pipeline.image_dataset(_mini_split(1), 41))[0].astype(np.float32)
    out = augment.Augment(flip=True)(img, seed=tf.constant([1, 2], tf.int64)).numpy()
    for o, i in zip(out, img):
        assert np.array_equal(o, i) or np.array_equal(o, i[:, ::-1]), "not a mirror"
    assert any(not np.array_equal(o, i) for o, i in zip(out, img))
    # Zooming (any factor) maps the centre pixel onto itself.
    z = augment.Augment(flip=False, zoom=0.3)(img, seed=tf.constant([5, 6], tf.int64)).numpy()
    np.testing.assert_allclose(z[:, 20, 20], img[:, 20, 20], atol=1e-3)


def test_training_epochs_see_new_augmented_images_and_unaugmented_batches_stay_clean():
    split = _mini_split(2)
    size = 64
    cached = data_pipeline.image_dataset(split, size)
    clean, _ = _all(cached)
    aug = augment.build_augmenter(True, 15, 0.1, 0.1, seed=5, translation=0.1, crop_min_area=0.6)
    train = data_pipeline.batched(cached, 5, 5, shuffle=False, augment=aug)
    epoch1 = np.concatenate([x.numpy() for x, _ in train])
    epoch2 = np.concatenate([x.numpy() for x, _ in train])
    assert epoch1.shape == epoch2.shape == clean.shape
    # Every image differs between epochs and from the cached clean image...
    per_image = np.abs(epoch1 - epoch2).mean(axis=(1, 2, 3))
    assert (per_image > 1.0).all(), per_image
    assert (np.abs(epoch1 - clean).mean(axis=(1, 2, 3)) > 1.0).all()
    # ... and the cache itself still holds clean images (augmentation is after it).
    np.testing.assert_array_equal(_all(cached)[0], clean)
    # Same seed, same sequence: runs are reproducible.
    aug_b = augment.build_augmenter(True, 15, 0.1, 0.1, seed=5, translation=0.1,
                                    crop_min_area=0.6)
    rerun = np.concatenate([x.numpy() for x, _ in data_pipeline.batched(
        data_pipeline.image_dataset(split, size), 5, 5, augment=aug_b)])
    np.testing.assert_allclose(rerun, epoch1, atol=1e-3)
    # Batches without an augmenter (what the pipeline gives validation: see the
    # next test): exactly the decoded pixels, every pass.
    val = data_pipeline.batched(cached, 5, 5)
    for _ in range(2):
        np.testing.assert_array_equal(np.concatenate([x.numpy() for x, _ in val]),
                                      clean.astype(np.float32))


def test_the_training_run_augments_training_images_only(tmp_path, monkeypatch):
    # A real run (32 px, both stages, stage 2 through the full model on the
    # image pipeline), watched where augmentation can enter: the views cached
    # for stage 1 (`features.extract`) and stage 2's batches (`batched`). The
    # training images get the run's augmenter; validation never does.
    from conftest import WEIGHTS_MNV2_035

    from tl_keras.config import Config
    from tl_keras.run import image as pipeline
    from tl_keras.train import features

    names, calls = {}, []
    image_dataset, extract, batched = (data_pipeline.image_dataset, features.extract,
                                       data_pipeline.batched)

    def named_dataset(split, size, *args, **kwargs):
        ds = image_dataset(split, size, *args, **kwargs)
        names[id(ds)] = kwargs.get("name", "split")
        return ds

    def watched_extract(model, images, batch_size, views=1, augmenter=None, **kwargs):
        calls.append(("extract", names.get(id(images)), augmenter))
        return extract(model, images, batch_size, views, augmenter, **kwargs)

    def watched_batched(ds, batch_size, num_classes, *args, augment=None, **kwargs):
        calls.append(("batched", names.get(id(ds)), augment))
        return batched(ds, batch_size, num_classes, *args, augment=augment, **kwargs)

    monkeypatch.setattr(data_pipeline, "image_dataset", named_dataset)
    monkeypatch.setattr(features, "extract", watched_extract)
    monkeypatch.setattr(data_pipeline, "batched", watched_batched)
    cfg = Config(data=str(FLOWERS_MINI), test_fraction=0.3, backbone="mobilenet_v2", alpha=0.35,
                 weights=str(WEIGHTS_MNV2_035), image_size=32, head_epochs=1,
                 head_fit="adamw",
                 finetune_epochs=1, finetune_blocks=1, cache_views=2, cache_max_mb=0,
                 batch_size=32, tensorboard=False, export=False,
                 output_dir=str(tmp_path / "out"))
    report = pipeline.train(cfg)
    assert report["stage2"]["mode"] == "full_model"
    augmented = {(where, name) for where, name, aug in calls if aug is not None}
    plain = {(where, name) for where, name, aug in calls if aug is None}
    assert augmented == {("extract", "train"), ("batched", "train")}, calls
    # (The data audit, on by default, also passes the clean test images.)
    assert plain == {("extract", "val"), ("extract", "test"), ("batched", "val")}, calls
    assert all(isinstance(aug, augment.Augment) for _, _, aug in calls if aug is not None)


def test_random_resized_crop_stays_inside_the_image_and_is_identity_at_inference():
    x = tf.constant(_all(data_pipeline.image_dataset(_mini_split(1), 40))[0], tf.float32)
    crop = augment.Augment(flip=False, crop_min_area=0.3, seed=1)
    y = crop(x, training=True)
    assert y.shape == x.shape
    assert float(tf.reduce_mean(tf.abs(y - x))) > 1.0
    np.testing.assert_array_equal(crop(x, training=False).numpy(), x.numpy())
    # Output corners map into the image: no reflected border is ever needed.
    t = crop.transforms(500, 40, 40, seed=tf.constant([7, 8], tf.int64)).numpy()
    for cx, cy in ((0, 0), (39, 0), (0, 39), (39, 39)):
        xin = t[:, 0] * cx + t[:, 1] * cy + t[:, 2]
        yin = t[:, 3] * cx + t[:, 4] * cy + t[:, 5]
        assert (xin > -1e-3).all() and (xin < 39 + 1e-3).all()
        assert (yin > -1e-3).all() and (yin < 39 + 1e-3).all()
    areas = np.abs(t[:, 0] * t[:, 4] - t[:, 1] * t[:, 3])
    assert areas.min() >= 0.3 - 1e-4 and areas.max() <= 1.0 + 1e-4


def test_pipelines_share_one_traced_decoder_and_decode_the_same_pixels():
    # Each pipeline used to trace the whole decoder (every format's branch,
    # the header checks) again: about 0.4 s, several times a run.
    paths = [str(p) for p in _photos("daisy", 3) + _photos("rose", 3)]
    split = sources_lib.Split(paths, np.array([0, 0, 0, 1, 1, 1]), "train")
    size = 77  # a size no other test uses: this test sees its first trace
    first = np.stack([x for x, _ in data_pipeline.image_dataset(split, size, cache=False)
                      .as_numpy_iterator()])
    second = np.stack([x for x, _ in data_pipeline.image_dataset(split, size, cache=False)
                       .as_numpy_iterator()])
    assert data_pipeline._load_one(size, True).experimental_get_tracing_count() == 1
    np.testing.assert_array_equal(first, second)
    want = np.stack([decode_lib.decode_and_resize(tf.io.read_file(p), size).numpy()
                     for p in paths])
    np.testing.assert_array_equal(first, want)


def test_resize_antialiases_only_beyond_twice_the_size():
    # A real photo (flowers_mini: 320x240 and the like) shrunk at most 2x
    # per axis: plain bilinear (cheap); shrunk more: antialiased (a plain
    # resize would skip pixels). Batches follow the same rule.
    image = decode_lib.decode_bytes(_photos("daisy", 1)[0].read_bytes())
    h, w = image.shape[:2]

    def resized(size, antialias):
        x = tf.image.resize(tf.cast(image, tf.float32), [size, size], antialias=antialias)
        return tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8).numpy()

    mild = -(-max(h, w) // 2)  # the longer side shrinks by 2x at most
    np.testing.assert_array_equal(decode_lib.resize_image(image, mild).numpy(),
                                  resized(mild, False))
    strong = min(h, w) // 3
    got = decode_lib.resize_image(image, strong).numpy()
    np.testing.assert_array_equal(got, resized(strong, True))
    assert np.abs(got.astype(int) - resized(strong, False)).mean() > 1.0  # a different filter
    np.testing.assert_array_equal(decode_lib.resize_image(image[None], strong).numpy()[0], got)
