"""Command line: `tl-keras COMMAND --flag=value ...` (also `python -m tl_keras`).

The only module that knows about absl flags. Flags are generated from the
fields of `tl_keras.config.Config` (same names, same defaults) and turned
into a Config; the library gets plain objects.

Commands:
  train     run both stages on --data and write --output_dir
  evaluate  evaluate a finished run (--model=OUT) on --data
  compare   print the key figures of finished runs side by side: compare OUT1 OUT2 ...
  predict   top-k classes of --images with an export (--model=OUT/export/1 or a .tflite)
  pretrain  train a source model from scratch on --data (--architecture); its
            OUT/model.keras then serves as train --backbone=OUT/model.keras
  audit     audit the data of a train command line (same flags): likely label
            errors, near-duplicates and leakage, outliers -> OUT/audit.md,
            label_issues.csv, relabelled.csv (features cached for train)
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys

from absl import flags

from tl_keras.config import Config, fields_with_help
from tl_keras.errors import ConfigError

FLAGS = flags.FLAGS
COMMANDS = ("train", "evaluate", "compare", "predict", "pretrain", "audit")


def define_flags(flag_values: flags.FlagValues = FLAGS) -> None:
    """Defines one flag per Config field, defaults taken from Config()."""
    defaults = Config()
    for field, help_text in fields_with_help():
        default = getattr(defaults, field.name)
        kind = type(default)
        definer = {bool: flags.DEFINE_boolean, int: flags.DEFINE_integer,
                   float: flags.DEFINE_float, str: flags.DEFINE_string}[kind]
        definer(field.name, default, help_text, flag_values=flag_values)
    flags.DEFINE_string("model", "", "evaluate: a finished run folder (OUT) or a .keras file; "
                        "predict: an export version folder (OUT/export/1) or a .tflite file",
                        flag_values=flag_values)


def config_from_flags(flag_values: flags.FlagValues = FLAGS) -> Config:
    """Builds a Config from parsed flags; --task=text takes the text defaults of the flags
    not given (on the command line or in a flagfile): config.TEXT_DEFAULTS."""
    names = [f.name for f in dataclasses.fields(Config)]
    given = {n for n in names if flag_values[n].present or not flag_values[n].using_default_value}
    return Config(**{n: flag_values[n].value for n in names}).with_text_defaults(given)


def _train(cfg: Config) -> int:
    from tl_keras.report import evaluations
    from tl_keras.report import metrics as metrics_lib
    from tl_keras.run import image as pipeline

    report = pipeline.train(cfg)
    summary = {k: report[k] for k in ("stage1", "stage2", "kept", "test") if k in report}
    # The full evaluation (per class, mistakes, ...) is in report.json / report.md.
    split = evaluations.evaluated_split(report)
    if split:
        summary[split] = metrics_lib.headline(report[split])
    print(json.dumps(summary, indent=2))
    return 0


def _pretrain(cfg: Config) -> int:
    from tl_keras.run import pretrain

    report = pretrain.pretrain(cfg)
    summary = {k: report[k] for k in ("architecture", "blocks", "test") if k in report}
    summary["pretrain"] = {k: v for k, v in report["pretrain"].items() if k != "history"}
    print(json.dumps(summary, indent=2))
    return 0


def _audit(cfg: Config) -> int:
    from tl_keras.run import audit

    result = audit.audit(cfg)
    print(json.dumps({**result["summary"], "oof_accuracy": result["oof_accuracy"],
                      "seconds": result["seconds"],
                      "audit": os.path.join(cfg.output_dir, "audit.md")}, indent=2))
    return 0


def _evaluate(cfg: Config, model_path: str) -> int:
    from tl_keras.run import evaluate as runs

    result = runs.evaluate_run(model_path, cfg.data, batch_size=cfg.batch_size, top_k=cfg.top_k,
                               allow_external_paths=cfg.allow_external_paths)
    print(json.dumps(result, indent=2))
    return 0


def _predict(cfg: Config, model_path: str) -> int:
    from tl_keras.run import predict

    result = predict.predict_images(model_path, cfg.images, cfg.top_k, cfg.batch_size,
                                    max_pixels=cfg.max_pixels)
    for s in result["skipped"]:
        print(f"tl-keras: skipped {s['image']!r}: {s['error']}", file=sys.stderr)
    if not result["predictions"]:
        raise ConfigError(f"--images={cfg.images!r}: none of the "
                          f"{len(result['skipped'])} file(s) could be decoded")
    print(json.dumps(result, indent=2) if cfg.json else predict.format_table(result))
    return 0


def main(argv: list[str]) -> int:
    """Dispatches a parsed command line; returns the exit code."""
    if len(argv) < 2 or argv[1] not in COMMANDS:
        got = argv[1] if len(argv) > 1 else ""
        raise ConfigError(f"command {got!r}: expected one of {', '.join(COMMANDS)} "
                          "(e.g. tl-keras train --flagfile=flags/smoke.flags)")
    if argv[1] == "compare":
        from tl_keras.report import compare

        print(compare.table(argv[2:]))
        return 0
    if len(argv) > 2:
        raise ConfigError(f"unexpected argument {argv[2]!r} (flags are --name=value)")
    cfg = config_from_flags()
    if argv[1] == "train":
        return _train(cfg)
    if argv[1] == "predict":
        if not FLAGS.model:
            raise ConfigError("--model='': required by predict (an export version folder "
                              "or a .tflite file)")
        return _predict(cfg, FLAGS.model)
    if argv[1] == "pretrain":
        return _pretrain(cfg)
    if argv[1] == "audit":
        return _audit(cfg)
    if not FLAGS.model:
        raise ConfigError("--model='': required by evaluate (a run folder or a .keras file)")
    return _evaluate(cfg, FLAGS.model)


def _exit_process(code: int) -> None:
    """Ends the `tl-keras` process without the interpreter's teardown.

    Everything a command writes is closed by then (atomic writes, TensorBoard
    writers, export folders renamed into place). What remains is Python
    clearing every module and TensorFlow freeing its graphs and functions
    object by object: 1.5 CPU seconds after a training run, time a user
    waits for nothing (benchmarks/README.md). The exit handlers still run,
    and other threads are waited for, as at a normal exit.
    """
    import atexit
    import threading

    for thread in threading.enumerate():
        if thread is not threading.current_thread() and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def run(argv: list[str] | None = None) -> None:
    """Console entry point: one-line errors, non-zero exit, no traceback.

    Args:
        argv: the command line; None: `sys.argv`, as the console script and
            `python -m tl_keras` call it, and then a successful command ends
            the process at once (`_exit_process`). Given (tests, notebooks,
            several commands in one process), it raises SystemExit as usual.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    whole_process = argv is None
    argv = list(sys.argv if argv is None else argv)
    argv[0] = "tl-keras"
    if "data" not in FLAGS:
        define_flags()
    if any(a in ("-h", "--help", "--helpfull") for a in argv[1:]):
        print(__doc__ + "\nFlags:\n" + FLAGS.get_help())
        sys.exit(0)
    if FLAGS.is_parsed():  # a second run in one process starts from the defaults again
        FLAGS.unparse_flags()
    try:
        rest = FLAGS(argv)
    except flags.Error as e:
        print(f"tl-keras: error: {' '.join(str(e).split())}", file=sys.stderr)
        sys.exit(2)
    try:
        code = main(rest)
    except ConfigError as e:
        print(f"tl-keras: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("tl-keras: interrupted", file=sys.stderr)
        sys.exit(130)
    if whole_process:
        _exit_process(code)
    sys.exit(code)
