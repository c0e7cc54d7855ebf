"""Which out-of-distribution score `model.open_set` uses (issue 23), chosen on the TUNE half.

200 photos a class from the TUNE half of the flowers128 photos not in flowers/
(`transfer_quality.flowers128_halves`; seeded), MobileNetV2-0.35 at 160 px,
features of each photo and its mirror through the package's own pipeline.
For each of the 10 choices of 3 known classes out of 5: the cross-validated
logistic head (the default stage 1) on 150 photos of each known class, then
every score on the other 50 photos of all five classes (the two unseen
classes are the positives). Prints the mean AUROC over the 10 choices (with
its standard error) and the share of unseen photos flagged at the threshold
that keeps 95% of the known test photos (chosen on them: a diagnostic).

Scores: from the head's probabilities (max-probability, entropy), from its
logits (energy = -logsumexp, max logit) and from the features (cosine k
nearest neighbours, class centroids, Mahalanobis and relative Mahalanobis on
principal directions, the residual outside them), and entropy combined with
four of them by the mean of their ranks.

Usage (from the repo root): PYTHONPATH=. python benchmarks/tune_explorations/open_set_scores.py
Features are cached in $TUNE_WORK (default /tmp).
"""

import itertools
import os
import sys

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))

import numpy as np  # noqa: E402
from scipy.stats import rankdata  # noqa: E402
from sklearn.metrics import roc_auc_score  # noqa: E402

from transfer_quality import WEIGHTS, flowers128_halves  # noqa: E402

PER_CLASS, TRAIN = 200, 150


def load_features():
    cache = os.path.join(os.environ.get("TUNE_WORK", "/tmp"), "open_set_tune_feats.npz")
    if os.path.exists(cache):
        z = np.load(cache)
        return z["clean"], z["mirror"], z["y"]
    from tl_keras.data import pipeline, sources
    from tl_keras.model import classifier, families
    from tl_keras.train import features

    tune, _ = flowers128_halves()
    rng = np.random.default_rng(23)
    picked = []
    for c in range(5):
        rows = [r for r in tune if r[1] == c]
        picked += [rows[i] for i in sorted(rng.choice(len(rows), PER_CLASS, replace=False))]
    y = np.array([label for _, label in picked])
    fam = families.get_family("mobilenet_v2")
    clf = classifier.build_classifier(families.build_backbone(fam, str(WEIGHTS), 160, 0.35),
                                      fam, 5)
    ds = pipeline.image_dataset(sources.Split([p for p, _ in picked], y), 160)
    f, _, _ = features.extract(clf.features, ds, 64, progress=False, mirror=True)
    clean, mirror = f[:len(y)], f[len(y):]  # the clean rows, then the mirrors'
    np.savez(cache, clean=clean, mirror=mirror, y=y)
    return clean, mirror, y


def _lse(z):
    m = z.max(1, keepdims=True)
    return (m + np.log(np.exp(z - m).sum(1, keepdims=True)))[:, 0]


def _mahalanobis(ztr, ytr, zte, n_known):
    means = np.stack([ztr[ytr == c].mean(0) for c in range(n_known)])
    r = ztr - means[ytr]
    cov = r.T @ r / len(r)
    cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov))
    inv = np.linalg.inv(cov)
    d = np.stack([np.einsum("ij,jk,ik->i", zte - m, inv, zte - m) for m in means], 1)
    bcov = np.cov(ztr.T)
    bcov += 1e-3 * np.trace(bcov) / len(bcov) * np.eye(len(bcov))
    m0 = ztr.mean(0)
    bg = np.einsum("ij,jk,ik->i", zte - m0, np.linalg.inv(bcov), zte - m0)
    return d.min(1), (d - bg[:, None]).min(1)


def scores_for(known, clean, mirror, y):
    from tl_keras.train import kfold

    tr, te = [], []
    for c in range(5):
        idx = np.flatnonzero(y == c)
        if c in known:
            tr += list(idx[:TRAIN])
        te += list(idx[TRAIN:])
    tr, te = np.array(tr), np.array(te)
    unseen = ~np.isin(y[te], known)
    ytr = np.searchsorted(np.array(known), y[tr])
    targets = np.eye(len(known), dtype=np.float32)[ytr]
    cv = kfold.cross_validate([clean[tr]], targets, kfold.fold_ids(ytr, 5, 0), mirror=mirror[tr])
    head = kfold.fit_views([clean[tr]], targets, cv.c, mirror=mirror[tr])
    p = (head.predict(clean[te]) + head.predict(mirror[te])) / 2
    logits = ((clean[te] + mirror[te]) @ head.kernel) / 2 + head.bias
    out = {"max-probability": 1 - p.max(1),
           "entropy": -(p * np.log(np.clip(p, 1e-7, 1))).sum(1),
           "energy (logits)": -_lse(logits), "max logit (logits)": -logits.max(1)}
    train_rows = np.concatenate([clean[tr], mirror[tr]])
    mu = train_rows.mean(0)

    def unit(x):
        x = x - mu
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    a, b = unit(train_rows), unit((clean[te] + mirror[te]) / 2)
    sims = b @ a.T
    for k in (5, 10):
        out[f"kNN cosine, k={k}"] = -np.sort(sims, 1)[:, -k]
    centroids = np.stack([a[:len(tr)][ytr == c].mean(0) for c in range(len(known))])
    centroids /= np.linalg.norm(centroids, axis=1, keepdims=True)
    out["class centroid cosine"] = -(b @ centroids.T).max(1)
    z = train_rows - mu
    w, v = np.linalg.eigh(z.T @ z / len(z))
    order = np.argsort(w)[::-1]
    zt = (clean[te] + mirror[te]) / 2 - mu
    yy = np.concatenate([ytr, ytr])
    for dim in (64, 128):
        basis = v[:, order[:dim]]
        md, rel = _mahalanobis(z @ basis, yy, zt @ basis, len(known))
        out[f"Mahalanobis, {dim} dims"], out[f"relative Mahalanobis, {dim} dims"] = md, rel
        out[f"residual outside {dim} dims"] = (np.linalg.norm(zt - (zt @ basis) @ basis.T, axis=1)
                                               / np.linalg.norm(zt, axis=1))
    # Session 13: the served score (entropy) combined with a feature-space one,
    # as the mean of their ranks over the test photos (an upper bound for any
    # served combination, whose scales would have to be fixed in advance).
    for name in ("relative Mahalanobis, 128 dims", "kNN cosine, k=10", "class centroid cosine",
                 "energy (logits)"):
        out[f"entropy + {name} (ranks)"] = (rankdata(out["entropy"]) + rankdata(out[name])) / 2
    return out, unseen


def main():
    clean, mirror, y = load_features()
    table = {}
    for known in itertools.combinations(range(5), 3):
        out, unseen = scores_for(known, clean, mirror, y)
        for name, s in out.items():
            thr = np.quantile(s[~unseen], 0.95)
            table.setdefault(name, []).append((roc_auc_score(unseen, s), np.mean(s[unseen] > thr)))
    print(f"TUNE half, {PER_CLASS} photos a class, mean over the 10 choices of 3 known classes")
    print(f"{'score':36s}{'AUROC':>8}{'s.e.':>7}{'unseen flagged at 95% known kept':>34}")
    for name, rows in sorted(table.items(), key=lambda kv: -np.mean([r[0] for r in kv[1]])):
        r = np.array(rows)
        print(f"{name:36s}{r[:, 0].mean():8.3f}{r[:, 0].std(ddof=1) / np.sqrt(len(r)):7.3f}"
              f"{r[:, 1].mean():34.3f}")


if __name__ == "__main__":
    main()
