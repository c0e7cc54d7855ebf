"""Untrusted files: model files with code are refused unexecuted; list paths stay
inside the list's folder."""

from __future__ import annotations

import json
import os

import keras
import pytest
from absl import flags
from conftest import FLOWERS_MINI

from tl_keras import cli
from tl_keras.config import Config
from tl_keras.core import untrusted as untrusted_lib
from tl_keras.errors import ConfigError
from tl_keras.run import evaluate as runs


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

    assert untrusted_lib.check_inside("img/a.jpg", str(root), "data", lst) == str(root / "img/a.jpg")
    for bad in ("../secret.txt", str(tmp_path / "secret.txt"), "img/../../secret.txt",
                "img/link.jpg"):
        with pytest.raises(ConfigError) as e:
            untrusted_lib.check_inside(bad, str(root), "data", lst, where="line 3")
        msg = str(e.value)
        assert msg.startswith(f"--data={lst!r}: line 3: {bad!r} points outside")
        assert "--allow_external_paths" in msg and "\n" not in msg
    # Allowed explicitly: the path is returned as the list gave it (absolute).
    assert untrusted_lib.check_inside("../secret.txt", str(root), "data", lst, allow=True) == \
        str(tmp_path / "secret.txt")


def _cli(command, args, capsys) -> tuple[int, str, str]:
    """Runs `tl-keras COMMAND ARGS` in this process: (exit code, last stderr line, stderr)."""
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        cli.run(["tl-keras", command, *args])
    err = capsys.readouterr().err
    return e.value.code, (err.strip().splitlines() or [""])[-1], err


def test_list_file_naming_images_elsewhere_is_refused_unless_allowed(tmp_path, capsys):
    # A list in its own folder whose rows name real photos elsewhere: first a
    # relative path inside, then absolute paths outside (line 3 is the first).
    lists = tmp_path / "lists"
    (lists / "img").mkdir(parents=True)
    photos = {c: sorted((FLOWERS_MINI / c).glob("*.jpg"))[:6] for c in ("daisy", "rose")}
    inside = lists / "img" / photos["daisy"][0].name
    inside.write_bytes(photos["daisy"][0].read_bytes())
    rows = ["path,label", f"img/{inside.name},daisy"]
    rows += [f"{p},{c}" for c, ps in photos.items() for p in ps[1:]]
    lst = lists / "train.csv"
    lst.write_text("\n".join(rows) + "\n")
    outside = photos["daisy"][1]

    # train: refused before anything is trained, one line naming flag, list, line, path.
    out = tmp_path / "out"
    code, last, err = _cli("train", [f"--data={lst}", f"--output_dir={out}", "--weights=none",
                                     "--image_size=32", "--export=false"], capsys)
    assert code == 2 and "Traceback" not in err, err[-2000:]
    assert last == (f"tl-keras: error: --data={str(lst)!r}: line 3: {str(outside)!r} points "
                    f"outside the list's folder {os.path.realpath(lists)!r}; move the images "
                    "under it or pass --allow_external_paths if you trust the list")
    assert not (out / "state.json").exists()  # nothing ran

    # evaluate reads lists the same way (a small valid run folder to evaluate).
    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inp)))
    run = tmp_path / "run"
    run.mkdir()
    model.save(run / "model.keras")
    (run / "labels.txt").write_text("daisy\nrose\n")
    (run / "config.json").write_text(Config(image_size=32).to_json())
    code, last, err = _cli("evaluate", [f"--model={run}", f"--data={lst}"], capsys)
    assert code == 2 and "Traceback" not in err and "line 3:" in last, err[-2000:]
    assert "--allow_external_paths" in last

    # --allow_external_paths: the same list loads, every row as it was given.
    from tl_keras.data import sources as sources_lib

    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data=str(lst), val_fraction=0.2,
                                                       allow_external_paths=True))
    items = sorted(ds.train.items + ds.val.items)
    assert items == sorted([str(inside)] + [str(p) for ps in photos.values() for p in ps[1:]])
    code, last, err = _cli("evaluate", [f"--model={run}", f"--data={lst}",
                                        "--allow_external_paths"], capsys)
    assert code == 0 or code is None, err[-2000:]
    result = json.loads((run / "evaluation.json").read_text())
    assert result["test"]["n"] == len(items) == 11


def test_predict_skips_images_over_max_pixels_without_decoding_them(tmp_path, capsys):
    import odd_images

    from tl_keras.export import tflite as tflite_lib
    from tl_keras.run import predict

    inp = keras.Input((32, 32, 3))
    model = keras.Model(inp, keras.layers.Dense(2, activation="softmax")(
        keras.layers.GlobalAveragePooling2D()(inp)))
    lite = tmp_path / "model.tflite"
    lite.write_bytes(tflite_lib.convert(tflite_lib.prepare(model, 32), "float"))
    (tmp_path / "labels.txt").write_text("daisy\nrose\n")
    photo = sorted((FLOWERS_MINI / "rose").glob("*.jpg"))[0]
    # A real photo's PNG whose header claims 50000 x 50000 pixels (7.5 GB decoded).
    bomb = odd_images.decompression_bomb(photo, tmp_path / "bomb").path

    result = predict.predict_images(str(lite), f"{bomb},{photo}", top_k=1)
    assert [p["image"] for p in result["predictions"]] == [str(photo)]
    assert result["skipped"] == [{"image": str(bomb), "error": (
        "50000x50000 = 2500000000 pixels is over --max_pixels=100000000 (decompression "
        "bomb?); not decoded")}]
    # The limit is the flag's, through the command line: one line per skipped file
    # (a 179x240 photo is over 1000 pixels too).
    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    with pytest.raises(SystemExit) as e:
        cli.run(["tl-keras", "predict", f"--model={lite}", f"--images={bomb},{photo}",
                 "--max_pixels=1000"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "Traceback" not in err
    assert err.splitlines() == [
        f"tl-keras: skipped {str(bomb)!r}: 50000x50000 = 2500000000 pixels is over "
        "--max_pixels=1000 (decompression bomb?); not decoded",
        f"tl-keras: skipped {str(photo)!r}: 179x240 = 42960 pixels is over --max_pixels=1000 "
        "(decompression bomb?); not decoded",
        f"tl-keras: error: --images='{bomb},{photo}': none of the 2 file(s) could be decoded"]
