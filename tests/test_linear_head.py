"""Stage 1 as a cross-validated logistic head, and the stage-2 trial on held-out folds.

Real MobileNetV2-0.35 weights and the flowers_mini photos (100, 5 classes):
the features of a clean and an augmented view and of the mirrored images
are computed once for the module.
"""

import numpy as np
import pytest
import tensorflow as tf

from conftest import FLOWERS_MINI, WEIGHTS_MNV2_035
from tl_keras.data import augment, pipeline, sources
from tl_keras.model import blocks as blocks_lib
from tl_keras.model import classifier, families
from tl_keras.train import activations, features, finetune_trial, kfold, linear_head, stages

SIZE = 96


@pytest.fixture(scope="module")
def mini():
    classes = sorted(p.name for p in FLOWERS_MINI.iterdir() if p.is_dir())
    items = [(str(f), i) for i, c in enumerate(classes) for f in sorted((FLOWERS_MINI / c).iterdir())]
    split = sources.Split([p for p, _ in items], np.array([y for _, y in items]))
    fam = families.get_family("mobilenet_v2")
    clf = classifier.build_classifier(
        families.build_backbone(fam, str(WEIGHTS_MNV2_035), SIZE, 0.35), fam, len(classes))
    cut = activations.cut(clf, 1)
    images = pipeline.image_dataset(split, SIZE)
    aug = augment.Augment(flip=True, rotation=0.03, zoom=0.1)
    (acts, feats), labels, _ = features.extract(cut.joint, images, 32, views=2, augmenter=aug,
                                                seed=3, progress=False)
    (mirror_acts, mirror), _, _ = features.extract(cut.joint, images.map(
        lambda x, y: (tf.image.flip_left_right(x), y)), 32, progress=False)
    n = len(split)
    return dict(clf=clf, fam=fam, cut=cut, n=n, labels=labels[:n], mirror=mirror,
                mirror_acts=mirror_acts,
                feats=[feats[:n], feats[n:]], acts=[acts[:n], acts[n:]],
                targets=np.eye(len(classes), dtype=np.float32)[labels[:n]])


def test_the_installed_head_is_the_cross_validated_logistic_regression(mini):
    clf = mini["clf"]
    result, cv = linear_head.fit_head_cv(clf.model, mini["feats"], mini["labels"],
                                         mini["targets"], linear_head.HeadCVSpec(seed=1),
                                         mirror=mini["mirror"])
    # The model's Dense head computes exactly the logistic head fitted at the chosen C.
    ref = kfold.fit_views(mini["feats"], mini["targets"], cv.c, mirror=mini["mirror"])
    served = clf.head.predict(mini["feats"][0], verbose=0)
    np.testing.assert_allclose(served, ref.predict(mini["feats"][0]), atol=1e-5)
    # Its reported validation figures are the out-of-fold ones, not training accuracy.
    assert result.val_accuracy == pytest.approx(cv.accuracy(mini["labels"]))
    assert result.val_loss == pytest.approx(cv.losses[cv.c])
    train_acc = float(np.mean(served.argmax(1) == mini["labels"]))
    assert result.val_accuracy < train_acc
    # Real features of 5 flower classes: far above chance (0.2) out of fold.
    assert result.val_accuracy > 0.6
    assert sorted(np.unique(cv.folds)) == [0, 1, 2, 3, 4]
    rec = linear_head.describe(cv, mini["n"])
    assert rec["folds"] == 5 and rec["c"] == cv.c
    assert {float(c) for c in rec["out_of_fold_log_loss"]} == set(cv.losses)


def test_class_weights_change_the_head(mini):
    clf = mini["clf"]
    spec = linear_head.HeadCVSpec(seed=1, grid=(0.01,))
    linear_head.fit_head_cv(clf.model, mini["feats"], mini["labels"], mini["targets"], spec)
    plain = clf.head.predict(mini["feats"][0], verbose=0)
    heavy = linear_head.HeadCVSpec(seed=1, grid=(0.01,), class_weight={0: 5.0, 1: 1.0, 2: 1.0,
                                                                       3: 1.0, 4: 1.0})
    linear_head.fit_head_cv(clf.model, mini["feats"], mini["labels"], mini["targets"], heavy)
    weighted = clf.head.predict(mini["feats"][0], verbose=0)
    assert weighted[:, 0].mean() > plain[:, 0].mean() + 0.02


def test_folds_shrink_to_the_smallest_class(mini):
    keep = np.concatenate([np.flatnonzero(mini["labels"] == c)[:3] for c in range(5)])
    _, cv = linear_head.fit_head_cv(mini["clf"].model, [f[keep] for f in mini["feats"]],
                                    mini["labels"][keep], mini["targets"][keep],
                                    linear_head.HeadCVSpec(folds=5, seed=0))
    assert int(cv.folds.max()) + 1 == 3


def test_the_trial_restores_the_model_and_measures_held_out_folds(mini):
    clf, fam, cut = mini["clf"], mini["fam"], mini["cut"]
    _, cv = linear_head.fit_head_cv(clf.model, mini["feats"], mini["labels"], mini["targets"],
                                    linear_head.HeadCVSpec(seed=1), mirror=mini["mirror"])
    before = stages.snapshot(clf.model)
    blocks_lib.set_trainable_top_blocks(clf.backbone, fam, 1)
    spec = stages.StageSpec(epochs=2, learning_rate=3e-4, batch_size=16, warmup_epochs=1)
    trial = finetune_trial.try_finetune(clf.model, cut.trainer, mini["acts"], mini["feats"],
                                        mini["labels"], mini["targets"], cv, spec,
                                        mirror=mini["mirror"], min_heldout=30)
    clf.backbone.trainable = False
    # Every weight is back as it was: the trial leaves no trace in the model.
    for a, b in zip(before, stages.snapshot(clf.model)):
        np.testing.assert_array_equal(a, b)
    # 20 images a fold: two folds reach 30 held-out images.
    assert trial.folds == [0, 1] and trial.images == 40
    assert set(trial.index) == set(np.flatnonzero(cv.folds <= 1))
    # The head's held-out accuracy is that of the fold heads: the out-of-fold
    # probabilities of the cross-validation on the same images (clean view).
    assert 0.5 < trial.head_accuracy <= 1.0
    assert trial.probs.shape == (40, 5)
    # The discordant pairs: their difference is the difference of the accuracies.
    assert trial.finetune_only_right - trial.head_only_right == round(
        (trial.finetune_accuracy - trial.head_accuracy) * 40)
    right = trial.probs.argmax(1) == mini["labels"][trial.index]
    assert trial.finetune_only_right <= right.sum() and trial.head_only_right <= 40 - right.sum()
    assert trial.finetune_wins == ((trial.finetune_accuracy, -trial.finetune_loss)
                                   > (trial.head_accuracy, -trial.head_loss))
    assert trial.summary()["finetune_kept"] == trial.finetune_wins


def test_with_mirror_activations_the_trial_probabilities_are_as_served(mini):
    # The exported model averages each image with its mirror: the trial's
    # held-out probabilities, which calibrate a kept stage 2 and place its
    # thresholds, do too; its figures (the decision) are the clean views'.
    clf, fam, cut = mini["clf"], mini["fam"], mini["cut"]
    _, cv = linear_head.fit_head_cv(clf.model, mini["feats"], mini["labels"], mini["targets"],
                                    linear_head.HeadCVSpec(seed=1), mirror=mini["mirror"])
    blocks_lib.set_trainable_top_blocks(clf.backbone, fam, 1)
    spec = stages.StageSpec(epochs=2, learning_rate=3e-4, batch_size=16, warmup_epochs=1)
    args = (clf.model, cut.trainer, mini["acts"], mini["feats"], mini["labels"],
            mini["targets"], cv, spec)

    def trial(mirror_acts):
        t = finetune_trial.try_finetune(*args, mirror=mini["mirror"],
                                        mirror_activations=mirror_acts, min_heldout=30)
        t_targets = mini["targets"][t.index]
        return t, kfold.log_loss(t.probs, t_targets, False)

    clean, clean_loss = trial(None)
    # "Mirrors" that are the clean views themselves: the average is the clean
    # prediction, so the probabilities give the trial's own fine-tuned figures.
    same, same_loss = trial(mini["acts"][0])
    served, served_loss = trial(mini["mirror_acts"])
    clf.backbone.trainable = False
    for t, loss in ((clean, clean_loss), (same, same_loss)):
        assert loss == pytest.approx(t.finetune_loss, rel=1e-5)
        assert kfold.correct(t.probs, mini["labels"][t.index]).mean() == t.finetune_accuracy
    # Real mirrors: probabilities of another input, averaged in.
    assert abs(served_loss - served.finetune_loss) > 1e-3
    np.testing.assert_allclose(served.probs.sum(axis=1), 1.0, atol=1e-5)
    assert served.probs.shape == (40, 5) and served.index.tolist() == clean.index.tolist()


def test_a_stage_without_validation_runs_its_whole_schedule(mini):
    clf, fam, cut = mini["clf"], mini["fam"], mini["cut"]
    start = stages.snapshot(clf.model)
    blocks_lib.set_trainable_top_blocks(clf.backbone, fam, 1)
    spec = stages.StageSpec(epochs=3, learning_rate=3e-4, batch_size=16, patience=1)
    res = stages.fit_finetune(cut.trainer, (mini["acts"][0], mini["targets"]), None, spec,
                              initial_epoch=0, steps_per_epoch=7, verbose=0)
    clf.backbone.trainable = False
    assert res.epochs == 3 and res.best_epoch == 3
    assert np.isnan(res.val_accuracy) and np.isnan(res.val_loss)
    assert any(not np.array_equal(a, b) for a, b in zip(start, stages.snapshot(clf.model)))
    stages.restore(clf.model, start)
