"""Untrusted files: model files with code are refused unexecuted; list paths stay
inside the list's folder."""

from __future__ import annotations

import os

import keras
import pytest
from absl import flags

from conftest import FLOWERS_MINI
from tl_keras import cli
from tl_keras import runs
from tl_keras import untrusted
from tl_keras.config import Config, ConfigError


def _lambda_run(tmp_path, marker):
    """A run folder whose model.keras holds a Lambda layer that writes `marker` when run."""
    # The code a malicious file would carry, self-contained (its bytecode is
    # what the .keras file stores).
    touch = eval(f"lambda x: (open({str(marker)!r}, 'w').write('ran'), x)[1]")
    inp = keras.Input((8, 8, 3))
    out = keras.layers.Lambda(touch)(inp)
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(out)))
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    marker.unlink()  # building the model ran it once; loading must not
    (run / "labels.txt").write_text("a\nb\n")
    (run / "config.json").write_text(Config(image_size=8).to_json())
    return run


def test_keras_file_with_lambda_is_refused_and_not_executed(tmp_path, capsys):
    marker = tmp_path / "marker"
    run = _lambda_run(tmp_path, marker)

    with pytest.raises(ConfigError) as e:
        runs.load_run(str(run))
    assert "contains a Lambda layer" in str(e.value) and "safe mode" in str(e.value)
    assert not marker.exists()

    # Through the command line: one line, exit 2, no traceback, nothing run.
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as ex:
        cli.run(["tl-keras", "evaluate", f"--model={run}", f"--data={FLOWERS_MINI}"])
    err = capsys.readouterr().err
    assert ex.value.code == 2 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith(f"tl-keras: error: --model={str(run / 'model.keras')!r}: refused")
    assert not marker.exists()

    # The control: loaded without safe mode, the same file does run its code,
    # so the check above would have seen it.
    keras.models.load_model(run / "model.keras", safe_mode=False, compile=False)
    assert marker.read_text() == "ran"


def test_list_paths_must_stay_inside_the_list_folder(tmp_path):
    root = tmp_path / "lists"
    (root / "img").mkdir(parents=True)
    (tmp_path / "secret.txt").write_text("x")
    os.symlink(tmp_path / "secret.txt", root / "img" / "link.jpg")
    lst = str(root / "train.csv")

    assert untrusted.check_inside("img/a.jpg", str(root), "data", lst) == str(root / "img/a.jpg")
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "img/../../secret.txt",
                "img/link.jpg"):
        with pytest.raises(ConfigError) as e:
            untrusted.check_inside(bad, str(root), "data", lst, where="line 3")
        msg = str(e.value)
        assert msg.startswith(f"--data={lst!r}: line 3: {bad!r} points outside")
        assert "--allow_external_paths" in msg and "\n" not in msg
    # Allowed explicitly: the path is returned as the list gave it (absolute).
    assert untrusted.check_inside("../secret.txt", str(root), "data", lst, allow=True) == \
        str(tmp_path / "secret.txt")
