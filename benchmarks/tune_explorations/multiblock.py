"""TUNE-half experiment: LR (kfold CV) on final pooled features vs multi-block pooled features."""
import os, sys, time
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.dirname(os.path.abspath(__file__))); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, tensorflow as tf, keras
from transfer_quality import flowers128_halves, WEIGHTS, CLASSES
from tl_keras.data import pipeline, sources
from tl_keras.model import families

from draws import cv_head_accuracy, draws

tune, _ = flowers128_halves()
cache = os.environ.get("TUNE_WORK", "/tmp") + "/mb_feats.npz"
LAYERS = ["block_5_add", "block_9_add", "block_12_add", "block_15_add", "block_16_project_BN", "out_relu"]
if not os.path.exists(cache):
    fam = families.get_family("mobilenet_v2")
    bb = families.build_backbone(fam, str(WEIGHTS), 160, 0.35)
    inp = keras.Input((160, 160, 3))
    from tl_keras.model.layers import Preprocess
    x = Preprocess(fam.preprocess)(inp)
    sub = keras.Model(bb.input, [bb.get_layer(n).output for n in LAYERS])
    outs = sub(x, training=False)
    pooled = [keras.layers.GlobalAveragePooling2D()(o) for o in outs]
    m = keras.Model(inp, pooled)
    split = sources.Split([p for p, _ in tune], np.array([y for _, y in tune]))
    ds = pipeline.image_dataset(split, 160)
    res = {}
    for name, d in (("clean", ds), ("mirror", ds.map(lambda a, b: (tf.image.flip_left_right(a), b)))):
        t = time.time()
        outs = [[] for _ in LAYERS]
        for xb, _ in d.batch(64):
            for i, o in enumerate(m(xb, training=False)):
                outs[i].append(o.numpy())
        for i, n in enumerate(LAYERS):
            res[f"{name}_{n}"] = np.concatenate(outs[i])
        print(name, time.time() - t, flush=True)
    res["y"] = np.array([y for _, y in tune])
    np.savez(cache, **res)
z = np.load(cache)
y = z["y"]
print({n: z["clean_" + n].shape[1] for n in LAYERS})

def feats(kind, layers):
    parts = []
    for n in layers:
        a = z[f"{kind}_{n}"]
        scale = np.sqrt((z["clean_" + n] ** 2).sum(1).mean())  # unit average norm per block
        parts.append(a / scale)
    return np.concatenate(parts, 1)

ARMS = {"final": ["out_relu"],
        "final+16": ["block_16_project_BN", "out_relu"],
        "final+15+12": ["block_12_add", "block_15_add", "out_relu"],
        "all6": LAYERS}
for per in (10, 25):
    for arm, layers in ARMS.items():
        clean, mirror = feats("clean", layers), feats("mirror", layers)
        accs = []
        for tr, te, t, folds in draws(y, per):
            acc, c = cv_head_accuracy([clean[tr]], mirror[tr], t, folds, clean[te], mirror[te],
                                      y[te])
            accs.append(acc); cs.append(c)
        print(f"per={per} {arm:12s} acc {np.mean(accs):.4f} {np.round(accs,3)} c={c}", flush=True)
