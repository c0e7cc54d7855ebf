"""TUNE half (issue 20): stage 2 with an exponential moving average of its weights.

Runs `transfer_quality.py`'s TUNE draws (25 and 150 flowers128 photos a class,
3 draws each) with every `tl-keras train` in a child process whose stage-2
optimizer (Adam, `train.stages.fit_finetune`, also in the stage-2 trial) keeps
Keras's EMA of the weights (`use_ema=True`), which `fit` writes into the model
at the end. The EMA's horizon is a third of the stage's steps (momentum
1 - 1 / (steps / 3)); the schedule is unchanged (warmup, cosine decay to 0).
Not kept (benchmarks/README.md, "transfer_quality.py: the cross-validated
head", session 13).

  PYTHONPATH=. python benchmarks/tune_explorations/stage2_ema.py
"""
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
HORIZON = 1 / 3


def _child(argv):
    import keras

    plain = keras.optimizers.Adam

    def adam_with_ema(schedule, **kw):
        steps = schedule.decay_steps + (schedule.warmup_steps or 0)
        return plain(schedule, use_ema=True,
                     ema_momentum=max(0.5, 1.0 - 1.0 / max(1.0, HORIZON * steps)), **kw)

    keras.optimizers.Adam = adam_with_ema  # stage 2 is the only Adam in a run
    from tl_keras import cli

    cli.run(["tl-keras", *argv])


def main():
    import subprocess

    import transfer_quality as tq

    def tl_keras_run(args, out):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", "train", *args,
               f"--output_dir={out}", "--noexport", "--notensorboard"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"tl-keras failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return tq.json.loads((out / "report.json").read_text())

    tq.tl_keras_run = tl_keras_run
    sys.argv = [tq.__file__, "--datasets", "f128_25", "f128_150", "--half", "tune"]
    tq.main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2:])
    else:
        main()
