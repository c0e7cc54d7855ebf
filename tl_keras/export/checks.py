"""Checks of the serving settings (export, TFLite variants, parity limits).

They run before training (`tl_keras.run.setup.validate`), so that a bad
--tflite or parity limit fails in a second instead of after the run.
"""

from __future__ import annotations

from tl_keras.errors import fail
from tl_keras.export import parity, tflite


def validate(cfg) -> None:
    """Checks the export, TFLite and parity-gate flags of a `Config`; raises ConfigError."""
    if tflite.parse_variants(cfg.tflite) and not cfg.export:
        raise fail("tflite", cfg.tflite, "TFLite variants are written with the export; "
                   "drop --noexport")
    if tflite.parse_variants(cfg.tflite) and cfg.task != "image":
        raise fail("tflite", cfg.tflite, "TFLite variants are exported for image models only")
    parity.min_agreement_limits(cfg.parity_min_agreement)
    parity.max_prob_diff_limits(cfg.parity_max_prob_diff)
    if cfg.parity_images < 0:
        raise fail("parity_images", cfg.parity_images, "must be >= 0 (0: all validation images)")
    if cfg.int8_calibration_images < 1:
        raise fail("int8_calibration_images", cfg.int8_calibration_images, "must be >= 1")
