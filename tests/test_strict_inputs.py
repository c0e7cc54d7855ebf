"""Strict inputs: every flag's bad values and every data shape that cannot work
end in one line naming the flag, a non-zero exit and no traceback.

The table is built from the fields of `Config`, so a new flag is covered the
moment it exists: its wrong-type value always, and a new numeric flag must
refuse -1 (or say why not in NEGATIVE_OK); a new string flag needs a bad
value in BAD_STRINGS (or a reason in UNCHECKED_STRINGS). Runs go through
`cli.run` in-process (fast); two cases run as real subprocesses.
"""

from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
from absl import flags
from conftest import DATA, FLOWERS_MINI, run_cli

from tl_keras import cli
from tl_keras.config import Config

# Cheap settings, so that a bad value which slipped through would still end fast.
FAST = ["--weights=none", "--image_size=32", "--head_epochs=1", "--finetune_epochs=0",
        "--cache_views=1", "--export=false", "--tensorboard=false"]

WRONG_TYPE = {int: "abc", float: "1.5.2", bool: "maybe"}
# Numeric flags for which -1 is a valid value (none so far).
NEGATIVE_OK: dict[str, str] = {}
# Values beyond the top of a numeric flag's range.
TOO_LARGE = {"val_fraction": 1.0, "test_fraction": 1.0, "dropout": 1.0, "label_smoothing": 1.0,
             "zoom": 1.0, "contrast": 1.0, "rotation": 181.0, "seed": 2 ** 32,
             "translation": 1.0, "crop_min_area": 1.0, "embedding_dropout": 1.0}
# Flags only --task=text reads: their bad values are fed with --task=text.
TEXT_ONLY = ("encoder", "max_tokens", "sequence_length", "encoder_units", "embedding_dim",
             "embeddings", "embedding_dropout", "embedding_vocabulary", "embedding_init")
# Flags only `tl-keras pretrain` reads: their bad values are fed to that command.
PRETRAIN_ONLY = ("architecture", "pretrain_epochs", "pretrain_learning_rate",
                 "pretrain_weight_decay", "pretrain_batch_size")
# A bad value for every string flag: unknown names, missing files and folders.
BAD_STRINGS = {
    "data": "/no/such/folder",
    "val_data": "/no/such/folder",
    "test_data": "/no/such/folder",
    "backbone": "resnet9000",
    "weights": "imagenet21k",
    "precision": "fp8",
    "jit_compile": "sometimes",
    "frozen_engine": "xnnpack",
    "head_fit": "sgd",
    "output_dir": "{file}/out",
    "cache_dir": "{file}/cache",
    "class_weight": "sometimes",
    "tflite": "float64",
    "parity_min_agreement": "bogus=1",
    "parity_max_prob_diff": "int8=x",
    "task": "video",
    "encoder": "transformer",
    "embeddings": "/no/such/vectors.txt",
    "embedding_init": "word2vec",
    "architecture": "resnet9000",
    # Only meaningful with --backbone=PATH.keras: a conflicting pair with any other backbone.
    "cut_layer": "block_16_project",
    "block_prefixes": "block_16",
    "preprocess": "caffe",
    "strategy": "quantum",
    "replica_scaling": "cubic",
}
# String flags without a value that is bad on its own, and why.
UNCHECKED_STRINGS = {
    "tfds_split": "only read with --data=tfds:NAME, which needs TFDS data",
    "tfds_data_dir": "only read with --data=tfds:NAME; any folder is a valid place",
    "images": "only read by `tl-keras predict` (its errors: test_serving.py, "
              "test_predict_errors_name_the_flag)",
    "tpu": "any name may be a TPU; the conflicting pair tpu+strategy below checks the flag",
}


def _cases() -> list[tuple[str, list[str], str]]:
    """(case id, extra args, flag the message must name) for every Config field.

    Args of a PRETRAIN_ONLY flag start with "pretrain", the command that reads it.
    """
    cases = []
    for f in dataclasses.fields(Config):
        kind = type(getattr(Config(), f.name))
        cases.append((f"{f.name}=wrong_type", [f"--{f.name}={WRONG_TYPE.get(kind, '')}"],
                      f.name))
        if kind in (int, float) and f.name not in NEGATIVE_OK:
            cases.append((f"{f.name}=-1", [f"--{f.name}=-1"], f.name))
        if f.name in TOO_LARGE:
            cases.append((f"{f.name}=too_large", [f"--{f.name}={TOO_LARGE[f.name]}"], f.name))
        if kind is str and f.name in BAD_STRINGS:
            cases.append((f"{f.name}=bad", [f"--{f.name}={BAD_STRINGS[f.name]}"], f.name))
    cases = [c for c in cases if not c[0].endswith("=wrong_type") or
             type(getattr(Config(), c[2])) is not str]  # any text is a string
    cases = [(i, ["--task=text", *a] if flag in TEXT_ONLY else
              ["pretrain", *a] if flag in PRETRAIN_ONLY else a, flag)
             for i, a, flag in cases]
    cases += [
        # Unknown names and conflicting pairs.
        ("unknown_flag", ["--no_such_flag=1"], "no_such_flag"),
        ("test_fraction+test_data", ["--test_fraction=0.2", f"--test_data={FLOWERS_MINI}"],
         "test_fraction"),
        ("val_fraction_without_val_data", ["--val_fraction=1"], "val_fraction"),
        ("cv_folds<2", ["--cv_folds=1"], "cv_folds"),
        ("alpha_without_imagenet_weights", ["--alpha=0.3", "--weights=imagenet"], "alpha"),
        ("finetune_blocks>blocks", ["--finetune_blocks=99"], "finetune_blocks"),
        ("head_epochs=0", ["--head_epochs=0"], "head_epochs"),
        ("tpu+strategy", ["--strategy=mirrored", "--tpu=my-tpu"], "tpu"),
        # Image sizes the backbone cannot take.
        ("image_size<min", ["--image_size=16"], "image_size"),
        ("inception_v3_at_64", ["--backbone=inception_v3", "--image_size=64"], "image_size"),
        # Weights files that do not fit.
        ("weights_of_another_backbone",
         [f"--weights={DATA / 'weights' / 'mobilenet_2_5_224_tf_no_top.h5'}"], "weights"),
        ("weights_not_a_weights_file", [f"--weights={FLOWERS_MINI / 'daisy'}"], "weights"),
    ]
    return cases


def _args(case_args, tmp_path):
    file = tmp_path / "a_file"
    file.write_text("")
    return [a.replace("{file}", str(file)) for a in case_args]


def _cli(args, capsys, command="train") -> tuple[int, str, str]:
    """Runs `tl-keras COMMAND ARGS` in this process: (exit code, last stderr line, stderr)."""
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:  # any other exception is a traceback: the test fails
        cli.run(["tl-keras", command, *args])
    err = capsys.readouterr().err
    return e.value.code, (err.strip().splitlines() or [""])[-1], err


def _assert_one_line_error(code, last, err, *needles):
    assert code not in (0, None), (code, err[-2000:])
    assert "Traceback" not in err, err[-3000:]
    assert last.startswith("tl-keras: error:"), err[-2000:]
    for n in needles:
        assert n in last, (n, last)


def test_every_string_flag_has_a_bad_value_or_a_reason():
    strings = {f.name for f in dataclasses.fields(Config)
               if type(getattr(Config(), f.name)) is str}
    missing = strings - set(BAD_STRINGS) - set(UNCHECKED_STRINGS)
    assert not missing, f"add a bad value for these string flags to BAD_STRINGS: {missing}"


@pytest.mark.parametrize("case,extra,flag", _cases(), ids=[c[0] for c in _cases()])
def test_bad_flag_value(case, extra, flag, tmp_path, capsys):
    command = extra[0] if extra[:1] == ["pretrain"] else "train"
    extra = extra[1:] if command != "train" else extra
    args = [f"--data={FLOWERS_MINI}", f"--output_dir={tmp_path / 'out'}", *FAST,
            *_args(extra, tmp_path)]
    code, last, err = _cli(args, capsys, command)
    _assert_one_line_error(code, last, err, flag)


# ---------------------------------------------------------------------------
# Data that cannot train a classifier
# ---------------------------------------------------------------------------

def _folder(root: Path, counts: dict[str, int]) -> Path:
    """A class-folder dataset of real flowers_mini photos: {class: number of images}."""
    photos = sorted((FLOWERS_MINI / "daisy").iterdir())
    for name, n in counts.items():
        (root / name).mkdir(parents=True, exist_ok=True)
        for p in photos[:n]:
            shutil.copy(p, root / name / p.name)
    return root


DATA_CASES = {
    "one_class": (lambda t: [f"--data={_folder(t / 'd', {'cat': 6})}"], "data", "class"),
    "empty_class": (lambda t: [f"--data={_folder(t / 'd', {'cat': 6, 'dog': 0})}"],
                    "data", "'dog' has no images"),
    "test_labels_unseen_in_train": (
        lambda t: [f"--data={_folder(t / 'd', {'cat': 6, 'dog': 6})}",
                   f"--test_data={_folder(t / 't', {'cat': 2, 'zebra': 2})}"],
        "test_data", "'zebra' does not occur in the training data"),
    "val_labels_unseen_in_train": (
        lambda t: [f"--data={_folder(t / 'd', {'cat': 6, 'dog': 6})}",
                   f"--val_data={_folder(t / 'v', {'cat': 2, 'emu': 2})}"],
        "val_data", "'emu' does not occur"),
    "too_few_images_to_validate": (
        lambda t: [f"--data={_folder(t / 'd', {'cat': 1, 'dog': 1})}", "--head_fit=adamw"],
        "val_fraction", "validation split is empty"),
    "too_few_images_to_cross_validate": (
        lambda t: [f"--data={_folder(t / 'd', {'cat': 3, 'dog': 1})}"],
        "data", "class 'dog' has 1 training image"),
    "no_class_folders": (lambda t: [f"--data={FLOWERS_MINI / 'daisy'}"], "data",
                         "no class subfolders"),
}


@pytest.mark.parametrize("name", list(DATA_CASES))
def test_data_that_cannot_work(name, tmp_path, capsys):
    make, flag, needle = DATA_CASES[name]
    args = [f"--output_dir={tmp_path / 'out'}", *FAST, *make(tmp_path)]
    code, last, err = _cli(args, capsys)
    _assert_one_line_error(code, last, err, f"--{flag}", needle)


# A few through a real process: the exit status and stderr a shell sees.
@pytest.mark.parametrize("args,needles", [
    (["--batch_size=abc"], ["batch_size", "abc"]),
    (["--seed=-1"], ["--seed", "-1"]),
])
def test_bad_values_in_a_real_process(args, needles, tmp_path):
    proc = run_cli("train", f"--data={FLOWERS_MINI}", f"--output_dir={tmp_path / 'o'}", *args,
                   timeout=300)
    last = (proc.stderr.strip().splitlines() or [""])[-1]
    _assert_one_line_error(proc.returncode, last, proc.stderr, *needles)


def test_a_second_run_in_one_process_starts_from_the_defaults(tmp_path, capsys):
    # Notebooks and tests call cli.run more than once in one process: a flag
    # given to the first run must not leak into the next.
    for args, export in ((["--export=false"], False), ([], True)):
        with pytest.raises(SystemExit):
            cli.run(["tl-keras", "train", f"--data={FLOWERS_MINI}", "--batch_size=0",
                     f"--output_dir={tmp_path / 'o'}", *args])
        assert flags.FLAGS.export is export
    assert "--batch_size" in capsys.readouterr().err
