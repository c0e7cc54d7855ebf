"""What `stage2.py` and `head_ft_ensemble.py` share: the TUNE half's cached activations, the
draws, the cross-validated logistic head and stage 2 started from it (not a script)."""
import os
import sys
import types

os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "benchmarks"))
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from tl_keras.data import pipeline, sources  # noqa: E402
from tl_keras.model import blocks as blocks_lib  # noqa: E402
from tl_keras.model import classifier, families  # noqa: E402
from tl_keras.train import activations, features, kfold, stages  # noqa: E402
from transfer_quality import WEIGHTS, flowers128_halves  # noqa: E402


def setup(nb, dropout, views, augmenter, seed, cache_name):
    """MobileNetV2-0.35 at 160 px cut below its top `nb` blocks (None: the auto depth), and the
    TUNE half's activations and pooled features: `views` views and the mirror, cached in
    $TUNE_WORK/`cache_name`.npz (`{nb}` in it: the depth).

    Returns:
        A namespace: y, fam, clf, cut, nb, A / F (views x images), MA / MF (mirrors), init.
    """
    tune, _ = flowers128_halves()
    y = np.array([label for _, label in tune])
    fam = families.get_family("mobilenet_v2")
    backbone = families.build_backbone(fam, str(WEIGHTS), 160, 0.35)
    if nb is None:
        nb = blocks_lib.auto_finetune_blocks(blocks_lib.num_blocks(backbone, fam))
    clf = classifier.build_classifier(backbone, fam, 5, dropout=dropout)
    cut = activations.cut(clf, nb)
    cache = os.environ.get("TUNE_WORK", "/tmp") + f"/{cache_name.format(nb=nb)}.npz"
    if not os.path.exists(cache):
        ds = pipeline.image_dataset(sources.Split([p for p, _ in tune], y), 160)
        (acts, f), _, s = features.extract(cut.joint, ds, 64, views=views, augmenter=augmenter,
                                           seed=seed, progress=False)
        (macts, mf), _, _ = features.extract(
            cut.joint, ds.map(lambda x, label: (tf.image.flip_left_right(x), label)), 64,
            progress=False)
        np.savez(cache, acts=acts.reshape(views, len(y), *acts.shape[1:]),
                 f=f.reshape(views, len(y), -1), macts=macts, mf=mf)
        print("cached", s, flush=True)
    z = np.load(cache)
    return types.SimpleNamespace(y=y, fam=fam, clf=clf, cut=cut, nb=nb, A=z["acts"], F=z["f"],
                                 MA=z["macts"], MF=z["mf"], init=stages.snapshot(clf.model))


def draw(y, per, seed):
    """`per` photos a class (seeded) to train on, the rest to test: (train, test, targets)."""
    rng = np.random.default_rng(seed)
    tr = np.concatenate([rng.permutation(np.flatnonzero(y == c))[:per] for c in range(5)])
    return tr, np.setdiff1d(np.arange(len(y)), tr), np.eye(5, dtype=np.float32)[y[tr]]


def cv_head(t, s, tr):
    """The default stage 1 on the training photos' views and mirrors."""
    vs = [s.F[v][tr] for v in range(len(s.F))]
    cv = kfold.cross_validate(vs, t, kfold.fold_ids(s.y[tr], 5, 0), mirror=s.MF[tr])
    return kfold.fit_views(vs, t, cv.c, mirror=s.MF[tr])


def head_probs(head, s, te):
    return (head.predict(s.F[0][te]) + head.predict(s.MF[te])) / 2


def finetune_probs(s, head, x, y, spec, val, tr, te):
    """Stage 2 of the top blocks from `head` on activation rows x / targets y; the mirror-averaged
    probabilities of the test photos."""
    stages.restore(s.clf.model, s.init)
    s.clf.backbone.trainable = False
    s.clf.model.get_layer("head").set_weights([head.kernel, head.bias])
    blocks_lib.set_trainable_top_blocks(s.clf.backbone, s.fam, s.nb)
    stages.fit_finetune(s.cut.trainer, (x, y), val, spec, initial_epoch=0,
                        steps_per_epoch=-(-len(tr) // 32), verbose=0)
    p = (s.cut.trainer.predict(s.A[0][te], batch_size=256, verbose=0)
         + s.cut.trainer.predict(s.MA[te], batch_size=256, verbose=0)) / 2
    s.clf.backbone.trainable = False
    return p
