"""The distribution strategy of a run: which devices, which worker, whose files.

* `create` turns --strategy/--tpu (and TF_CONFIG) into a `Distribution`:
  the tf.distribute strategy, the number of replicas and workers, whether
  this process is the chief, and where this worker keeps its own files
  (`worker_dir`). This is the one place that decides "am I the chief" and
  which folder is this worker's: outputs are written by the chief only;
  per-worker state (feature caches, resume checkpoints) goes under
  `worker_dir(OUT)`.
* `Distribution.scale` applies the stated replica-scaling rule to the batch
  size and learning rates (`--replica_scaling`).
* `Distribution.shard` gives each worker its own shard of the data, so each
  worker computes and caches only its part of the features.

The training loop that runs under every strategy is `tl_keras.train.loop`.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import os
from typing import Optional

import keras
import numpy as np
import tensorflow as tf

from tl_keras.errors import ConfigError, fail

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")
SCALING_RULES = ("sqrt", "linear", "none")
# Replica values summed across the whole cluster (counts, masks, losses).
SUM = tf.distribute.ReduceOp.SUM


# --------------------------------------------------------------------------
# TF_CONFIG
# --------------------------------------------------------------------------

def _tf_config() -> dict:
    """The parsed TF_CONFIG environment variable ({} when unset)."""
    raw = os.environ.get("TF_CONFIG", "")
    if not raw.strip():
        return {}
    try:
        conf = json.loads(raw)
    except ValueError as e:
        raise ConfigError(f"TF_CONFIG={raw[:200]!r}: not valid JSON ({e})") from None
    if not isinstance(conf, dict) or not isinstance(conf.get("cluster", {}), dict):
        raise ConfigError(f"TF_CONFIG={raw[:200]!r}: expected "
                          '{"cluster": {"worker": [...]}, "task": {"type": ..., "index": ...}}')
    return conf


def _cluster_size(conf: dict) -> int:
    cluster = conf.get("cluster", {})
    return len(cluster.get("chief", [])) + len(cluster.get("worker", []))


# --------------------------------------------------------------------------
# Strategy creation
# --------------------------------------------------------------------------

def resolve_strategy(name: str, tpu: str, num_gpus: int, cluster_size: int) -> str:
    """Maps --strategy (maybe `auto`) to a concrete strategy name.

    auto: `tpu` when --tpu names one, `multi_worker` when TF_CONFIG lists more
    than one worker, `mirrored` with more than one GPU, `default` otherwise.
    """
    if name not in STRATEGIES:
        raise fail("strategy", name, "choose one of " + ", ".join(STRATEGIES))
    if tpu and name not in ("auto", "tpu"):
        raise fail("tpu", tpu, f"names a TPU but --strategy={name}; use --strategy=tpu or auto")
    if name != "auto":
        return name
    if tpu:
        return "tpu"
    if cluster_size > 1:
        return "multi_worker"
    return "mirrored" if num_gpus > 1 else "default"


def _make_strategy(kind: str, tpu: str) -> tf.distribute.Strategy:
    if kind == "default":
        return tf.distribute.get_strategy()
    if kind == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        return tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    if kind == "mirrored":
        # All GPUs; without GPUs, every logical CPU device (one unless the
        # program split the CPU with tf.config.set_logical_device_configuration).
        devices = (tf.config.list_logical_devices("GPU")
                   or tf.config.list_logical_devices("CPU"))
        return tf.distribute.MirroredStrategy([d.name for d in devices])
    if kind == "multi_worker":
        conf = _tf_config()
        task = conf.get("task", {})
        if conf and task.get("type") not in ("chief", "worker"):
            raise ConfigError(f"TF_CONFIG task {task!r}: --strategy=multi_worker runs "
                              "'chief' and 'worker' tasks only")
        try:
            return tf.distribute.MultiWorkerMirroredStrategy()
        except (RuntimeError, ValueError) as e:
            raise fail("strategy", kind, f"cannot start: {' '.join(str(e).split())[:300]} "
                       "(it must be created before TensorFlow runs anything)") from None
    if kind == "tpu":
        try:
            resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or "local")
            tf.config.experimental_connect_to_cluster(resolver)
            tf.tpu.experimental.initialize_tpu_system(resolver)
            return tf.distribute.TPUStrategy(resolver)
        except Exception as e:  # noqa: BLE001 - any failure to reach the TPU is one message
            raise fail("tpu", tpu or "local",
                       f"cannot connect to the TPU: {' '.join(str(e).split())[:300]}") from None
    raise fail("strategy", kind, "choose one of " + ", ".join(STRATEGIES))


def uses_custom_loop(strategy: tf.distribute.Strategy) -> bool:
    """Whether `fit`/`evaluate`/`predict` use the strategy-aware loop (not Keras's).

    Every strategy but the default one does: besides keras-team/keras#20585
    under MultiWorkerMirroredStrategy, `model.fit` under any strategy passes
    its dataset through `experimental_distribute_dataset`, which reshuffles
    it in another order than the same seed gives on the default strategy.
    """
    return _kind_of(strategy) in ("one_device", "mirrored", "multi_worker", "tpu")


def _kind_of(strategy: tf.distribute.Strategy) -> str:
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return "multi_worker"
    if isinstance(strategy, tf.distribute.TPUStrategy):
        return "tpu"
    if isinstance(strategy, tf.distribute.MirroredStrategy):
        return "mirrored"
    if isinstance(strategy, tf.distribute.OneDeviceStrategy):
        return "one_device"
    return "default"


@dataclasses.dataclass
class Distribution:
    """The strategy of a run and this process's place in it.

    Attributes:
        strategy: the tf.distribute strategy (the default strategy for `default`).
        kind: default | one_device | mirrored | multi_worker | tpu.
        num_replicas: replicas in sync (devices taking part in each step).
        num_workers: worker processes (1 except under multi_worker).
        worker_index: this worker's position, 0..num_workers-1 (the chief is 0).
        task: this worker's TF_CONFIG task as "type-index" ("" without TF_CONFIG).
        is_chief: whether this process writes the run's outputs.
        scaling: the --replica_scaling rule applied by `scale`.
    """

    strategy: tf.distribute.Strategy
    kind: str
    num_replicas: int
    num_workers: int
    worker_index: int
    task: str
    is_chief: bool
    scaling: str = "none"
    # (batch_size, head_learning_rate, finetune_learning_rate) before `scale`.
    _active: bool = dataclasses.field(default=False, repr=False, compare=False)

    @classmethod
    def of(cls, strategy: tf.distribute.Strategy, scaling: str = "none") -> "Distribution":
        """Describes `strategy` (e.g. the one in scope: `tf.distribute.get_strategy()`)."""
        kind = _kind_of(strategy)
        workers, index, task, chief = 1, 0, "", True
        if kind == "multi_worker":
            resolver = strategy.cluster_resolver
            spec = resolver.cluster_spec().as_dict()
            n_chief = len(spec.get("chief", []))
            workers = max(n_chief + len(spec.get("worker", [])), 1)
            if resolver.task_type:
                task = f"{resolver.task_type}-{resolver.task_id}"
                # MultiWorkerMirroredStrategy's own order: the chief first, then workers.
                index = (0 if resolver.task_type == "chief"
                         else n_chief + int(resolver.task_id))
                chief = index == 0
        return cls(strategy, kind, int(strategy.num_replicas_in_sync), workers, index, task,
                   chief, scaling)

    def activate(self) -> None:
        """Enters the strategy's scope until `deactivate` (a `with scope()` that
        can end before the block does: training runs inside the scope, saving and
        exporting outside it, where a reloaded SavedModel gets plain variables)."""
        if self.kind != "default" and not self._active:
            tf.distribute.experimental_set_strategy(self.strategy)
            self._active = True

    def deactivate(self) -> None:
        """Leaves the scope entered by `activate` (no-op otherwise)."""
        if self._active:
            tf.distribute.experimental_set_strategy(None)
            self._active = False

    @contextlib.contextmanager
    def scope(self):
        """`activate` for the block, `deactivate` after it (also on errors).

        The block may call `deactivate` itself to leave the scope early (to
        save and export with plain variables); leaving twice is harmless.
        """
        self.activate()
        try:
            yield self
        finally:
            self.deactivate()

    def worker_dir(self, out: str) -> str:
        """Where this worker keeps its own files (caches, resume state).

        The chief uses OUT itself; other workers use OUT/workers/TASK, so
        workers that share a file system never write the same file and the
        outputs in OUT are the chief's alone.
        """
        if self.is_chief:
            return out
        return os.path.join(out, "workers", self.task or f"worker-{self.worker_index}")

    def shard(self, split):
        """This worker's shard of a `data.Split` (every num_workers-th example)."""
        if self.num_workers == 1:
            return split
        return split.subset(range(self.worker_index, len(split), self.num_workers))

    def cache_key(self) -> dict:
        """Extra cache-key parts: a worker's shard is its own cache entry."""
        return {} if self.num_workers == 1 else {"shard": [self.worker_index, self.num_workers]}

    def precision(self, name: str) -> str:
        """--precision for this strategy: `auto` means bfloat16 on TPUs."""
        return "mixed_bfloat16" if name == "auto" and self.kind == "tpu" else name

    def scale(self, cfg):
        """Applies the replica-scaling rule to a Config.

        With N replicas, `sqrt` (the default) makes --batch_size the batch of
        each replica (global batch = batch_size x N) and multiplies the
        learning rates by sqrt(N), the square-root rule for Adam-type
        optimizers (Malladi et al., 2022); `linear` multiplies them by N (the
        rule of Goyal et al., 2017, for SGD); `none` keeps both as given, and
        --batch_size is the global batch, split evenly over the replicas.
        """
        n = self.num_replicas
        if self.scaling == "none" or n == 1:
            if cfg.batch_size % n:
                raise fail("batch_size", cfg.batch_size,
                           f"must be a multiple of the {n} replicas with --replica_scaling=none")
            return cfg
        factor = math.sqrt(n) if self.scaling == "sqrt" else float(n)
        return cfg.replace(batch_size=cfg.batch_size * n,
                           head_learning_rate=cfg.head_learning_rate * factor,
                           finetune_learning_rate=cfg.finetune_learning_rate * factor)

    def barrier(self) -> None:
        """Waits until every worker gets here (a no-op with one worker)."""
        if self.num_workers > 1:
            gather_counts(self.strategy, 0)

    def describe(self, model: Optional[keras.Model] = None, cfg=None) -> dict:
        """The report block: strategy, replicas, workers, effective settings."""
        d = {"strategy": self.kind, "replicas": self.num_replicas, "workers": self.num_workers,
             "worker_index": self.worker_index, "replica_scaling": self.scaling}
        if cfg is not None:
            d.update(global_batch_size=cfg.batch_size,
                     head_learning_rate=cfg.head_learning_rate,
                     finetune_learning_rate=cfg.finetune_learning_rate)
        if model is not None:
            d["weights_fingerprint"] = weights_fingerprint(model)
        return d

    def __str__(self) -> str:
        where = (f", worker {self.worker_index + 1}/{self.num_workers} ({self.task}"
                 f"{', chief' if self.is_chief else ''})") if self.num_workers > 1 else ""
        return f"{self.kind}: {self.num_replicas} replica(s){where}"


def create(strategy: str = "auto", tpu: str = "", replica_scaling: str = "sqrt") -> Distribution:
    """Creates the strategy named by --strategy / --tpu / --replica_scaling.

    Call it before anything else runs TensorFlow ops: MultiWorkerMirroredStrategy
    must configure collective ops before TensorFlow initializes, and a TPU
    must be connected before its devices are used.

    Raises:
        ConfigError: a bad value, a bad TF_CONFIG, or a TPU that cannot be reached.
    """
    if replica_scaling not in SCALING_RULES:
        raise fail("replica_scaling", replica_scaling,
                   "choose one of " + ", ".join(SCALING_RULES))
    if strategy not in STRATEGIES:
        raise fail("strategy", strategy, "choose one of " + ", ".join(STRATEGIES))
    conf = _tf_config() if strategy in ("auto", "multi_worker") else {}
    num_gpus = len(tf.config.list_physical_devices("GPU")) if strategy == "auto" else 0
    kind = resolve_strategy(strategy, tpu, num_gpus, _cluster_size(conf))
    return Distribution.of(_make_strategy(kind, tpu), replica_scaling)


def require_one_device(strategy: str, tpu: str, what: str) -> None:
    """Refuses --strategy / --tpu for what trains on one device only.

    Args:
        strategy, tpu: the --strategy and --tpu values.
        what: the command or mode, for the message (e.g. "--task=text").

    Raises:
        ConfigError: a strategy other than auto/default, or a TPU.
    """
    if strategy not in ("auto", "default"):
        raise fail("strategy", strategy, f"{what} trains on one device (auto or default)")
    if tpu:
        raise fail("tpu", tpu, f"{what} trains on one device; drop --tpu")


def current() -> Distribution:
    """The Distribution of the strategy in scope (the default one outside any scope)."""
    return Distribution.of(tf.distribute.get_strategy())


def weights_fingerprint(model: keras.Model) -> str:
    """A short hash of all weight values: equal on workers that hold equal weights."""
    h = hashlib.sha256()
    for v in model.weights:
        h.update(np.ascontiguousarray(keras.ops.convert_to_numpy(v)).tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------
# Cross-worker counts
# --------------------------------------------------------------------------

def gather_counts(strategy: tf.distribute.Strategy, local: int) -> np.ndarray:
    """Every worker's `local` value, in worker order (a collective: all workers call it)."""
    dist = Distribution.of(strategy)
    local_replicas = len(strategy.extended.worker_devices)
    onehot = np.zeros(dist.num_workers, np.float64)
    onehot[dist.worker_index] = float(local) / local_replicas

    @tf.function
    def gather():
        per_replica = strategy.run(lambda: tf.constant(onehot))
        return strategy.reduce(SUM, per_replica, axis=None)

    return np.rint(gather().numpy()).astype(np.int64)


def steps_per_epoch(n_local: int, global_batch: int) -> int:
    """Training steps in one pass over the data, under the strategy in scope.

    Each worker passes over its own `n_local` examples, global_batch /
    num_workers per step; the epoch lasts as long as the largest shard.
    """
    dist = current()
    if dist.num_workers == 1:
        return max(1, math.ceil(n_local / global_batch))
    biggest = int(gather_counts(dist.strategy, n_local).max())
    return max(1, math.ceil(biggest * dist.num_workers / global_batch))


def local_share(n_global: int) -> int:
    """This worker's share of `n_global` examples (all of them with one worker)."""
    return -(-n_global // current().num_workers)


def local_batch_size(global_batch: int) -> int:
    """This worker's share of a global batch, under the strategy in scope.

    A dataset given to `fit` under a multi-worker strategy must be batched at
    this size (each worker's input pipeline makes its part of every step),
    endless streams (`train.view_stream`) included.
    """
    return max(1, global_batch // current().num_workers)
