"""Fit, evaluate and predict under any tf.distribute strategy.

* `fit` / `evaluate` / `predict` / `predict_on_batch` are what train/stages.py,
  train/features.py and report/metrics.py call instead of the Keras methods. Under the
  default strategy they are the Keras methods, called with the arguments
  given (a single-device run is exactly what it is without this module),
  except `fit(..., own_loop=True)`, which the head's fit uses: the loop
  below, which trains the same weights as `model.fit` without its
  per-epoch work. Under every other strategy
  (one-device, mirrored, multi-worker, TPU) they run a strategy-aware loop
  (`strategy.run` over a distributed dataset, the model's own optimizer and
  loss, per-example losses averaged over the global batch), because
  `model.fit` fails under MultiWorkerMirroredStrategy with TF 2.21 /
  Keras 3.15 (keras-team/keras#20585), and under the others reads the
  examples in another order than on the default strategy. The loop drives
  Keras callbacks with the same hooks and logs as `model.fit` (loss,
  metrics, val_*), so early stopping with best-weight restore, learning-rate
  logging and user callbacks behave the same under every strategy.

The loop reads training examples in the order `model.fit` reads them
(arrays through Keras's own array pipeline, a dataset in its own order; a
fresh iterator each epoch, or one endless stream with `steps_per_epoch`), so
a run on several replicas takes the same steps as a run on one device. Each
compiled call runs the model's `steps_per_execution` steps in a while loop,
as model.fit does, and an evaluation runs all its steps in one call.
"""
from __future__ import annotations

import math
import weakref
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tl_keras.errors import fail
from tl_keras.train.strategy import SUM, Distribution, gather_counts, uses_custom_loop

# Compiled step functions per model (rebuilt when the model is recompiled).
_STEPS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
_PREDICT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------
# Input pipelines (the example order of model.fit under every strategy)
# --------------------------------------------------------------------------

def _is_dataset(x) -> bool:
    return isinstance(x, tf.data.Dataset)


def _index_batches(n: int, batch: int) -> tf.data.Dataset:
    """Batches of row indices 0..n-1, in order (evaluation of arrays)."""
    return tf.data.Dataset.range(n).batch(batch)


def _gather_rows(indices: tf.data.Dataset, arrays: tuple) -> tf.data.Dataset:
    """Maps (index batch, *rest) to (rows of each array, *rest).

    Rows are gathered by index (as Keras does for arrays), so the arrays are
    held once, never copied into a shuffle buffer.
    """
    whole = tf.data.Dataset.from_tensors(tuple(arrays)).repeat()

    @tf.autograph.experimental.do_not_convert  # plain ops (see _all_real)
    def gather(item, a):
        item = item if isinstance(item, tuple) else (item,)
        return tuple(tf.gather(t, item[0]) for t in a) + tuple(item[1:])

    return tf.data.Dataset.zip((indices, whole)).map(
        gather, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _keras_batches(x, y, batch: int, shuffle: bool) -> tf.data.Dataset:
    """One epoch of (x, y) batches of arrays, made by Keras's own array
    pipeline, the one `model.fit(x, y, shuffle=...)` reads: the same order."""
    # Private module: Keras has no public API for the batches model.fit makes
    # from arrays, and only they give the same shuffled order as model.fit.
    from keras.src.trainers.data_adapters.array_data_adapter import ArrayDataAdapter

    return ArrayDataAdapter(x, y, batch_size=batch, shuffle=shuffle).get_tf_dataset()


def _pad_rows(t: tf.Tensor, size: int) -> tf.Tensor:
    pad = [[0, size - tf.shape(t)[0]]] + [[0, 0]] * (len(t.shape) - 1)
    out = tf.pad(t, pad)
    out.set_shape([size] + list(t.shape[1:]))
    return out


def _replica_slices(batches: tf.data.Dataset, parts: int, size: int) -> tf.data.Dataset:
    """Cuts every batch (a tuple of tensors) into `parts` consecutive slices,
    one per local replica, each padded to `size` rows, plus a mask of real rows.

    Static shapes everywhere (TPUs need them) and no empty batches (some CPU
    kernels fail on those); padded rows get weight 0.
    """

    def slices(*b):
        n = tf.shape(b[0])[0]
        check = tf.debugging.assert_less_equal(
            n, parts * size, message="a batch is larger than this worker's share of the "
            "global batch (global batch size / number of workers)")

        def one(r):
            start = tf.minimum(tf.cast(r, tf.int32) * size, n)
            stop = tf.minimum(start + size, n)
            mask = tf.cast(tf.range(size) < stop - start, tf.float32)
            return tuple(_pad_rows(t[start:stop], size) for t in b) + (mask,)

        with tf.control_dependencies([check]):
            return tf.data.Dataset.range(parts).map(one)

    return batches.map(lambda *b: b).flat_map(slices)


def _padding(spec: tuple) -> tf.data.Dataset:
    """Endless all-padding replica batches (mask 0) shaped like `spec`."""
    zeros = tuple(tf.zeros(s.shape, s.dtype) for s in spec)
    return tf.data.Dataset.from_tensors(zeros).repeat()


def _num_batches(ds: tf.data.Dataset) -> int:
    n = int(ds.cardinality())
    if n >= 0:
        return n
    return int(ds.reduce(np.int64(0), lambda c, _: c + 1))  # unknown: count once


def _class_weights(y, class_weight: Optional[dict]):
    """Per-example weights from one-hot targets (ones without class weights)."""
    if class_weight is None:
        return tf.ones(tf.shape(y)[:1], tf.float32)
    table = tf.constant([float(class_weight.get(i, 1.0)) for i in range(int(y.shape[-1]))],
                        tf.float32)
    return tf.gather(table, tf.argmax(y, axis=-1))


# Plain tensor functions for tf.data maps: with autograph's transpiling of
# them, its default, a process's first feed took 0.28 s to build, 0.02 s without.
@tf.autograph.experimental.do_not_convert
def _all_real(*batch):
    """(x, y) -> (x, y, mask of ones): a whole batch, every row real."""
    return batch + (tf.ones(tf.shape(batch[0])[:1], tf.float32),)


def _weighed(class_weight: Optional[dict]):
    """(x, y, mask) -> (x, y, weight, mask), the weight the mask times the class weight."""

    @tf.autograph.experimental.do_not_convert
    def weigh(x, y, mask):
        return x, y, mask * _class_weights(y, class_weight), mask

    return weigh


class _Feed:
    """The input of one fit or evaluation under a strategy-aware loop.

    Each worker feeds its own data (no auto-sharding: the pipeline gave each
    worker its shard): arrays, or a dataset batched at this worker's share of
    the global batch (global batch / number of workers). Every local batch is
    cut into one slice per local replica, so one global step sees the same
    examples as one step of the whole batch on a single device.

    Training reads what `model.fit` reads: arrays through Keras's array
    pipeline (the same shuffle), a dataset as it comes. With
    `steps_per_epoch` (an endless stream such as `train.view_stream`) the
    epochs are consecutive runs of that many steps from one iterator, the
    steps counted by the caller from the global examples, so the same on
    every worker; without it an epoch is one pass, read from a fresh iterator
    as Keras does, and all workers take the same number of steps (the longest
    shard's): a worker whose shard is shorter wraps around (training) or
    feeds padding (evaluation). Evaluation repeats its pass endlessly and
    reads it from one iterator (`iterator`): with a new iterator of the
    distributed dataset at every validation, a head's epoch under the
    one-device strategy took 317 ms; with one, 61 ms.

    Attributes:
        dataset: the distributed dataset of (x, y, weight, mask) per replica
            ((x, y) batches for a plain training feed: see `weigh_in_step`).
        weigh_in_step: None, or the class weights (sorted (class, weight)
            pairs, maybe none) the step applies to a plain training feed.
        steps: global steps per epoch (per evaluation pass).
        fresh_each_epoch: whether each training epoch reads a new iterator of `dataset`.
        iterator: evaluation's iterator, made at the first pass.
    """

    def __init__(self, strategy, x, y, global_batch: int, train: bool,
                 class_weight: Optional[dict], steps_per_epoch: Optional[int] = None,
                 shuffle: bool = True):
        dist = Distribution.of(strategy)
        replicas = strategy.num_replicas_in_sync
        if not global_batch:
            raise ValueError("the strategy-aware loop needs the global batch size")
        if global_batch % replicas:
            raise fail("batch_size", global_batch,
                       f"must be a multiple of the {replicas} replicas")
        plain = dist.kind == "default"  # one replica in this process: nothing to slice
        local_replicas = 1 if plain else len(strategy.extended.worker_devices)
        local_batch = global_batch // dist.num_workers
        size = global_batch // replicas
        stream = bool(train and steps_per_epoch)
        self.fresh_each_epoch = train and not stream
        self.iterator = None
        # A plain training feed yields its (x, y) batches as they come, and
        # the step adds the mask and class weights in its graph: two tf.data
        # maps per batch took 14.5 ms of CPU per 19 head steps, against 7.7
        # ms without them. None: the batches come complete.
        self.weigh_in_step = (tuple(sorted((class_weight or {}).items()))
                              if plain and train else None)
        if stream:
            self.steps = int(steps_per_epoch)
        else:
            if _is_dataset(x):
                local_steps = _num_batches(x)
            else:
                local_steps = math.ceil(len(x) / local_batch)
            self.steps = max(1, local_steps)
            if dist.num_workers > 1:
                self.steps = max(1, int(gather_counts(strategy, local_steps).max()))
        steps = self.steps

        def make(_ctx: Optional[tf.distribute.InputContext]) -> tf.data.Dataset:
            if _is_dataset(x):
                batches = x
            elif train:
                batches = _keras_batches(x, y, local_batch, shuffle)
            else:
                batches = _index_batches(len(x), local_batch)
            if stream:
                batches = batches.repeat()
            elif train:
                batches = batches.repeat().take(steps)  # one pass; a short shard wraps
            if plain and train:
                return batches
            if plain:  # whole batches as they come, every row real
                ds = batches.map(_all_real)
                if not _is_dataset(x):
                    ds = _gather_rows(ds, (x, y))
            else:
                ds = _replica_slices(batches, local_replicas, size)
                if not train:
                    ds = ds.concatenate(_padding(ds.element_spec)).take(steps * local_replicas)
                    if not _is_dataset(x):
                        ds = _gather_rows(ds, (x, y))
            ds = ds.map(_weighed(class_weight))
            return (ds if train else ds.repeat()).prefetch(tf.data.AUTOTUNE)

        self.dataset = make(None) if plain else strategy.distribute_datasets_from_function(make)


# --------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------

def _per_example_loss(model: keras.Model) -> Callable:
    """The compiled loss as (y_true, y_pred) -> per-example losses (no reduction)."""
    loss = model.loss
    if isinstance(loss, str):
        loss = keras.losses.get(loss)
    # A Loss object's `call` is its unreduced form; loss functions are unreduced.
    return loss.call if isinstance(loss, keras.losses.Loss) else loss


class _Steps:
    """tf.functions running `n` global training steps, or evaluation steps, per call."""

    def __init__(self, model: keras.Model, metric_fns: dict[str, Callable]):
        if model.loss is None:
            raise ValueError(f"model {model.name!r}: compile it with a loss before fit/evaluate")
        self.model = model
        self.strategy = model.distribute_strategy
        self.metric_fns = dict(metric_fns)
        self.loss = _per_example_loss(model)
        n = self.strategy.num_replicas_in_sync
        jit = bool(model.jit_compile) and not isinstance(self.strategy, tf.distribute.TPUStrategy)

        def forward(x, y, w, mask, n_global, training):
            pred = model(x, training=training)
            pred = tf.cast(pred, tf.float32)
            y = tf.cast(y, pred.dtype)
            per_example = tf.reshape(self.loss(y, pred), [-1])
            # Averaged over the global batch: the optimizer sums the replicas'
            # gradients, which then equal the gradient of the global mean.
            loss = tf.reduce_sum(per_example * w) / tf.maximum(n_global, 1.0)
            count = tf.reduce_sum(mask)
            logged = tf.reduce_sum(per_example * w)
            if model.losses:
                penalty = tf.cast(tf.add_n(model.losses), tf.float32)
                if training:
                    loss += penalty / n
                # Keras logs each batch's loss with the penalty, weighted by its examples.
                logged += penalty * count
            # Metrics count every real example once, class weights or not
            # (Keras's `metrics`, as opposed to `weighted_metrics`).
            sums = [logged, count]
            for fn in self.metric_fns.values():
                m = tf.reshape(tf.cast(fn(y, pred), tf.float32), [tf.shape(pred)[0], -1])
                sums.append(tf.reduce_sum(tf.reduce_mean(m, axis=-1) * mask))
            return loss, sums

        def grads(x, y, w, mask, n_global):
            with tf.GradientTape() as tape:
                loss, sums = forward(x, y, w, mask, n_global, True)
                scaled = model.optimizer.scale_loss(loss)
            return tape.gradient(scaled, model.trainable_variables), sums

        grads_fn = tf.function(grads, jit_compile=True) if jit else grads

        def replica_train(x, y, w, mask):
            # Real (unpadded) examples in the whole global batch.
            n_global = tf.distribute.get_replica_context().all_reduce(SUM, tf.reduce_sum(mask))
            g, sums = grads_fn(x, y, w, mask, n_global)
            model.optimizer.apply_gradients(zip(g, model.trainable_variables))
            return sums

        def replica_test(x, y, w, mask):
            return forward(x, y, w, mask, tf.constant(1.0), False)[1]

        strategy = self.strategy
        width = 2 + len(self.metric_fns)

        def steps_of(replica_fn, learning_rate: bool):
            # `n` steps in one call, a while loop in the graph: a small head's
            # step costs less than the Python round trip around it. `n` is a
            # tensor: one trace serves every count.
            @tf.function(autograph=False)
            def steps(iterator, n, weigh=None):
                # weigh: see _Feed.weigh_in_step (a Python value: part of the trace's key).
                def body(i, totals, bad):
                    batch = iterator.get_next()
                    if weigh is not None:  # what _Feed's maps do for the other feeds
                        batch = _weighed(dict(weigh) or None)(*_all_real(*batch))
                    sums = tf.stack(strategy.reduce(
                        SUM, strategy.run(replica_fn, args=batch), axis=None))
                    # The first step whose loss is not finite, for the guard's message.
                    bad = tf.where((bad < 0) & ~tf.math.is_finite(sums[0]), i, bad)
                    return i + 1, totals + sums, bad

                _, totals, bad = tf.while_loop(lambda i, *_: i < n, body,
                                               (tf.constant(0), tf.zeros([width]),
                                                tf.constant(-1)))
                if not learning_rate:
                    return totals
                # The rate of the next step, read here: evaluating a schedule
                # eagerly after each epoch took 2-3 ms, as much as 19 steps.
                with tf.control_dependencies([totals]):
                    return totals, bad, tf.cast(model.optimizer.learning_rate, tf.float32)

            return steps

        self.train_steps = steps_of(replica_train, learning_rate=True)
        self.test_steps = steps_of(replica_test, learning_rate=False)

    def logs(self, totals: np.ndarray) -> dict:
        loss_sum, count = totals[:2]
        logs = {"loss": float(loss_sum / max(count, 1.0))}
        for name, value in zip(self.metric_fns, totals[2:]):
            logs[name] = float(value / max(count, 1.0))
        return logs


def _steps_for(model: keras.Model, metric_fns: dict) -> _Steps:
    """The model's step functions, traced again after each compile (new optimizer)."""
    key = (tuple(metric_fns), model.jit_compile)
    cached = _STEPS.get(model)
    # The cached optimizer itself (not its id) is compared: a recompiled model
    # has a new optimizer, and the traced steps captured the old one.
    if cached is None or cached[0] is not model.optimizer or cached[1] != key:
        with model.distribute_strategy.scope():
            if model.optimizer is not None and not model.optimizer.built:
                model.optimizer.build(model.trainable_variables)
            cached = _STEPS[model] = (model.optimizer, key, _Steps(model, metric_fns))
    return cached[2]


def _run_eval(steps: _Steps, feed: "_Feed", callbacks=None) -> dict:
    """Every evaluation step in one call; the batch hooks run once around it,
    as `model.evaluate` runs them around each of its executions."""
    if callbacks is not None:
        callbacks.on_test_begin()
        callbacks.on_test_batch_begin(0)
    if feed.iterator is None:
        feed.iterator = iter(feed.dataset)
    totals = steps.test_steps(feed.iterator, tf.constant(feed.steps)).numpy()
    logs = steps.logs(totals)
    if callbacks is not None:
        callbacks.on_test_batch_end(feed.steps - 1, logs)
        callbacks.on_test_end(logs)
    return logs


# --------------------------------------------------------------------------
# What train.py, features.py and evaluate.py call
# --------------------------------------------------------------------------

def fit(model: keras.Model, x, y=None, *, batch_size: Optional[int], epochs: int = 1,
        initial_epoch: int = 0, validation_data=None, callbacks=(), verbose=2,
        class_weight: Optional[dict] = None, steps_per_epoch: Optional[int] = None,
        shuffle: bool = True, metric_fns: Optional[dict] = None,
        global_batch: Optional[int] = None, own_loop: bool = False) -> keras.callbacks.History:
    """`model.fit` that works under every strategy (the model must be compiled).

    Under the default strategy this is `model.fit` with these arguments,
    unless `own_loop`.

    Args:
        model: a compiled model, built in the scope of the strategy it trains under.
        x, y: arrays (this worker's examples), or a batched dataset of (x, y) as
            x, batched at this worker's share of the global batch
            (`local_batch_size`); endless with `steps_per_epoch`.
        batch_size: as in `model.fit`: the global batch of arrays, None for a dataset.
        epochs / initial_epoch / callbacks / verbose / class_weight / shuffle:
            as in `model.fit`.
        steps_per_epoch: as in `model.fit`; for an endless dataset, counted
            from all workers' examples (the same on every worker).
        validation_data: a batched (x, y) dataset (or (x, y) arrays).
        metric_fns: name -> per-example metric function (e.g.
            keras.metrics.categorical_accuracy); the strategy-aware loop logs
            these, `model.fit` logs the compiled metrics (give the same ones).
        global_batch: the global batch size (all replicas together) for the
            strategy-aware loop; defaults to `batch_size`.
        own_loop: run the strategy-aware loop under the default strategy
            too. For a model whose steps are tiny (a head on cached
            features): model.fit's own work per epoch, and the first
            trace of its step loop, then cost more than the steps (a
            24-epoch head fit: see `train.fit_head`).

    Returns:
        The History, as `model.fit` returns it.
    """
    strategy = model.distribute_strategy
    if not (own_loop or uses_custom_loop(strategy)):
        return model.fit(x, y, batch_size=batch_size, epochs=epochs,
                         initial_epoch=initial_epoch, validation_data=validation_data,
                         callbacks=callbacks, verbose=verbose, class_weight=class_weight,
                         steps_per_epoch=steps_per_epoch, shuffle=shuffle)
    return _loop_fit(model, x, y, global_batch or batch_size, epochs, initial_epoch,
                     validation_data, list(callbacks), verbose, class_weight,
                     dict(metric_fns or {}), steps_per_epoch, shuffle)


def _loop_fit(model, x, y, batch_size, epochs, initial_epoch, validation_data, callbacks,
              verbose, class_weight, metric_fns, steps_per_epoch=None,
              shuffle=True) -> keras.callbacks.History:
    """model.fit's sequence of callback hooks and logs around strategy.run steps."""
    strategy = model.distribute_strategy
    dist = Distribution.of(strategy)
    steps = _steps_for(model, metric_fns)
    train = _Feed(strategy, x, y, batch_size, True, class_weight, steps_per_epoch, shuffle)
    val = None
    if validation_data is not None:
        vx, vy = (validation_data, None) if _is_dataset(validation_data) else validation_data
        val = _Feed(strategy, vx, vy, batch_size, False, None)
    history = keras.callbacks.History()
    # Only the chief prints progress.
    verbose = (1 if verbose == "auto" else verbose) if dist.is_chief else 0
    cbs = keras.callbacks.CallbackList(
        callbacks + [history], add_history=False, add_progbar=bool(verbose), model=model,
        verbose=verbose, epochs=epochs, steps=train.steps)
    # Steps per compiled call: the model's `steps_per_execution`, as model.fit runs them.
    per_call = max(1, int(getattr(model, "steps_per_execution", 1) or 1))
    model.stop_training = False
    model.history = history  # as Keras's History sets it; a resumed fit replaces it
    cbs.on_train_begin()
    logs = {}
    batches = None
    # A resumed fit (resume.StageCheckpoint) sets where it goes on, as for
    # model.fit: `_initial_epoch` is the only way Keras's BackupAndRestore has
    # to tell a fit loop its starting epoch (no public API).
    for epoch in range(model._initial_epoch or initial_epoch, epochs):
        if batches is None or train.fresh_each_epoch:
            batches = iter(train.dataset)
        cbs.on_epoch_begin(epoch)
        totals = np.zeros(2 + len(metric_fns))
        done, rate = 0, None
        while done < train.steps and not model.stop_training:
            # The batch hooks run once per call, as model.fit runs them around
            # its executions: with the index of the call's last step, or of
            # its first step whose loss was not finite.
            n = min(per_call, train.steps - done)
            cbs.on_train_batch_begin(done)
            sums, bad, rate = steps.train_steps(batches, tf.constant(n), train.weigh_in_step)
            totals += sums.numpy()
            last = done + (int(bad) if int(bad) >= 0 else n - 1)
            done += n
            cbs.on_train_batch_end(last, steps.logs(totals))
        logs = steps.logs(totals)
        if rate is not None:
            logs["lr"] = float(rate)
        if val is not None:
            logs.update({f"val_{k}": v for k, v in _run_eval(steps, val, cbs).items()})
        cbs.on_epoch_end(epoch, logs)
        if model.stop_training:
            break
    cbs.on_train_end(logs)
    # What model.fit returns: the model's history, which a resumed fit's
    # StageCheckpoint fills with the epochs of earlier attempts too.
    return model.history


def evaluate(model: keras.Model, x, y=None, *, batch_size: int,
             metric_fns: Optional[dict] = None) -> list[float]:
    """`model.evaluate(..., verbose=0)` under every strategy: [loss, *metrics].

    Under a multi-worker strategy each worker passes its own examples and
    all get the metrics of all examples together.
    """
    strategy = model.distribute_strategy
    if not uses_custom_loop(strategy):
        if _is_dataset(x):
            return model.evaluate(x, verbose=0)
        return model.evaluate(x, y, batch_size=batch_size, verbose=0)
    metric_fns = dict(metric_fns or {})
    logs = _run_eval(_steps_for(model, metric_fns),
                     _Feed(strategy, x, y, batch_size, False, None))
    return [logs["loss"]] + [logs[k] for k in metric_fns]


def _predict_fn(model: keras.Model):
    cached = _PREDICT.get(model)
    if cached is None:
        strategy = model.distribute_strategy

        @tf.function(reduce_retracing=True)
        def step(x):
            return strategy.run(lambda a: model(a, training=False), args=(x,))

        cached = _PREDICT[model] = step
    return cached


def predict_on_batch(model: keras.Model, x):
    """`model.predict_on_batch` under every strategy, computed on this worker's devices.

    Under every strategy but the default one the batch is split over
    the local replicas; no other worker takes part, so workers may predict
    different amounts of data.

    Returns:
        What the model returns, as numpy: an array, or a list for several outputs.
    """
    strategy = model.distribute_strategy
    if not uses_custom_loop(strategy):
        return model.predict_on_batch(x)
    x = keras.ops.convert_to_numpy(x)
    devices = len(strategy.extended.worker_devices)
    pieces = np.array_split(x, devices)
    first = Distribution.of(strategy).worker_index * devices
    values = strategy.experimental_distribute_values_from_function(
        lambda ctx: tf.constant(pieces[ctx.replica_id_in_sync_group - first]))
    out = _predict_fn(model)(values)
    parts = [np.concatenate([keras.ops.convert_to_numpy(t)
                             for t in strategy.experimental_local_results(o)])
             for o in tf.nest.flatten(out)]
    return parts if isinstance(out, (list, tuple)) else parts[0]


# Arrays up to this size are padded to whole batches by copying them (`predict`).
PAD_COPY_BYTES = 256 * 2 ** 20


def predict(model: keras.Model, x, batch_size: int = 32):
    """`model.predict(x, batch_size=..., verbose=0)` under every strategy.

    Args:
        x: a dataset of input batches, or an array (batched here).
    """
    if isinstance(x, np.ndarray) and len(x) > batch_size and len(x) % batch_size:
        # A smaller last batch makes the predict function trace again (0.5 s
        # for a MobileNetV2 at 160 px): the last batch is padded with copies of
        # the last row (their predictions dropped). A small array is copied
        # whole (one predict call); a large one goes as a view of its whole
        # batches, then the padded last batch (a second call, about 0.3 s).
        n = len(x)
        pad = np.repeat(x[-1:], batch_size - n % batch_size, axis=0)
        if x.nbytes <= PAD_COPY_BYTES:
            out = predict(model, np.concatenate([x, pad]), batch_size)
            return [o[:n] for o in out] if isinstance(out, list) else out[:n]
        whole = n - n % batch_size
        outs = [predict(model, x[:whole], batch_size),
                predict(model, np.concatenate([x[whole:], pad]), batch_size)]
        if isinstance(outs[0], list):
            return [np.concatenate([a, b[:n - whole]]) for a, b in zip(*outs)]
        return np.concatenate([outs[0], outs[1][:n - whole]])
    if not uses_custom_loop(model.distribute_strategy):
        if _is_dataset(x):
            return model.predict(x, verbose=0)
        return model.predict(x, batch_size=batch_size, verbose=0)
    batches = x if _is_dataset(x) else (x[i:i + batch_size] for i in range(0, len(x), batch_size))
    outs = [predict_on_batch(model, b) for b in batches]
    if outs and isinstance(outs[0], list):
        return [np.concatenate(o) for o in zip(*outs)]
    return np.concatenate(outs) if outs else np.zeros((0,) + tuple(model.output.shape[1:]))
