"""What every driver does first: the one log line format and the one validate."""

from __future__ import annotations

from tl_keras import config as config_lib
from tl_keras.config import Config
from tl_keras.data import sources as sources_lib
from tl_keras.export import checks as export_checks


def log(msg: str) -> None:
    """Prints one progress line of a run, flushed (runs are often piped to a file)."""
    print(f"[tl_keras] {msg}", flush=True)


def log_stage(stage: int, result) -> None:
    """Logs how a stage ended: its validation accuracy, epochs, best epoch and time."""
    log(f"stage {stage}: val_accuracy {result.val_accuracy:.4f} after {result.epochs} epochs "
        f"(best {result.best_epoch}), {result.seconds:.1f}s")


def log_calibration(summary: dict) -> None:
    """Logs the fitted temperature(s) and the validation NLL before and after."""
    t = summary["temperature"]
    t = ("per label " + ", ".join(f"{v:.3f}" for v in t)) if isinstance(t, list) else f"{t:.3f}"
    log(f"calibration: temperature {t}, validation NLL {summary['val_nll_uncalibrated']:.4f} "
        f"-> {summary['val_nll']:.4f}")


def validate(cfg: Config) -> None:
    """Checks every setting that needs no data or model; raises ConfigError.

    The plain value checks of `tl_keras.config.validate` and the serving
    settings' (`tl_keras.export.checks.validate`), so a bad --tflite or
    parity limit fails before any training.
    """
    config_lib.validate(cfg)
    export_checks.validate(cfg)


def val_fraction(cfg: Config, cross_validated: bool = False) -> float:
    """The validation share held out of --data: --val_fraction, or for 0 (auto)
    none where cross-validation replaces it, `config.DEFAULT_VAL_FRACTION` elsewhere."""
    return cfg.val_fraction or (0.0 if cross_validated else config_lib.DEFAULT_VAL_FRACTION)


def data_spec(cfg: Config, cross_validated: bool = False) -> sources_lib.DataSpec:
    """The data sources and hold-outs of a run's flags (see `val_fraction`)."""
    return sources_lib.DataSpec(
        data=cfg.data, val_data=cfg.val_data, test_data=cfg.test_data,
        val_fraction=val_fraction(cfg, cross_validated), test_fraction=cfg.test_fraction,
        seed=cfg.seed,
        tfds_split=cfg.tfds_split, tfds_data_dir=cfg.tfds_data_dir,
        allow_external_paths=cfg.allow_external_paths)
