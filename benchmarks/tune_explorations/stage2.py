"""TUNE-half: does stage 2 (cached activations, from the CV logistic head) beat the head alone?"""
import os, sys, time, itertools
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO); sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np, tensorflow as tf, keras
from transfer_quality import flowers128_halves, WEIGHTS
from tl_keras.data import pipeline, sources, augment
from tl_keras.model import families, classifier, blocks as blocks_lib
from tl_keras.train import features, kfold, activations, stages
tune, _ = flowers128_halves()
y = np.array([l for _, l in tune])
NB = int(os.environ.get("NB", "4"))
fam = families.get_family("mobilenet_v2")
clf = classifier.build_classifier(families.build_backbone(fam, str(WEIGHTS), 160, 0.35), fam, 5, dropout=0.0)
cut = activations.cut(clf, NB)
cache = os.environ.get("TUNE_WORK", "/tmp") + f"/acts_nb{NB}.npz"
if not os.path.exists(cache):
    split = sources.Split([p for p, _ in tune], y)
    ds = pipeline.image_dataset(split, 160)
    a = augment.Augment(flip=True, rotation=augment.degrees_to_turn_fraction(10), zoom=0.1, contrast=0.1)
    (acts, f), _, s = features.extract(cut.joint, ds, 64, views=3, augmenter=a, seed=1, progress=False)
    (macts, mf), _, _ = features.extract(cut.joint, ds.map(lambda x, l: (tf.image.flip_left_right(x), l)), 64, progress=False)
    np.savez(cache, acts=acts.reshape(3, len(y), *acts.shape[1:]), f=f.reshape(3, len(y), -1), macts=macts, mf=mf)
    print("cached", s, flush=True)
z = np.load(cache)
A, F, MA, MF = z["acts"], z["f"], z["macts"], z["mf"]
init = stages.snapshot(clf.model)
ARMS = [dict(epochs=e, lr=lr, ls=ls) for e, lr, ls in [(6, 3e-4, 0.0), (6, 1e-4, 0.0), (12, 1e-4, 0.0), (6, 3e-4, 0.1)]]
for per in (10, 25):
    res = {"head": []} | {str(a): [] for a in ARMS}
    for draw in (1, 2, 3):
        rng = np.random.default_rng(draw)
        tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(5)])
        te = np.setdiff1d(np.arange(len(y)), tr)
        t = np.eye(5, dtype=np.float32)[y[tr]]
        vs = [F[v][tr] for v in range(3)]
        cv = kfold.cross_validate(vs, t, kfold.fold_ids(y[tr], 5, 0), mirror=MF[tr])
        head = kfold.fit_views(vs, t, cv.c, mirror=MF[tr])
        p = (head.predict(F[0][te]) + head.predict(MF[te])) / 2
        res["head"].append(np.mean(p.argmax(1) == y[te]))
        for arm in ARMS:
            stages.restore(clf.model, init)
            clf.backbone.trainable = False
            clf.model.get_layer("head").set_weights([head.kernel, head.bias])
            blocks_lib.set_trainable_top_blocks(clf.backbone, fam, NB)
            xa = np.concatenate([A[v][tr] for v in range(3)] + [MA[tr]])
            ya = np.tile(t, (4, 1))
            spec = stages.StageSpec(epochs=arm["epochs"], learning_rate=arm["lr"], batch_size=32, patience=100,
                                    label_smoothing=arm["ls"], warmup_epochs=1, seed=draw)
            stages.fit_finetune(cut.trainer, (xa, ya), (A[0][tr], t), spec, initial_epoch=0,
                                steps_per_epoch=-(-len(tr) // 32), verbose=0)
            pt = (cut.trainer.predict(A[0][te], batch_size=256, verbose=0) + cut.trainer.predict(MA[te], batch_size=256, verbose=0)) / 2
            res[str(arm)].append(np.mean(pt.argmax(1) == y[te]))
            clf.backbone.trainable = False
        print(per, draw, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
    for k, v in res.items():
        d = np.array(v) - np.array(res["head"])
        print(f"NB={NB} per={per} {k}: {np.mean(v):.4f}  diff vs head {d.mean():+.4f} {np.round(d,3)}", flush=True)
