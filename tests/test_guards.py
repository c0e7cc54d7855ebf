"""A non-finite loss stops the stage at once, keeps the last good weights, says where."""

from __future__ import annotations

import json

import keras
import numpy as np
import pytest
from absl import flags
from conftest import FLOWERS_MINI

from tl_keras import cli
from tl_keras.train import guards
from tl_keras.train import stages as train_lib


class _PoisonAtEpoch(keras.callbacks.Callback):
    """Puts a NaN into the weights when an epoch begins (a blown-up update)."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch, self.good = epoch, None

    def on_epoch_begin(self, epoch, logs=None):
        if epoch == self.epoch:
            self.good = self.model.get_weights()
            w = self.model.weights[0]
            w.assign(w * np.nan)


def test_guard_stops_at_the_first_bad_step_and_restores_the_last_good_epoch():
    keras.utils.set_random_seed(0)
    inp = keras.Input((4,))
    head = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(inp))
    x = np.random.default_rng(0).normal(size=(64, 4)).astype("float32")
    y = np.eye(2, dtype="float32")[(x[:, 0] > 0).astype(int)]
    poison, seen = _PoisonAtEpoch(2), []
    guard = guards.NonFiniteLossGuard(1, "head_learning_rate", 0.5, on_diverge=seen.append)
    with pytest.raises(guards.Diverged) as e:
        train_lib.fit_head(head, x, y, x, y,
                           train_lib.StageSpec(epochs=10, learning_rate=0.5, weight_decay=0,
                                               batch_size=16, patience=0, label_smoothing=0.0,
                                               jit_compile=False), verbose=0,
                           callbacks=[guard, poison])
    err = e.value
    assert (err.stage, err.epoch, err.step) == (1, 3, 1) and seen == [err]
    msg = str(err)
    assert msg.startswith("--head_learning_rate=0.5: stage 1 diverged: loss became nan at "
                          "epoch 3, step 1; this learning rate is likely too high")
    assert "end of epoch 2" in msg and "\n" not in msg
    # The model holds the weights of the end of epoch 2, not the poisoned ones.
    for a, b in zip(head.get_weights(), poison.good):
        np.testing.assert_array_equal(a, b)


def _cli(args, capsys) -> tuple[int, str]:
    """Runs the CLI in-process; returns (exit code, its last stderr line)."""
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        cli.run(["tl-keras", "train", *args])
    err = capsys.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    return e.value.code, (err.strip().splitlines() or [""])[-1]


def test_diverging_stage_2_exits_with_one_line_and_the_state_says_so(tmp_path, capsys):
    out = tmp_path / "out"
    args = [f"--data={FLOWERS_MINI}", f"--output_dir={out}", "--weights=none",
            "--image_size=32", "--head_fit=adamw", "--head_epochs=2", "--finetune_epochs=2",
            "--finetune_blocks=2", "--cache_views=1", "--export=false", "--tensorboard=false",
            "--finetune_learning_rate=1e38"]
    code, line = _cli(args, capsys)
    assert code != 0
    assert line.startswith("tl-keras: error: --finetune_learning_rate=1e+38: stage 2 diverged: ")
    assert "epoch 3, step" in line and "learning rate is likely too high" in line
    # Stage 1 finished (2 epochs); its result, where stage 2 started, is kept.
    assert f"kept in {out / 'checkpoints' / 'stage1'}" in line
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "diverged" and "1" in state["stages"]
    assert state["failure"]["stage"] == 2 and state["failure"]["epoch"] == 3
    assert (out / "checkpoints" / "stage1" / "meta.json").is_file()
    assert not (out / "model.keras").exists()  # no model is written from a diverged run

    # The same command again does not train into the same wall.
    code, line = _cli(args, capsys)
    assert code != 0 and line.startswith("tl-keras: error: ")
    assert "--restart" in line and "diverged" in line

    # --restart with a sane rate starts over (stage 1 included) and finishes.
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        cli.run(["tl-keras", "train", *args[:-1], "--finetune_learning_rate=1e-4", "--restart"])
    out_text = capsys.readouterr().out
    assert e.value.code == 0, out_text[-2000:]
    assert f"--restart: discarded the run state and checkpoints in {out}" in out_text
    assert "resuming" not in out_text and "finished before the interruption" not in out_text
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "finished" and "failure" not in state
    assert state["settings"]["finetune_learning_rate"] == 1e-4
    assert (out / "model.keras").is_file() and not (out / "checkpoints").exists()
