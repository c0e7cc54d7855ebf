"""The k-fold machinery on cached features (tl_keras.train.kfold).

The logistic head is checked against scikit-learn's LogisticRegression (the
same objective), the folds for stratification and grouping, and the
cross-validation on real data (scikit-learn's handwritten digits, 1797 images)
against scikit-learn's own cross_val_predict with the same folds.
"""

import numpy as np
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import PredefinedSplit, cross_val_predict
from sklearn.multiclass import OneVsRestClassifier

from tl_keras.train import kfold


@pytest.fixture(scope="module")
def digits():
    x, y = load_digits(return_X_y=True)
    return (x / 16.0).astype(np.float32), y


def test_the_logistic_head_is_scikit_learns(digits):
    x, y = digits
    x, y = x[:400], y[:400]
    t = np.eye(10, dtype=np.float32)[y]
    ours = kfold.fit_logistic(x, t, 0.3, max_iter=2000, tol=1e-7)
    ref = LogisticRegression(C=0.3, max_iter=5000, tol=1e-8).fit(x, y)
    np.testing.assert_allclose(ours.predict(x), ref.predict_proba(x), atol=2e-3)
    assert (ours.predict(x).argmax(1) == ref.predict(x)).mean() > 0.99


def test_multi_label_heads_are_one_sigmoid_per_label(digits):
    x, y = digits
    x = x[:300]
    t = np.stack([y[:300] % 2 == 0, y[:300] > 4, y[:300] == 3], axis=1).astype(np.float32)
    ours = kfold.fit_logistic(x, t, 1.0, multi_label=True, max_iter=2000, tol=1e-7)
    ref = OneVsRestClassifier(LogisticRegression(C=1.0, max_iter=5000, tol=1e-8)).fit(x, t)
    np.testing.assert_allclose(ours.predict(x), ref.predict_proba(x), atol=2e-3)


def test_row_weights_count_like_repeated_rows(digits):
    x, y = digits
    x, y = x[:200], y[:200]
    t = np.eye(10, dtype=np.float32)[y]
    w = np.where(y < 5, 2.0, 1.0).astype(np.float32)
    weighted = kfold.fit_logistic(x, t, 0.5, weights=w, max_iter=2000, tol=1e-7)
    twice = np.flatnonzero(y < 5)
    repeated = kfold.fit_logistic(np.concatenate([x, x[twice]]), np.concatenate([t, t[twice]]),
                                  0.5, max_iter=2000, tol=1e-7)
    np.testing.assert_allclose(weighted.predict(x), repeated.predict(x), atol=2e-3)


def test_folds_are_stratified_seeded_and_keep_groups_together():
    labels = np.repeat(np.arange(4), [40, 23, 17, 5])
    folds = kfold.fold_ids(labels, 5, seed=1)
    for c in range(4):
        counts = np.bincount(folds[labels == c], minlength=5)
        assert counts.max() - counts.min() <= 1, (c, counts)
    np.testing.assert_array_equal(folds, kfold.fold_ids(labels, 5, seed=1))
    assert not np.array_equal(folds, kfold.fold_ids(labels, 5, seed=2))
    groups = [i // 2 for i in range(len(labels))]  # pairs of copies
    grouped = kfold.fold_ids(labels, 5, seed=1, groups=groups)
    assert all(grouped[i] == grouped[i + 1] for i in range(0, len(labels) - 1, 2))
    with pytest.raises(ValueError, match="k=1"):
        kfold.fold_ids(labels, 1, seed=0)


def test_a_head_on_principal_directions_lifts_to_the_raw_features(digits):
    x, y = digits
    proj = kfold.Projection.fit(x[:500], 20)
    head = kfold.fit_logistic(proj(x[:500]), np.eye(10, dtype=np.float32)[y[:500]], 1.0)
    lifted = proj.lift(head)
    assert lifted.kernel.shape == (64, 10)
    np.testing.assert_allclose(lifted.predict(x[500:]), head.predict(proj(x[500:])), atol=1e-5)


def test_cross_validation_matches_scikit_learn_out_of_fold(digits):
    x, y = digits
    t = np.eye(10, dtype=np.float32)[y]
    folds = kfold.fold_ids(y, 5, seed=0)
    cv = kfold.cross_validate([x], t, folds, grid=(0.01, 0.1, 1.0), max_dim=64)
    assert cv.c == min(cv.losses, key=cv.losses.get)
    # The grid's losses are not flat: the choice matters (strong regularisation underfits).
    assert cv.losses[0.01] > cv.losses[cv.c] + 0.05
    ref = cross_val_predict(LogisticRegression(C=cv.c, max_iter=5000), x, y,
                            cv=PredefinedSplit(folds), method="predict_proba")
    ref_acc = float((ref.argmax(1) == y).mean())
    assert abs(cv.accuracy(y) - ref_acc) <= 0.01, (cv.accuracy(y), ref_acc)
    assert cv.accuracy(y) > 0.93  # logistic regression on digits: about 0.96 cross-validated
    # Out of fold: a held-out image's prediction comes from a head that never saw it.
    np.testing.assert_allclose(cv.oof_probs.sum(axis=1), 1.0, atol=1e-5)


def test_the_mirror_view_trains_and_averages_held_out_predictions(digits):
    x, y = digits
    mirror = x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)
    t = np.eye(10, dtype=np.float32)[y]
    folds = kfold.fold_ids(y, 3, seed=0)
    plain = kfold.cross_validate([x], t, folds, grid=(0.3,), max_dim=64)
    both = kfold.cross_validate([x], t, folds, mirror=mirror, grid=(0.3,), max_dim=64)
    # Digits are not mirror-symmetric: mixing in mirrored rows must change the predictions.
    assert np.abs(both.oof_probs - plain.oof_probs).max() > 0.05
    head = kfold.fit_views([x], t, 0.3, mirror=mirror, max_dim=64)
    assert head.kernel.shape == (64, 10)


def test_held_out_views_average_every_views_prediction(digits):
    x, y = digits
    shifted = np.roll(x.reshape(-1, 8, 8), 1, axis=2).reshape(-1, 64)  # an "augmented" view
    mirror = x.reshape(-1, 8, 8)[:, :, ::-1].reshape(-1, 64)
    t = np.eye(10, dtype=np.float32)[y]
    folds = kfold.fold_ids(y, 3, seed=0)
    tta = kfold.cross_validate([x, shifted], t, folds, mirror=mirror, grid=(0.3,),
                               max_dim=64, held_out_views=True)
    clean = kfold.cross_validate([x, shifted], t, folds, mirror=mirror, grid=(0.3,), max_dim=64)
    # Each fold's head (the same in both runs, fitted as cross_validate fits it)
    # predicts its held-out images from all three views (the clean run: from
    # the clean view and the mirror).
    proj = kfold.Projection.fit(np.concatenate([x, shifted, mirror]), 64)
    views = [proj(v) for v in (x, shifted, mirror)]
    held, tr = np.flatnonzero(folds == 1), np.flatnonzero(folds != 1)
    head = kfold.fit_logistic(np.concatenate([v[tr] for v in views]), np.tile(t[tr], (3, 1)), 0.3)
    want = np.mean([head.predict(v[held]) for v in views], axis=0)
    want_clean = np.mean([head.predict(v[held]) for v in (views[0], views[2])], axis=0)
    np.testing.assert_allclose(tta.oof_probs[held], want, atol=1e-5)
    np.testing.assert_allclose(clean.oof_probs[held], want_clean, atol=1e-5)
    assert np.abs(tta.oof_probs - clean.oof_probs).max() > 0.05


def test_the_path_stops_past_the_minimum_with_the_full_grids_choice(digits, monkeypatch):
    x, y = digits
    t = np.eye(10, dtype=np.float32)[y]
    folds = kfold.fold_ids(y, 5, seed=0)
    # Strong regularisation first: on digits the out-of-fold loss falls to its
    # minimum at C=10, then stops improving (the last strengths are skipped).
    grid = (0.001, 0.01, 0.1, 1.0, 10.0, 100.0, 1000.0, 1e4)
    fitted = []
    real_fit = kfold.fit_logistic
    monkeypatch.setattr(kfold, "fit_logistic", lambda *a, **k: fitted.append(a[2]) or
                        real_fit(*a, **k))
    early = kfold.cross_validate([x], t, folds, grid=grid, max_dim=64)
    stopped_fits = list(fitted)
    monkeypatch.setattr(kfold, "PATH_PATIENCE", len(grid))
    fitted.clear()
    full = kfold.cross_validate([x], t, folds, grid=grid, max_dim=64)
    assert len(full.losses) == len(grid) and len(fitted) == 5 * len(grid)
    # The strengths past the minimum were skipped, and nothing else changed.
    assert len(early.losses) < len(grid) and len(stopped_fits) == 5 * len(early.losses)
    assert max(early.losses) == sorted(grid)[len(early.losses) - 1]
    assert early.c == full.c
    np.testing.assert_array_equal(early.oof_probs, full.oof_probs)
    for c, loss in early.losses.items():
        assert loss == full.losses[c]


@pytest.mark.parametrize("rows", [40, 300])  # the Gram branch (N <= D), the covariance one
def test_projection_keeps_the_top_principal_directions(rows):
    x = np.random.default_rng(5).normal(size=(rows, 64)).astype(np.float32)
    x[:, :8] *= np.arange(10, 2, -1)  # 8 clearly leading directions
    proj = kfold.Projection.fit(x, 8)
    np.testing.assert_allclose(proj.basis.T @ proj.basis, np.eye(8), atol=1e-4)
    _, _, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    # The same subspace as the SVD's top 8 right singular vectors.
    np.testing.assert_allclose(np.abs(np.linalg.svd(vt[:8] @ proj.basis)[1]), 1.0, atol=1e-4)


def test_nested_fits_run_on_one_blas_thread_under_the_outer_limit():
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    seen = []
    inner = kfold._one_blas_thread(lambda: seen.append(blas_threads()))

    @kfold._one_blas_thread
    def outer():
        inner()
        seen.append(blas_threads())

    outer()
    inner()  # on its own again after the outer call: it sets the limit itself
    assert seen == [{1}, {1}, {1}]
    assert not kfold._limited.on
