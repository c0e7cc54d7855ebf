"""Atomic outputs: a killed write never damages a file; its leftovers are cleaned;
full or unwritable output locations are refused before training."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import pytest
from conftest import REPO

from tl_keras.core import outputs
from tl_keras.errors import ConfigError


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _kill_mid_write(target, kind: str) -> None:
    """SIGKILLs a real process in the middle of replacing `target` atomically."""
    code = textwrap.dedent(f"""
        import os, signal
        from tl_keras.core import outputs
        with outputs.atomic_path({str(target)!r}) as tmp:
            if {kind!r} == "file":
                with open(tmp, "w") as f:
                    f.write("half a new mod")
                    f.flush()
            else:
                os.makedirs(os.path.join(tmp, "variables"))
                open(os.path.join(tmp, "saved_model.pb"), "w").write("half")
            os.kill(os.getpid(), signal.SIGKILL)
    """)
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO)
    assert proc.returncode == -signal.SIGKILL


def test_killed_writes_leave_the_previous_file_and_folder_intact(tmp_path):
    model = tmp_path / "model.keras"
    model.write_text("the good model")
    export = tmp_path / "export" / "1"
    export.mkdir(parents=True)
    (export / "saved_model.pb").write_text("the good export")

    _kill_mid_write(model, "file")
    _kill_mid_write(export, "folder")
    assert model.read_text() == "the good model"
    assert (export / "saved_model.pb").read_text() == "the good export"
    left = [p for p in tmp_path.rglob(".tmp*")]
    assert len(left) == 2, left

    removed = outputs.clean_temporaries(str(tmp_path))
    assert sorted(removed) == sorted(str(p) for p in left)
    assert not list(tmp_path.rglob(".tmp*"))
    assert model.read_text() == "the good model"


def test_replacement_killed_between_its_renames_is_completed(tmp_path):
    # atomic_path replaces a folder in two renames: target -> .old, new -> target.
    # Killed in between, the complete new folder is moved into place.
    pid = _dead_pid()
    new = tmp_path / f".tmp{pid}.1"
    old = tmp_path / f".tmp{pid}.1.old"
    new.mkdir()
    (new / "saved_model.pb").write_text("new")
    old.mkdir()
    (old / "saved_model.pb").write_text("old")
    outputs.clean_temporaries(str(tmp_path))
    assert (tmp_path / "1" / "saved_model.pb").read_text() == "new"
    assert sorted(os.listdir(tmp_path)) == ["1"]


def test_temporaries_of_live_writers_are_left_alone(tmp_path):
    mine = tmp_path / f".tmp{os.getpid()}.report.json"
    mine.write_text("{}")
    assert outputs.clean_temporaries(str(tmp_path)) == []
    assert mine.exists()


def test_atomic_write_text_replaces_whole_files(tmp_path):
    p = tmp_path / "labels.txt"
    outputs.atomic_write_text(str(p), "a\nb\n")
    outputs.atomic_write_text(str(p), "c\n")
    assert p.read_text() == "c\n" and os.listdir(tmp_path) == ["labels.txt"]
    with pytest.raises(TypeError):  # a failed serialization leaves no temporary
        outputs.atomic_write_json(str(tmp_path / "r.json"), {"x": object()})
    assert os.listdir(tmp_path) == ["labels.txt"]


def test_free_space_check_names_folder_and_sizes(tmp_path):
    free = __import__("shutil").disk_usage(tmp_path).free
    outputs.check_free_space(str(tmp_path), 1024, "the run")  # plenty: no error
    with pytest.raises(ConfigError) as e:
        outputs.check_free_space(str(tmp_path), free + 2 ** 40, "the model files")
    msg = str(e.value)
    assert msg.startswith(f"--output_dir={str(tmp_path)!r}: only ") and "free there" in msg
    assert "the model files need about" in msg and "\n" not in msg


def test_unwritable_output_location_is_refused(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("")
    with pytest.raises(ConfigError, match="cannot write there"):
        outputs.ensure_writable_dir(str(f / "out"))


def test_full_output_location_is_refused_before_training(tmp_path, capsys):
    # 10^9 cached views of each image cannot fit on any disk here: the run
    # stops after building the model, before caching or training anything.
    from absl import flags
    from conftest import FLOWERS_MINI

    from tl_keras import cli

    if "data" in flags.FLAGS:
        flags.FLAGS.unparse_flags()
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        cli.run(["tl-keras", "train", f"--data={FLOWERS_MINI}", f"--output_dir={out}",
                 "--weights=none", "--image_size=32", "--cache_views=1000000000"])
    err = capsys.readouterr().err
    last = err.strip().splitlines()[-1]
    assert e.value.code == 2 and "Traceback" not in err
    assert last.startswith(f"tl-keras: error: --output_dir={str(out)!r}: only ")
    assert "need about" in last and "free some space" in last
    assert not list((out / "cache").glob("*.npy"))
