"""--deterministic with --seed: two runs on CPU give identical weights and metrics."""

from __future__ import annotations

import json

import numpy as np

from tl_keras.run import evaluate as runs


def test_two_deterministic_runs_are_identical(deterministic_runs):
    # Both stages, augmentation inside tf.data (stage 2 through the full model,
    # --cache_max_mb=0) and cached augmented views: every random draw counts.
    outs = deterministic_runs
    reports = [json.loads((o / "report.json").read_text()) for o in outs]
    assert reports[0]["stage2"]["mode"] == "full_model"
    for key in ("stage1", "stage2"):
        for k in ("epochs", "best_epoch", "val_accuracy", "val_loss"):
            assert reports[0][key][k] == reports[1][key][k], (key, k)
    assert reports[0]["test"] == reports[1]["test"]
    (ma, _, cfg), (mb, _, _) = (runs.load_run(str(o)) for o in outs)
    assert cfg.deterministic and cfg.seed == 7
    weights = list(zip(ma.get_weights(), mb.get_weights()))
    assert len(weights) > 100  # the whole model: backbone and head
    for a, b in weights:
        np.testing.assert_array_equal(a, b)
    # Both stages really trained (a run that trained nothing would be identical too).
    assert reports[0]["stage2"]["epochs"] == 2 and reports[0]["stage1"]["epochs"] >= 3
