"""Speed plumbing: precision policy, XLA fallback, keyed caches."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from tl_keras.core import cache as cache_lib
from tl_keras.core import precision
from tl_keras.errors import ConfigError
from tl_keras.train import stages as train_lib


@pytest.mark.parametrize("cc,want", [(None, "float32"), ((7, 5), "mixed_float16"),
                                     ((8, 0), "mixed_bfloat16"), ((9, 0), "mixed_bfloat16")])
def test_auto_precision_follows_the_device(cc, want):
    assert precision.resolve("auto", cc) == want


def test_explicit_precision_and_bad_value():
    assert precision.resolve("mixed_float16", None) == "mixed_float16"
    with pytest.raises(ConfigError, match="--precision='fp8'"):
        precision.resolve("fp8", None)


def test_apply_sets_the_global_policy_before_models_are_built():
    try:
        assert precision.apply("mixed_bfloat16") == "mixed_bfloat16"
        layer = keras.layers.Dense(2)
        assert layer.compute_dtype == "bfloat16" and layer.variable_dtype == "float32"
    finally:
        keras.mixed_precision.set_global_policy("float32")


class _HostOp(keras.layers.Layer):
    """A layer whose op XLA cannot compile (a host-side numpy function)."""

    def call(self, x):
        y = tf.numpy_function(lambda a: a * 1.0, [x], tf.float32)
        y.set_shape(x.shape)
        return y


def test_xla_failure_falls_back_to_plain_tensorflow(capsys):
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    out = keras.layers.Dense(2, activation="softmax")(_HostOp()(inp))
    head = keras.Model(inp, out)
    x = np.random.default_rng(0).normal(size=(32, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(32) % 2]
    result = train_lib.fit_head(head, x, y, x, y,
                                train_lib.StageSpec(epochs=2, learning_rate=1e-2, weight_decay=0,
                                                    batch_size=8, patience=0, label_smoothing=0.0,
                                                    jit_compile=True), verbose=0)
    assert result.epochs == 2
    assert "continuing without --jit_compile" in capsys.readouterr().out
    assert head.jit_compile is False
    assert head.steps_per_execution == 4  # still a whole epoch per call (32 rows / 8)


def test_jit_compile_works_on_cpu_for_a_plain_head():
    inp = keras.Input((4,))
    head = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(inp))
    x = np.random.default_rng(0).normal(size=(16, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[np.arange(16) % 2]
    r = train_lib.fit_head(head, x, y, x, y,
                           train_lib.StageSpec(epochs=1, learning_rate=1e-2, weight_decay=0,
                                               batch_size=8, patience=0, label_smoothing=0.0,
                                               jit_compile=True), verbose=0)
    assert head.jit_compile is True and r.epochs == 1


def test_array_cache_hits_misses_and_recovers_from_corruption(tmp_path):
    c = cache_lib.ArrayCache(str(tmp_path), ram_budget_mb=1)
    calls = []

    def compute():
        calls.append(1)
        return np.arange(10.0), np.arange(10)

    k1 = cache_lib.make_key(seed=1, views=2)
    (a, b), hit = c.get_or_compute(k1, ("x", "y"), compute)
    assert not hit and len(calls) == 1
    (a2, b2), hit = c.get_or_compute(k1, ("x", "y"), compute)
    assert hit and len(calls) == 1
    np.testing.assert_array_equal(a2, a)
    # Any change of the key misses.
    assert cache_lib.make_key(seed=2, views=2) != k1
    _, hit = c.get_or_compute(cache_lib.make_key(seed=2, views=2), ("x", "y"), compute)
    assert not hit and len(calls) == 2
    # A truncated entry (a crash mid-write by an older version) is recomputed, not trusted.
    (tmp_path / f"{k1}.x.npy").write_bytes(b"\x93NUMPY garbage")
    (a3, _), hit = c.get_or_compute(k1, ("x", "y"), compute)
    assert not hit and len(calls) == 3
    np.testing.assert_array_equal(a3, np.arange(10.0))


def test_large_arrays_are_memory_mapped_not_loaded(tmp_path):
    c = cache_lib.ArrayCache(str(tmp_path), ram_budget_mb=1)
    big = np.zeros((600, 1000), np.float32)  # 2.4 MB > 1 MB budget
    (x,), _ = c.get_or_compute("k", ("x",), lambda: (big,))
    assert isinstance(x, np.memmap)


def test_split_fingerprint_changes_with_files(tmp_path):
    f = tmp_path / "a.jpg"
    f.write_bytes(b"1")
    labels = np.array([0])
    h1 = cache_lib.split_fingerprint([str(f)], labels)
    assert cache_lib.split_fingerprint([str(f)], np.array([1])) != h1
    f.write_bytes(b"12")
    assert cache_lib.split_fingerprint([str(f)], labels) != h1


def test_view_stream_is_a_seeded_permutation_per_pass_and_reads_memory_maps(tmp_path):
    x = np.arange(10 * 3, dtype="float32").reshape(10, 3)
    y = np.eye(10, dtype="float32")
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")

    def rows(seed):
        it = iter(train_lib.view_stream(mm, y, batch_size=5, seed=seed))
        return [np.asarray(next(it)[0][:, 0] // 3).astype(int).tolist() for _ in range(4)]

    a = rows(7)
    # Every pass of 10 rows (two batches) holds each row exactly once...
    assert sorted(a[0] + a[1]) == list(range(10)) == sorted(a[2] + a[3])
    # ...the passes are reshuffled, and the order repeats with the seed.
    assert a[0] + a[1] != a[2] + a[3]
    assert rows(7) == a
    _, by = next(iter(train_lib.view_stream(mm, y, batch_size=5, seed=7)))
    assert by.shape == (5, 10)
    # Arrays in RAM stream from a tensor, not through numpy: the same batches.
    it_mm = iter(train_lib.view_stream(mm, y, batch_size=4, seed=3))
    it_ram = iter(train_lib.view_stream(np.array(mm), y, batch_size=4, seed=3))
    for _ in range(6):
        (ax, ay), (bx, by) = next(it_mm), next(it_ram)
        np.testing.assert_array_equal(ax, bx)
        np.testing.assert_array_equal(ay, by)

    def calls_python(ds):
        return b"PyFunc" in ds._as_serialized_graph().numpy()

    assert calls_python(train_lib.view_stream(mm, y, 4))
    assert not calls_python(train_lib.view_stream(np.array(mm), y, 4))


def test_an_epoch_of_the_head_is_one_pass_over_the_images_not_over_every_view():
    rng = np.random.default_rng(0)
    images, views, bs = 40, 4, 8
    x = rng.normal(size=(images * views, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, images * views)]
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    r = train_lib.fit_head(head, x, y, x[:16], y[:16],
                           train_lib.StageSpec(epochs=3, learning_rate=1e-2, weight_decay=0.0,
                                               batch_size=bs, patience=10, label_smoothing=0.0),
                           examples_per_epoch=images, verbose=0)
    assert r.epochs == 3
    # 5 steps per epoch (40 images / 8), run 5 to a compiled call, never past an epoch.
    assert int(head.optimizer.iterations.numpy()) == 3 * images // bs
    assert head.steps_per_execution == 5


def test_steps_per_call_divides_the_epoch():
    assert train_lib._steps_per_call(None) == 1
    assert train_lib._steps_per_call(19) == 19
    assert train_lib._steps_per_call(3000) == 60
    assert train_lib._steps_per_call(3001) == 1  # prime above the cap: one per call
    # The head's own loop ends an epoch's last call early itself: no divisor needed.
    assert train_lib._steps_per_call(3001, divide=False) == 64
    assert train_lib._steps_per_call(19, divide=False) == 19


def test_a_head_epoch_of_a_prime_number_of_steps_still_runs_many_steps_per_call():
    # 67 steps an epoch: a divisor would be 1 (67 calls); the own loop runs
    # 64 then 3, every step once, and no epoch runs into the next.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(67 * 4, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 67 * 4)]
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    calls = []

    class Calls(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            calls.append(batch)

    r = train_lib.fit_head(head, x, y, x[:16], y[:16],
                           train_lib.StageSpec(epochs=2, learning_rate=1e-2, weight_decay=0.0,
                                               batch_size=4, patience=10, label_smoothing=0.0),
                           verbose=0, callbacks=[Calls()])
    assert r.epochs == 2 and head.steps_per_execution == 64
    assert int(head.optimizer.iterations.numpy()) == 2 * 67
    assert calls == [63, 66, 63, 66]  # the index of each call's last step, per epoch


def test_feature_extraction_pads_the_last_batch_without_changing_results():
    from tl_keras.train import features

    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3),
                              keras.layers.BatchNormalization(),
                              keras.layers.GlobalAveragePooling2D()])
    imgs = np.random.default_rng(1).integers(0, 256, (7, 8, 8, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices((imgs, np.arange(7)))
    got, labels, _ = features.extract(model, ds, batch_size=4, progress=False)
    want = model.predict(imgs.astype("float32"), verbose=0)
    assert got.shape == (7, 4) and labels.tolist() == list(range(7))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_the_mirror_view_is_each_images_mirror_in_the_images_order():
    # The test split's pass (the audit's, and a kept head's evaluation) runs
    # each image and its mirror in the same batches: rows come back as the
    # clean view, then the mirrored one, each in the images' order.
    from tl_keras.train import features

    model = keras.Sequential([keras.Input((6, 6, 3)), keras.layers.Flatten()])
    imgs = np.random.default_rng(3).integers(0, 256, (9, 6, 6, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices((imgs, np.arange(9)))
    got, labels, _ = features.extract(model, ds, batch_size=4, progress=False, mirror=True)
    assert got.shape == (18, 108) and labels.tolist() == list(range(9)) * 2
    np.testing.assert_array_equal(got[:9], imgs.reshape(9, -1))
    np.testing.assert_array_equal(got[9:], imgs[:, :, ::-1].reshape(9, -1))
    with pytest.raises(ValueError, match="one clean view"):
        features.extract(model, ds, batch_size=4, views=2, augmenter=lambda x, **k: x,
                         mirror=True)


def test_augmented_views_are_the_same_on_every_run_and_differ_by_seed():
    # The views are augmented in parallel; each batch's draws come from its
    # own seed, so thread timing cannot change them (it did with one shared
    # stateful generator: the same --seed gave different models run to run).
    from tl_keras.data import augment
    from tl_keras.train import features

    model = keras.Sequential([keras.Input((16, 16, 3)), keras.layers.Flatten()])
    imgs = np.random.default_rng(2).integers(0, 256, (40, 16, 16, 3)).astype("uint8")
    ds = tf.data.Dataset.from_tensor_slices((imgs, np.arange(40)))

    def views(seed):
        aug = augment.build_augmenter(True, 20.0, 0.1, 0.1, seed=seed)
        return features.extract(model, ds, batch_size=4, views=3, augmenter=aug, seed=seed,
                                progress=False)[0]

    a, b, other = views(7), views(7), views(8)
    np.testing.assert_array_equal(a, b)
    np.testing.assert_allclose(a[:40], imgs.reshape(40, -1))  # view 0 is the clean image
    assert not np.allclose(a[40:80], imgs.reshape(40, -1))  # the others are augmented
    assert not np.allclose(a[40:], other[40:])


def test_evaluation_pads_the_last_batch_without_changing_results(tmp_path):
    # One traced batch shape: the last, smaller batch is padded, its rows dropped.
    from PIL import Image

    from tl_keras.data import sources as sources_lib
    from tl_keras.report import metrics as metrics_lib

    rng = np.random.default_rng(3)
    paths = []
    for i in range(7):
        p = tmp_path / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (8, 8, 3)).astype("uint8")).save(p)
        paths.append(str(p))
    split = sources_lib.Split(paths, np.arange(7) % 2)
    model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Flatten(),
                              keras.layers.Dense(2, activation="softmax")])
    got = metrics_lib.predict(model, split, 8, batch_size=4)
    pixels = np.stack([np.asarray(Image.open(p)) for p in paths]).astype("float32")
    assert got.shape == (7, 2)
    np.testing.assert_allclose(got, model.predict(pixels, verbose=0), rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(bool(tf.config.list_physical_devices("GPU")), reason="a GPU is present")
def test_forcing_xla_without_a_gpu_says_it_is_slower():
    # Measured on CPU: the head 22 s with XLA vs 4.3 s without, stage 2 7x slower.
    said = []
    assert train_lib.jit_setting("true", said.append) is True
    assert len(said) == 1 and "--jit_compile=true" in said[0] and "slower" in said[0]
    assert train_lib.jit_setting("auto", said.append) == "auto"
    assert train_lib.jit_setting("false", said.append) is False
    assert len(said) == 1


def test_the_training_step_is_traced_once():
    # Keras (no distribution strategy) creates the optimizer's and metrics'
    # variables inside the first trace, and TensorFlow then traces the step
    # again: seconds for a backbone's top blocks. train._create_state makes
    # them first for model.fit; the head's own loop (loop_lib.fit with
    # own_loop) builds the optimizer before its trace. The model runs in
    # training mode once per trace.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 64)]
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dropout(0.1),
                             keras.layers.Dense(3, activation="softmax")])
    traced = []
    call = head.call
    head.call = lambda *a, **k: (traced.append(k.get("training")), call(*a, **k))[1]
    r = train_lib.fit_head(head, x, y, x[:16], y[:16],
                           train_lib.StageSpec(epochs=3, learning_rate=1e-2, weight_decay=0.0,
                                               batch_size=16, patience=10, label_smoothing=0.0),
                           verbose=0)
    assert r.epochs == 3 and traced.count(True) == 1

    # fit_finetune's model.fit
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dropout(0.1),
                              keras.layers.Dense(3, activation="softmax")])
    step = model.train_step
    steps = []
    model.train_step = lambda data: (steps.append(1), step(data))[1]
    train_lib.fit_finetune(model, (x, y), (x[:16], y[:16]),
                           train_lib.StageSpec(epochs=2, learning_rate=1e-3, warmup_epochs=0,
                                               patience=10, label_smoothing=0.0, batch_size=16),
                           initial_epoch=0, steps_per_epoch=4, verbose=0)
    assert len(steps) == 1


def test_the_heads_own_loop_trains_exactly_as_model_fit(monkeypatch):
    # fit_head runs whole epochs per call in loop_lib.fit's own loop
    # (model.fit's per-epoch work cost more than a head's steps). It must
    # train the same model: the same steps, dropout, class weights,
    # regularization, schedule and early stopping as model.fit.
    from tl_keras.train import loop as loop_lib

    rng = np.random.default_rng(0)
    x = rng.normal(size=(120, 8)).astype("float32")  # 2 views of 60 images
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 120)]
    vx = rng.normal(size=(30, 8)).astype("float32")
    vy = np.eye(3, dtype="float32")[rng.integers(0, 3, 30)]

    def run():
        keras.utils.set_random_seed(5)
        head = keras.Sequential([keras.Input((8,)), keras.layers.Dropout(0.3),
                                 keras.layers.Dense(3, activation="softmax",
                                                    kernel_regularizer=keras.regularizers.L2(0.01))])
        r = train_lib.fit_head(head, x, y, vx, vy,
                               train_lib.StageSpec(epochs=12, learning_rate=0.05, weight_decay=1e-3,
                                                   batch_size=16, patience=3, label_smoothing=0.1,
                                                   class_weight={0: 2.0, 1: 0.5, 2: 1.0}, seed=4),
                               verbose=0, examples_per_epoch=60)
        return r, [w.numpy() for w in head.weights], head

    own, w_own, head = run()
    # The stage's figures are the best epoch's logs: the weights it ends with.
    loss, acc = head.evaluate(vx, vy, verbose=0)
    assert own.best_epoch < own.epochs
    assert (own.val_loss, own.val_accuracy) == (pytest.approx(loss, rel=1e-5),
                                                pytest.approx(acc))
    fit = loop_lib.fit
    used = []
    monkeypatch.setattr(loop_lib, "fit", lambda *a, **k: (used.append(k["own_loop"]), fit(
        *a, **{**k, "own_loop": False}))[1])
    ref, w_ref, _ = run()
    assert used == [True]
    assert (own.epochs, own.best_epoch) == (ref.epochs, ref.best_epoch)
    assert set(own.history) == set(ref.history) == {"loss", "accuracy", "val_loss",
                                                     "val_accuracy", "lr"}
    for k in ref.history:
        np.testing.assert_allclose(own.history[k], ref.history[k], rtol=1e-5, atol=1e-6,
                                   err_msg=k)
    for a, b in zip(w_own, w_ref):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


def test_cached_validation_logs_what_keras_validation_logs_and_early_stopping_reads_it():
    # Stage 1 and stage 2 on cached arrays validate with train.CachedValidation
    # instead of Keras's per-epoch evaluate: the same numbers, sooner.
    rng = np.random.default_rng(0)
    x = rng.normal(size=(96, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 96)]
    vx, vy = x[:37], y[:37]  # 37 rows: slices of 10 leave a short last one

    def model():
        keras.utils.set_random_seed(1)
        m = keras.Sequential([keras.Input((6,)), keras.layers.Dense(
            3, activation="softmax", kernel_regularizer=keras.regularizers.L2(0.01))])
        m.compile(optimizer=keras.optimizers.SGD(0.1),
                  loss=keras.losses.CategoricalCrossentropy(label_smoothing=0.1),
                  metrics=train_lib._metrics(False))
        return m

    ref = model().fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                      validation_data=(vx, vy)).history
    m = model()
    check = train_lib.CachedValidation(vx, vy, 10, train_lib._metric_fns(m))
    ours = m.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0,
                 callbacks=[check]).history
    for k in ("val_loss", "val_accuracy"):
        np.testing.assert_allclose(ours[k], ref[k], rtol=1e-5, atol=1e-6)
    assert check.evaluate()["loss"] == pytest.approx(m.evaluate(vx, vy, verbose=0)[0], rel=1e-5)

    # Through fit_head: early stopping sees val_loss, stops, and keeps the best epoch.
    head = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    noise = np.eye(3, dtype="float32")[rng.integers(0, 3, 37)]  # labels unrelated to x
    r = train_lib.fit_head(head, x, y, vx, noise,
                           train_lib.StageSpec(epochs=60, learning_rate=0.3, weight_decay=0.0,
                                               batch_size=16, patience=2, label_smoothing=0.0),
                           verbose=0)
    assert r.epochs < 60 and r.best_epoch == min(range(r.epochs), key=lambda e: r.history[
        "val_loss"][e]) + 1
    assert r.val_loss == pytest.approx(min(r.history["val_loss"]), rel=1e-5)


def test_cached_validation_holds_arrays_in_ram_and_reads_memory_maps_slice_by_slice(tmp_path):
    # Arrays in RAM become tensors once (a head validates every ~20 ms); a
    # memory-mapped cache (larger than the RAM budget) is read a slice at a
    # time on every call, never held. Both give the same figures.
    rng = np.random.default_rng(1)
    x = rng.normal(size=(45, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 45)]
    mx = np.lib.format.open_memmap(str(tmp_path / "x.npy"), mode="w+", dtype="float32",
                                   shape=x.shape)
    mx[:] = x
    model = keras.Sequential([keras.Input((6,)), keras.layers.Dense(3, activation="softmax")])
    model.compile(loss=keras.losses.CategoricalCrossentropy(), metrics=train_lib._metrics(False))
    held = train_lib.CachedValidation(x, y, 16, train_lib._metric_fns(model))
    mapped = train_lib.CachedValidation(mx, y, 16, train_lib._metric_fns(model))
    for c in (held, mapped):
        c.set_model(model)
    a, b = held.evaluate(), mapped.evaluate()
    assert held._held is not None and len(held._held) == 3 and mapped._held is None
    assert a == pytest.approx(b) and b == pytest.approx(held.evaluate())
    ref = model.evaluate(x, y, verbose=0)
    assert a["loss"] == pytest.approx(ref[0], rel=1e-5) and a["accuracy"] == pytest.approx(ref[1])


def test_pipelines_run_without_the_autotune_model_thread(tmp_path):
    # Releasing an iterator waits for tf.data's autotuning thread, which on
    # 2 cores sometimes slept through its period first: 0.25-2 s with the
    # whole process idle at the end of a caching pass. Every pipeline that
    # tl_keras builds switches it off.
    from tl_keras.data import pipeline as data_pipeline
    from tl_keras.data import sources as sources_lib

    imgs = [str(tmp_path / f"{i}.png") for i in range(3)]
    for p in imgs:
        tf.io.write_file(p, tf.io.encode_png(tf.zeros((8, 8, 3), tf.uint8)))
    split = sources_lib.Split(imgs, np.array([0, 1, 0]))
    x, y = np.zeros((6, 2), "float32"), np.eye(2, dtype="float32")[[0, 1, 0, 1, 0, 1]]
    pipelines = {
        "images": data_pipeline.image_dataset(split, 8),
        "images, no cache": data_pipeline.image_dataset(split, 8, cache=False),
        "training batches": data_pipeline.batched(data_pipeline.image_dataset(split, 8), 2, 2,
                                             shuffle=True, seed=1),
        "view stream": train_lib.view_stream(x, y, 2),
        "view stream, memory-mapped": train_lib.view_stream(np.memmap(
            tmp_path / "x.bin", "float32", "w+", shape=x.shape), y, 2),
        "array batches": train_lib.array_batches(x, y, 2),
    }
    for name, ds in pipelines.items():
        assert ds.options().autotune.enabled is False, name


def test_the_first_caching_pass_decodes_ahead_while_the_model_is_traced():
    # The first batch traces the model (over a second of one core on
    # MobileNetV2); meanwhile the pipeline keeps decoding into a deep buffer
    # instead of idling the other core once a batch or two are ready.
    import threading
    import time

    from tl_keras.train import features

    decoded = []
    lock = threading.Lock()

    def decode(i):
        with lock:
            decoded.append(int(i))
        return np.zeros((4, 4, 3), np.uint8)

    n = 48
    ds = tf.data.Dataset.range(n).map(
        lambda i: (tf.ensure_shape(tf.numpy_function(decode, [i], tf.uint8), (4, 4, 3)), i))

    class WaitsWhileTraced(keras.layers.Layer):
        armed, seen = False, None

        def call(self, x):  # runs while the model is traced, on the first batch
            if not WaitsWhileTraced.armed:  # building the model
                return keras.ops.mean(x, axis=(1, 2))
            deadline = time.monotonic() + 20
            while len(decoded) < n and time.monotonic() < deadline:
                time.sleep(0.01)
            WaitsWhileTraced.seen = len(decoded)
            return keras.ops.mean(x, axis=(1, 2))

    model = keras.Sequential([keras.Input((4, 4, 3)), WaitsWhileTraced()])
    assert features._decode_ahead(ds) >= n
    WaitsWhileTraced.armed = True
    feats, labels, _ = features.extract(model, ds, batch_size=4, progress=False)
    assert WaitsWhileTraced.seen == n  # all decoded before the first batch left the model
    assert labels.tolist() == list(range(n)) and feats.shape == (n, 3)


def test_decode_ahead_is_bounded_by_bytes():
    from tl_keras.train import features

    def ds(shape):
        return tf.data.Dataset.from_tensors((tf.zeros(shape, tf.uint8), 0))

    assert features._decode_ahead(ds((160, 160, 3))) == features.DECODE_AHEAD_BYTES // 76800
    assert features._decode_ahead(ds((8192, 8192, 3))) == 1
    assert features._decode_ahead(tf.data.Dataset.from_generator(
        lambda: iter(()), output_signature=(tf.TensorSpec((None, None, 3), tf.uint8),
                                            tf.TensorSpec((), tf.int64)))) == 64
