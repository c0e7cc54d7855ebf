import os, sys
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import numpy as np
from tl_keras.train import kfold
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
        for draw in (1, 2, 3):
            rng = np.random.default_rng(draw)
            tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(5)])
            te = np.setdiff1d(np.arange(len(y)), tr)
            t = np.eye(5, dtype=np.float32)[y[tr]]
            folds = kfold.fold_ids(y[tr], 5, 0)
            cv = kfold.cross_validate([clean[tr]], t, folds, mirror=mirror[tr], grid=GRID)
            head = kfold.fit_views([clean[tr]], t, cv.c, mirror=mirror[tr])
            p = (head.predict(clean[te]) + head.predict(mirror[te])) / 2
            accs.append(np.mean(p.argmax(1) == y[te])); cs.append(cv.c)
        print(f"per={per} {name:8s} acc {np.mean(accs):.4f} {np.round(accs,3)} c={cs}", flush=True)
