"""The pre-flight scan on real photos mixed with bad and odd files of every kind."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import numpy as np
import odd_images
import pytest
import tensorflow as tf
from conftest import FLOWERS_MINI

from tl_keras.config import Config
from tl_keras.data import decode as decode_lib
from tl_keras.data import preflight
from tl_keras.data import sources as sources_lib
from tl_keras.errors import ConfigError

CLASSES = ("daisy", "rose", "tulip")


def _photos(cls: str, n: int, start: int = 0) -> list[Path]:
    return sorted((FLOWERS_MINI / cls).glob("*.jpg"))[start:start + n]


@pytest.fixture(scope="module")
def messy(tmp_path_factory) -> dict:
    """train/: 3 classes x 8 real photos, odd files of every kind in daisy/,
    a byte copy inside rose/ and another of a train photo in val/ (leakage).
    val/: 3 classes x 3 other real photos."""
    root = tmp_path_factory.mktemp("messy")
    for cls in CLASSES:
        (root / "train" / cls).mkdir(parents=True)
        (root / "val" / cls).mkdir(parents=True)
        for p in _photos(cls, 8):
            shutil.copy(p, root / "train" / cls)
        for p in _photos(cls, 3, start=8):
            shutil.copy(p, root / "val" / cls)
    odds = odd_images.make_odd_files(_photos("daisy", 4, start=12), root / "train" / "daisy")
    rose = _photos("rose", 2)
    shutil.copy(rose[0], root / "train" / "rose" / "copy_of_first.jpg")  # duplicate within
    leaked = _photos("tulip", 1)[0]
    shutil.copy(leaked, root / "val" / "tulip" / "leaked.jpg")  # leakage train -> val
    return {"root": root, "odds": odds, "dup": (str(root / "train" / "rose" / rose[0].name),
                                                 str(root / "train" / "rose" / "copy_of_first.jpg")),
            "leaked": (str(root / "train" / "tulip" / leaked.name),
                       str(root / "val" / "tulip" / "leaked.jpg"))}


def _prepare(messy, tmp_path, **kw):
    root = messy["root"]
    args = dict(val_data=str(root / "val"), cache_dir=str(tmp_path / "cache"),
                report_path=str(tmp_path / "preflight.json"), progress=False,
                log=lambda *_: None)
    args.update(kw)
    fields = {f.name for f in dataclasses.fields(sources_lib.DataSpec)}
    spec = sources_lib.DataSpec(str(root / "train"),
                                **{k: v for k, v in args.items() if k in fields})
    return preflight.prepare_dataset(spec, **{k: v for k, v in args.items() if k not in fields})


def test_every_bad_file_is_listed_with_its_reason_and_odd_ones_are_used(messy, tmp_path):
    ds, report = _prepare(messy, tmp_path)
    written = json.loads((tmp_path / "preflight.json").read_text())
    assert written["summary"] == report["summary"]
    train = written["sources"]["train"]
    skipped = {e["path"]: e["reason"] for e in train["skipped"]}
    converted = {e["path"]: e["reason"] for e in train["converted"]}
    notes = {e["path"]: e["note"] for e in train["notes"]}
    for odd in messy["odds"]:
        path = str(odd.path)
        if odd.status == "skipped":
            assert odd.reason in skipped.get(path, ""), (odd.kind, skipped.get(path))
            assert all(e["label"] == "daisy" for e in train["skipped"])
        elif odd.status == "converted":
            assert odd.reason in converted.get(path, ""), (odd.kind, converted.get(path))
        elif odd.status == "ok":
            assert odd.reason in notes.get(path, ""), (odd.kind, notes.get(path))
    n_bad = sum(o.status == "skipped" for o in messy["odds"])
    assert len(skipped) == n_bad == report["summary"]["skipped"]
    # Every usable file trains: 8 real + usable odd ones in daisy, 8 + 1 copy in rose.
    counts = dict(zip(ds.class_names, ds.train.class_counts(3)))
    assert counts == {"daisy": 8 + len(messy["odds"]) - n_bad, "rose": 9, "tulip": 8}
    # Duplicates within a split, and leakage across splits, are named.
    assert [sorted(e["path"] for e in g["files"]) for g in train["duplicates"]] == \
        [sorted(messy["dup"])]
    (leak,) = written["leakage"]
    assert leak["files"] == {"train": [messy["leaked"][0]], "val": [messy["leaked"][1]]}
    assert leak["dropped_from"] == []
    assert written["class_counts"]["train"] == ds.train.class_counts(3)


def test_training_pixels_are_what_a_person_sees(messy, tmp_path):
    ds, _ = _prepare(messy, tmp_path)
    used = dict(zip(ds.train.keys, ds.train.items))
    import hashlib

    for odd in messy["odds"]:
        if odd.expected is None:
            continue
        item = used[hashlib.sha1(odd.path.read_bytes()).hexdigest()]
        # The exact function the training pipeline decodes with.
        got = decode_lib.decode_image(tf.io.read_file(item)).numpy()
        assert got.shape == odd.expected.shape, odd.kind
        diff = np.abs(got.astype(np.int16) - odd.expected.astype(np.int16)).mean()
        assert diff <= odd.tolerance, (odd.kind, diff)
    # Converted files live in the cache, never next to the user's files.
    fixed = [i for i in ds.train.items if str(tmp_path / "cache") in i]
    assert len(fixed) == sum(o.status == "converted" for o in messy["odds"])
    assert not any(p.name.endswith(".png") and "fixed" in str(p)
                   for p in messy["root"].rglob("*"))


def test_rerun_uses_the_cache_and_notices_changed_files(messy, tmp_path):
    _, first = _prepare(messy, tmp_path)
    assert first["summary"]["from_cache"] == 0
    total = first["summary"]["scanned"]
    _, again = _prepare(messy, tmp_path)
    assert again["summary"]["scanned"] == 0
    assert again["summary"]["from_cache"] == total
    assert again["sources"] == first["sources"]
    # A changed file (new size and mtime) is scanned again; a lower pixel
    # limit re-decides from the cached size without decoding.
    victim = Path(messy["dup"][1])
    saved = victim.read_bytes()
    try:
        victim.write_bytes(b"")
        _, changed = _prepare(messy, tmp_path)
        assert changed["summary"]["scanned"] == 1
        reasons = {e["path"]: e["reason"] for e in changed["sources"]["train"]["skipped"]}
        assert reasons[str(victim)] == "empty file (0 bytes)"
    finally:
        victim.write_bytes(saved)
    # Every photo is over 20000 pixels: all skipped, decided from the cache,
    # and the run stops because classes are left empty.
    with pytest.raises(ConfigError, match="no usable training images"):
        _prepare(messy, tmp_path, max_pixels=20000)
    small = json.loads((tmp_path / "preflight.json").read_text())
    assert small["summary"]["scanned"] == 1  # only the restored file (new mtime)
    val_skipped = small["sources"]["val"]["skipped"]
    assert len(val_skipped) == 10
    assert all("over --max_pixels=20000" in e["reason"] for e in val_skipped)


def test_drop_leakage_removes_copies_from_the_training_side(messy, tmp_path):
    ds, report = _prepare(messy, tmp_path, drop_leakage=True)
    (leak,) = report["leakage"]
    assert leak["dropped_from"] == ["train"]
    assert ds.train.class_counts(3)[2] == 7  # tulip lost its leaked copy
    assert ds.val.class_counts(3)[2] == 4    # the evaluation data stays as given
    assert not set(ds.train.keys) & set(ds.val.keys)


def test_automatic_splits_keep_byte_identical_copies_on_one_side(tmp_path):
    root = tmp_path / "data"
    for cls in CLASSES:
        (root / cls).mkdir(parents=True)
        photos = _photos(cls, 10)
        for p in photos:
            shutil.copy(p, root / cls)
        for i in range(3):  # three extra copies of one photo per class
            shutil.copy(photos[0], root / cls / f"copy{i}.jpg")
    ds, report = preflight.prepare_dataset(
                                           sources_lib.DataSpec(data=str(root), val_fraction=0.3,
                                                                test_fraction=0.3),
                                           cache_dir=str(tmp_path / "c"), progress=False,
                                           log=lambda *_: None)
    assert report["leakage"] == []
    assert len(report["sources"]["train"]["duplicates"]) == 3
    sides = [set(s.keys) for s in (ds.train, ds.val, ds.test)]
    assert not (sides[0] & sides[1]) and not (sides[0] & sides[2]) and not (sides[1] & sides[2])


def test_stops_with_one_line_only_when_a_class_is_left_empty(tmp_path):
    root = tmp_path / "data"
    for cls in ("daisy", "rose"):
        (root / cls).mkdir(parents=True)
        for p in _photos(cls, 5):
            shutil.copy(p, root / cls)
    (root / "broken").mkdir()
    odd_images.zero_byte(None, root / "broken" / "a")
    odd_images.text_named_jpg(None, root / "broken" / "b")
    report_path = tmp_path / "out" / "preflight.json"
    with pytest.raises(ConfigError) as e:
        preflight.prepare_dataset(sources_lib.DataSpec(data=str(root)),
                                  cache_dir=str(tmp_path / "c"), report_path=str(report_path),
                                  progress=False, log=lambda *_: None)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(f"--data={str(root)!r}")
    assert "'broken' has no usable training images" in msg and "skipped 2" in msg
    assert str(report_path) in msg
    # The list of what was wrong is there for the user to read.
    assert len(json.loads(report_path.read_text())["sources"]["train"]["skipped"]) == 2


ASTERACEAE = {"daisy", "dandelion", "sunflower"}  # the daisy family; rose and tulip are not
ALL_CLASSES = ["daisy", "dandelion", "rose", "sunflower", "tulip"]


def test_messy_multi_label_list_trains_exports_and_evaluates(tmp_path):
    """One real run (the CPU budget allows one) covering, end to end: a CSV
    list with multi-label rows, bad and odd files of every kind mixed in, a
    missing file, a duplicate row, everything spilled to the disk cache;
    sigmoid head, per-label thresholds and metrics, export, and `evaluate`."""
    import keras
    from conftest import DATA, WEIGHTS_MNV2_035

    from tl_keras.run import evaluate as runs
    from tl_keras.run import image as pipeline

    def tags(c):
        return f"{c}|asteraceae" if c in ASTERACEAE else c

    def not_in_mini(c):
        mini = {p.name for p in _photos(c, 20)}
        return [p for p in sorted((DATA / "flowers" / c).glob("*.jpg")) if p.name not in mini]

    # 30 photos a class: over 100 training images, so the stage-2 trial runs.
    rows = [f"{p},{tags(c)}" for c in ALL_CLASSES for p in _photos(c, 20) + not_in_mini(c)[:10]]
    others = not_in_mini("daisy")[10:]
    odds = odd_images.make_odd_files(others[:6], tmp_path / "odd")
    rows += [f"odd/{o.path.name},{tags('daisy')}" for o in odds]
    rows += ["odd/never_downloaded.jpg,rose", rows[0]]  # a missing file; a duplicate row
    (tmp_path / "tags.csv").write_text("path,labels\n" + "\n".join(rows) + "\n")
    out = tmp_path / "run"
    # The rows name the shared photos by absolute path, outside the list's folder.
    cfg = Config(data=str(tmp_path / "tags.csv"), allow_external_paths=True,
                 test_fraction=0.3, output_dir=str(out),
                 weights=str(WEIGHTS_MNV2_035), alpha=0.35, image_size=96, head_epochs=30,
                 finetune_epochs=1, finetune_blocks=1, cache_views=2, label_smoothing=0.0,
                 cache_ram_mb=0)
    report = pipeline.train(cfg)

    # Every bad file is listed with its reason; the run went on.
    bad = {str(o.path): o.reason for o in odds if o.status == "skipped"}
    bad[str(tmp_path / "odd" / "never_downloaded.jpg")] = "missing file"
    pre = json.loads((out / "preflight.json").read_text())
    listed = {e["path"]: e["reason"] for e in pre["sources"]["train"]["skipped"]}
    assert set(listed) == set(bad)
    assert all(bad[p] in listed[p] for p in bad), listed
    assert len(pre["sources"]["train"]["duplicates"]) == 1
    assert report["preflight"]["skipped"] == len(bad)
    assert report["image_cache"]["train"]["ram"] == 0  # all spilled to disk ...
    assert not [d for d in os.listdir(out / "cache") if d.startswith("tfdata-")]  # ... and removed

    # Multi-label end to end.
    names = ["asteraceae"] + ALL_CLASSES
    assert report["classes"] == names and report["multi_label"] is True
    assert report["class_weight"] is None
    # The stage-2 trial ran on multi-hot labels (exact match of every label).
    trial = report["stage2_trial"]
    assert trial["images"] >= 100 and "stage2_skipped" not in report
    assert report["stage2"]["epochs"] == (1 if trial["finetune_kept"] else 0)
    test = report["test"]
    for m in test["per_label"].values():
        assert {"threshold", "precision", "recall", "f1", "average_precision", "support"} <= set(m)
    # Real ImageNet features separate the daisy family from roses and tulips;
    # a blind ranking would score about the base rate (0.6).
    assert test["per_label"]["asteraceae"]["average_precision"] >= 0.8, test
    assert test["mean_average_precision"] >= 0.6, test
    saved = json.loads((out / "thresholds.json").read_text())
    assert list(saved["thresholds"]) == names and saved["thresholds"] == report["thresholds"]
    assert [m["threshold"] for m in test["per_label"].values()] == list(saved["thresholds"].values())
    assert json.loads((out / "export" / "1" / "assets" / "thresholds.json").read_text()) == saved
    model = keras.models.load_model(out / "model.keras", compile=False)

    def heads(m):  # the saved model may wrap the trained one (mirror averaging)
        for layer in m.layers:
            if layer.name == "head":
                yield layer
            elif isinstance(layer, keras.Model):
                yield from heads(layer)

    assert [h.activation.__name__ for h in heads(model)] == ["sigmoid"]

    # `evaluate` on the same messy list skips the same files and uses the run's thresholds.
    result = runs.evaluate_run(str(out), str(tmp_path / "tags.csv"), allow_external_paths=True)
    assert {e["path"] for e in result["skipped"]} == set(bad)
    assert result["test"]["n"] == len(rows) - len(bad)
    assert [m["threshold"] for m in result["test"]["per_label"].values()] == \
        list(saved["thresholds"].values())
