""""None of the above": the score, its threshold, and the outputs the exports serve."""

import json

import keras
import numpy as np
import pytest
import tensorflow as tf
from sklearn.metrics import roc_auc_score

from conftest import FLOWERS, WEIGHTS_MNV2_035, run_cli
from tl_keras.export import saved_model as export_lib
from tl_keras.export import tflite as tflite_lib
from tl_keras.model import model_files, open_set
from tl_keras.run import predict as predict_lib

KNOWN = ("daisy", "dandelion", "rose")
UNSEEN = ("sunflower", "tulip")


def test_the_score_is_the_entropy_over_log_c_and_the_graph_computes_the_same():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3.0, size=(200, 5)).astype(np.float32)
    probs = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    want = -(probs * np.log(np.clip(probs, 1e-7, 1))).sum(1) / np.log(5)
    np.testing.assert_allclose(open_set.score(probs), want, rtol=1e-5, atol=1e-6)
    # Sure of one class -> 0; spread evenly -> 1.
    assert open_set.score(np.eye(5, dtype=np.float32)).max() < 1e-4
    assert open_set.score(np.full((1, 5), 0.2, np.float32))[0] == pytest.approx(1.0, abs=1e-5)
    threshold = float(np.median(want))
    graph = tf.function(lambda p: open_set.graph_outputs(p, threshold))(tf.constant(probs))
    np.testing.assert_allclose(graph["ood_score"].numpy(), open_set.score(probs), atol=1e-6)
    np.testing.assert_array_equal(graph["unknown"].numpy(), open_set.is_unknown(probs, threshold))
    assert 0 < graph["unknown"].numpy().sum() < len(probs)


def test_the_threshold_is_the_lowest_that_keeps_the_share_asked_for():
    probs = np.stack([np.full(5, 0.2, np.float32)] * 3 + [np.eye(5, dtype=np.float32)[0]] * 17)
    probs[:3, 0] += 0.01 * np.arange(1, 4)[:, None].ravel()
    probs /= probs.sum(1, keepdims=True)
    chosen = open_set.choose_threshold(probs, 0.9)
    s = np.sort(open_set.score(probs))
    assert chosen["threshold"] == pytest.approx(s[17])  # 18 of 20 kept: >= 0.9
    assert chosen["known_kept"] == pytest.approx(0.9) and chosen["n"] == 20
    assert open_set.is_unknown(probs, chosen["threshold"]).sum() == 2
    assert open_set.choose_threshold(probs, 1.0)["known_kept"] == 1.0
    with pytest.raises(ValueError, match="keep must be in"):
        open_set.choose_threshold(probs, 0.0)


def _write_list(path, rows):
    path.write_text("".join(f"{p},{label}\n" for p, label in rows))
    return path


@pytest.fixture(scope="module")
def open_set_run(tmp_path_factory, data_dir):
    """A real run trained on three flower classes (60 photos each), tested on 25 more
    of each, exported with a float TFLite file; 25 photos of each unseen class."""
    root = tmp_path_factory.mktemp("open_set")
    train, test, unseen = [], [], []
    for c in KNOWN + UNSEEN:
        photos = sorted((FLOWERS / c).iterdir())
        if c in KNOWN:
            train += [(p, c) for p in photos[:60]]
            test += [(p, c) for p in photos[100:125]]
        else:
            unseen += [p for p in photos[100:125]]
    out = root / "out"
    proc = run_cli(
        "train", f"--data={_write_list(root / 'train.csv', train)}",
        f"--test_data={_write_list(root / 'test.csv', test)}", "--backbone=mobilenet_v2",
        "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=128", "--noaudit",
        "--notensorboard", "--tflite=float", "--allow_external_paths", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return out, [p for p, _ in test], unseen


def test_a_model_trained_on_three_classes_flags_the_other_two_more_often(open_set_run):
    out, known, unseen = open_set_run
    report = json.loads((out / "report.json").read_text())
    # 180 training images: the stage-2 trial ran (on all five folds, to reach
    # 150 held-out images). The threshold was chosen on held-out predictions
    # of all 180 (out-of-fold for the head, the trial's for stage 2).
    trial = report["stage2_trial"]
    assert trial["folds"] == [0, 1, 2, 3, 4] and trial["images"] == 180
    assert trial["finetune_only_right"] - trial["head_only_right"] == round(
        (trial["finetune_accuracy"] - trial["head_accuracy"]) * 180)
    chosen = report["open_set"]
    assert chosen["n"] == 180
    assert chosen["keep"] == 0.95 and chosen["known_kept"] >= 0.95
    # What the run reports on its test split is what the served model does.
    served = export_lib.SavedModelClassifier(str(out / "export" / "1"))
    assert served.unknown_threshold == pytest.approx(chosen["threshold"])
    outs = {}
    for name, files in (("known", known), ("unseen", unseen)):
        result = served.serve(image_bytes=tf.constant([p.read_bytes() for p in files]))
        outs[name] = {k: v.numpy() for k, v in result.items()}
        # The served outputs are the formula of the served probabilities.
        np.testing.assert_allclose(outs[name]["ood_score"],
                                   open_set.score(outs[name]["probabilities"]), atol=1e-5)
        np.testing.assert_array_equal(
            outs[name]["unknown"], open_set.is_unknown(outs[name]["probabilities"],
                                                       served.unknown_threshold))
    assert outs["known"]["unknown"].sum() == report["test"]["open_set"]["unknown"]
    # Unseen classes are flagged more often than known ones, and their scores
    # rank higher (measured on this run: flagged 0.16 against 0.067, AUROC
    # 0.76, mean score 0.64 against 0.36; a score blind to the classes would
    # give an AUROC near 0.5, an inverted one below it).
    rates = {k: float(v["unknown"].mean()) for k, v in outs.items()}
    assert rates["unseen"] > rates["known"], rates
    scores = np.concatenate([outs["known"]["ood_score"], outs["unseen"]["ood_score"]])
    is_unseen = np.r_[np.zeros(len(known)), np.ones(len(unseen))]
    assert roc_auc_score(is_unseen, scores) >= 0.7
    assert outs["unseen"]["ood_score"].mean() > outs["known"]["ood_score"].mean() + 0.15
    # Calibration changes no answer: the calibrated and raw argmax agree.
    model = model_files.load_model_file(str(out / "model.keras"))
    raw = keras.Model(model.input, model.get_layer("calibrated").input)
    pixels = tflite_lib.load_pixels(_split(known + unseen), 128).astype(np.float32)
    calibrated, uncalibrated = model.predict(pixels, verbose=0), raw.predict(pixels, verbose=0)
    assert np.abs(calibrated - uncalibrated).max() > 1e-3  # a temperature was applied
    np.testing.assert_array_equal(calibrated.argmax(1), uncalibrated.argmax(1))


def _split(paths):
    from tl_keras.data import sources as sources_lib

    return sources_lib.Split([str(p) for p in paths], np.zeros(len(paths), np.int64))


def test_the_tflite_file_returns_the_same_unknown_output(open_set_run):
    out, known, unseen = open_set_run
    version = out / "export" / "1"
    lite = tflite_lib.TFLiteClassifier(str(version / "model_float.tflite"))
    assert lite.has_unknown
    served = export_lib.SavedModelClassifier(str(version))
    files = known[:10] + unseen[:10]
    pixels = tflite_lib.load_pixels(_split(files), lite.image_size)
    got = lite.predict_outputs(pixels)
    want = {k: v.numpy() for k, v in served.serve(
        image_bytes=tf.constant([p.read_bytes() for p in files])).items()}
    np.testing.assert_allclose(got["probabilities"], want["probabilities"], atol=1e-4)
    np.testing.assert_allclose(got["ood_score"], want["ood_score"], atol=1e-4)
    near = np.abs(want["ood_score"] - served.unknown_threshold) < 1e-3
    np.testing.assert_array_equal(got["unknown"][~near], want["unknown"][~near])
    np.testing.assert_allclose(lite.predict(pixels), got["probabilities"])


def test_predict_says_unknown_for_flagged_images(open_set_run):
    out, known, unseen = open_set_run
    files = ",".join(str(p) for p in known[:5] + unseen)
    for model in (out / "export" / "1", out / "export" / "1" / "model_float.tflite"):
        result = predict_lib.predict_images(str(model), files, top_k=2)
        flagged = [p for p in result["predictions"] if p["unknown"]]
        assert flagged and all(p["ood_score"] > 0 for p in flagged)
        rows = predict_lib.format_table(result).splitlines()
        assert rows[0].split() == ["image", "top-1", "top-2", "answer"]
        for p, row in zip(result["predictions"], rows[1:]):
            assert row.split()[-1] == ("unknown" if p["unknown"] else p["classes"][0])


def test_unknown_keep_is_validated():
    from tl_keras.config import Config, validate
    from tl_keras.errors import ConfigError

    with pytest.raises(ConfigError, match=r"--unknown_keep=1\.5"):
        validate(Config(data="x", unknown_keep=1.5))
    validate(Config(data="x", unknown_keep=0.0))  # 0: off


def test_without_a_threshold_the_exports_return_the_probabilities_alone(tmp_path):
    # --unknown_keep=0 (or a multi-label run) exports no threshold: the SavedModel's
    # signatures and the TFLite file return what they returned before.
    images = keras.Input((16, 16, 3))
    probs = keras.layers.Dense(3, activation="softmax")(keras.layers.GlobalAveragePooling2D()(images))
    model = keras.Model(images, probs)
    outputs = {}
    for name, threshold in (("off", None), ("on", 0.5)):
        path = export_lib.write_saved_model(model, ["a", "b", "c"], 16, str(tmp_path / name),
                                            unknown_threshold=threshold)
        outputs[name] = set(tf.saved_model.load(path).signatures["serve_images"]
                            .structured_outputs)
        assert (tmp_path / name / export_lib.OPEN_SET_FILE).is_file() == (threshold is not None)
        lite = tflite_lib.TFLiteClassifier(tflite_lib.convert(
            tflite_lib.prepare(model, 16, threshold), "float"))
        assert lite.has_unknown == (threshold is not None)
        pixels = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.float32)
        np.testing.assert_allclose(lite.predict(pixels), model.predict(pixels, verbose=0),
                                   atol=1e-5)
    assert outputs["off"] == {"probabilities", "classes", "scores"}
    assert outputs["on"] == outputs["off"] | {"ood_score", "unknown"}
