"""TensorBoard logs of a run: both stages in one run folder.

`OUT/tensorboard/` holds the run: `train/` and `validation/` get the
per-epoch scalars (`epoch_loss`, `epoch_accuracy`, as Keras's own callback
names them, plus `epoch_learning_rate` and `stage` in train/), numbered by
the run's 1-based epoch, so stage 2 continues where stage 1 ended; the
folder itself gets the hyperparameters (as a text table, and for the HParams
dashboard too when the tensorboard package is installed) and the final
evaluation scalars. One writer per folder serves both stages.

Writing needs only TensorFlow: TF 2.20+ no longer installs tensorboard, and
its `tf.summary.scalar`/`text` then raise, so scalars and text are written
with `tf.summary.write` and the metadata TensorBoard's own plugins use.
Viewing needs `pip install tensorboard` and
`tensorboard --logdir OUT/tensorboard`.
"""

from __future__ import annotations

import os
import shutil
from typing import Optional

import keras
import tensorflow as tf
from tensorflow.core.framework import summary_pb2

LOG_DIR = "tensorboard"


def _metadata(plugin: str, data_class: int) -> summary_pb2.SummaryMetadata:
    # Plugin data version 0 of the scalars and text plugins is empty content.
    return summary_pb2.SummaryMetadata(
        plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin),
        data_class=data_class)


_SCALAR = _metadata("scalars", summary_pb2.DATA_CLASS_SCALAR)
_TEXT = _metadata("text", summary_pb2.DATA_CLASS_TENSOR)


def write_scalar(tag: str, value: float, step: int) -> None:
    """A scalar summary in the default writer, as `tf.summary.scalar` writes it."""
    tf.summary.write(tag, tf.constant(float(value), tf.float32), step=step, metadata=_SCALAR)


def write_text(tag: str, text: str, step: int) -> None:
    """A (markdown) text summary in the default writer, as `tf.summary.text` writes it."""
    tf.summary.write(tag, tf.constant(text, tf.string), step=step, metadata=_TEXT)


def _hparams_api():
    """The HParams plugin's summary API, or None without the tensorboard package."""
    try:
        from tensorboard.plugins.hparams import api as hp
    except ImportError:
        return None
    return hp


class RunLog:
    """The TensorBoard run folder of one training run (see the module doc)."""

    def __init__(self, log_dir: str, hparams: dict, run_name: str = "", resume: bool = False):
        """Starts the run folder, replacing the logs of an earlier run there.

        Args:
            log_dir: the run folder, e.g. OUT/tensorboard.
            hparams: flat {name: bool/int/float/str} hyperparameters.
            run_name: the trial id shown by the HParams dashboard.
            resume: this run continues the interrupted run whose logs are
                there (see `resume.py`): keep them.
        """
        # The logs describe the model in OUT; an earlier run's curves in the
        # same folder would be drawn as if they were this run's.
        if os.path.isdir(log_dir) and not resume:
            shutil.rmtree(log_dir)
        self.log_dir = log_dir
        self.train_writer = tf.summary.create_file_writer(os.path.join(log_dir, "train"))
        self.val_writer = tf.summary.create_file_writer(os.path.join(log_dir, "validation"))
        self.root_writer = tf.summary.create_file_writer(log_dir)
        self.hparams_plugin = self._write_hparams(hparams, run_name)

    def _write_hparams(self, hparams: dict, run_name: str) -> bool:
        clean = {k: v for k, v in hparams.items() if isinstance(v, (bool, int, float, str))}
        hp = _hparams_api()
        with self.root_writer.as_default():
            if hp is not None:
                hp.hparams(clean, trial_id=run_name or None)
            table = "\n".join(["| hyperparameter | value |", "|---|---|"]
                              + [f"| {k} | {v} |" for k, v in sorted(clean.items())])
            write_text("hparams", table, step=0)
        self.root_writer.flush()
        return hp is not None

    def callback(self, stage: int, note: str = "") -> keras.callbacks.Callback:
        """A Keras callback that logs one stage's epochs into this run.

        Args:
            stage: 1 or 2, written as the `stage` scalar of each epoch.
            note: text logged at the stage's first epoch (what it trains).
        """
        return _EpochLogger(self, stage, note)

    def log_evaluation(self, split: str, evaluation: dict, step: int) -> None:
        """Writes the headline figures of an evaluation as `SPLIT/NAME` scalars."""
        figures = {"accuracy": evaluation.get("accuracy"),
                   "macro_f1": evaluation.get("macro_avg", {}).get("f1"),
                   "roc_auc": evaluation.get("roc_auc"), "pr_auc": evaluation.get("pr_auc"),
                   "ece": evaluation.get("ece")}
        figures.update({k: v for k, v in evaluation.items()
                        if k.startswith("top_") and k.endswith("_accuracy")})
        with self.root_writer.as_default():
            for name, value in figures.items():
                if value is not None:
                    write_scalar(f"{split}/{name}", float(value), step=step)
        self.root_writer.flush()

    def close(self) -> None:
        for w in (self.train_writer, self.val_writer, self.root_writer):
            w.close()


class _EpochLogger(keras.callbacks.Callback):
    """Writes each epoch's logs to the run's train/ and validation/ writers."""

    def __init__(self, run: RunLog, stage: int, note: str):
        super().__init__()
        self.run, self.stage, self.note = run, stage, note
        self._first = True

    def on_epoch_begin(self, epoch, logs=None):
        if self._first and self.note:
            with self.run.root_writer.as_default():
                write_text("stages", f"stage {self.stage} starts at epoch {epoch + 1}: "
                                f"{self.note}", step=epoch + 1)
            self.run.root_writer.flush()
        self._first = False

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        step = epoch + 1  # Keras counts from 0 (and on from initial_epoch); reports from 1
        lr = logs.pop("lr", None)
        if lr is None and getattr(self.model, "optimizer", None) is not None:
            lr = float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate))
        with self.run.train_writer.as_default():
            for k, v in logs.items():
                if not k.startswith("val_"):
                    write_scalar(f"epoch_{k}", float(v), step=step)
            if lr is not None:
                write_scalar("epoch_learning_rate", float(lr), step=step)
            write_scalar("stage", float(self.stage), step=step)
        with self.run.val_writer.as_default():
            for k, v in logs.items():
                if k.startswith("val_"):
                    write_scalar(f"epoch_{k[4:]}", float(v), step=step)
        # Flush every epoch so a TensorBoard watching the run sees it live.
        self.run.train_writer.flush()
        self.run.val_writer.flush()


def start(out_dir: str, hparams: dict, enabled: bool = True,
          resume: bool = False) -> Optional[RunLog]:
    """The TensorBoard run of a training run in `out_dir/tensorboard`, or None if disabled.

    `resume`: keep the logs of the interrupted run this one continues.
    """
    if not enabled:
        return None
    return RunLog(os.path.join(out_dir, LOG_DIR), hparams,
                  os.path.basename(os.path.abspath(out_dir)), resume)


def stage_callbacks(run: Optional[RunLog], stage: int, note: str = "") -> list:
    """The callbacks a stage's fit needs for `run` (none when logging is off)."""
    return [run.callback(stage, note)] if run is not None else []
