"""The data audit (issue 22) on real photos with the real MobileNetV2-0.35 weights.

A copy of flowers_mini with one label flipped and one test photo copied,
altered (10% crop, 70% size, JPEG quality 60), into the training folders.
"""

from __future__ import annotations

import json
import os
import shutil
import sys

import numpy as np
import pytest

from tests.conftest import FLOWERS_MINI, REPO, WEIGHTS_MNV2_035, run_cli

sys.path.insert(0, str(REPO / "benchmarks"))
from audit_quality import altered_copy  # noqa: E402  (the benchmark's alteration)

FLIPPED = ("sunflower", "tulip")  # the first sunflower, filed under tulip


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("audit")
    truth = {}
    for c in sorted(os.listdir(FLOWERS_MINI)):
        files = sorted(os.listdir(FLOWERS_MINI / c))
        for i, f in enumerate(files):
            split = "test" if i >= 16 else "train"
            given = FLIPPED[1] if (c == FLIPPED[0] and i == 0) else c
            dst = root / split / given / f
            dst.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(FLOWERS_MINI / c / f, dst)
            if given != c:
                truth["flipped"] = str(dst)
    src = root / "test" / "daisy" / sorted(os.listdir(root / "test" / "daisy"))[0]
    copy = root / "train" / "daisy" / "copy_of_test_photo.jpg"
    altered_copy(str(src), str(copy))
    truth.update(copy=str(copy), original=str(src), root=root)
    return truth


def _cfg(planted, out, **kw):
    from tl_keras.config import Config

    return Config(data=str(planted["root"] / "train"), test_data=str(planted["root"] / "test"),
                  backbone="mobilenet_v2", alpha=0.35, weights=str(WEIGHTS_MNV2_035),
                  image_size=160, finetune_epochs=0, head_epochs=3, export=False,
                  output_dir=str(out), cache_dir=str(planted["root"] / "cache"), **kw)


@pytest.fixture(scope="module")
def audited(planted):
    from tl_keras.run import audit

    out = planted["root"] / "audit_out"
    return audit.audit(_cfg(planted, out)), out


def test_flipped_label_is_flagged(planted, audited):
    result, out = audited
    flagged = {d["file"]: d for d in result["label_issues"]}
    assert planted["flipped"] in flagged, result["label_issues"]
    d = flagged[planted["flipped"]]
    assert (d["given"], d["suggested"]) == (FLIPPED[1], FLIPPED[0])
    rows = (out / "label_issues.csv").read_text().splitlines()
    assert rows[0] == "path,split,given,suggested,score"
    assert any(r.startswith(planted["flipped"] + ",") for r in rows[1:])
    for name in ("audit.md", "audit.json", "audit_labels.png", "audit_duplicates.png"):
        assert (out / name).is_file(), name


def test_altered_copy_across_splits_is_found(planted, audited):
    result, _ = audited
    pairs = [d for d in result["near_duplicates"]
             if {d["a"], d["b"]} == {planted["copy"], planted["original"]}]
    assert len(pairs) == 1 and pairs[0]["kind"] == "across", result["near_duplicates"]
    assert pairs[0]["drop"]["split"] in ("train", "val")


def test_the_copy_is_the_only_cross_split_pair(planted, audited):
    # The copy descriptor, not a low threshold, finds it: no other test photo
    # pairs with a training photo, and the pair clears the threshold.
    result, _ = audited
    across = [d for d in result["near_duplicates"] if d["kind"] == "across"]
    assert [{d["a"], d["b"]} for d in across] == [{planted["copy"], planted["original"]}]
    assert across[0]["similarity"] >= result["duplicate_similarity"]


def test_copy_grid_comes_from_the_same_pass(planted):
    # The grid is one more output of the feature pass: the pooled features
    # (stage 1's input) are bit-identical with and without it.
    from tl_keras.config import Config
    from tl_keras.data import pipeline, sources
    from tl_keras.run import views
    from tl_keras.train import copies, features

    cfg = Config(data=str(planted["root"] / "train"), backbone="mobilenet_v2", alpha=0.35,
                 weights=str(WEIGHTS_MNV2_035), image_size=160)
    family, size = views.resolve_family(cfg)
    clf = views.build_model(cfg, family, size, 5, False).clf
    files = sorted(str(p) for p in (planted["root"] / "test").rglob("*.jpg"))[:6]
    images = pipeline.image_dataset(sources.Split(files, np.zeros(len(files), int)), size)
    plain, _, _ = features.extract(clf.features, images, 4, progress=False)
    (pooled, grid), _, _ = features.extract(copies.extraction_model(clf), images, 4,
                                            progress=False)
    np.testing.assert_array_equal(plain, pooled)
    # MobileNetV2 at 160 px: block_12 (10x10x32 at alpha 0.35) on a 5x5 grid.
    assert grid.shape == (6, 5 * 5 * 32)


def test_audit_through_the_stage2_cut_finds_the_same(planted, audited):
    # With stage 2 planned, the pass also outputs the cut's activations and the
    # test split reuses that model (keeping its activations, and its mirrors',
    # for the evaluation of a stage-2 top): the same findings.
    import dataclasses

    from tl_keras.run import audit

    cfg = dataclasses.replace(_cfg(planted, planted["root"] / "cut_out"), finetune_epochs=1,
                              cache_dir=str(planted["root"] / "cut_cache"))
    result = audit.audit(cfg)
    kinds = [f.split(".")[-2] for f in os.listdir(cfg.cache_dir) if f.endswith(".npy")]
    # Train, its mirror pass (the stage-2 trial's held-out mirrors) and test
    # cut (no validation split: the run cross-validates).
    assert kinds.count("a") == 3 and kinds.count("am") == 1 and kinds.count("g") == 2
    assert result["near_duplicates"] == audited[0]["near_duplicates"]
    assert result["label_issues"] == audited[0]["label_issues"]


def test_relabelled_csv_round_trips(planted, audited):
    from tl_keras.data import sources

    result, out = audited
    _, split = sources.load_source(str(out / "relabelled.csv"), "data",
                                   allow_external_paths=True)
    names = sorted(os.listdir(planted["root"] / "train"))
    got = {p: names[int(y)] for p, y in zip(split.items, split.labels)}
    listed = {str(p) for p in (planted["root"] / "train").rglob("*.jpg")}
    assert set(got) == listed  # every image of --data, nothing else
    assert got[planted["flipped"]] == FLIPPED[0]  # the suggestion applied
    fixes = {d["file"]: d["suggested"] for d in result["label_issues"]
             if d["split"] in ("train", "val")}
    for p, label in got.items():
        assert label == fixes.get(p, os.path.basename(os.path.dirname(p)))


@pytest.fixture(scope="module")
def trained(planted, audited):
    from tl_keras.run import image

    out = planted["root"] / "train_out"
    cache = planted["root"] / "cache"
    before = {f for f in os.listdir(cache) if f.endswith(".npy")}
    report = image.train(_cfg(planted, out, drop_leakage=True, audit=True))
    planted["new_cache_entries"] = {f for f in os.listdir(cache) if f.endswith(".npy")} - before
    return report, out


def test_train_reuses_features_and_reports_the_audit(planted, trained):
    report, out = trained
    # Everything the audit cached (views, the mirror pass, test features) is
    # read, not computed again, even though --drop_leakage drops the copy: the
    # kept rows are taken from the entries of the whole split.
    assert planted["new_cache_entries"] == set()
    assert report["stage1"]["head_fit"] == "cv_logistic"
    assert report["stage1"]["cross_validation"]["images"] == (
        sum(report["class_counts"]["train"]) - report["audit"]["dropped"]["train"])
    assert "audit" in report and (out / "audit.json").is_file()
    assert "## Data audit" in (out / "report.md").read_text()


def test_the_kept_head_is_evaluated_on_cached_test_features(planted, trained):
    # The kept model is the frozen backbone with its head, so train evaluates
    # the head on the test images' cached features and their mirrors' (the
    # audit's entry: no new pass, above) and gets what the saved model
    # computes from the raw test images.
    from tl_keras.model import model_files
    from tl_keras.report import metrics as metrics_lib
    from tl_keras.run import views

    report, out = trained
    assert report["kept"] == "stage1" and report["tta"] == "mirror_average"
    cfg = _cfg(planted, planted["root"] / "reload_out")
    data, _ = views.load_data(cfg, str(planted["root"] / "cache"), str(cfg.output_dir),
                              cross_validated=True)
    model = model_files.load_model(str(out / "model.keras"))
    probs = metrics_lib.predict(model, data.test, 160)
    assert report["test"]["n"] == len(data.test)
    assert report["test"]["accuracy"] == pytest.approx(
        float(np.mean(probs.argmax(axis=1) == data.test.labels)), abs=1e-9)
    ece, _ = metrics_lib.calibration_of(probs, data.test.labels)
    assert report["test"]["ece"] == pytest.approx(ece, abs=2e-3)


def test_train_drops_the_copy(planted, trained):
    report, out = trained
    assert report["audit"]["dropped"] == {"train": 1} or report["audit"]["dropped"] == {"val": 1}
    assert "## Data audit" in (out / "report.md").read_text()
    audit_json = json.loads((out / "audit.json").read_text())
    assert any({d["a"], d["b"]} == {planted["copy"], planted["original"]}
               for d in audit_json["near_duplicates"])
    n_train = sum(1 for _ in (planted["root"] / "train").rglob("*.jpg"))
    assert report["class_counts"]["train"] and sum(report["class_counts"]["train"]) + sum(
        report["class_counts"]["val"]) == n_train  # counted before the drop
    assert report["audit"]["dropped"]


def test_no_audit_flag_skips_it(planted):
    from tl_keras.config import Config
    from tl_keras.run import image

    assert Config().audit  # train audits by default; --noaudit turns it off

    out = planted["root"] / "no_audit_out"
    report = image.train(_cfg(planted, out, audit=False))
    assert "audit" not in report and not (out / "audit.json").exists()


def test_cli_audit_reads_the_cache(planted, audited):
    out = planted["root"] / "cli_out"
    proc = run_cli("audit", f"--data={planted['root'] / 'train'}",
                   f"--test_data={planted['root'] / 'test'}", "--backbone=mobilenet_v2",
                   "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=160",
                   "--finetune_epochs=0", f"--cache_dir={planted['root'] / 'cache'}",
                   f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "read from cache" in proc.stdout
    summary = json.loads(proc.stdout[proc.stdout.index("{"):])
    assert summary["label_issues"] >= 1
    assert np.isclose(summary["oof_accuracy"], audited[0]["oof_accuracy"])


def test_dropped_copies_leave_cached_rows_in_the_smaller_splits_order():
    # Row i of cached training arrays is image example_order(n, seed)[i] of the
    # split; after --drop_leakage the folds and the held-out predictions index
    # the smaller split the same way, so the rows (views' and mirror's) must follow.
    from tl_keras.data import pipeline as data_pipeline
    from tl_keras.data import sources as sources_lib
    from tl_keras.run import audit

    n, seed = 10, 42
    order = data_pipeline.example_order(n, seed)
    split = sources_lib.Split([f"{i}.jpg" for i in range(n)], np.arange(n) % 2, "d")
    data = sources_lib.Dataset(["a", "b"], split, split.subset([]), None)
    rows = np.concatenate([order, order]).astype(np.float32)  # 2 views: each row's image
    tr = {"f": rows[:, None], "y": np.concatenate([order, order]) % 2}
    va = {"f": np.zeros((0, 1), np.float32), "y": np.zeros(0, int)}
    result = {"near_duplicates": [{"drop": {"split": "train", "index": 3}}]}
    # The mirror pass: one row per image, in the same order (features and activations).
    mirror = {"f": order.astype(np.float32)[:, None],
              "a": order.astype(np.float32)[:, None, None, None]}
    data, tr, va, mirror, dropped = audit.drop_copies(result, data, tr, va, seed, mirror)
    assert dropped == {"train": 1} and len(data.train) == 9
    names = [data.train.items[i] for i in data_pipeline.example_order(9, seed)]
    assert [f"{int(i)}.jpg" for i in mirror["f"][:, 0]] == names
    assert [f"{int(i)}.jpg" for i in mirror["a"][:, 0, 0, 0]] == names
    for view in (0, 1):
        got = tr["f"][view * 9:(view + 1) * 9, 0]
        assert [f"{int(i)}.jpg" for i in got] == names
        np.testing.assert_array_equal(tr["y"][view * 9:(view + 1) * 9], got.astype(int) % 2)
