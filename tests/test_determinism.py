"""--deterministic with --seed: two runs on CPU give identical weights and metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np

from conftest import FLOWERS_MINI, REPO
from tl_keras import runs


def test_two_deterministic_runs_are_identical(tmp_path):
    # Both stages, augmentation inside tf.data (stage 2 through the full model,
    # --cache_max_mb=0) and cached augmented views: every random draw counts.
    def start(out):
        args = ["train", f"--data={FLOWERS_MINI}", f"--output_dir={out}", "--weights=none",
                "--image_size=32", "--test_fraction=0.2", "--head_epochs=3",
                "--finetune_epochs=2", "--finetune_blocks=2", "--cache_views=2",
                "--cache_max_mb=0", "--export=false", "--tensorboard=false",
                "--deterministic", "--seed=7"]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
        return subprocess.Popen([sys.executable, "-m", "tl_keras", *args], cwd=REPO, env=env,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    outs = [tmp_path / "a", tmp_path / "b"]
    procs = [start(o) for o in outs]  # side by side: two separate processes
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:] + stdout[-2000:]

    reports = [json.loads((o / "report.json").read_text()) for o in outs]
    assert reports[0]["stage2"]["mode"] == "full_model"
    for key in ("stage1", "stage2"):
        for k in ("epochs", "best_epoch", "val_accuracy", "val_loss"):
            assert reports[0][key][k] == reports[1][key][k], (key, k)
    assert reports[0]["test"] == reports[1]["test"]
    (ma, _, cfg), (mb, _, _) = (runs.load_run(str(o)) for o in outs)
    assert cfg.deterministic and cfg.seed == 7
    for a, b in zip(ma.get_weights(), mb.get_weights()):
        np.testing.assert_array_equal(a, b)
