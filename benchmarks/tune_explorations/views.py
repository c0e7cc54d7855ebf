import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, tensorflow as tf
from transfer_quality import flowers128_halves, WEIGHTS
from tl_keras.data import pipeline, sources, augment
from tl_keras.model import families, classifier
from tl_keras.train import features
from draws import cv_head_accuracy, draws
tune, _ = flowers128_halves()
y = np.array([l for _, l in tune])
cache = os.environ.get("TUNE_WORK", "/tmp") + "/views_feats.npz"
AUGS = {"default": dict(flip=True, rotation=10, zoom=0.1, contrast=0.1),
        "crop": dict(flip=True, crop_min_area=0.35, contrast=0.1)}
if not os.path.exists(cache):
    fam = families.get_family("mobilenet_v2")
    clf = classifier.build_classifier(families.build_backbone(fam, str(WEIGHTS), 160, 0.35), fam, 5)
    split = sources.Split([p for p, _ in tune], y)
    ds = pipeline.image_dataset(split, 160)
    res = {}
    for name, kw in AUGS.items():
        a = augment.Augment(rotation=augment.degrees_to_turn_fraction(kw.pop("rotation", 0)), **kw)
        f, _, s = features.extract(clf.features, ds, 64, views=9, augmenter=a, seed=1, progress=False)
        res[name] = f.reshape(9, len(y), -1)[1:]
        print(name, s, flush=True)
        if "clean" not in res:
            res["clean"] = f.reshape(9, len(y), -1)[0]
    z0 = np.load(os.environ.get("TUNE_WORK", "/tmp") + "/mb_feats.npz")
    res["mirror"] = z0["mirror_out_relu"]
    print("check clean", np.abs(res["clean"] - z0["clean_out_relu"]).max())
    np.savez(cache, **res)
z = np.load(cache)
clean, mirror = z["clean"], z["mirror"]
for per in (10, 25):
    for arm, nv in (("default", 0), ("default", 1), ("default", 3), ("default", 8), ("crop", 3), ("crop", 8)):
        accs, cs = [], []
        for tr, te, t, folds in draws(y, per):
            acc, c = cv_head_accuracy([clean[tr]] + [z[arm][i][tr] for i in range(nv)], mirror[tr], t, folds, clean[te], mirror[te],
                                      y[te])
            accs.append(acc); cs.append(c)
        print(f"per={per} {arm:8s} views={nv} acc {np.mean(accs):.4f} {np.round(accs,3)} c={cs}", flush=True)
