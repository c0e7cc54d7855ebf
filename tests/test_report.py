"""Evaluation report, plots, TensorBoard logs, manifest and `compare`.

The metric tests use prediction sets small enough to count by hand; the
expected numbers below were worked out on paper, not by the code under test.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
from conftest import FLOWERS_MINI, run_cli
from PIL import Image

from tl_keras.report import markdown as markdown_lib
from tl_keras.report import metrics as metrics_lib
from tl_keras.report import plots
from tl_keras.report import montage

CLASSES = ["a", "b", "c"]
# 8 examples, 3 classes. Rows: true label, probabilities (argmax = prediction).
KNOWN = [
    (0, [0.80, 0.10, 0.10]),  # a -> a
    (0, [0.70, 0.20, 0.10]),  # a -> a
    (0, [0.30, 0.60, 0.10]),  # a -> b   (a is 2nd: top-2 hit)
    (1, [0.20, 0.70, 0.10]),  # b -> b
    (1, [0.10, 0.40, 0.50]),  # b -> c   (b is 2nd: top-2 hit)
    (2, [0.10, 0.10, 0.80]),  # c -> c
    (2, [0.20, 0.10, 0.70]),  # c -> c
    (2, [0.90, 0.08, 0.02]),  # c -> a   (c is last: top-2 miss)
]


def _known():
    labels = np.array([t for t, _ in KNOWN])
    probs = np.array([p for _, p in KNOWN], dtype=np.float32)
    names = [f"img{i}.jpg" for i in range(len(KNOWN))]
    return metrics_lib.evaluation(probs, labels, CLASSES, top_k=2, names=names)


def test_confusion_matrix_and_per_class_scores_of_a_known_prediction_set():
    ev = _known()
    assert ev["n"] == 8
    assert ev["accuracy"] == pytest.approx(5 / 8)
    assert ev["top_2_accuracy"] == pytest.approx(7 / 8)
    assert ev["confusion_matrix"] == [[2, 1, 0],
                                      [0, 1, 1],
                                      [1, 0, 2]]
    rows = {r["class"]: r for r in ev["per_class"]}
    # a: predicted 3 times (2 right), 3 true -> P = R = F1 = 2/3.
    # b: predicted 2 times (1 right), 2 true -> 1/2.  c: like a.
    for name, value, support in (("a", 2 / 3, 3), ("b", 1 / 2, 2), ("c", 2 / 3, 3)):
        assert rows[name]["precision"] == pytest.approx(value)
        assert rows[name]["recall"] == pytest.approx(value)
        assert rows[name]["f1"] == pytest.approx(value)
        assert rows[name]["support"] == support
    assert ev["macro_avg"]["f1"] == pytest.approx((2 / 3 + 1 / 2 + 2 / 3) / 3)
    assert ev["weighted_avg"]["f1"] == pytest.approx((3 * 2 / 3 + 2 * 1 / 2 + 3 * 2 / 3) / 8)
    assert ev["macro_avg"]["support"] == ev["weighted_avg"]["support"] == 8
    # Each off-diagonal cell holds 1: ties are listed by true, then predicted class.
    assert [(p["true"], p["predicted"], p["count"]) for p in ev["most_confused"]] == [
        ("a", "b", 1), ("b", "c", 1), ("c", "a", 1)]


def test_auc_and_mistakes_of_a_known_prediction_set():
    ev = _known()
    auc = ev["auc"]["per_class"]
    # One-vs-rest ROC-AUC = fraction of (positive, negative) pairs ranked right.
    assert auc["a"]["roc_auc"] == pytest.approx(12 / 15)  # 0.8,0.7,0.3 vs 0.2,0.1,0.1,0.2,0.9
    assert auc["b"]["roc_auc"] == pytest.approx(11 / 12)  # 0.7,0.4 vs 0.1,0.2,0.6,0.1,0.1,0.08
    assert auc["c"]["roc_auc"] == pytest.approx(10 / 15)  # 0.8,0.7,0.02 vs 0.1,0.1,0.1,0.1,0.5
    assert ev["roc_auc"] == pytest.approx((12 / 15 + 11 / 12 + 10 / 15) / 3)
    # b ranked: 0.7 (b), 0.6 (not b), 0.4 (b): AP = 1/2 * 1 + 1/2 * 2/3.
    assert auc["b"]["pr_auc"] == pytest.approx(5 / 6)
    assert ev["auc"]["average"] == "macro"
    # The three mistakes, most confident first.
    assert [(m["file"], m["true"], m["predicted"]) for m in ev["mistakes"]] == [
        ("img7.jpg", "c", "a"), ("img2.jpg", "a", "b"), ("img4.jpg", "b", "c")]
    assert [m["score"] for m in ev["mistakes"]] == pytest.approx([0.9, 0.6, 0.5])
    json.dumps(ev)  # report.json must be able to hold it as is


def test_expected_calibration_error_of_a_tiny_example():
    # Two predictions at 0.95 (one right), three at 0.65 (two right):
    # ECE = 2/5 * |1/2 - 0.95| + 3/5 * |2/3 - 0.65| = 0.18 + 0.01.
    ece, bins = metrics_lib.expected_calibration_error(
        np.array([0.95, 0.95, 0.65, 0.65, 0.65]), np.array([1, 0, 1, 1, 0]), n_bins=10)
    assert ece == pytest.approx(0.19)
    assert [(b["count"], b["accuracy"]) for b in bins] == [(3, pytest.approx(2 / 3)), (2, 0.5)]
    # Perfect calibration: confidence 0.75 and three of four right.
    assert metrics_lib.expected_calibration_error(np.full(4, 0.75),
                                                 np.array([1, 1, 1, 0]))[0] == pytest.approx(0)


def test_binary_auc_takes_the_second_class_as_positive():
    probs1 = np.array([0.1, 0.6, 0.4, 0.9])
    ev = metrics_lib.evaluation(np.stack([1 - probs1, probs1], 1), np.array([0, 0, 1, 1]),
                               ["neg", "pos"], top_k=3)
    assert ev["auc"]["average"] == "binary"
    assert ev["roc_auc"] == pytest.approx(3 / 4)  # 0.4>0.1, 0.4<0.6, 0.9>both
    assert ev["pr_auc"] == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)
    assert ev["top_2_accuracy"] == 1.0  # k is capped at the number of classes


def test_multi_label_metrics():
    targets = np.array([[1, 0], [1, 1], [0, 1], [0, 0]])
    probs = np.array([[0.9, 0.2], [0.6, 0.4], [0.3, 0.8], [0.2, 0.1]])
    ev = metrics_lib.evaluation(probs, targets, ["x", "y"], names=list("pqrs"))
    assert ev["multi_label"] is True
    assert ev["accuracy"] == pytest.approx(3 / 4)  # exact match; q misses y
    rows = {r["class"]: r for r in ev["per_class"]}
    assert (rows["x"]["precision"], rows["x"]["recall"]) == (1.0, 1.0)
    assert (rows["y"]["precision"], rows["y"]["recall"]) == (1.0, 0.5)
    assert rows["y"]["f1"] == pytest.approx(2 / 3)
    assert ev["roc_auc"] == pytest.approx(1.0) and ev["auc"]["average"] == "macro"
    assert ev["mistakes"] == [{"file": "q", "true": "x+y", "predicted": "x",
                               "score": pytest.approx(0.6), "index": 1}]


def test_a_class_missing_from_the_labels_has_no_auc():
    probs = np.array([[0.7, 0.2, 0.1], [0.2, 0.7, 0.1], [0.6, 0.3, 0.1]])
    ev = metrics_lib.evaluation(probs, np.array([0, 1, 1]), CLASSES)
    assert ev["auc"]["per_class"]["c"] == {"roc_auc": None, "pr_auc": None}
    # Macro over a and b only. a: 0.7 vs 0.2, 0.6 -> 1. b: 0.7, 0.3 vs 0.2 -> 1.
    # (Were c counted as 0 or 0.5, the mean would be below 1.)
    assert ev["roc_auc"] == pytest.approx(1.0)
    assert json.loads(json.dumps(ev))["auc"]["per_class"]["c"]["roc_auc"] is None


def test_markdown_has_the_per_class_table():
    md = markdown_lib.evaluation_markdown(_known(), "Test (8 images)", {"confusion": "cm.png"})
    assert "| class | precision | recall | F1 | support | ROC-AUC | PR-AUC |" in md
    assert "| a | 0.667 | 0.667 | 0.667 | 3 | 0.800 |" in md
    assert "| b | 0.500 | 0.500 | 0.500 | 2 | 0.917 | 0.833 |" in md
    assert "| *macro avg* | 0.611 | 0.611 | 0.611 | 8 |" in md
    assert "| **c** | 1 | 0 | 2 |" in md  # confusion matrix row
    assert "![confusion matrix](cm.png)" in md
    assert "| 1 | `img7.jpg` | c | a | 0.900 |" in md


def _png(path):
    with Image.open(path) as img:
        assert img.format == "PNG"
        arr = np.asarray(img.convert("RGB"))
    assert arr.std() > 10, "the figure is blank"
    return arr.shape[1], arr.shape[0]


def test_pngs_are_real_images_of_the_expected_size(tmp_path):
    s1 = {"loss": [1.2, 0.9, 0.8], "accuracy": [0.5, 0.7, 0.75], "val_loss": [1.0, 0.9, 0.85],
          "val_accuracy": [0.6, 0.7, 0.72], "lr": [1e-3, 5e-4, 1e-5]}
    s2 = {"loss": [0.7, 0.6], "accuracy": [0.8, 0.85], "val_loss": [0.8, 0.82],
          "val_accuracy": [0.75, 0.74], "lr": [1e-4, 0.0]}
    curves = plots.learning_curves_png([s1, s2], str(tmp_path / "c.png"), kept_epoch=4)
    assert _png(curves) == (1500, 450) == tuple(int(v * plots.DPI) for v in plots.CURVES_SIZE)

    cm = plots.confusion_matrix_png(np.array([[2, 1, 0], [0, 1, 1], [1, 0, 2]]), CLASSES,
                                    str(tmp_path / "cm.png"))
    w, h = plots.confusion_figsize(3)
    assert _png(cm) == (int(w * plots.DPI), int(h * plots.DPI)) == (650, 550)

    photos = sorted((FLOWERS_MINI / "daisy").glob("*.jpg"))[:3]
    items = [str(photos[0]), photos[1].read_bytes(), str(photos[2]), b"not an image",
             str(photos[0])]
    mistakes = [{"file": f"f{i}", "true": "daisy", "predicted": "rose", "score": 0.9 - i / 10}
                for i in range(len(items))]
    grid = plots.mistakes_png(mistakes, items, str(tmp_path / "m.png"))
    # 5 thumbnails: 4 columns, 2 rows of cells (a thumbnail and three caption lines).
    cell_w, cell_h = montage.CELL + montage.PAD, montage.CELL + 3 * montage.LINE + 2 * montage.PAD
    assert _png(grid) == (4 * cell_w + montage.PAD, 2 * montage.LINE + montage.PAD + 2 * cell_h)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.png", "cm.png", "m.png"]


def test_a_perfect_evaluation_leaves_no_stale_mistakes_png(tmp_path):
    (tmp_path / "evaluation_mistakes.png").write_bytes(b"from an earlier evaluation")
    probs = np.full((3, 3), 0.1) + np.eye(3) * 0.7
    ev = metrics_lib.evaluation(probs, np.array([0, 1, 2]), CLASSES)
    written = markdown_lib.write_evaluation_files(str(tmp_path), {"data": "d", "test": ev},
                                                ["unused"] * 3)
    assert written == ["evaluation.md", "evaluation_confusion_matrix.png",
                       "evaluation_reliability.png"]
    assert not (tmp_path / "evaluation_mistakes.png").exists()
    assert "No mistakes." in (tmp_path / "evaluation.md").read_text()


def test_a_run_without_test_split_reports_its_validation_split(tmp_path):
    ev = _known()
    hist = {"loss": [1.0, 0.8], "accuracy": [0.5, 0.6], "val_loss": [0.9, 0.85],
            "val_accuracy": [0.55, 0.6], "lr": [1e-3, 1e-4]}
    report = {"classes": CLASSES, "backbone": "mobilenet_v2", "image_size": 96,
              "stage1": {"epochs": 2, "best_epoch": 2, "val_accuracy": 0.6, "val_loss": 0.85,
                         "seconds": 1.0}, "stage2": {"epochs": 0}, "kept": "stage1", "val": ev}
    photo = str(sorted((FLOWERS_MINI / "tulip").glob("*.jpg"))[0])
    written = markdown_lib.write_run_files(str(tmp_path), report, [hist], [photo] * 8)
    assert written == ["report.md", "learning_curves.png", "confusion_matrix.png", "mistakes.png",
                       "reliability.png"]
    md = (tmp_path / "report.md").read_text()
    assert "## Validation (8 images; no test split" in md and "optimistic" in md
    assert "| a | 0.667 | 0.667 | 0.667 | 3 |" in md
    # 3 mistakes in one row (montage cells: a thumbnail and three caption lines)
    assert _png(tmp_path / "mistakes.png") == (
        3 * (montage.CELL + montage.PAD) + montage.PAD,
        2 * montage.LINE + montage.PAD + montage.CELL + 3 * montage.LINE + 2 * montage.PAD)


def test_split_hash_names_examples_and_labels_not_order_or_location(tmp_path):
    from tl_keras.data import sources as sources_lib
    from tl_keras.run import manifest

    photos = sorted((FLOWERS_MINI / "rose").glob("*.jpg"))[:3]
    for root in ("x", "y"):
        (tmp_path / root / "rose").mkdir(parents=True)
        for p in photos:
            shutil.copy(p, tmp_path / root / "rose")
    _, x = sources_lib.load_source(str(tmp_path / "x"), "data")
    _, y = sources_lib.load_source(str(tmp_path / "y"), "data")
    assert manifest.split_hash(x) == manifest.split_hash(y)  # same files elsewhere
    assert manifest.split_hash(x) == manifest.split_hash(x.subset([2, 0, 1]))
    relabelled = sources_lib.Split(x.items, x.labels + 1, x.source)
    assert manifest.split_hash(relabelled) != manifest.split_hash(x)
    assert manifest.split_hash(x.subset([0, 1])) != manifest.split_hash(x)
    as_bytes = sources_lib.Split([open(p, "rb").read() for p in x.items], x.labels, "tfds:t")
    assert manifest.split_hash(as_bytes) == manifest.split_hash(
        sources_lib.Split(list(reversed(as_bytes.items)), x.labels, "tfds:t"))


# --------------------------------------------------------------------------
# End to end, on the shared real run of conftest
# --------------------------------------------------------------------------

def test_train_writes_report_md_pngs_and_extended_report_json(trained_run):
    report = json.loads((trained_run / "report.json").read_text())
    test = report["test"]
    assert {"accuracy", "n"} <= set(test) and test["n"] == 30  # the old keys still there
    assert sum(map(sum, test["confusion_matrix"])) == 30
    diag = sum(test["confusion_matrix"][i][i] for i in range(5))
    assert diag / 30 == pytest.approx(test["accuracy"])
    assert [r["class"] for r in test["per_class"]] == report["classes"]
    assert sum(r["support"] for r in test["per_class"]) == 30
    assert 0.5 < test["roc_auc"] <= 1 and 0 <= test["ece"] < 1
    wrong = 30 - diag
    assert len(test["mistakes"]) == min(wrong, metrics_lib.NUM_MISTAKES)
    assert all(m["file"].endswith(".jpg") and m["true"] != m["predicted"]
               for m in test["mistakes"])
    md = (trained_run / "report.md").read_text()
    assert "| class | precision | recall | F1 | support |" in md
    for name in report["classes"]:
        assert f"| {name} |" in md
    assert _png(trained_run / "learning_curves.png") == (1500, 450)
    assert _png(trained_run / "confusion_matrix.png") == (650 + 100, 550 + 100)  # 5 classes
    if wrong:
        assert (trained_run / "mistakes.png").is_file()
        _png(trained_run / "mistakes.png")
    # Calibrated probabilities: a temperature fitted on validation, the test ECE
    # before it beside the calibrated one, and the reliability diagram.
    cal = report["calibration"]
    assert cal["temperature"] > 0 and cal["val_nll"] <= cal["val_nll_uncalibrated"]
    assert 0 <= test["ece_uncalibrated"] < 1 and test["calibration_uncalibrated"]
    assert "expected calibration error, uncalibrated" in md and "reliability.png" in md
    _png(trained_run / "reliability.png")
    from tl_keras.model import model_files

    # Selective prediction at the default --target_accuracy (0.95): chosen on
    # validation, measured on test, drawn against coverage.
    chosen, on_test = report["selective"], test["selective"]
    assert chosen["target_accuracy"] == on_test["target_accuracy"] == 0.95
    if chosen["reached"]:
        assert chosen["accuracy"] >= 0.95 and on_test["threshold"] == chosen["threshold"]
    assert len(test["coverage_curve"]) == 20 and test["coverage_curve"][-1]["coverage"] == 1.0
    assert "### Selective prediction" in md and "coverage.png" in md
    _png(trained_run / "coverage.png")
    saved = model_files.load_model(str(trained_run / "model.keras"))
    assert saved.get_layer("calibrated").temperature == pytest.approx(cal["temperature"])


def _events(folder):
    """{tag: [(step, value)]} of every event file in `folder` (not its subfolders)."""
    import tensorflow as tf

    out: dict = {}
    files = sorted(folder.glob("events.out.tfevents.*"))
    assert files, f"no event files in {folder}"
    for f in files:
        for e in tf.compat.v1.train.summary_iterator(str(f)):
            for v in e.summary.value:
                out.setdefault(v.tag, []).append((e.step, tf.make_ndarray(v.tensor)))
    return out


def test_tensorboard_has_both_stages_in_one_run(deterministic_runs):
    # The AdamW head (epochs, on a validation split) and stage 2 in one run.
    trained_run = deterministic_runs[0]
    report = json.loads((trained_run / "report.json").read_text())
    e1, e2 = report["stage1"]["epochs"], report["stage2"]["epochs"]
    assert e1 >= 1 and e2 >= 1
    tb = trained_run / "tensorboard"
    train, val, root = _events(tb / "train"), _events(tb / "validation"), _events(tb)
    stage = sorted(train["stage"])
    # Stage 2 continues the epoch numbering of stage 1 in the same run.
    assert [s for s, v in stage if v == 1] == list(range(1, e1 + 1))
    assert [s for s, v in stage if v == 2] == list(range(e1 + 1, e1 + e2 + 1))
    for tag in ("epoch_loss", "epoch_accuracy", "epoch_learning_rate"):
        assert [s for s, _ in sorted(train[tag])] == list(range(1, e1 + e2 + 1)), tag
    for tag in ("epoch_loss", "epoch_accuracy"):
        assert [s for s, _ in sorted(val[tag])] == list(range(1, e1 + e2 + 1)), tag
    assert all(float(v) > 0 for _, v in train["epoch_learning_rate"][:e1])
    assert b"image_size | 64" in root["hparams"][0][1].item()
    assert float(root["test/accuracy"][0][1]) == pytest.approx(report["test"]["accuracy"])


def test_manifest_in_run_folder_and_saved_model(trained_run):
    import tensorflow as tf

    from tl_keras.data import sources as sources_lib
    from tl_keras.run import manifest

    m = json.loads((trained_run / "manifest.json").read_text())
    assert m == json.loads((trained_run / "export" / "1" / "assets.extra" /
                            "manifest.json").read_text())
    assert m["config"] == json.loads((trained_run / "config.json").read_text())
    assert m["versions"]["tensorflow"] == tf.__version__
    assert {"tl_keras", "keras", "python"} <= set(m["versions"])
    assert m["device"]["summary"] and m["seeds"]["seed"] == m["config"]["seed"]
    cfg = m["config"]
    ds = sources_lib.load_dataset(
                                  sources_lib.DataSpec(data=cfg["data"],
                                                       test_fraction=cfg["test_fraction"],
                                                       seed=cfg["seed"],
                                                       val_fraction=cfg["val_fraction"]))
    assert m["data"] == manifest.data_manifest(ds)  # reproducible from the data alone
    assert m["data"]["splits"]["test"]["class_counts"] == {c: 6 for c in ds.class_names}


def test_evaluate_writes_the_full_report(trained_run, tmp_path):
    from tl_keras.run import evaluate as runs

    run = tmp_path / "run"
    run.mkdir()
    for f in ("model.keras", "labels.txt", "config.json"):
        shutil.copy(trained_run / f, run / f)
    data = tmp_path / "data"
    for c in ("daisy", "tulip"):
        (data / c).mkdir(parents=True)
        for p in sorted((FLOWERS_MINI / c).glob("*.jpg"))[:4]:
            shutil.copy(p, data / c)
    result = runs.evaluate_run(str(run), str(data), batch_size=8)
    ev = result["test"]
    assert ev["n"] == 8 and len(ev["confusion_matrix"]) == 5  # all the model's classes
    assert json.loads((run / "evaluation.json").read_text()) == result
    md = (run / "evaluation.md").read_text()
    assert "| daisy |" in md and "| class | precision |" in md
    assert _png(run / "evaluation_confusion_matrix.png") == (750, 650)


def test_compare_prints_runs_side_by_side(trained_run, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    for f in ("report.json", "config.json", "manifest.json"):
        shutil.copy(trained_run / f, other / f)
    r = json.loads((other / "report.json").read_text())
    r["test"]["accuracy"] = 0.123456
    (other / "report.json").write_text(json.dumps(r))
    proc = run_cli("compare", str(trained_run), str(other), timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.splitlines()
    assert str(trained_run) in lines[0] and str(other) in lines[0]
    acc = next(line for line in lines if line.startswith("accuracy"))
    mine = json.loads((trained_run / "report.json").read_text())["test"]["accuracy"]
    assert acc.split()[1:] == [f"{mine:.4f}", "0.1235"]
    assert any(line.startswith("macro F1") for line in lines)

    proc = run_cli("compare", str(trained_run), str(tmp_path / "nothing"), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("tl-keras: error: run ")
    assert "Traceback" not in proc.stderr


def _cli_in_process(capsys, *args) -> tuple[int, str, str]:
    """`tl-keras ARGS` run by `cli.run` in this process: (exit code, stdout, stderr)."""
    from tl_keras import cli

    with pytest.raises(SystemExit) as exit_:
        cli.run(["tl-keras", *args])
    out = capsys.readouterr()
    return exit_.value.code, out.out, out.err


def _one_line_error(code, err) -> str:
    assert code == 2 and "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tl-keras: error: "), err
    return lines[0][len("tl-keras: error: "):]


def test_broken_run_files_are_one_line_errors_in_evaluate_and_compare(tmp_path, capsys):
    # evaluate: config.json is read before the model, so a placeholder model
    # file will do; the error names the run, the file and the parser's words.
    run = tmp_path / "run"
    run.mkdir()
    (run / "model.keras").write_bytes(b"placeholder")
    (run / "labels.txt").write_text("daisy\nrose\n")
    for text, why in [
        ('{"image_size": 96,', "config.json is not valid JSON: JSONDecodeError: Expecting "
                               "property name enclosed in double quotes: line 1 column 19 "
                               "(char 18)"),
        ('["image_size", 96]', "config.json holds an array, not a JSON object"),
    ]:
        (run / "config.json").write_text(text)
        code, _, err = _cli_in_process(capsys, "evaluate", f"--model={run}",
                                       f"--data={FLOWERS_MINI}")
        assert _one_line_error(code, err) == f"--model={str(run)!r}: {why}"

    # compare: a report that is not an object, a config that is not JSON.
    good = tmp_path / "good"
    good.mkdir()
    (good / "report.json").write_text(json.dumps({"test": {"accuracy": 0.5, "n": 2}}))
    bad = tmp_path / "bad"
    bad.mkdir()
    for name, text, why in [
        ("report.json", '"finished"', "report.json holds a string, not a JSON object"),
        ("report.json", "[0.5]", "report.json holds an array, not a JSON object"),
        ("config.json", "{oops}", "config.json is not valid JSON: JSONDecodeError: Expecting "
                                  "property name enclosed in double quotes: line 1 column 2 "
                                  "(char 1)"),
    ]:
        (bad / "report.json").write_text("{}")
        (bad / name).write_text(text)
        code, _, err = _cli_in_process(capsys, "compare", str(good), str(bad))
        assert _one_line_error(code, err) == f"run {str(bad)!r}: {why}"
    # An object whose figures have other shapes (hand-edited, older) shows "-".
    (bad / "config.json").write_text("{}")
    (bad / "report.json").write_text(json.dumps({"stage1": None, "test": 5, "classes": 3,
                                                 "stage2": {"epochs": [1]}}))
    code, out, err = _cli_in_process(capsys, "compare", str(good), str(bad))
    assert code == 0 and "Traceback" not in err, err
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[2:] if line}
    assert rows["accuracy"] == ["0.5000", "-"] and rows["classes"] == ["-", "-"]


def test_a_broken_thresholds_file_is_one_line(tmp_path):
    from tl_keras.errors import ConfigError
    from tl_keras.report import thresholds as multilabel

    (tmp_path / multilabel.THRESHOLDS_FILE).write_text('{"thresholds": {"a": 0.4,}}')
    with pytest.raises(ConfigError) as e:
        multilabel.read_thresholds(str(tmp_path), ["a", "b"])
    assert str(e.value) == (f"--model={str(tmp_path)!r}: thresholds.json is not valid JSON: "
                            "JSONDecodeError: Expecting property name enclosed in double quotes: "
                            "line 1 column 26 (char 25)")
    (tmp_path / multilabel.THRESHOLDS_FILE).write_text('{"thresholds": {"a": "high"}}')
    with pytest.raises(ConfigError, match=r"thresholds.json: could not convert string to float: "
                                          r"'high'$"):
        multilabel.read_thresholds(str(tmp_path), ["a", "b"])
    (tmp_path / multilabel.THRESHOLDS_FILE).write_text('{"thresholds": {"a": 0.4}}')
    assert multilabel.read_thresholds(str(tmp_path), ["a", "b"]) == [0.4, 0.5]
