"""Resume after a crash: stage checkpoints, the keyed run state, and real kills.

The in-process tests check the mechanics on a tiny head (exact numbers);
`test_sigkill_in_caching_stage1_stage2_and_export_then_rerun_finishes` kills
a real training subprocess with SIGKILL four times in a run on flowers_mini
(while caching features, in the middle of stage 1, in the middle of a stage-2
epoch, while exporting), reruns the same command after each, and compares the
finished run with an uninterrupted run of the same settings, weight by weight.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import keras
import numpy as np
import pytest
from conftest import FLOWERS_MINI, REPO, WEIGHTS_MNV2_035

from tl_keras.config import Config
from tl_keras.errors import ConfigError
from tl_keras.train import resume
from tl_keras.train import stages as train_lib

# ---------------------------------------------------------------------------
# StageCheckpoint: optimizer state, schedule and early stopping survive a crash
# ---------------------------------------------------------------------------

class _Crash(Exception):
    pass


class _CrashAfterEpoch(keras.callbacks.Callback):
    """Raises at the end of a given epoch, after the checkpoint has saved it."""

    def __init__(self, epoch: int):
        super().__init__()
        self.epoch = epoch

    def on_epoch_end(self, epoch, logs=None):
        if epoch == self.epoch:
            raise _Crash(f"crash after epoch {epoch + 1}")


class _EpochCounter(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_begin(self, epoch, logs=None):
        self.epochs.append(epoch)


def _head():
    keras.utils.set_random_seed(0)
    inp = keras.Input((8,))
    return keras.Model(inp, keras.layers.Dense(2, activation="softmax")(inp))


def _problem():
    """Training labels follow a linear rule; validation labels are its opposite,
    so val_loss is best after epoch 1 and only worsens: early stopping must
    stop at epoch 1 + patience and give back epoch 1's weights."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(64, 8)).astype("float32")
    y = (x[:, 0] > 0).astype(int)
    return x, np.eye(2, dtype="float32")[y], np.eye(2, dtype="float32")[1 - y]


def _fit(head, folder, *extra, epochs=10, patience=3, every_seconds=0.0):
    x, y, y_val = _problem()
    ckpt = resume.StageCheckpoint(str(folder), 1, log=lambda m: None,
                                  every_seconds=every_seconds)
    counter = _EpochCounter()
    # One batch per epoch: the gradient does not depend on the shuffle order,
    # so a resumed fit must reproduce the uninterrupted one exactly.
    result = train_lib.fit_head(head, x, y, x, y_val,
                                train_lib.StageSpec(epochs=epochs, learning_rate=0.05,
                                                    weight_decay=1e-3, batch_size=64,
                                                    patience=patience, label_smoothing=0.0,
                                                    jit_compile=False), verbose=0,
                                callbacks=[ckpt, counter, *extra])
    return result, ckpt, counter


@pytest.mark.parametrize("strategy", ["default", "one_device"])
def test_resumed_fit_continues_optimizer_schedule_and_early_stopping(tmp_path, strategy):
    # The strategy-aware loop (every strategy but the default; the head's fit
    # on the default one too) resumes where the checkpoint says, as model.fit does.
    import contextlib

    import tensorflow as tf

    scope = (tf.distribute.OneDeviceStrategy("/cpu:0").scope() if strategy == "one_device"
             else contextlib.nullcontext())
    with scope:
        ref_head = _head()
        ref, _, ref_count = _fit(ref_head, tmp_path / "ref")
        # Early stopping did its job: best epoch 1, stopped after `patience` more.
        assert ref.best_epoch == 1 and ref.epochs == 4, (ref.best_epoch, ref.epochs)

        # The same fit, crashed after its 3rd epoch (while early stopping waits
        # for an improvement that never comes, holding epoch 1's weights)...
        with pytest.raises(_Crash):
            _fit(_head(), tmp_path / "run", _CrashAfterEpoch(2))
        meta = json.loads((tmp_path / "run" / "meta.json").read_text())
        assert meta["epoch"] == 3 and not meta["complete"]
        assert meta["early_stopping"]["best_epoch"] == 0 and meta["early_stopping"]["wait"] == 2

        # ...then resumed by a fresh model (a new process) from the checkpoint.
        head = _head()
        res, ckpt, count = _fit(head, tmp_path / "run")
        assert ckpt.resumed_after == 3
        assert count.epochs == [3]  # only the 4th epoch runs; none is repeated
        # Optimizer step count (which drives the cosine schedule) and the
        # learning rate go on where they were.
        assert int(head.optimizer.iterations) == int(ref_head.optimizer.iterations) == 4
        assert float(head.optimizer.learning_rate) == pytest.approx(
            float(ref_head.optimizer.learning_rate), rel=1e-6)
        # Early stopping stops at the same epoch and restores epoch 1's weights,
        # which only the checkpoint still had.
        assert (res.epochs, res.best_epoch) == (ref.epochs, ref.best_epoch)
        for a, b in zip(head.get_weights(), ref_head.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
        # The history spans all epochs, those of the crashed attempt included.
        assert len(res.history["loss"]) == 4
        np.testing.assert_allclose(res.history["val_loss"], ref.history["val_loss"], rtol=1e-5)

        # A finished fit, run again, runs no epoch and restores its result.
        again_head = _head()
        again, ckpt, count = _fit(again_head, tmp_path / "run")
        assert count.epochs == [] and ckpt.resumed_after == 4
        assert (again.epochs, again.best_epoch) == (ref.epochs, ref.best_epoch)
        for a, b in zip(again_head.get_weights(), ref_head.get_weights()):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_checkpoint_files_are_consistent_after_each_epoch(tmp_path):
    _fit(_head(), tmp_path / "c", epochs=3, patience=0)
    names = sorted(os.listdir(tmp_path / "c"))
    # One weights file (the latest epoch), the best weights, the metadata: no
    # stale epochs, no temporaries.
    meta = json.loads((tmp_path / "c" / "meta.json").read_text())
    assert meta["weights"] in names and meta["early_stopping"]["best_weights"] in names
    assert len(names) == 3, names
    assert meta["complete"] and meta["epoch"] == 3 and len(meta["history"]["loss"]) == 3


# ---------------------------------------------------------------------------
# RunState: keyed by the settings
# ---------------------------------------------------------------------------

def _open(out, log=None, **changes):
    cfg = Config(data="d", output_dir=str(out), image_size=96).replace(**changes)
    lines = [] if log is None else log
    return resume.RunState.open(str(out), cfg, {"train": "h1", "val": "h2"}, {"test": None},
                                lines.append), lines


def test_unfinished_run_with_other_settings_is_refused_with_one_line(tmp_path):
    state, _ = _open(tmp_path)
    state.finish_stage(1, train_lib.StageResult(3, 2, 1.0, 0.5, 1.0, {"loss": [1, 1, 1]}))
    with pytest.raises(ConfigError) as e:
        _open(tmp_path, head_learning_rate=0.01, seed=7)
    msg = str(e.value)
    assert "\n" not in msg and "--restart" in msg
    assert "--head_learning_rate: 0.001 -> 0.01" in msg and "--seed: 42 -> 7" in msg
    # Changed data is named too (same settings, other fingerprints).
    with pytest.raises(ConfigError, match="changed inputs: train"):
        resume.RunState.open(str(tmp_path), Config(data="d", output_dir=str(tmp_path),
                                                   image_size=96),
                             {"train": "other", "val": "h2"}, {"test": None}, print)
    # Settings that change nothing computed (where caches go, logging, flags of
    # other commands) resume.
    state, log = _open(tmp_path, [], cache_dir=str(tmp_path / "c"), tensorboard=False,
                       pretrain_epochs=1, architecture="alexnet")
    assert state.resumed and any("stage 1 finished" in line for line in log)
    # --restart discards the state (and never the caches).
    (tmp_path / "cache").mkdir()
    state, log = _open(tmp_path, [], head_learning_rate=0.01, restart=True)
    assert not state.resumed and state.state["stages"] == {}
    assert (tmp_path / "cache").is_dir()


def test_finished_run_does_nothing_or_is_replaced(tmp_path):
    state, _ = _open(tmp_path)
    state.once("evaluation", lambda: {"accuracy": 0.5})
    (tmp_path / "report.json").write_text('{"kept": "stage1"}')
    state.finish()
    same, log = _open(tmp_path, [])
    assert same.finished and same.report() == {"kept": "stage1"}
    # A finished run keeps no checkpoints: any change trains a new run.
    for changes in ({"top_k": 2}, {"dropout": 0.5}):
        new, log = _open(tmp_path, [], **changes)
        assert not new.finished and not new.resumed and "replaces it" in log[-1]
        assert new.state["stages"] == {} and new.state["done"] == {}
        new.finish()


def test_interrupted_run_with_other_evaluation_settings_keeps_its_stages(tmp_path):
    state, _ = _open(tmp_path)
    state.finish_stage(1, train_lib.StageResult(3, 2, 1.0, 0.5, 1.0, {"loss": [1, 1, 1]}))
    state.once("evaluation", lambda: {"accuracy": 0.5})
    evals, log = _open(tmp_path, [], top_k=2)
    assert evals.resumed and "--top_k: 3 -> 2" in log[0]
    assert "1" in evals.state["stages"] and evals.state["done"] == {}
    # A stage finished before keeps the seconds it took then (not the restore's).
    again = evals.finish_stage(1, train_lib.StageResult(3, 2, 0.01, 0.5, 1.0, {"loss": [1] * 3}))
    assert again.seconds == 1.0


def test_diverged_run_is_not_resumed(tmp_path):
    state, _ = _open(tmp_path)
    from tl_keras.train import guards

    state._diverged(guards.Diverged("--head_learning_rate=10.0: stage 1 diverged", 1, 2, 3,
                                    float("nan")))
    saved = json.loads((tmp_path / "state.json").read_text())
    assert saved["status"] == "diverged" and saved["failure"]["epoch"] == 2
    with pytest.raises(ConfigError, match="stage 1 diverged.*--restart"):
        _open(tmp_path)


def test_save_interval_skips_epochs_but_always_saves_the_end_and_the_best(tmp_path):
    hour = 3600.0
    # Crashed after its 3rd epoch with an hour between saves: nothing was
    # saved, so the rerun starts the stage over rather than from a stale file.
    with pytest.raises(_Crash):
        _fit(_head(), tmp_path / "run", _CrashAfterEpoch(2), every_seconds=hour)
    assert not (tmp_path / "run" / "meta.json").exists()
    res, ckpt, count = _fit(_head(), tmp_path / "run", every_seconds=hour)
    assert ckpt.resumed_after is None and count.epochs == [0, 1, 2, 3]
    # The stage's last epoch is saved, with the best epoch's weights (epoch 1,
    # which the interval skipped) written alongside.
    meta = json.loads((tmp_path / "run" / "meta.json").read_text())
    assert meta["epoch"] == 4 and meta["complete"]
    assert meta["early_stopping"]["best_weights"] == "best-0001.npz"
    assert sorted(os.listdir(tmp_path / "run")) == ["best-0001.npz", "epoch-0004.weights.h5",
                                                    "meta.json"]
    ref_head = _head()
    ref, _, _ = _fit(ref_head, tmp_path / "ref")  # saved after every epoch
    assert (res.epochs, res.best_epoch) == (ref.epochs, ref.best_epoch)
    # Run again, the finished stage restores the same result from those files.
    again_head = _head()
    again, ckpt, count = _fit(again_head, tmp_path / "run", every_seconds=hour)
    assert count.epochs == [] and ckpt.resumed_after == 4
    for a, b in zip(again_head.get_weights(), ref_head.get_weights()):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------
# Real kills: SIGKILL a training subprocess at each phase, rerun the command
# ---------------------------------------------------------------------------

# Runs the CLI with a hook that SIGKILLs the process at the point KILL_AT names.
# The hooks only observe (they wrap tl_keras functions and call them as they
# are); the kill itself is a real SIGKILL, as from `kill -9`.
_DRIVER = textwrap.dedent("""
    import os, signal, sys
    where = os.environ.get("KILL_AT", "")

    def die():
        sys.stdout.flush()
        os.kill(os.getpid(), signal.SIGKILL)

    from tl_keras.train import features
    from tl_keras.train import stages as train
    if where == "caching":  # training features cached, validation ones not yet
        extract, calls = features.extract, []
        def extract_then_die(*a, **k):
            calls.append(1)
            if len(calls) == 2:
                die()
            return extract(*a, **k)
        features.extract = extract_then_die
    elif where.startswith("stage1:"):  # end of that stage-1 epoch (0-based), before its checkpoint
        at, end = int(where.split(":")[1]), train._LearningRateLogger.on_epoch_end
        def on_epoch_end(self, epoch, logs=None):
            end(self, epoch, logs)
            if self.model.name == "head" and epoch == at:
                die()
        train._LearningRateLogger.on_epoch_end = on_epoch_end
    elif where.startswith("stage2:"):  # mid-epoch: that stage-2 epoch (1-based), after that step
        epoch_at, step_at = (int(v) for v in where.split(":")[1:])
        seen = []
        def on_epoch_begin(self, epoch, logs=None):
            if self.model.name != "head":
                seen.append(epoch)
        def on_train_batch_end(self, batch, logs=None):
            if self.model.name != "head" and len(seen) == epoch_at and batch + 1 == step_at:
                die()
        train._LearningRateLogger.on_epoch_begin = on_epoch_begin
        train._LearningRateLogger.on_train_batch_end = on_train_batch_end
    elif where == "export":  # the SavedModel is written to its temporary folder
        from tl_keras.export import saved_model
        save = saved_model._save_signatures
        def save_then_die(*a, **k):
            save(*a, **k)
            die()
        saved_model._save_signatures = save_then_die

    from tl_keras import cli
    cli.run(["tl-keras"] + sys.argv[1:])
""")

# A small real run (64 px, the real MobileNetV2-0.35 weights, stage 2 through the
# full model) whose epochs draw nothing at random: no augmentation, no dropout,
# one view per image, and one batch per epoch (55 training images, batches of
# 64), so the order the shuffle gives changes float rounding only. A rerun
# epoch then computes what the killed one would have, and the resumed run must
# end where the uninterrupted one does. (With augmentation or dropout a
# resumed fit draws afresh from the resumed epoch, as the README says: the
# same kind of run, not the same numbers.)
_ARGS = ("train", f"--data={FLOWERS_MINI}", "--test_fraction=0.3", "--backbone=mobilenet_v2",
         "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=64",
         "--head_fit=adamw", "--head_epochs=6",
         "--finetune_epochs=3", "--finetune_blocks=2", "--cache_views=1", "--cache_max_mb=0",
         "--batch_size=64", "--flip=false", "--rotation=0", "--zoom=0", "--contrast=0",
         "--dropout=0", "--tensorboard=false", "--deterministic", "--seed=7",
         # Checkpoints after every epoch, so that each kill has one to resume from.
         "--checkpoint_seconds=0")


def _command(out: Path, kill_at: str = "", *extra: str) -> tuple[list[str], dict]:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1", KILL_AT=kill_at)
    return [sys.executable, "-c", _DRIVER, *_ARGS, f"--output_dir={out}", *extra], env


def _train(out: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    argv, env = _command(out, kill_at)
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    if kill_at:
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.returncode, proc.stderr[-3000:])
    else:
        assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return proc


def _epoch_lines(stdout: str) -> list[str]:
    return [line.split()[1] for line in stdout.splitlines() if line.startswith("Epoch ")]


def _state(out: Path) -> dict:
    return json.loads((out / "state.json").read_text())


def _meta(out: Path, stage: int) -> dict:
    return json.loads((out / "checkpoints" / f"stage{stage}" / "meta.json").read_text())


def test_sigkill_in_caching_stage1_stage2_and_export_then_rerun_finishes(tmp_path, data_dir):
    # Four kills of a real training process, each followed by the same
    # command. The uninterrupted run of the same settings trains beside them.
    # (A kill in pre-flight or evaluation is not made: pre-flight keeps nothing
    # to resume, and evaluation is recorded the way the export is.)
    out, ref = tmp_path / "out", tmp_path / "ref"
    argv, env = _command(ref, "", "--export=false")
    reference = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
    try:
        # 1. Caching: the training features are cached, the validation ones not.
        p = _train(out, "caching")
        assert "resuming" not in p.stdout
        assert _state(out)["status"] == "running" and _state(out)["stages"] == {}
        cached = list((out / "cache").glob("*.npy"))  # arrays of one entry: the training split's
        assert cached and len({c.name.split(".")[0] for c in cached}) == 1, cached

        # 2. Stage 1, at the end of its 4th epoch, before that epoch is saved.
        p = _train(out, "stage1:3")
        assert "resuming the interrupted run" in p.stdout
        assert "read from cache" in p.stdout  # validated and reused, not recomputed
        assert _epoch_lines(p.stdout) == ["1/6", "2/6", "3/6", "4/6"]
        assert _meta(out, 1)["epoch"] == 3 and not _meta(out, 1)["complete"]
        assert _state(out)["stages"] == {}

        # 3. Stage 2, in its 2nd epoch: after the step, before validation and the save.
        p = _train(out, "stage2:2:1")
        assert "stage 1: resuming after epoch 3" in p.stdout
        # Stage 1's last epochs (none repeated), stage 2's 1st and the killed 2nd.
        assert _epoch_lines(p.stdout) == ["4/6", "5/6", "6/6", "7/9", "8/9"]
        s1_epochs = _state(out)["stages"]["1"]["epochs"]
        assert s1_epochs == 6
        assert _meta(out, 2)["epoch"] == s1_epochs + 1 and not _meta(out, 2)["complete"]

        # 4. Export: killed with the SavedModel half-way to its place (after evaluation).
        p = _train(out, "export")
        assert "stage 1: finished before the interruption" in p.stdout
        assert f"stage 2: resuming after epoch {s1_epochs + 1}" in p.stdout
        assert _epoch_lines(p.stdout) == ["8/9", "9/9"]  # none repeated
        assert "evaluation" in _state(out)["done"]
        leftovers = [n for n in os.listdir(out / "export") if n.startswith(".tmp")]
        assert leftovers and not (out / "export" / "1").exists()

        # 5. The same command once more finishes the run, repeating nothing.
        p = _train(out)
        assert _epoch_lines(p.stdout) == []  # no epoch of either stage runs again
        for line in ("stage 1: finished before the interruption",
                     "stage 2: finished before the interruption",
                     "evaluation: done before the interruption; skipped",
                     f"removed {os.path.join('export', leftovers[0])}, left by an interrupted "
                     "write",
                     f"exported version 1 to {out / 'export' / '1'}"):
            assert line in p.stdout, line
        state = _state(out)
        assert state["status"] == "finished" and not (out / "checkpoints").exists()
        for root, dirs, files in os.walk(out):
            assert not [n for n in dirs + files if n.startswith(".tmp")], root
        assert (out / "export" / "1" / "saved_model.pb").is_file()
    finally:
        stdout, stderr = reference.communicate(timeout=900)
    assert reference.returncode == 0, stderr[-3000:] + stdout[-2000:]

    # The result is the uninterrupted run's: the same epochs and best epochs,
    # the same validation and test figures, the same weights (to float
    # rounding: measured at most 2e-7 apart, predictions 2e-7).
    report = json.loads((out / "report.json").read_text())
    base = json.loads((ref / "report.json").read_text())
    assert report["stage2"]["mode"] == "full_model"
    for key in ("stage1", "stage2"):
        assert (report[key]["epochs"], report[key]["best_epoch"]) == \
            (base[key]["epochs"], base[key]["best_epoch"]), key
        for k in ("val_loss", "val_accuracy"):
            assert report[key][k] == pytest.approx(base[key][k], rel=1e-5, abs=1e-6), (key, k)
    assert report["stage2"]["epochs"] == 3 and report["kept"] == base["kept"]
    test, base_test = report["test"], base["test"]
    assert test["n"] == base_test["n"] == 30 and test["accuracy"] == base_test["accuracy"]
    for k in ("roc_auc", "pr_auc", "ece_uncalibrated"):
        assert test[k] == pytest.approx(base_test[k], abs=1e-5), k
    # The temperature is the minimum of a flat NLL over this run's few
    # validation images: weights 2e-7 apart move it by about 1e-4, and the
    # calibrated ECE with it by about 2e-5 (measured); the uncalibrated ECE
    # above is held to 1e-5.
    assert report["calibration"]["temperature"] == pytest.approx(
        base["calibration"]["temperature"], rel=1e-3)
    assert test["ece"] == pytest.approx(base_test["ece"], abs=1e-4)
    from tl_keras.model import families as families_lib
    from tl_keras.run import evaluate as runs

    resumed, uninterrupted = (runs.load_run(str(o))[0] for o in (out, ref))
    weights = list(zip(resumed.weights, uninterrupted.weights))
    assert len(weights) > 100  # the whole model: backbone and head
    for a, b in weights:
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=0, atol=1e-5, err_msg=a.path)
    # Not a comparison of two runs that trained nothing: the unfrozen blocks
    # moved from the weights file by far more than that tolerance.
    start = families_lib.build_backbone(families_lib.get_family("mobilenet_v2"),
                                        str(WEIGHTS_MNV2_035), 64, 0.35)
    initial = {w.path: w.numpy() for w in start.weights}
    unfrozen = ("block_16_expand/kernel", "block_16_depthwise/kernel",
                "block_16_project/kernel", "Conv_1/kernel")
    moved = {w.path: float(np.abs(w.numpy() - initial[w.path]).max())
             for w in uninterrupted.weights if w.path in unfrozen}
    assert len(moved) == len(unfrozen) and min(moved.values()) > 1e-4, moved


def test_two_runs_never_write_one_output_folder(tmp_path):
    # Another process holds OUT (a run still going); this one is refused.
    code = textwrap.dedent(f"""
        import sys, time
        from tl_keras.train import resume
        from tl_keras.config import Config
        resume.RunState.open({str(tmp_path)!r}, Config(data="d", output_dir={str(tmp_path)!r}),
                             {{}}, {{}}, lambda m: None)
        print("holding", flush=True)
        time.sleep(60)
    """)
    holder = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "holding"
        with pytest.raises(ConfigError, match="another tl-keras run is writing there"):
            _open(tmp_path)
    finally:
        holder.kill()  # SIGKILL: the kernel releases its lock
        holder.wait()
    # The killed run's lock is gone (its state has other settings: start over)...
    state, _ = _open(tmp_path, restart=True)
    again, _ = _open(tmp_path)  # ...and this process may open the folder again
    assert again.resumed
