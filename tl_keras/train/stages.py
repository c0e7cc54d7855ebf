"""The two training stages: compile and fit.

Stage 1 fits the head on cached pooled features (the backbone is frozen, so
its features are a fixed function of the image view). Stage 2 fits the full
model with the top blocks unfrozen, at a low learning rate with linear warmup
and cosine decay; BatchNorm stays frozen and in inference mode.
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Callable, Optional

import keras
import numpy as np
import tensorflow as tf

from tl_keras.data import pipeline as data_pipeline
from tl_keras.train import loop as loop_lib
from tl_keras.train import strategy as strategy_lib


@dataclasses.dataclass
class StageResult:
    """What one stage did.

    Attributes:
        epochs: epochs run.
        best_epoch: 1-based epoch (counted across stages) whose weights were kept.
        seconds: wall time of the fit.
        val_accuracy / val_loss: of the kept weights.
        history: per-epoch logs (loss, accuracy, val_loss, val_accuracy, lr).
    """

    epochs: int
    best_epoch: int
    seconds: float
    val_accuracy: float
    val_loss: float
    history: dict

    def summary(self) -> dict:
        """JSON-able figures (validation ones None for a stage run without validation)."""
        def measured(v):
            return None if v is None or np.isnan(v) else v

        return {"epochs": self.epochs, "best_epoch": self.best_epoch,
                "seconds": round(self.seconds, 2), "val_accuracy": measured(self.val_accuracy),
                "val_loss": measured(self.val_loss)}


def snapshot(model: keras.Model) -> list[np.ndarray]:
    """The values of every weight of `model` (to put back with `restore`)."""
    return [v.numpy() for v in model.weights]


def restore(model: keras.Model, values: list[np.ndarray]) -> None:
    """Puts back weights taken by `snapshot`."""
    for v, a in zip(model.weights, values):
        v.assign(a)


def stage2_is_better(s1: StageResult, s2: StageResult) -> bool:
    """Whether to keep fine-tuning's weights: fine-tuning can hurt on small
    data, so the stage that validates better wins (accuracy first, loss breaks
    ties; stage 2 on a tie)."""
    return (s2.val_accuracy, -s2.val_loss) >= (s1.val_accuracy, -s1.val_loss)


def keep_better(model: keras.Model, s1: StageResult, s2: StageResult,
                stage1_weights: list[np.ndarray]) -> str:
    """Keeps stage 2's weights when it validates better (`stage2_is_better`),
    else puts stage 1's back into `model`; returns "stage1" or "stage2"."""
    if stage2_is_better(s1, s2):
        return "stage2"
    restore(model, stage1_weights)
    return "stage1"


def _loss(multi_label: bool, label_smoothing: float):
    if multi_label:
        return keras.losses.BinaryCrossentropy(label_smoothing=label_smoothing)
    return keras.losses.CategoricalCrossentropy(label_smoothing=label_smoothing)


def _metrics(multi_label: bool):
    if multi_label:
        return [keras.metrics.BinaryAccuracy(name="accuracy")]
    return [keras.metrics.CategoricalAccuracy(name="accuracy")]


def _metric_fns(model) -> dict:
    """The per-example form of `_metrics`, for the strategy-aware loop (distribute.py)."""
    if isinstance(model.loss, keras.losses.BinaryCrossentropy):
        return {"accuracy": keras.metrics.binary_accuracy}
    return {"accuracy": keras.metrics.categorical_accuracy}


class _LearningRateLogger(keras.callbacks.Callback):
    """Adds the optimizer's current learning rate to each epoch's logs
    (`loop_lib.fit`'s own loop reads it in its step function already)."""

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None and "lr" not in logs:
            logs["lr"] = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))


class CachedValidation(keras.callbacks.Callback):
    """Validation on cached arrays at each epoch's end, in one traced function.

    What `model.fit(validation_data=...)` logs, without its per-epoch
    `evaluate`: Keras builds an evaluation loop and its callbacks on every
    epoch, about 35 ms here, more than a small head's whole epoch (a head fit
    of 40 epochs on cached features took 3.2-3.6 s with it and 1.9-2.4 s with
    this, same process). Logs `val_loss` (the compiled loss, mean over the
    examples, plus any regularization losses, as `evaluate` computes it) and
    `val_<name>` for each per-example metric in `metric_fns`. Put it before
    the callbacks that read those logs (early stopping, checkpoints).

    Arrays in RAM (up to `IN_GRAPH_BYTES`) become tensors once; a
    memory-mapped or larger cache is read slice by slice on every call.

    For the default strategy only: under the strategy-aware loop each worker
    holds its own rows, and `loop_lib.fit` validates across them.

    Args:
        x / y: validation inputs and targets (arrays, possibly memory-mapped).
        batch_size: rows per call (any size; one trace serves them all).
        metric_fns: name -> per-example metric (see `_metric_fns`).
    """

    def __init__(self, x, y, batch_size: int, metric_fns: dict):
        super().__init__()
        self.x, self.y, self.batch_size = x, y, max(int(batch_size), 1)
        self.metric_fns = dict(metric_fns)
        self._fn = None
        self._held = None  # the slices as tensors, for arrays held in RAM

    def _sums(self):
        model = self.model
        spec = [tf.TensorSpec((None,) + tuple(a.shape[1:]), tf.as_dtype(a.dtype))
                for a in (self.x, self.y)]

        @tf.function(input_signature=spec, autograph=False)  # no tensor-dependent Python here
        def sums(x, y):
            p = model(x, training=False)
            n = tf.cast(tf.shape(x)[0], tf.float32)
            loss = tf.cast(model.loss(y, p), tf.float32)
            if model.losses:
                loss += tf.add_n([tf.cast(v, tf.float32) for v in model.losses])
            return tf.stack([loss * n] + [tf.reduce_sum(tf.cast(f(y, p), tf.float32))
                                          for f in self.metric_fns.values()])

        return sums

    def _slices(self):
        if self._held is not None:
            return self._held
        parts = ((np.asarray(self.x[i:i + self.batch_size]),
                  np.asarray(self.y[i:i + self.batch_size]))
                 for i in range(0, len(self.x), self.batch_size))  # read as they are used
        if not isinstance(self.x, np.memmap) and self.x.nbytes + self.y.nbytes <= IN_GRAPH_BYTES:
            # Converted once: a head's epoch is short enough for the copy to show.
            self._held = parts = [tuple(tf.convert_to_tensor(a) for a in p) for p in parts]
        return parts

    def evaluate(self) -> dict:
        """{"loss": ..., name: ...} of the model's current weights."""
        if self._fn is None:
            self._fn = self._sums()
        totals = np.zeros(1 + len(self.metric_fns))
        for x, y in self._slices():
            totals += self._fn(x, y).numpy()
        totals /= max(len(self.x), 1)
        return dict(zip(["loss", *self.metric_fns], totals.tolist()))

    def on_epoch_end(self, epoch, logs=None):
        if logs is not None:
            logs.update({f"val_{k}": v for k, v in self.evaluate().items()})


# Validation inputs per call of `CachedValidation`: a head's features in one
# call (each call costs about 1 ms besides its work); stage 2's activations
# in a few.
VALIDATION_CALL_BYTES = 16 * 2 ** 20


def _validation(model: keras.Model, val, batch_size: int):
    """(validation_data for fit, callbacks, evaluate() -> (loss, accuracy)).

    `val` is (x, y) cached arrays or a batched dataset. Arrays validate with a
    `CachedValidation` under the default strategy; a dataset, or arrays under
    the strategy-aware loop, with that loop's or Keras's own validation.
    """
    fns = _metric_fns(model)
    if isinstance(val, tuple):
        if not strategy_lib.uses_custom_loop(model.distribute_strategy):
            row = max(val[0][:1].nbytes, 1)
            check = CachedValidation(val[0], val[1],
                                     max(2 * batch_size, VALIDATION_CALL_BYTES // row), fns)

            def evaluate():
                logs = check.evaluate()
                return logs["loss"], logs["accuracy"]

            return None, [check], evaluate
        val = array_batches(val[0], val[1], strategy_lib.local_batch_size(batch_size))

    def evaluate():
        return tuple(loop_lib.evaluate(model, val, batch_size=batch_size,
                                         metric_fns=fns)[:2])

    return val, [], evaluate


def jit_setting(value: str, log: Optional[Callable[[str], None]] = None):
    """--jit_compile value -> Keras compile argument ("auto", True or False).

    With `log`, warns when XLA is forced on a machine with no GPU or TPU,
    where it measured several times slower than TensorFlow's own kernels
    (Keras's "auto" leaves it off there).
    """
    v = str(value).lower()
    if v == "true" and log is not None and not (tf.config.list_physical_devices("GPU")
                                                or tf.config.list_physical_devices("TPU")):
        log("--jit_compile=true without a GPU or TPU: XLA on a CPU measured 5x slower for the "
            "head and 7x for stage 2 than without it; --jit_compile=auto leaves it off on CPUs")
    return "auto" if v == "auto" else v == "true"


def _is_xla_failure(e: Exception) -> bool:
    text = f"{type(e).__name__} {e}"
    return any(s in text for s in ("XLA", "xla", "jit_compile", "JIT compilation"))


def _create_state(model: keras.Model, x) -> None:
    """Creates the optimizer's and the compiled metrics' variables before fit.

    Without a distribution strategy, Keras creates them while tracing the
    first training step, and TensorFlow then traces that step a second time.
    Stage 2's first epoch on MobileNetV2-0.35's top 8 blocks (trace and 18
    steps, interleaved in one process) took 7.5 / 5.6 / 8.5 s that way and
    3.8 / 4.5 / 3.4 s with the variables made here. Under a strategy Keras
    creates them itself before tracing.

    Args:
        model: compiled.
        x: the training inputs: an array, or a dataset of (inputs, targets)
            batches.
    """
    if tf.distribute.has_strategy():
        return
    shape = tuple(model.input_shape[1:])
    if any(d is None for d in shape):  # no one example shape: leave it to Keras
        return
    dtype = (x.element_spec[0].dtype.name if isinstance(x, tf.data.Dataset)
             else np.dtype(x.dtype).name)
    xb = np.zeros((1,) + shape, dtype)
    y_pred = model(xb, training=False)
    model.optimizer.build(model.trainable_variables)
    # Targets are one-hot or multi-hot rows shaped like the predictions.
    model.compute_metrics(xb, keras.ops.zeros_like(y_pred), y_pred, sample_weight=None)
    model.reset_metrics()


def fit_model(model, x, y, validation_data, epochs, batch_size, patience, initial_epoch, callbacks,
         class_weight=None, verbose=2, steps_per_epoch=None,
         global_batch=None, own_loop=False) -> tuple[dict, int, float]:
    """Fits with early stopping on val_loss; returns (history, best epoch 1-based, seconds).

    When XLA cannot compile the step (an unsupported op), the model is
    recompiled without XLA and the fit runs again, with a message saying so.
    """
    try:
        return _fit_once(model, x, y, validation_data, epochs, batch_size, patience,
                         initial_epoch, callbacks, class_weight, verbose, steps_per_epoch,
                         global_batch, own_loop)
    except Exception as e:  # noqa: BLE001 - only XLA failures are retried
        if not (model.jit_compile and _is_xla_failure(e)):
            raise
        first = " ".join(str(e).split())[:160]
        print(f"[tl_keras] XLA could not compile this model ({first}); "
              "continuing without --jit_compile", flush=True)
        model.compile(optimizer=model.optimizer, loss=model.loss,
                      metrics=_metrics_like(model), jit_compile=False,
                      steps_per_execution=model.steps_per_execution)
        return _fit_once(model, x, y, validation_data, epochs, batch_size, patience,
                         initial_epoch, callbacks, class_weight, verbose, steps_per_epoch,
                         global_batch, own_loop)


def _metrics_like(model):
    multi = isinstance(model.loss, keras.losses.BinaryCrossentropy)
    return _metrics(multi)


def _fit_once(model, x, y, validation_data, epochs, batch_size, patience, initial_epoch,
              callbacks, class_weight, verbose, steps_per_epoch=None,
              global_batch=None, own_loop=False) -> tuple[dict, int, float]:
    checks = [c for c in callbacks or [] if isinstance(c, CachedValidation)]
    validated = validation_data is not None or bool(checks)
    stop = keras.callbacks.EarlyStopping(monitor="val_loss", patience=max(patience, 1),
                                         restore_best_weights=True)
    if not patience:
        stop.patience = epochs + 1  # patience 0: never stop early, still keep the best
    # Validation first: early stopping and the checkpoints read its logs.
    # Without validation (a fixed schedule, see `fit_finetune`) the last
    # epoch's weights are the result.
    cbs = checks + ([stop] if validated else []) + [_LearningRateLogger()] + [
        c for c in callbacks or [] if c not in checks]
    for c in cbs:  # a resumable fit (resume.StageCheckpoint) saves and restores its state
        if validated and hasattr(c, "track_early_stopping"):
            c.track_early_stopping(stop)
    t0 = time.perf_counter()
    # loop_lib.fit is this very model.fit call under the default strategy,
    # or a loop driving the same callbacks where the strategy needs one
    # (one-device, mirrored, multi-worker, TPU).
    hist = loop_lib.fit(model, x, y, batch_size=batch_size, epochs=initial_epoch + epochs,
                          initial_epoch=initial_epoch, validation_data=validation_data,
                          callbacks=cbs, verbose=verbose, class_weight=class_weight,
                          steps_per_epoch=steps_per_epoch,
                          # A tf.data input is shuffled by its own pipeline; Keras
                          # only warns when asked to shuffle it again.
                          shuffle=not isinstance(x, tf.data.Dataset),
                          metric_fns=_metric_fns(model), global_batch=global_batch,
                          own_loop=own_loop)
    seconds = time.perf_counter() - t0
    # Keras numbers epochs absolutely (from initial_epoch), 0-based.
    last = initial_epoch + len(hist.history.get("loss", [])) - 1
    best = stop.best_epoch if validated and stop.best_epoch is not None else last
    return hist.history, best + 1, seconds


# Cached arrays up to this size stream from a tensor (see `view_stream`);
# larger ones, and memory-mapped ones, through numpy one batch at a time.
IN_GRAPH_BYTES = 512 * 2 ** 20


def view_stream(x: np.ndarray, y: np.ndarray, batch_size: int, seed: int = 0
                ) -> tf.data.Dataset:
    """An endless stream of shuffled batches drawn from cached arrays.

    With K cached views per image, an epoch is one pass over the training
    images, not over all K views: each epoch sees about one view of every
    image, so extra views add augmentation without multiplying the cost of
    an epoch. Rows are gathered by index, so a memory-mapped cache is read
    batch by batch and never copied whole into the graph.

    Args:
        x: [N, ...] cached inputs (features or activations), possibly memory-mapped.
        y: [N, C] targets.
        batch_size: rows per batch.
        seed: shuffle seed (the order is reproducible).

    Returns:
        A repeating dataset of (x, y) batches; pass `steps_per_epoch` to fit.
    """
    n = len(x)
    order = (tf.data.Dataset.range(n).shuffle(n, seed=seed, reshuffle_each_iteration=True)
             .repeat().batch(batch_size))
    if not isinstance(x, np.memmap) and x.nbytes + y.nbytes <= IN_GRAPH_BYTES:
        # Arrays in RAM are gathered by TensorFlow itself: no Python call per
        # batch (a 40-epoch head fit: 1.7-1.8 s instead of 1.9-2.4 s).
        xt, yt = tf.convert_to_tensor(x), tf.convert_to_tensor(y)

        @tf.autograph.experimental.do_not_convert  # plain ops: skip autograph's transpiling
        def take(idx):
            idx = tf.sort(idx)  # the same rows in the same order as the numpy path
            return tf.gather(xt, idx), tf.gather(yt, idx)

        return data_pipeline.steady(order.map(take).prefetch(tf.data.AUTOTUNE))

    def gather(idx):
        idx = np.sort(idx)  # in-order reads of a memory-mapped file
        return np.asarray(x[idx]), np.asarray(y[idx])

    return data_pipeline.steady(order.map(_rows_op(x, y, gather)).prefetch(tf.data.AUTOTUNE))


def array_batches(x: np.ndarray, y: np.ndarray, batch_size: int) -> tf.data.Dataset:
    """The rows of cached arrays as ordered (x, y) batches, one pass.

    For validation: Keras rebuilds its own pipeline around numpy arrays on
    every epoch (about 0.1 s each, more than a small head's whole epoch);
    this one is built once, and gathers slices, so a memory-mapped cache is
    read batch by batch.
    """
    n = len(x)

    def gather(start):
        return np.asarray(x[start:start + batch_size]), np.asarray(y[start:start + batch_size])

    return data_pipeline.steady(tf.data.Dataset.range(0, n, batch_size)
                           .map(_rows_op(x, y, gather)).prefetch(tf.data.AUTOTUNE))


def _rows_op(x: np.ndarray, y: np.ndarray, gather):
    """A tf.data map function: `gather(key) -> (x rows, y rows)` run as a numpy
    function, its outputs typed and shaped like `x` and `y` (batch unknown)."""

    @tf.autograph.experimental.do_not_convert  # see data._decoded
    def load(key):
        bx, by = tf.numpy_function(gather, [key], (tf.as_dtype(x.dtype), tf.as_dtype(y.dtype)))
        bx.set_shape((None,) + tuple(x.shape[1:]))
        by.set_shape((None,) + tuple(y.shape[1:]))
        return bx, by

    return load


def _steps_per_call(steps_per_epoch: Optional[int], most: int = 64, divide: bool = True) -> int:
    """Training steps per compiled call: a small head's step costs less than
    the Python round trip around it, so several run in one call. With
    `divide`, a divisor of the epoch's steps, so that no epoch of model.fit
    runs past its end; `loop_lib.fit`'s own loop cuts an epoch's last call
    short itself, so up to `most` (an epoch of 67 steps: 64 and 3, not 67 calls)."""
    if not steps_per_epoch:
        return 1
    if not divide:
        return min(most, steps_per_epoch)
    return max(d for d in range(1, min(most, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def _epochs_of(x, y, batch_size, examples_per_epoch, seed):
    """(x, y, batch_size, steps_per_epoch) for fit: the arrays themselves when
    an epoch is a full pass, else a `view_stream` and its steps per epoch.

    `batch_size` and `examples_per_epoch` are global (all workers together);
    `x` and `y` are this worker's rows. Under a multi-worker strategy each
    worker streams its share of every global batch, and the steps are counted
    from the global examples, so every worker takes the same number.
    """
    if not examples_per_epoch or strategy_lib.local_share(examples_per_epoch) >= len(x):
        return x, y, batch_size, None
    return (view_stream(x, y, strategy_lib.local_batch_size(batch_size), seed), None, None,
            math.ceil(examples_per_epoch / batch_size))


@dataclasses.dataclass(frozen=True)
class StageSpec:
    """How one stage trains: schedule, stopping, loss and batching.

    Attributes:
        epochs: maximum epochs; early stopping on val_loss keeps the best.
        learning_rate: peak learning rate (stage 1: AdamW with cosine decay;
            stage 2: Adam, linear warmup then cosine decay).
        batch_size: global batch size.
        patience: epochs without val_loss improvement before stopping.
        label_smoothing: of the cross-entropy loss (single-label runs).
        weight_decay: AdamW decoupled weight decay (stage 1).
        warmup_epochs: linear warmup length (stage 2).
        multi_label: sigmoid outputs and binary cross-entropy.
        class_weight: {class index: weight}, or None.
        jit_compile: XLA setting passed to `compile` ("auto", True, False).
        seed: shuffle seed of the view stream.
    """

    epochs: int
    learning_rate: float
    batch_size: int = 32
    patience: int = 8
    label_smoothing: float = 0.0
    weight_decay: float = 0.0
    warmup_epochs: int = 0
    multi_label: bool = False
    class_weight: Optional[dict] = None
    jit_compile: object = "auto"
    seed: int = 0


def fit_head(head: keras.Model, train_features: np.ndarray, train_targets: np.ndarray,
             val_features: np.ndarray, val_targets: np.ndarray, spec: StageSpec, *,
             callbacks=(), verbose: int = 2,
             examples_per_epoch: Optional[int] = None) -> StageResult:
    """Stage 1: trains the head on cached features.

    Args:
        head: features -> probabilities (its layers are the full model's head).
        train_features: [N, D] pooled features (all cached views).
        train_targets: [N, C] one-hot (or multi-hot) targets.
        val_features / val_targets: the validation split, same form.
        spec: epochs, learning rate, weight decay, patience, loss, batching.
        callbacks: Keras callbacks added to the stage's own.
        examples_per_epoch: rows one epoch trains on (the number of training
            images when `train_features` holds several views of each; see
            `view_stream`); None: every row, every epoch.

    Returns:
        The StageResult; the head holds the best weights.
    """
    epochs, batch_size = spec.epochs, spec.batch_size
    x, y, bs, per_epoch = _epochs_of(train_features, train_targets, batch_size,
                                     examples_per_epoch, spec.seed)
    epoch_steps = per_epoch or strategy_lib.steps_per_epoch(len(train_features), batch_size)
    schedule = keras.optimizers.schedules.CosineDecay(
        spec.learning_rate, decay_steps=epoch_steps * max(epochs, 1), alpha=0.01)
    # Whole epochs per compiled call, in loop_lib.fit's own loop (`own_loop`
    # below) under the default strategy as under the others: the same
    # weights as model.fit, bit for bit (the seed-42 flowers fingerprint did
    # not change), without its per-epoch work.
    head.compile(optimizer=keras.optimizers.AdamW(schedule, weight_decay=spec.weight_decay),
                 loss=_loss(spec.multi_label, spec.label_smoothing),
                 metrics=_metrics(spec.multi_label), jit_compile=spec.jit_compile,
                 steps_per_execution=_steps_per_call(epoch_steps, divide=False))
    val, checks, evaluate = _validation(head, (val_features, val_targets), batch_size)
    history, best_epoch, seconds = fit_model(
        head, x, y, val, epochs, bs, spec.patience, 0, checks + list(callbacks),
        class_weight=spec.class_weight, verbose=verbose, steps_per_epoch=per_epoch,
        global_batch=batch_size, own_loop=True)
    val_loss, val_acc = evaluate()
    return StageResult(len(history["loss"]), best_epoch, seconds, float(val_acc),
                       float(val_loss), history)


def fit_finetune(model: keras.Model, train_data, val_data, spec: StageSpec, *,
                 initial_epoch: int, steps_per_epoch: int, callbacks=(),
                 verbose: int = 2) -> StageResult:
    """Stage 2: fine-tunes the unfrozen top blocks and the head.

    The model must already have its top blocks unfrozen (see
    `backbones.set_trainable_top_blocks`); this recompiles it, as Keras
    requires after changing `trainable`.

    Args:
        model: the full model, or the top part of it that trains on cached
            activations (see `activations.cut`).
        train_data / val_data: batched (inputs, targets) tf.data datasets
            (training batches augmented by the pipeline), or (x, y) arrays
            of cached activations, batched here with `spec.batch_size`.
            `val_data` None: no validation; the stage runs its whole
            schedule and keeps the last weights (`val_accuracy`/`val_loss`
            are NaN).
        spec: epochs, peak learning rate after warmup, warmup, patience,
            loss, batching.
        initial_epoch: epochs already run by stage 1 (numbering continues).
        steps_per_epoch: batches per epoch (for the schedule); with arrays
            holding several views per image, fewer than a full pass: each
            epoch then draws that many batches from `view_stream`.
        callbacks: Keras callbacks added to the stage's own.

    Returns:
        The StageResult; the model holds the best weights of this stage.
    """
    epochs, batch_size, learning_rate = spec.epochs, spec.batch_size, spec.learning_rate
    total = max(steps_per_epoch * epochs, 1)
    warmup = min(steps_per_epoch * spec.warmup_epochs, total - 1)
    schedule = keras.optimizers.schedules.CosineDecay(
        0.0 if warmup else learning_rate, decay_steps=total - warmup, alpha=0.0,
        warmup_target=learning_rate if warmup else None, warmup_steps=warmup)
    per_epoch = None
    if isinstance(train_data, tuple):
        x, y, bs, per_epoch = _epochs_of(train_data[0], train_data[1], batch_size,
                                         steps_per_epoch * batch_size, spec.seed)
    else:
        x, y, bs = train_data, None, None
    model.compile(optimizer=keras.optimizers.Adam(schedule),
                  loss=_loss(spec.multi_label, spec.label_smoothing),
                  metrics=_metrics(spec.multi_label), jit_compile=spec.jit_compile,
                  steps_per_execution=_steps_per_call(per_epoch))
    _create_state(model, train_data[0] if isinstance(train_data, tuple) else train_data)
    if val_data is None:  # a fixed schedule: no early stopping, the last weights kept
        checks = []

        def evaluate():
            return float("nan"), float("nan")
    else:
        val_data, checks, evaluate = _validation(model, val_data, batch_size)
    history, best_epoch, seconds = fit_model(model, x, y, val_data, epochs, bs, spec.patience,
                                             initial_epoch, checks + list(callbacks),
                                             class_weight=spec.class_weight, verbose=verbose,
                                             steps_per_epoch=per_epoch, global_batch=batch_size)
    val_loss, val_acc = evaluate()
    return StageResult(len(history["loss"]), best_epoch, seconds,
                       float(val_acc), float(val_loss), history)
