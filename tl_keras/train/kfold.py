"""K-fold cross-validation on cached features: folds, logistic heads, out-of-fold probabilities.

A frozen backbone's features are computed once per image (and view), so
training a linear head on them costs milliseconds: k of them, one per fold,
are nearly free. This module is the one k-fold machinery of tl_keras:

* `fold_ids` assigns every image to one of k stratified folds (all views of
  an image, and byte-identical copies, in the same fold);
* `fit_logistic` trains an L2-regularised logistic head (softmax, or one
  sigmoid per label for multi-label data) by L-BFGS, full batch and
  deterministic: the same model as scikit-learn's `LogisticRegression`
  (multinomial, lbfgs), in float32;
* `cross_validate` picks the regularisation by the out-of-fold log loss over a
  small grid and returns the out-of-fold probabilities of every image: an
  honest estimate of the chosen procedure, and the input of the label audit
  and of calibration.

Rows of several views of an image train together; an image is predicted from
its clean view (averaged with its mirror's where given), as the exported model
predicts it.
"""

from __future__ import annotations

import dataclasses
import functools
import threading
from typing import Optional, Sequence

import numpy as np
from threadpoolctl import threadpool_limits

# Inverse regularisation strengths tried (scikit-learn's C: the weight of the
# data term against 0.5 * |W|^2). Log-spaced over the range where linear probes
# on pooled ImageNet features peak.
DEFAULT_C_GRID = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
# `cross_validate` stops along the grid (strong to weak regularisation) once
# this many strengths in a row have not improved the out-of-fold loss: the weakest
# strengths take the most L-BFGS steps, and past the loss's minimum they only
# confirm it.
PATH_PATIENCE = 2


_limited = threading.local()  # inside a one-BLAS-thread call on this thread


def _one_blas_thread(fn):
    """Runs `fn` with numpy's BLAS on one thread.

    The fits multiply small matrices thousands of times; OpenBLAS's worker
    threads spin between calls, and on a busy 2-core machine (TensorFlow's own
    threads, a second job) they starved each other: a 5-fold cross-validation
    on 750 flowers took 374 s with 2 BLAS threads and 8.7 s with one, under
    the same load (benchmarks/README.md, issue 20).
    """

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        # Nested calls (a cross-validation's fits) run under the outer limit:
        # each threadpool_limits scans the loaded libraries (about 4 ms).
        if getattr(_limited, "on", False):
            return fn(*args, **kwargs)
        _limited.on = True
        try:
            with threadpool_limits(1, user_api="blas"):
                return fn(*args, **kwargs)
        finally:
            _limited.on = False

    return wrapped


def fold_ids(labels: np.ndarray, k: int, seed: int,
             groups: Optional[Sequence] = None) -> np.ndarray:
    """A stratified fold index (0..k-1) per example.

    Args:
        labels: [N] class ids, or [N, C] multi-hot rows (stratified by their
            rarest label).
        k: number of folds (2 <= k <= N).
        seed: shuffles each class before dealing it round-robin over folds.
        groups: an optional key per example; examples with the same key
            (byte-identical copies) land in the same fold.

    Returns:
        [N] int fold ids; every fold holds examples of every class that has
        at least k examples.
    """
    labels = np.asarray(labels)
    n = len(labels)
    if not 2 <= k <= n:
        raise ValueError(f"k={k} folds need 2 <= k <= {n} examples")
    if labels.ndim == 2:  # multi-label: stratify by the rarest label each row carries
        freq = labels.sum(axis=0)
        strata = np.array([int(np.argmin(np.where(r > 0.5, freq, np.inf))) if r.any() else -1
                           for r in labels])
    else:
        strata = labels.astype(int)
    rng = np.random.default_rng(seed)
    # One representative per group; the group's other members follow it.
    keys = list(groups) if groups is not None else list(range(n))
    first: dict = {}
    for i, key in enumerate(keys):
        first.setdefault(key, i)
    reps = np.array(sorted(set(first.values())))
    out = np.empty(n, dtype=int)
    offset = 0
    for s in np.unique(strata[reps]):
        members = rng.permutation(reps[strata[reps] == s])
        # Continue the round-robin where the last class ended, so small
        # classes do not all start in fold 0.
        out[members] = (np.arange(len(members)) + offset) % k
        offset = (offset + len(members)) % k
    for i, key in enumerate(keys):
        out[i] = out[first[key]]
    return out


def _softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 0.5 * (1.0 + np.tanh(0.5 * z))


@dataclasses.dataclass
class LogisticHead:
    """A linear head: probabilities = softmax(x @ kernel + bias) (sigmoid if multi-label)."""

    kernel: np.ndarray  # [D, C]
    bias: np.ndarray  # [C]
    multi_label: bool = False

    def predict(self, x: np.ndarray) -> np.ndarray:
        z = np.asarray(x, np.float32) @ self.kernel + self.bias
        return _sigmoid(z) if self.multi_label else _softmax(z)


@_one_blas_thread
def fit_logistic(x: np.ndarray, targets: np.ndarray, c: float, multi_label: bool = False,
                 init: Optional[LogisticHead] = None, max_iter: int = 100,
                 weights: Optional[np.ndarray] = None, tol: float = 1e-4) -> LogisticHead:
    """Fits an L2-regularised logistic head by L-BFGS (full batch, deterministic).

    Minimises sum_i w_i loss_i + 0.5 / c * |kernel|^2 (the bias is not
    regularised), scikit-learn's objective for `LogisticRegression(C=c)`
    fitted with `sample_weight=w`.

    Args:
        x: [N, D] features.
        targets: [N, C] one-hot (or multi-hot, or soft) targets.
        c: inverse regularisation strength (> 0).
        multi_label: one sigmoid per column instead of a softmax over them.
        init: warm start (e.g. the fit for a neighbouring c).
        max_iter: L-BFGS iterations.
        weights: [N] row weights (class weights); None: all 1.
        tol: stop when the largest gradient entry is below tol * N. The
            default stops where more iterations no longer change a
            prediction's class on pooled features (tests use 1e-7 to compare
            with scikit-learn's optimum).

    Returns:
        The fitted head.
    """
    from scipy.optimize import minimize

    x = np.ascontiguousarray(x, dtype=np.float32)
    t = np.asarray(targets, dtype=np.float32)
    n, d = x.shape
    # Weighted rows: scaling a row's targets scales its loss and gradient
    # (the softmax loss is linear in the targets; for sigmoids both terms are
    # scaled below).
    w_rows = (np.ones(n, np.float32) if weights is None
              else np.asarray(weights, np.float32))[:, None]
    k = t.shape[1]
    lam = np.float32(1.0 / c)
    # Classes along the rows ([C, N] logits): the per-image max, exp and sum
    # then run along contiguous memory (a row-wise max over 5 columns of
    # [N, 5] took as long as the matrix product), and the weighted targets
    # and their per-image sums are computed once, not per iteration.
    tw = np.ascontiguousarray((t * w_rows).T)
    tw_sum = tw.sum(axis=0)
    w_col = w_rows[:, 0]
    tt = np.ascontiguousarray(t.T)

    def loss_grad(theta):
        w = theta[:d * k].reshape(d, k).astype(np.float32)
        b = theta[d * k:].astype(np.float32)
        z = np.ascontiguousarray((x @ w).T)
        z += b[:, None]
        if multi_label:
            # log(1 + e^z) - t z per label, computed stably
            loss = float(np.sum(w_col * (np.logaddexp(0.0, z) - tt * z)))
            g = w_col * (_sigmoid(z) - tt)
        else:
            # z shifted by each image's max m: logsumexp = m + log(sum e^z), and
            # sum_j tw_j (m + log s - z_j - m) needs no m.
            z -= z.max(axis=0)
            e = np.exp(z)
            s = e.sum(axis=0)
            loss = float(tw_sum @ np.log(s)) - float(np.vdot(tw, z))
            g = e * (tw_sum / s) - tw
        gw = (g @ x).T + lam * w
        loss += 0.5 * float(lam) * float(np.vdot(w, w))
        return loss, np.concatenate([gw.ravel(), g.sum(axis=1)]).astype(np.float64)

    theta0 = (np.concatenate([init.kernel.ravel(), init.bias]) if init is not None
              else np.zeros(d * k + k))
    res = minimize(loss_grad, theta0.astype(np.float64), jac=True, method="L-BFGS-B",
                   options={"maxiter": max_iter, "ftol": 1e-6 if tol >= 1e-5 else 1e-12,
                            "gtol": tol * n})
    theta = res.x.astype(np.float32)
    return LogisticHead(theta[:d * k].reshape(d, k), theta[d * k:], multi_label)


@dataclasses.dataclass
class CrossValidation:
    """What `cross_validate` found.

    Attributes:
        c: the chosen inverse regularisation strength.
        losses: {c: mean out-of-fold log loss} of the strengths tried (the
            grid, up to PATH_PATIENCE strengths past the best).
        oof_probs: [N, C] out-of-fold probabilities at the chosen c: each
            image predicted by the head of the folds that did not see it.
        folds: [N] the fold of each image.
    """

    c: float
    losses: dict
    oof_probs: np.ndarray
    folds: np.ndarray

    def accuracy(self, labels: np.ndarray) -> float:
        """Out-of-fold accuracy (exact match for multi-hot labels)."""
        return accuracy(self.oof_probs, labels)


def correct(probs: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N] bool: each row predicted right (the argmax for class ids, every label
    decided right at 0.5 for [N, C] multi-hot rows)."""
    if labels.ndim == 2:
        return ((probs >= 0.5) == (labels > 0.5)).all(axis=1)
    return probs.argmax(axis=1) == labels


def accuracy(probs: np.ndarray, labels: np.ndarray) -> float:
    """Accuracy of probabilities: the mean of `correct`."""
    return float(np.mean(correct(probs, labels)))


def log_loss(probs: np.ndarray, targets: np.ndarray, multi_label: bool) -> float:
    """Mean log loss of probabilities against one-hot (multi-hot) targets."""
    p = np.clip(probs, 1e-7, 1 - 1e-7)
    if multi_label:
        return float(-np.mean(np.sum(targets * np.log(p) + (1 - targets) * np.log(1 - p), 1)))
    return float(-np.mean(np.sum(targets * np.log(p), axis=1)))


def _rows(views: Sequence[np.ndarray], idx: np.ndarray) -> np.ndarray:
    return np.concatenate([v[idx] for v in views])


@dataclasses.dataclass
class Projection:
    """x -> (x - mean) @ basis: the top principal directions of the training rows.

    Fitting logistic heads in this space is 5-10x faster than on the raw
    pooled features (1280 of MobileNetV2), and a head on it is a head on the
    raw features (`LogisticHead` via `lift`); the directions left out hold
    little variance (measured: 256 of 1280 keep 98% of the variance of 625
    rows of flowers128 features, same cross-validated accuracy within 0.3
    points).
    """

    mean: np.ndarray  # [D]
    basis: np.ndarray  # [D, d]

    @classmethod
    def fit(cls, x: np.ndarray, max_dim: int) -> "Projection":
        """The top `max_dim` principal directions of the rows of `x` [N, D].

        From `eigh` of the smaller of the Gram and covariance matrices: for
        2250 x 1280 features a quarter of the SVD's time (0.4 against 1.7 s
        on one core), the same directions.
        """
        x = np.asarray(x, np.float32)
        mean = x.mean(axis=0, dtype=np.float64).astype(np.float32)
        if max_dim >= x.shape[1]:
            return cls(mean, np.eye(x.shape[1], dtype=np.float32))
        x = x - mean
        if len(x) <= x.shape[1]:  # Gram: x = U S V^T, so V = x^T U S^-1
            w, u = np.linalg.eigh((x @ x.T).astype(np.float64))
            top = np.argsort(w)[::-1][:max_dim]
            basis = (x.T @ u[:, top]) / np.sqrt(np.maximum(w[top], 1e-12))
        else:  # the products in float32 (rows x D may be large), eigh in float64
            w, v = np.linalg.eigh((x.T @ x).astype(np.float64))
            basis = v[:, np.argsort(w)[::-1][:max_dim]]
        return cls(mean, np.ascontiguousarray(basis, np.float32))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float32) - self.mean) @ self.basis

    def lift(self, head: LogisticHead) -> LogisticHead:
        """The same head on raw features: x @ (B W) + (b - mean B W)."""
        kernel = self.basis @ head.kernel
        return LogisticHead(kernel, head.bias - self.mean @ kernel, head.multi_label)


@_one_blas_thread
def cross_validate(views: Sequence[np.ndarray], targets: np.ndarray, folds: np.ndarray,
                   mirror: Optional[np.ndarray] = None, multi_label: bool = False,
                   grid: Sequence[float] = DEFAULT_C_GRID, weights: Optional[np.ndarray] = None,
                   max_dim: int = 256, held_out_views: bool = False) -> CrossValidation:
    """Chooses the logistic head's regularisation by k-fold cross-validation.

    Args:
        views: V arrays [N, D]: view 0 the clean images, the others augmented
            views of the same images, in the same order.
        targets: [N, C] one-hot (multi-hot) targets.
        folds: [N] fold ids (`fold_ids`).
        mirror: optional [N, D] features of the mirrored images: a training
            view, and averaged with view 0's prediction for held-out images,
            as the exported model averages an image and its mirror.
        multi_label: sigmoid heads.
        grid: inverse regularisation strengths to try.
        weights: [N] per-image weights (class weights); None: all 1.
        max_dim: heads are fitted on the top `max_dim` principal directions of
            the rows (`Projection`); the folds' held-out rows are projected
            with the same directions (label-free, so no label leaks).
        held_out_views: predict a held-out image from the mean over all its
            views (and its mirror): test-time augmentation, for the label
            audit; False predicts it as the exported model does.

    Returns:
        The CrossValidation (chosen c, losses, out-of-fold probabilities).
    """
    proj = Projection.fit(np.concatenate(list(views) + ([mirror] if mirror is not None else [])),
                          max_dim)
    views = [proj(v) for v in views]
    mirror = proj(mirror) if mirror is not None else None
    train_views = list(views) + ([mirror] if mirror is not None else [])
    # What a held-out image is predicted from: every view, or as the exported
    # model sees it (the clean view, averaged with its mirror's).
    shown = train_views if held_out_views else views[:1] + (
        [mirror] if mirror is not None else [])
    targets = np.asarray(targets, np.float32)
    w = np.ones(len(targets), np.float32) if weights is None else np.asarray(weights, np.float32)
    k = int(folds.max()) + 1
    heads = [None] * k
    oof, losses = {}, {}
    stale, best_loss = 0, np.inf
    for c in sorted(grid):  # each fold's head warm-starts along the path, strong to weak
        oof[c] = np.zeros(targets.shape, np.float32)
        for f in range(k):
            tr, te = np.flatnonzero(folds != f), np.flatnonzero(folds == f)
            heads[f] = fit_logistic(_rows(train_views, tr),
                                    np.tile(targets[tr], (len(train_views), 1)), c, multi_label,
                                    init=heads[f], weights=np.tile(w[tr], len(train_views)))
            oof[c][te] = np.mean([heads[f].predict(v[te]) for v in shown], axis=0)
        losses[c] = log_loss(oof[c], targets, multi_label)
        # The out-of-fold loss along the path is U-shaped: once PATH_PATIENCE
        # strengths in a row have not improved on the best, weaker ones (the
        # slowest fits) are not tried.
        stale = 0 if losses[c] < best_loss else stale + 1
        best_loss = min(best_loss, losses[c])
        if stale >= PATH_PATIENCE:
            break
    best = min(losses, key=lambda c: (losses[c], -c))
    return CrossValidation(best, losses, oof[best], folds)


@_one_blas_thread
def fit_views(views: Sequence[np.ndarray], targets: np.ndarray, c: float,
              mirror: Optional[np.ndarray] = None, multi_label: bool = False,
              weights: Optional[np.ndarray] = None, max_dim: int = 256) -> LogisticHead:
    """The final head: every view (and the mirror) of every image, at the chosen `c`.

    Fitted in the same principal-direction space as `cross_validate` and
    lifted back to the raw features, so it loads into a Dense layer.
    """
    rows = list(views) + ([mirror] if mirror is not None else [])
    x = np.concatenate(rows)
    proj = Projection.fit(x, max_dim)
    t = np.tile(np.asarray(targets, np.float32), (len(rows), 1))
    w = None if weights is None else np.tile(np.asarray(weights, np.float32), len(rows))
    return proj.lift(fit_logistic(proj(x), t, c, multi_label, weights=w))
