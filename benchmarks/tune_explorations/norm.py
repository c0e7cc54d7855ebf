import os, sys
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import numpy as np
from draws import cv_head_accuracy, draws
z = np.load(os.environ.get("TUNE_WORK", "/tmp") + "/mb_feats.npz"); y = z["y"]
C0, M0 = z["clean_out_relu"], z["mirror_out_relu"]
def l2(a): return a / np.linalg.norm(a, axis=1, keepdims=True)
TR = {"raw": lambda a: a,
      "l2": lambda a: l2(a) * 10,
      "sqrt_l2": lambda a: l2(np.sqrt(np.maximum(a, 0))) * 10,
      "sqrt": lambda a: np.sqrt(np.maximum(a, 0)),
      }
GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0)
for per in (10, 25):
    for name, f in TR.items():
        clean, mirror = f(C0), f(M0)
        accs, cs = [], []
        for tr, te, t, folds in draws(y, per):
            acc, c = cv_head_accuracy([clean[tr]], mirror[tr], t, folds, clean[te], mirror[te],
                                      y[te], grid=GRID)
            accs.append(acc); cs.append(c)
        print(f"per={per} {name:8s} acc {np.mean(accs):.4f} {np.round(accs,3)} c={cs}", flush=True)
