"""Resuming an interrupted run: what it finished, and where each fit stopped.

Rerunning the same command after a crash or `kill -9` continues the run in
OUTPUT_DIR instead of starting over:

    OUT/state.json              what the run has finished, keyed by its settings
    OUT/checkpoints/stage1/     the stage-1 fit, saved at the end of every epoch
    OUT/checkpoints/stage2/     the same for stage 2

* Each fit carries a `StageCheckpoint` (a `keras.callbacks.BackupAndRestore`
  whose files are written atomically and hang together): weights with the
  optimizer's state (so the learning-rate schedule, which counts optimizer
  steps, goes on where it was), the per-epoch history and the early-stopping
  state including its best weights. A resumed fit starts at the epoch after
  the last one saved; a finished fit runs no epoch and only restores.
* Evaluation and export results are recorded in state.json once done.
* Cached features and activations live in their own keyed cache
  (`cache.py`), which recomputes unreadable entries.
* A finished run that is rerun unchanged does nothing and returns its report.

The state is keyed by the settings that change what the run computes (the
resolved Config without `IGNORED_FIELDS`) and by fingerprints of its inputs
(data splits, weights file). Policy when they differ from the state's:
an *unfinished* run is never resumed with other training settings nor
silently discarded: the run stops with a one-line error that names the
changed flags and suggests --restart (or another --output_dir). A
*finished* run (which keeps no checkpoints) is replaced by a new one, as a
plain rerun always did. Flags that only change evaluation or export
(`EVAL_FIELDS`) keep an interrupted run's finished stages and redo
evaluation and export. --restart deletes state.json and
checkpoints/ first (never caches, data or the outputs of a finished run,
which the new run replaces atomically at its end).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Callable, Optional

import keras
import numpy as np

from tl_keras.config import Config
from tl_keras.core import cache as cache_lib
from tl_keras.core import outputs
from tl_keras.errors import fail
from tl_keras.train import guards

STATE_FILE = "state.json"
CHECKPOINTS = "checkpoints"
LOCK_FILE = ".lock"
_VERSION = 1

# Settings that do not change what a run computes: where things go, how
# fast they are computed, whether progress is logged. (XLA and the frozen-pass
# engine change float rounding, within tested tolerances, as another CPU does.)
IGNORED_FIELDS = ("output_dir", "cache_dir", "cache_ram_mb", "jit_compile", "frozen_engine",
                  "tensorboard",
                  "restart", "checkpoint_seconds",
                  # read only by other commands (pretrain, predict), e.g. from a shared flagfile
                  "architecture", "pretrain_epochs", "pretrain_learning_rate",
                  "pretrain_weight_decay", "pretrain_batch_size", "images", "json")
# Settings that change only the evaluation and the export, not the weights.
EVAL_FIELDS = ("tta", "top_k", "export", "test_data")
# Lock files this process holds, by folder (kept open: closing one releases it).
_HELD_LOCKS: dict = {}
# Learning-rate flag of each stage (named when a stage diverges).
LR_FLAGS = {1: "head_learning_rate", 2: "finetune_learning_rate"}


def training_settings(cfg: Config) -> dict:
    """The settings of `cfg` that change the trained weights."""
    return {k: v for k, v in sorted(cfg.to_dict().items())
            if k not in IGNORED_FIELDS and k not in EVAL_FIELDS}


def eval_settings(cfg: Config) -> dict:
    """The settings of `cfg` that change only evaluation and export."""
    d = cfg.to_dict()
    return {k: d[k] for k in EVAL_FIELDS if k in d}


def _differences(old: dict, new: dict, limit: int = 4) -> str:
    """'--a: 1 -> 2; --b: ...' for the keys whose values differ."""
    keys = sorted(set(old) | set(new))
    diff = [f"--{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
            for k in keys if old.get(k) != new.get(k)]
    more = f"; and {len(diff) - limit} more" if len(diff) > limit else ""
    return "; ".join(diff[:limit]) + more


def _input_names(old: dict, new: dict) -> list[str]:
    return [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def _hash_values(parts: dict) -> dict:
    return {k: cache_lib.make_key(v=v) for k, v in parts.items()}


class RunState:
    """OUT/state.json and OUT/checkpoints/ of one run (see the module doc).

    Build it with `RunState.open`. Attributes:
        resumed: this run continues an interrupted one.
        finished: the same run already finished; `report()` returns its report.
    """

    def __init__(self, out: str, log: Callable[[str], None], checkpoint_seconds: float = 0.0):
        self.out = out
        self.checkpoint_seconds = checkpoint_seconds
        self.path = os.path.join(out, STATE_FILE)
        self.checkpoints = os.path.join(out, CHECKPOINTS)
        self.log = log
        self.resumed = False
        self.finished = False
        self.state: dict = {}
        self._stage_ckpt: dict[int, StageCheckpoint] = {}

    # --- opening -------------------------------------------------------------

    @classmethod
    def open(cls, out: str, cfg: Config, inputs: dict, eval_inputs: dict,
             log: Callable[[str], None]) -> "RunState":
        """Reads OUT's state, decides to resume, start over or refuse, and records this run.

        Args:
            out: the output folder (exists and is writable).
            cfg: the run's config, image size resolved.
            inputs: JSON-able fingerprints of what training reads besides the
                settings (data splits, weights file, precision policy).
            eval_inputs: the same for evaluation only (the test split).
            log: where progress lines go.

        Raises:
            ConfigError: an unfinished run with other settings is in `out`,
                or the run there diverged (one line; suggests --restart).
        """
        rs = cls(out, log, cfg.checkpoint_seconds)
        rs._lock()
        for p in outputs.clean_temporaries(out):
            log(f"removed {os.path.relpath(p, out)}, left by an interrupted write")
        if cfg.restart:
            rs._discard()
            log(f"--restart: discarded the run state and checkpoints in {out}")
        settings, evals = training_settings(cfg), eval_settings(cfg)
        hashed, eval_hashed = _hash_values(inputs), _hash_values(eval_inputs)
        key = cache_lib.make_key(settings=settings, inputs=hashed)
        eval_key = cache_lib.make_key(settings=evals, inputs=eval_hashed)
        old = rs._read()
        fresh = {"version": _VERSION, "key": key, "eval_key": eval_key, "settings": settings,
                 "inputs": hashed, "eval_settings": evals, "eval_inputs": eval_hashed,
                 "status": "running", "stages": {}, "done": {}}
        if old is None:
            rs.state = fresh
        elif old.get("key") != key:
            if old.get("status") == "finished":
                log(f"{out} holds a finished run with other settings; training a new run "
                    "that replaces it")
                rs._discard()
                rs.state = fresh
            else:
                changed = _differences(old.get("settings", {}), settings)
                inputs_changed = _input_names(old.get("inputs", {}), hashed)
                what = "; ".join(x for x in (changed, inputs_changed and
                                            "changed inputs: " + ", ".join(inputs_changed)) if x)
                raise fail("output_dir", out,
                           f"holds an interrupted run with other settings ({what}); rerun "
                           "with --restart to discard it, or choose another --output_dir")
        else:
            rs._continue(old, fresh)
        rs._write()
        return rs

    def _continue(self, old: dict, fresh: dict) -> None:
        """Continues the same run: same training settings and inputs."""
        if old.get("status") == "diverged":
            failure = old.get("failure", {})
            raise guards.Diverged(
                f"{failure.get('message', 'a stage diverged')}; this run stopped there: "
                "rerun with a lower learning rate and --restart",
                failure.get("stage", 0), failure.get("epoch", 0), failure.get("step"),
                failure.get("loss", float("nan")))
        same_eval = old.get("eval_key") == fresh["eval_key"]
        if old.get("status") == "finished":
            # A finished run kept no checkpoints: anything to redo means training again.
            if same_eval and os.path.isfile(os.path.join(self.out, "report.json")):
                self.finished = True
                self.state = old
                shutil.rmtree(self.checkpoints, ignore_errors=True)
                return
            self.log(f"{self.out} holds this run, finished, but "
                     + ("its report.json is missing" if same_eval else "with other evaluation "
                        "settings") + ": training a new run that replaces it")
            self._discard()
            self.state = fresh
            return
        self.state = dict(old)
        if not same_eval:
            changed = _differences(old.get("eval_settings", {}), fresh["eval_settings"])
            self.log("evaluation settings changed (" + (changed or "the test data") +
                     "): the finished stages are kept, evaluation and export run again")
            self.state.update(eval_key=fresh["eval_key"], eval_settings=fresh["eval_settings"],
                              eval_inputs=fresh["eval_inputs"], done={})
        self.resumed = True
        stages = self.state.get("stages", {})
        parts = [f"stage {n} finished" for n in (1, 2) if str(n) in stages]
        parts += [f"{k} done" for k in self.state.get("done", {})]
        self.log(f"resuming the interrupted run in {self.out}"
                 + (f" ({', '.join(parts)})" if parts else ""))

    def _lock(self) -> None:
        """Holds OUT/.lock for the life of this process, so two runs never write one OUT.

        A POSIX record lock: released by the kernel when the process ends, a
        `kill -9` included, so it never goes stale; a second run in the same
        process (a library user training again) gets it again.
        """
        try:
            import fcntl
        except ImportError:  # not on POSIX (Windows): no lock
            return
        path, key = os.path.join(self.out, LOCK_FILE), os.path.realpath(self.out)
        held = _HELD_LOCKS.pop(key, None)
        if held is not None:
            if os.path.isfile(path) and os.path.samefile(path, held.name):
                _HELD_LOCKS[key] = held  # this process holds it already
                return
            held.close()  # the folder was replaced: lock the new one
        f = open(path, "a+")
        try:
            fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            f.close()
            raise fail("output_dir", self.out, "another tl-keras run is writing there right "
                       "now; wait for it to end or choose another --output_dir") from None
        _HELD_LOCKS[os.path.realpath(self.out)] = f

    def _discard(self) -> None:
        shutil.rmtree(self.checkpoints, ignore_errors=True)
        if os.path.isfile(self.path):
            os.remove(self.path)

    def _read(self) -> Optional[dict]:
        if not os.path.isfile(self.path):
            return None
        try:
            with open(self.path, encoding="utf-8") as f:
                state = json.load(f)
            if state.get("version") != _VERSION:
                raise ValueError(f"version {state.get('version')!r}, expected {_VERSION}")
            return state
        except (OSError, ValueError, AttributeError) as e:
            # Written atomically, so this is not an interrupted write: an
            # edited or foreign file. Its progress cannot be trusted.
            self.log(f"{self.path} is unreadable ({e}); starting the run over")
            self._discard()
            return None

    def _write(self) -> None:
        outputs.atomic_write_json(self.path, self.state)

    # --- stages --------------------------------------------------------------

    def stage_callbacks(self, stage: int, learning_rate: float) -> list:
        """The callbacks that make stage `stage`'s fit resumable and stop it on divergence.

        The guard comes first, so an epoch whose loss is not finite is never saved.
        """
        folder = os.path.join(self.checkpoints, f"stage{stage}")
        if str(stage) in self.state.get("stages", {}) and not os.path.isfile(
                os.path.join(folder, "meta.json")):
            self.log(f"stage {stage}: finished before, but its checkpoint is gone; training "
                     "it again")
        ckpt = StageCheckpoint(folder, stage, self.log, self.checkpoint_seconds)
        self._stage_ckpt[stage] = ckpt
        guard = guards.NonFiniteLossGuard(stage, LR_FLAGS[stage], learning_rate,
                                          on_diverge=self._diverged,
                                          where_kept=lambda: self._last_good(stage))
        return [guard, ckpt]

    def finish_stage(self, stage: int, result):
        """Records a finished stage; adds the time its killed attempts spent.

        Args:
            stage: 1 or 2.
            result: the `train.StageResult` of the fit (its history already
                spans the epochs of earlier attempts, see `StageCheckpoint`).

        Returns:
            `result`, its `seconds` those of the attempt that finished it (a
            stage finished before) or including the epochs of killed attempts.
        """
        stages = self.state.setdefault("stages", {})
        ckpt = self._stage_ckpt.get(stage)
        if str(stage) in stages:
            result.seconds = stages[str(stage)]["seconds"]
        elif ckpt is not None:
            result.seconds += ckpt.seconds_before
        stages[str(stage)] = result.summary()
        self._write()
        return result

    def _last_good(self, stage: int) -> Optional[str]:
        """Where the last good weights of a diverged stage are on disk, described."""
        own = os.path.join(self.checkpoints, f"stage{stage}")
        if os.path.isfile(os.path.join(own, "meta.json")):
            with open(os.path.join(own, "meta.json"), encoding="utf-8") as f:
                return f"{own} (end of epoch {json.load(f).get('epoch')})"
        first = os.path.join(self.checkpoints, "stage1")
        if stage == 2 and os.path.isfile(os.path.join(first, "meta.json")):
            return f"{first} (the result of stage 1, where stage 2 started)"
        return None

    def _diverged(self, error: "guards.Diverged") -> None:
        self.state.update(status="diverged", failure={
            "stage": error.stage, "epoch": error.epoch, "step": error.step,
            "loss": error.loss, "message": str(error)})
        self._write()

    # --- evaluation, export, the end -------------------------------------------

    def once(self, name: str, compute: Callable[[], object],
             still_valid: Callable[[object], bool] = lambda v: True):
        """Returns the recorded result of step `name`, or computes and records it.

        Args:
            name: the step, e.g. "evaluation" or "export".
            compute: runs the step; returns a JSON-able result.
            still_valid: whether a recorded result still holds (e.g. the
                exported folder still exists).
        """
        done = self.state.setdefault("done", {})
        if name in done and still_valid(done[name]):
            self.log(f"{name}: done before the interruption; skipped")
            return done[name]
        value = compute()
        done[name] = value
        self._write()
        return value

    def finish(self) -> None:
        """Marks the run finished and frees the checkpoints' disk space."""
        self.state["status"] = "finished"
        self._write()
        shutil.rmtree(self.checkpoints, ignore_errors=True)

    def report(self) -> dict:
        """The report of the finished run (OUT/report.json)."""
        with open(os.path.join(self.out, "report.json"), encoding="utf-8") as f:
            return json.load(f)


class StageCheckpoint(keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` whose files are written atomically and hang together.

    Keras's own callback overwrites one weights file and one metadata file in
    place, so a kill while writing leaves a truncated file or weights of one
    epoch with the epoch number of another. Here every epoch writes a new
    weights file (weights and optimizer state), then the early-stopping best
    weights when they changed, then `meta.json` that names them, atomically;
    older files are removed after. Epochs are saved once `every_seconds` of
    training have passed since the last save, and always at the stage's end:
    on small data a save costs as much as an epoch. Beyond the epoch,
    meta.json keeps the per-epoch history, the seconds spent and the
    `EarlyStopping` state (counter, best value and epoch, whether it
    stopped), which Keras's callback loses, so a resumed fit stops and
    restores exactly as an uninterrupted one would.

    Args:
        folder: this fit's checkpoint folder (its own: nothing else in it).
        stage: 1 or 2, for messages.
        log: where progress lines go.
        every_seconds: least training time between two saves (0: every epoch).
    """

    def __init__(self, folder: str, stage: int, log: Callable[[str], None] = print,
                 every_seconds: float = 0.0):
        super().__init__(folder, save_freq="epoch", delete_checkpoint=False)
        self.stage, self.log = stage, log
        self.every_seconds = every_seconds
        self._t_saved = 0.0
        self._best_saved: Optional[str] = None
        self.stopper: Optional[keras.callbacks.EarlyStopping] = None
        self.history: dict[str, list] = {}
        self.seconds_before = 0.0
        self.resumed_after: Optional[int] = None  # epochs restored (absolute), None: fresh
        self._seconds = 0.0
        self._t_epoch = 0.0
        self._meta_path = os.path.join(folder, "meta.json")

    def track_early_stopping(self, stop: keras.callbacks.EarlyStopping) -> None:
        """Called by `train._fit_once` with its EarlyStopping, whose state is saved too."""
        self.stopper = stop

    # --- restore -------------------------------------------------------------

    def on_train_begin(self, logs=None):
        self.history, self.seconds_before, self._seconds = {}, 0.0, 0.0
        self.resumed_after = None
        self._t_saved, self._best_saved = time.perf_counter(), None
        try:
            self._load_model()
        except (OSError, ValueError, KeyError) as e:
            raise fail("output_dir", os.path.dirname(os.path.dirname(self.backup_dir)),
                       f"the stage-{self.stage} checkpoint in {self.backup_dir} is unreadable "
                       f"({' '.join(str(e).split())[:200]}); rerun with --restart") from None

    def _load_model(self):
        if not os.path.isfile(self._meta_path):
            return
        with open(self._meta_path, encoding="utf-8") as f:
            meta = json.load(f)
        if meta.get("epochs_planned") != self.params.get("epochs"):
            raise ValueError(f"it was saved for {meta.get('epochs_planned')} epochs, this fit "
                             f"runs {self.params.get('epochs')}")
        opt = self.model.optimizer
        if opt is not None and not opt.built:
            opt.build(self.model.trainable_variables)  # its variables must exist to be loaded
        self.model.load_weights(os.path.join(self.backup_dir, meta["weights"]))
        done = int(meta["epoch"])
        complete = bool(meta.get("complete"))
        # The fit loop starts at model._initial_epoch: how Keras's own
        # BackupAndRestore resumes, with no public API for it.
        self.model._initial_epoch = self.params["epochs"] if complete else done
        self.history = {k: list(v) for k, v in meta.get("history", {}).items()}
        self.seconds_before = self._seconds = float(meta.get("seconds", 0.0))
        self._current_epoch = done
        self.resumed_after = done
        es = meta.get("early_stopping")
        if self.stopper is not None and es:
            self.stopper.wait = es["wait"]
            self.stopper.best = es["best"]
            self.stopper.best_epoch = es["best_epoch"]
            self.stopper.stopped_epoch = es["stopped_epoch"]
            if es.get("best_weights"):
                self._best_saved = es["best_weights"]
                with np.load(os.path.join(self.backup_dir, es["best_weights"])) as z:
                    self.stopper.best_weights = [z[f"arr_{i}"] for i in range(len(z.files))]
        if complete:
            self.log(f"stage {self.stage}: finished before the interruption ({done} epochs); "
                     "skipped, its weights restored")
        else:
            self.log(f"stage {self.stage}: resuming after epoch {done} with the optimizer's "
                     "state and learning-rate schedule restored")

    # --- save ------------------------------------------------------------------

    def on_epoch_begin(self, epoch, logs=None):
        self._t_epoch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        for k, v in (logs or {}).items():
            try:
                self.history.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                continue
        self._seconds += time.perf_counter() - self._t_epoch
        self._current_epoch, self._last_batch_seen = epoch + 1, 0  # as BackupAndRestore does
        last = bool(self.model.stop_training) or epoch + 1 >= self.params["epochs"]
        if last or time.perf_counter() - self._t_saved >= self.every_seconds:
            self._save_model()
            self._t_saved = time.perf_counter()

    def _save_model(self):
        os.makedirs(self.backup_dir, exist_ok=True)
        n = self._current_epoch
        weights = f"epoch-{n:04d}.weights.h5"
        with outputs.atomic_path(os.path.join(self.backup_dir, weights)) as tmp:
            self.model.save_weights(tmp)
        es, keep = None, {weights, "meta.json"}
        if self.stopper is not None:
            best_file = self._best_weights_file()
            if best_file:
                keep.add(best_file)
            best = self.stopper.best
            es = {"wait": int(self.stopper.wait),
                  "best": None if best is None else float(best),
                  "best_epoch": int(self.stopper.best_epoch),
                  "stopped_epoch": int(self.stopper.stopped_epoch),
                  "best_weights": best_file}
        complete = bool(self.model.stop_training) or n >= self.params["epochs"]
        outputs.atomic_write_json(self._meta_path, {
            "epoch": n, "epochs_planned": self.params["epochs"], "complete": complete,
            "weights": weights, "history": self.history, "seconds": self._seconds,
            "early_stopping": es})
        for name in os.listdir(self.backup_dir):
            if name not in keep and not name.startswith(outputs.TMP_PREFIX):
                os.remove(os.path.join(self.backup_dir, name))

    def _best_weights_file(self) -> Optional[str]:
        """Writes the early stopper's best weights unless already on disk; returns the file."""
        stop = self.stopper
        if stop.best_weights is None:
            return None
        # Named by the epoch that set them (EarlyStopping ran before us); an
        # epoch skipped by the save interval is written at the next save.
        name = f"best-{stop.best_epoch + 1:04d}.npz"
        if name != self._best_saved or not os.path.isfile(os.path.join(self.backup_dir, name)):
            with outputs.atomic_path(os.path.join(self.backup_dir, name)) as tmp:
                with open(tmp, "wb") as f:
                    np.savez(f, *stop.best_weights)
            self._best_saved = name
        return name

    def on_train_end(self, logs=None):
        # fit() returns model.history, which Keras's History only sets at an
        # epoch's end (none runs in a finished, restored fit): give it the
        # history of every epoch of the stage, earlier attempts included.
        merged = keras.callbacks.History()
        merged.history = {k: list(v) for k, v in self.history.items()}
        merged.set_model(self.model)
        self.model.history = merged
        self.model._initial_epoch = None
        super().on_train_end(logs)


# Model-sized files a run writes to OUT at most at once: model.keras, the
# export, a stage checkpoint (weights + optimizer moments of the trainable
# part + best weights) and the temporary of whichever is being replaced.
_MODEL_COPIES = 6
# Reports, figures, TensorBoard logs, state.
_SMALL_FILES = 32 * 2 ** 20


def check_disk_space(out: str, cache_folder: str, clf, views: int, cut, n_train: int,
                     n_val: int) -> None:
    """Stops before any training when OUT (or the cache folder) lacks the space the run needs.

    An estimate from the model's size and the caches' sizes; space already
    taken by cached entries counts as available (a resumed run reuses them).
    Writes are atomic anyway, so a disk that fills up later fails the run
    without damaging any file.

    Args:
        out: the output folder.
        cache_folder: the feature/activation cache folder.
        clf: the built `model.Classifier`.
        views: cached views of each training image (--cache_views).
        cut: the `activations.Cut` whose activations stage 2 caches, or None.
        n_train / n_val: examples in the training and validation splits.
    """
    from tl_keras.train import activations

    weights = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in clf.model.weights)
    need_out = _MODEL_COPIES * weights + _SMALL_FILES
    dim = int(clf.features.output_shape[-1])
    need_cache = 4 * dim * (n_train * views + n_val)
    if cut is not None:
        need_cache += (activations.estimate_bytes(cut, n_train, views)
                       + activations.estimate_bytes(cut, n_val, 1))
    if os.path.isdir(cache_folder):
        have = sum(e.stat().st_size for e in os.scandir(cache_folder) if e.is_file())
        need_cache = max(0, need_cache - have)
    if os.stat(cache_folder).st_dev != os.stat(out).st_dev:
        outputs.check_free_space(cache_folder, need_cache, "the cached features and activations",
                                 "cache_dir")
        need_cache = 0
    outputs.check_free_space(out, need_out + need_cache,
                             "the model files, checkpoints and caches of this run")
