"""Stopping a diverging fit: a non-finite loss ends the stage at once.

A loss that turns NaN or infinite never comes back, and every further step
spreads the non-finite values through the weights. `NonFiniteLossGuard`
checks the loss after every step (and val_loss after every epoch), puts the
last good weights (the end of the last finished epoch, or the stage's start)
back into the model and raises `Diverged`, a one-line error that names the
stage, epoch, step and the learning-rate flag that most likely caused it.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import keras

from tl_keras.errors import ConfigError, fail


class Diverged(ConfigError):
    """The loss became non-finite. Attributes say where (1-based epoch and step)."""

    def __init__(self, message: str, stage: int, epoch: int, step: Optional[int], loss: float):
        super().__init__(message)
        self.stage, self.epoch, self.step, self.loss = stage, epoch, step, loss


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return True  # not a number: nothing to judge


class NonFiniteLossGuard(keras.callbacks.Callback):
    """Stops the fit at the first non-finite loss and keeps the last good weights.

    Args:
        stage: 1 or 2, for the message.
        lr_flag: the flag of this stage's learning rate (the likely cause).
        learning_rate: its value, quoted in the message.
        on_diverge: called with the `Diverged` error (after the good weights
            are back in the model) before it is raised, e.g. to record it in
            the run's state.
        where_kept: returns where the last good weights are kept on disk (or
            None), for the message.
    """

    def __init__(self, stage: int, lr_flag: str, learning_rate: float,
                 on_diverge: Optional[Callable[[Diverged], None]] = None,
                 where_kept: Optional[Callable[[], Optional[str]]] = None):
        super().__init__()
        self.stage, self.lr_flag, self.learning_rate = stage, lr_flag, learning_rate
        self.on_diverge, self.where_kept = on_diverge, where_kept
        self._good: Optional[list] = None
        self._good_epoch = 0  # the good weights are from the end of this 1-based epoch; 0: the start
        self._epoch = 0

    def on_train_begin(self, logs=None):
        self._good = None

    def on_epoch_begin(self, epoch, logs=None):
        if self._good is None:
            # At the first epoch, not at on_train_begin: a resumed fit has
            # restored its weights by now, whatever the callbacks' order.
            self._good = self.model.get_weights()
            self._good_epoch = 0
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        loss = (logs or {}).get("loss")
        if loss is not None and not _finite(loss):
            self._stop(float(loss), step=batch + 1)

    def on_epoch_end(self, epoch, logs=None):
        logs = logs or {}
        for k in ("loss", "val_loss"):
            if k in logs and not _finite(logs[k]):
                self._stop(float(logs[k]), step=None, what=k)
        self._good = self.model.get_weights()
        self._good_epoch = epoch + 1

    def _stop(self, loss: float, step: Optional[int], what: str = "loss") -> None:
        if self._good is not None:
            self.model.set_weights(self._good)
        epoch = self._epoch + 1
        at = f"epoch {epoch}, step {step}" if step else f"the end of epoch {epoch}"
        kept = self.where_kept() if self.where_kept is not None else None
        if kept:
            kept = f"the last good weights are kept in {kept}"
        elif self._good_epoch:
            kept = f"the model holds the last good weights (end of epoch {self._good_epoch})"
        else:
            kept = "no epoch had finished (the model holds the weights the stage started from)"
        err = fail(self.lr_flag, self.learning_rate,
                   f"stage {self.stage} diverged: {what} became {loss} at {at}; this learning "
                   f"rate is likely too high (try a tenth of it); {kept}")
        error = Diverged(str(err), self.stage, epoch, step, loss)
        self.model.stop_training = True
        if self.on_diverge is not None:
            self.on_diverge(error)
        raise error
