"""TUNE half (issue 20): stage 2's optimizer, two variants from the literature.

Runs `transfer_quality.py`'s TUNE draws (25 and 150 flowers128 photos a class,
3 draws each) with every `tl-keras train` in a child process whose stage-2
optimizer (Adam, `train.stages.fit_finetune`, also in the stage-2 trial) is
changed; the schedule is unchanged (warmup, cosine decay to 0):

  ema             Keras's exponential moving average of the weights
                  (`use_ema=True`, in the spirit of SWA), written into the
                  model at the end of `fit`; horizon a third of the stage's
                  steps (momentum 1 - 1 / (steps / 3)).
  discriminative  discriminative learning rates (ULMFiT, Howard & Ruder 2018):
                  the head and the backbone's top at the peak rate, each
                  unfrozen block below at half the rate of the one above it.

Neither was kept (benchmarks/README.md, "transfer_quality.py: the
cross-validated head", session 13).

  PYTHONPATH=. python benchmarks/tune_explorations/stage2_optimizer.py --variant ema
"""
import argparse
import os
import re
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
EMA_HORIZON = 1 / 3
BLOCK_DECAY = 0.5
_BLOCK = re.compile(r"block_(\d+)_")


def _child(variant, argv):
    import keras

    plain = keras.optimizers.Adam

    def adam_with_ema(schedule, **kw):
        steps = schedule.decay_steps + (schedule.warmup_steps or 0)
        return plain(schedule, use_ema=True,
                     ema_momentum=max(0.5, 1.0 - 1.0 / max(1.0, EMA_HORIZON * steps)), **kw)

    class DiscriminativeAdam(plain):
        """Adam whose rate halves for each unfrozen block below the top one."""

        def build(self, variables):
            found = [_BLOCK.search(v.path) for v in variables]
            top = max([int(m.group(1)) for m in found if m], default=0)
            # The backbone's top (Conv_1) and the head keep the peak rate.
            self._rate_factors = [BLOCK_DECAY ** (top - int(m.group(1)) + 1) if m else 1.0
                                  for m in found]
            super().build(variables)

        def update_step(self, gradient, variable, learning_rate):
            factor = self._rate_factors[self._get_variable_index(variable)]
            return super().update_step(gradient, variable, learning_rate * factor)

    # Stage 2 is the only Adam in a run (stage 1 is a logistic regression).
    keras.optimizers.Adam = adam_with_ema if variant == "ema" else DiscriminativeAdam
    from tl_keras import cli

    cli.run(["tl-keras", *argv])


def main():
    import subprocess

    import transfer_quality as tq

    ap = argparse.ArgumentParser()
    ap.add_argument("--variant", choices=("ema", "discriminative"), required=True)
    args = ap.parse_args()

    def tl_keras_run(flags, out):
        cmd = [sys.executable, os.path.abspath(__file__), "--child", args.variant, "train",
               *flags, f"--output_dir={out}", "--noexport", "--notensorboard"]
        done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(f"tl-keras failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
        return tq.json.loads((out / "report.json").read_text())

    tq.tl_keras_run = tl_keras_run
    sys.argv = [tq.__file__, "--datasets", "f128_25", "f128_150", "--half", "tune"]
    tq.main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--child"]:
        _child(sys.argv[2], sys.argv[3:])
    else:
        main()
