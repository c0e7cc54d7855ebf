"""TUNE half (issue 20): the head, stage 2 from it, and their output ensemble (mean of probabilities).

Default settings (2 cached views, stage 2 on the auto top blocks for 6 epochs at 3e-4, warmup 1,
label smoothing 0.1, dropout 0.2), 25 and 150 photos a class of the TUNE half, draws 1-3, tested
on the rest of the half, every model mirror-averaged. Not kept (benchmarks/README.md, session 12).

  PYTHONPATH=. python benchmarks/tune_explorations/head_ft_ensemble.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import tune_stage2  # noqa: E402
from tl_keras.data import augment  # noqa: E402
from tl_keras.train import stages  # noqa: E402

s = tune_stage2.setup(None, 0.2, 2, augment.build_augmenter(True, 10.0, 0.1, 0.1, 42), 42,
                      "ens_acts_nb{nb}")
print("NB", s.nb, flush=True)
for per in (25, 150):
    res = {"head": [], "ft": [], "ens": []}
    for d in (1, 2, 3):
        tr, te, t = tune_stage2.draw(s.y, per, d)
        head = tune_stage2.cv_head(t, s, tr)
        ph = tune_stage2.head_probs(head, s, te)
        spec = stages.StageSpec(epochs=6, learning_rate=3e-4, batch_size=32, patience=100,
                                label_smoothing=0.1, warmup_epochs=1, seed=42)
        pf = tune_stage2.finetune_probs(s, head, np.concatenate([s.A[v][tr] for v in range(2)]),
                                        np.tile(t, (2, 1)), spec, None, tr, te)
        for k, p in (("head", ph), ("ft", pf), ("ens", (ph + pf) / 2)):
            res[k].append(np.mean(p.argmax(1) == s.y[te]))
        print(per, d, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
    for k, v in res.items():
        diff = np.array(v) - np.array(res["head"])
        print(f"per={per} {k}: {np.mean(v):.4f}  vs head {diff.mean():+.4f} {np.round(diff, 3)}",
              flush=True)
