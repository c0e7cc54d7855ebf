"""Selective prediction: the accuracy-coverage curve and the threshold for a target accuracy."""

import numpy as np

from tl_keras.report import selective


def _probs(confidences, predicted, classes=3):
    p = np.full((len(confidences), classes), 0.0)
    for i, (c, k) in enumerate(zip(confidences, predicted)):
        p[i] = (1 - c) / (classes - 1)
        p[i, k] = c
    return p


def test_the_threshold_is_the_lowest_confidence_that_keeps_the_target():
    # Most confident first: right, right, right, wrong, right, wrong.
    conf = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6]
    labels = np.array([0, 1, 2, 1, 0, 0])
    pred = [0, 1, 2, 0, 0, 1]
    got = selective.choose_threshold(_probs(conf, pred), labels, 0.8)
    # Top 3: 1.0; top 4: 0.75; top 5: 0.8 (reached, the widest); top 6: 0.667.
    assert got["reached"] and got["threshold"] == 0.7
    assert (got["coverage"], got["accuracy"]) == (round(5 / 6, 4), 0.8)
    assert selective.choose_threshold(_probs(conf, pred), labels, 1.0)["threshold"] == 0.9
    none = selective.choose_threshold(_probs(conf, [1, 0, 0, 0, 1, 1]), labels, 0.9)
    assert not none["reached"] and none["threshold"] is None and none["coverage"] == 0.0
    on_test = selective.at_threshold(_probs(conf, pred), labels, 0.7)
    assert on_test == {"threshold": 0.7, "answered": 5, "coverage": round(5 / 6, 4),
                       "accuracy": 0.8}
    assert selective.at_threshold(_probs(conf, pred), labels, None)["answered"] == 0


def test_ties_are_answered_together():
    # Two images share confidence 0.9: one right, one wrong. A cut between them
    # would promise an accuracy that the threshold cannot deliver.
    conf, pred = [0.99, 0.9, 0.9], [0, 1, 2]
    labels = np.array([0, 1, 0])
    got = selective.choose_threshold(_probs(conf, pred), labels, 0.9)
    assert got["threshold"] == 0.99 and got["coverage"] == round(1 / 3, 4)


def test_the_curve_goes_from_the_most_confident_to_all_images():
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(4), size=400)
    labels = np.where(rng.random(400) < probs.max(1), probs.argmax(1), (probs.argmax(1) + 1) % 4)
    curve = selective.coverage_curve(probs, labels, points=10)
    assert [p["coverage"] for p in curve] == [round(c, 4) for c in np.linspace(0.1, 1.0, 10)]
    assert curve[-1]["accuracy"] == float(np.mean(probs.argmax(1) == labels))
    # Confidence that means something: the most confident tenth beats all images.
    assert curve[0]["accuracy"] > curve[-1]["accuracy"] + 0.1
    assert all(a["threshold"] >= b["threshold"] for a, b in zip(curve, curve[1:]))
