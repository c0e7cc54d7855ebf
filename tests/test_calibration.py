"""Temperature calibration: the fit, the formula, and the layer the exported model carries."""

import keras
import numpy as np
import pytest

from tl_keras.model import model_files
from tl_keras.model.layers import Temperature
from tl_keras.report import calibration


def _overconfident(n, classes, t_true, seed=0):
    """Labels drawn from softmax(z); probabilities reported as softmax(z * t_true)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=2.0, size=(n, classes))
    p_true = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    labels = np.array([rng.choice(classes, p=row) for row in p_true])
    shown = np.exp(z * t_true) / np.exp(z * t_true).sum(1, keepdims=True)
    return shown.astype(np.float32), labels


def test_the_fitted_temperature_undoes_a_known_overconfidence():
    probs, labels = _overconfident(20000, 5, t_true=2.0)
    t = calibration.fit_temperature(probs, labels)
    assert t == pytest.approx(2.0, rel=0.05)
    before = calibration.negative_log_likelihood(probs, labels)
    after = calibration.negative_log_likelihood(calibration.apply_temperature(probs, t), labels)
    assert after < before - 0.05
    # Under-confidence is undone the other way.
    soft, labels = _overconfident(20000, 5, t_true=0.5, seed=1)
    assert calibration.fit_temperature(soft, labels) == pytest.approx(0.5, rel=0.05)


def test_calibration_keeps_every_argmax_and_never_raises_the_nll():
    probs, labels = _overconfident(500, 4, t_true=3.0, seed=2)
    t = calibration.fit_temperature(probs, labels)
    calibrated = calibration.apply_temperature(probs, t)
    np.testing.assert_array_equal(calibrated.argmax(1), probs.argmax(1))
    np.testing.assert_allclose(calibrated.sum(1), 1.0, atol=1e-5)
    # Already calibrated probabilities: T stays near 1 and the NLL does not rise.
    fair, labels = _overconfident(5000, 4, t_true=1.0, seed=3)
    t = calibration.fit_temperature(fair, labels)
    assert t == pytest.approx(1.0, abs=0.1)
    assert (calibration.negative_log_likelihood(calibration.apply_temperature(fair, t), labels)
            <= calibration.negative_log_likelihood(fair, labels))


def test_multi_label_gets_one_temperature_per_label():
    rng = np.random.default_rng(4)
    z = rng.normal(scale=2.0, size=(20000, 2))
    labels = (rng.random((20000, 2)) < 1 / (1 + np.exp(-z))).astype(np.float32)
    shown = 1 / (1 + np.exp(-z * np.array([2.0, 0.5])))
    t = calibration.fit_temperature(shown, labels, multi_label=True)
    assert t == [pytest.approx(2.0, rel=0.08), pytest.approx(0.5, rel=0.08)]


def test_the_layer_computes_the_formula_and_reloads_in_safe_mode(tmp_path):
    probs, _ = _overconfident(64, 5, t_true=2.0, seed=5)
    inp = keras.Input((5,))
    model = keras.Model(inp, Temperature(1.7, name="calibrated")(inp))
    np.testing.assert_allclose(model.predict(probs, verbose=0),
                               calibration.apply_temperature(probs, 1.7), atol=1e-6)
    path = str(tmp_path / "m.keras")
    model.save(path)
    again = model_files.load_model(path)
    np.testing.assert_allclose(again.predict(probs, verbose=0), model.predict(probs, verbose=0),
                               atol=1e-7)
    inp = keras.Input((2,))
    multi = keras.Model(inp, Temperature([2.0, 0.5], multi_label=True)(inp))
    p = np.array([[0.9, 0.2], [0.3, 0.6]], np.float32)
    np.testing.assert_allclose(multi.predict(p, verbose=0),
                               calibration.apply_temperature(p, [2.0, 0.5], True), atol=1e-6)
