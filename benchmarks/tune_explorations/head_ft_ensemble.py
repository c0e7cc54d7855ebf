"""TUNE half (issue 20): the head, stage 2 from it, and their output ensemble (mean of probabilities).

Default settings (2 cached views, stage 2 on the auto top blocks for 6 epochs at 3e-4, warmup 1,
label smoothing 0.1, dropout 0.2), 25 and 150 photos a class of the TUNE half, draws 1-3, tested
on the rest of the half, every model mirror-averaged. Not kept (benchmarks/README.md, session 12).

  PYTHONPATH=. python benchmarks/tune_explorations/head_ft_ensemble.py
"""
import os, sys
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
fam = families.get_family("mobilenet_v2")
bb = families.build_backbone(fam, str(WEIGHTS), 160, 0.35)
NB = blocks_lib.auto_finetune_blocks(blocks_lib.num_blocks(bb, fam))
clf = classifier.build_classifier(bb, fam, 5, dropout=0.2)
cut = activations.cut(clf, NB)
cache = os.environ.get("TUNE_WORK", "/tmp") + f"/ens_acts_nb{NB}.npz"
if not os.path.exists(cache):
    split = sources.Split([p for p, _ in tune], y)
    ds = pipeline.image_dataset(split, 160)
    a = augment.build_augmenter(True, 10.0, 0.1, 0.1, 42)
    (acts, f), _, s = features.extract(cut.joint, ds, 64, views=2, augmenter=a, seed=42, progress=False)
    (macts, mf), _, _ = features.extract(cut.joint, ds.map(lambda x, l: (tf.image.flip_left_right(x), l)), 64, progress=False)
    np.savez(cache, acts=acts.reshape(2, len(y), *acts.shape[1:]), f=f.reshape(2, len(y), -1), macts=macts, mf=mf)
    print("cached", s, flush=True)
z = np.load(cache)
A, F, MA, MF = z["acts"], z["f"], z["macts"], z["mf"]
init = stages.snapshot(clf.model)
print("NB", NB, flush=True)
for per in (25, 150):
    res = {"head": [], "ft": [], "ens": []}
    for draw in (1, 2, 3):
        rng = np.random.default_rng(draw)
        tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(5)])
        te = np.setdiff1d(np.arange(len(y)), tr)
        t = np.eye(5, dtype=np.float32)[y[tr]]
        vs = [F[v][tr] for v in range(2)]
        cv = kfold.cross_validate(vs, t, kfold.fold_ids(y[tr], 5, 0), mirror=MF[tr])
        head = kfold.fit_views(vs, t, cv.c, mirror=MF[tr])
        ph = (head.predict(F[0][te]) + head.predict(MF[te])) / 2
        stages.restore(clf.model, init)
        clf.backbone.trainable = False
        clf.model.get_layer("head").set_weights([head.kernel, head.bias])
        blocks_lib.set_trainable_top_blocks(clf.backbone, fam, NB)
        xa = np.concatenate([A[v][tr] for v in range(2)])
        ya = np.tile(t, (2, 1))
        spec = stages.StageSpec(epochs=6, learning_rate=3e-4, batch_size=32, patience=100,
                                label_smoothing=0.1, warmup_epochs=1, seed=42)
        stages.fit_finetune(cut.trainer, (xa, ya), None, spec, initial_epoch=0,
                            steps_per_epoch=-(-len(tr) // 32), verbose=0)
        pf = (cut.trainer.predict(A[0][te], batch_size=256, verbose=0) + cut.trainer.predict(MA[te], batch_size=256, verbose=0)) / 2
        clf.backbone.trainable = False
        for k, p in (("head", ph), ("ft", pf), ("ens", (ph + pf) / 2)):
            res[k].append(np.mean(p.argmax(1) == y[te]))
        print(per, draw, {k: round(v[-1], 4) for k, v in res.items()}, flush=True)
    for k, v in res.items():
        d = np.array(v) - np.array(res["head"])
        print(f"per={per} {k}: {np.mean(v):.4f}  vs head {d.mean():+.4f} {np.round(d, 3)}", flush=True)
