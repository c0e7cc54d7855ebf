"""TUNE-half: does stage 2 (cached activations, from the CV logistic head) beat the head alone?

  NB=4 PYTHONPATH=. python benchmarks/tune_explorations/stage2.py
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np  # noqa: E402

import tune_stage2  # noqa: E402
from tl_keras.data import augment  # noqa: E402
from tl_keras.train import stages  # noqa: E402

NB = int(os.environ.get("NB", "4"))
s = tune_stage2.setup(NB, 0.0, 3, augment.Augment(
    flip=True, rotation=augment.degrees_to_turn_fraction(10), zoom=0.1, contrast=0.1), 1,
    "acts_nb{nb}")
ARMS = [dict(epochs=e, lr=lr, ls=ls)
        for e, lr, ls in [(6, 3e-4, 0.0), (6, 1e-4, 0.0), (12, 1e-4, 0.0), (6, 3e-4, 0.1)]]
for per in (10, 25):
    res = {"head": []} | {str(a): [] for a in ARMS}
    for d in (1, 2, 3):
        tr, te, t = tune_stage2.draw(s.y, per, d)
        head = tune_stage2.cv_head(t, s, tr)
        res["head"].append(np.mean(tune_stage2.head_probs(head, s, te).argmax(1) == s.y[te]))
        for arm in ARMS:
            spec = stages.StageSpec(epochs=arm["epochs"], learning_rate=arm["lr"], batch_size=32,
                                    patience=100, label_smoothing=arm["ls"], warmup_epochs=1,
                                    seed=d)
            pt = tune_stage2.finetune_probs(
                s, head, np.concatenate([s.A[v][tr] for v in range(3)] + [s.MA[tr]]),
                np.tile(t, (4, 1)), spec, (s.A[0][tr], t), tr, te)
            res[str(arm)].append(np.mean(pt.argmax(1) == s.y[te]))
        print(per, d, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
    for k, v in res.items():
        diff = np.array(v) - np.array(res["head"])
        print(f"NB={NB} per={per} {k}: {np.mean(v):.4f}  diff vs head {diff.mean():+.4f} "
              f"{np.round(diff, 3)}", flush=True)
