"""tf.distribute: strategy choice, replica scaling, and real runs on several replicas.

The two end-to-end tests run on CPU: two worker processes on 127.0.0.1 that
train together through TF_CONFIG (MultiWorkerMirroredStrategy), and one
process whose CPU is split into two logical devices (MirroredStrategy).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import keras
import pytest
from conftest import FLOWERS_MINI, REPO

from tl_keras.config import Config
from tl_keras.errors import ConfigError
from tl_keras.train import loop as loop_lib
from tl_keras.train import strategy as strategy_lib

# ---------------------------------------------------------------------------
# Strategy choice and scaling (no TensorFlow devices touched)
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("name,tpu,gpus,cluster,want", [
    ("auto", "", 0, 0, "default"),
    ("auto", "", 1, 0, "default"),
    ("auto", "", 2, 0, "mirrored"),
    ("auto", "", 8, 2, "multi_worker"),
    ("auto", "local", 8, 0, "tpu"),
    ("one_device", "", 4, 0, "one_device"),
    ("multi_worker", "", 0, 0, "multi_worker"),
])
def test_auto_picks_the_strategy_the_machine_calls_for(name, tpu, gpus, cluster, want):
    assert strategy_lib.resolve_strategy(name, tpu, gpus, cluster) == want


def test_bad_strategy_settings_name_the_flag():
    with pytest.raises(ConfigError, match=r"--strategy='horovod'"):
        strategy_lib.resolve_strategy("horovod", "", 0, 0)
    with pytest.raises(ConfigError, match=r"--tpu='my-tpu'.*--strategy=mirrored"):
        strategy_lib.resolve_strategy("mirrored", "my-tpu", 0, 0)
    with pytest.raises(ConfigError, match=r"--replica_scaling='cube'"):
        strategy_lib.create("default", "", "cube")


def test_bad_tf_config_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        strategy_lib.create("auto", "", "sqrt")


def _dist(replicas: int, scaling: str, workers: int = 1, index: int = 0):
    return strategy_lib.Distribution(None, "mirrored", replicas, workers, index,
                                   f"worker-{index}" if workers > 1 else "", index == 0, scaling)


def test_replica_scaling_rules():
    cfg = Config(batch_size=32, head_learning_rate=1e-3, finetune_learning_rate=1e-4)
    sq = _dist(4, "sqrt").scale(cfg)
    assert (sq.batch_size, sq.head_learning_rate, sq.finetune_learning_rate) == \
        (128, pytest.approx(2e-3), pytest.approx(2e-4))
    lin = _dist(4, "linear").scale(cfg)
    assert (lin.batch_size, lin.head_learning_rate) == (128, pytest.approx(4e-3))
    assert _dist(4, "none").scale(cfg) == cfg  # --batch_size is the global batch
    assert _dist(1, "linear").scale(cfg) == cfg
    with pytest.raises(ConfigError, match=r"--batch_size=30.*multiple of the 4 replicas"):
        _dist(4, "none").scale(cfg.replace(batch_size=30))


def test_workers_shard_data_and_keep_their_files_apart():
    import numpy as np

    from tl_keras.data.sources import Split

    split = Split([f"img{i}.jpg" for i in range(7)], np.arange(7) % 2)
    chief, other = _dist(2, "sqrt", 2, 0), _dist(2, "sqrt", 2, 1)
    a, b = chief.shard(split), other.shard(split)
    assert sorted(a.items + b.items) == sorted(split.items) and not set(a.items) & set(b.items)
    assert chief.worker_dir("OUT") == "OUT" and chief.is_chief
    assert other.worker_dir("OUT") == os.path.join("OUT", "workers", "worker-1")
    assert not other.is_chief
    assert chief.cache_key() != other.cache_key()
    assert _dist(2, "sqrt").cache_key() == {}  # one worker: caches shared with plain runs


def test_the_pipeline_refuses_a_bad_strategy_before_any_work(tmp_path):
    from tl_keras.run import image as pipeline

    cfg = Config(data=str(FLOWERS_MINI), output_dir=str(tmp_path / "o"), strategy="horovod")
    with pytest.raises(ConfigError, match=r"^--strategy='horovod': choose one of"):
        pipeline.train(cfg)
    assert not (tmp_path / "o").exists()


def test_one_device_commands_refuse_a_strategy_before_any_work(tmp_path):
    from tl_keras.run import image as pipeline
    from tl_keras.run import pretrain

    text = Config(task="text", data=str(tmp_path / "texts.csv"), strategy="mirrored",
                  output_dir=str(tmp_path / "t"))
    with pytest.raises(ConfigError, match=r"^--strategy='mirrored': --task=text trains on one"):
        pipeline.train(text)
    source = Config(data=str(FLOWERS_MINI), tpu="local", output_dir=str(tmp_path / "p"))
    with pytest.raises(ConfigError, match=r"^--tpu='local': pretrain trains on one device"):
        pretrain.pretrain(source)
    with pytest.raises(ConfigError, match=r"^--strategy='multi_worker': pretrain trains on one"):
        pretrain.pretrain(source.replace(tpu="", strategy="multi_worker"))
    assert not (tmp_path / "t").exists() and not (tmp_path / "p").exists()


class _Seen(keras.callbacks.Callback):
    """Records what a user callback gets from fit."""

    def __init__(self):
        super().__init__()
        self.calls, self.epoch_logs = [], []

    def on_train_begin(self, logs=None):
        self.calls.append("train_begin")

    def on_epoch_end(self, epoch, logs=None):
        self.epoch_logs.append((epoch, dict(logs)))

    def on_train_end(self, logs=None):
        self.calls.append("train_end")


def test_the_loop_gives_callbacks_what_model_fit_gives(tmp_path, monkeypatch):
    # Keras's model.fit on the default strategy is the reference. The head's
    # fit runs the strategy-aware loop on the default strategy too
    # (own_loop), and one device and one replica under MirroredStrategy run
    # it. Same data order, same steps: the same per-epoch logs reach the
    # callbacks, class weights included, early stopping keeps the same
    # epoch, same weights.
    import numpy as np
    import tensorflow as tf

    from tl_keras.train import stages as train_lib

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 60)]
    runs = {}
    fit = loop_lib.fit
    for name, strategy in (("model.fit", tf.distribute.get_strategy()),
                           ("default", tf.distribute.get_strategy()),
                           ("one_device", tf.distribute.OneDeviceStrategy("/cpu:0")),
                           ("loop", tf.distribute.MirroredStrategy(["/cpu:0"]))):
        monkeypatch.setattr(loop_lib, "fit", (lambda *a, **k: fit(*a, **{**k, "own_loop": False}))
                            if name == "model.fit" else fit)
        keras.utils.set_random_seed(3)
        with strategy.scope():
            inp = keras.Input((6,))
            model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
            seen = _Seen()
            result = train_lib.fit_head(model, x[:48], y[:48], x[48:], y[48:],
                                        train_lib.StageSpec(epochs=4, learning_rate=0.05,
                                                            weight_decay=0.0, batch_size=16,
                                                            patience=1, label_smoothing=0.1,
                                                            class_weight={0: 2.0, 1: 0.5, 2: 1.0}),
                                        callbacks=[seen], verbose=0)
        runs[name] = (seen, result, [w.numpy() for w in model.weights])
    assert not strategy_lib.uses_custom_loop(tf.distribute.get_strategy())
    assert strategy_lib.uses_custom_loop(tf.distribute.OneDeviceStrategy("/cpu:0"))
    a, ra, wa = runs["model.fit"]
    for name in ("default", "one_device", "loop"):
        b, rb, wb = runs[name]
        assert a.calls == b.calls == ["train_begin", "train_end"], name
        assert [e for e, _ in a.epoch_logs] == [e for e, _ in b.epoch_logs], name
        for (_, la), (_, lb) in zip(a.epoch_logs, b.epoch_logs):
            assert set(la) == set(lb) == {"loss", "accuracy", "val_loss", "val_accuracy", "lr"}
            for k in la:
                assert lb[k] == pytest.approx(la[k], rel=1e-4, abs=1e-6), (name, k)
        assert (ra.best_epoch, ra.epochs) == (rb.best_epoch, rb.epochs), name
        assert max(float(np.abs(p - q).max()) for p, q in zip(wa, wb)) < 1e-5, name


# ---------------------------------------------------------------------------
# Real runs on several replicas (CPU)
# ---------------------------------------------------------------------------
# CI runs these two on 2 CPU cores without GPUs or network; together they must
# stay around a minute there. So: flowers_mini at 32 px, a few steps, and a
# small untrained backbone, the compact CNN of `tl-keras pretrain` written as
# a --backbone=PATH.keras file exactly as pretrain writes it (MobileNetV2-0.35
# took twice the CPU time: tracing its graph on every replica dominates).

_TIMEOUT_S = 600  # per test (wall clock); about 30 s each on an idle 2-core machine


@pytest.fixture(scope="module")
def tiny_backbone(tmp_path_factory) -> str:
    """An untrained compact_cnn source model (alpha 0.5, 32 px) and its block map."""
    from tl_keras.model import model_files as model_files_lib
    from tl_keras.model import source_models
    from tl_keras.run import pretrain

    family = source_models.get_architecture("compact_cnn")
    keras.utils.set_random_seed(0)
    model, cut = source_models.build_source_model(family, 5, 32, alpha=0.5, dropout=0.0)
    path = str(tmp_path_factory.mktemp("backbone") / pretrain.MODEL_FILE)
    model.save(path)
    body = keras.Model(model.input, model.get_layer(cut).output)
    pretrain.write_block_map(model_files_lib.block_map_path(path), body, family, cut, 32)
    return path


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_ports(n: int) -> list[int]:
    """n distinct free ports on 127.0.0.1, chosen by the OS now."""
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _tail(path, n: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "(no output)"
    return text[-n:]


def _run_all(jobs: dict, tmp_path, timeout: float = _TIMEOUT_S) -> dict:
    """Runs processes side by side, each with its output in a log file.

    Args:
        jobs: name -> (argv, env).

    Returns:
        name -> the process's output, once all exited with status 0.

    Fails the test, with every process's output, when one exits with an error
    (the others are killed at once, not left waiting on it) or when they are
    not all done within `timeout` seconds.
    """
    procs, logs = {}, {}
    for name, (argv, env) in jobs.items():
        logs[name] = tmp_path / f"{name}.log"
        with open(logs[name], "w") as log:
            procs[name] = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log,
                                           stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    problem = None
    try:
        while problem is None and any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed:
                problem = f"{failed[0]} exited with status {procs[failed[0]].returncode}"
            elif time.monotonic() > deadline:
                problem = f"not finished after {timeout:.0f} s (killed)"
            else:
                time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [n for n, p in procs.items() if p.returncode != 0]
    if problem is None and failed:
        problem = f"{failed[0]} exited with status {procs[failed[0]].returncode}"
    if problem is not None:
        pytest.fail(problem + "\n" + "\n".join(
            f"----- output of {n} (status {procs[n].returncode}) -----\n{_tail(logs[n])}"
            for n in procs), pytrace=False)
    return {n: logs[n].read_text(errors="replace") for n in procs}


# No augmentation, no dropout, a few steps; stage 2 unfreezes the top block.
_TINY = ["--weights=none", "--image_size=32", "--batch_size=8", "--head_epochs=2",
         "--finetune_epochs=1", "--finetune_blocks=1", "--cache_views=1", "--flip=false",
         "--rotation=0", "--zoom=0", "--contrast=0", "--dropout=0", "--tensorboard=false"]


def _two_workers(tmp_path, backbone: str) -> dict:
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    jobs = {}
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        argv = [sys.executable, "-m", "tl_keras", "train", f"--data={FLOWERS_MINI}",
                f"--backbone={backbone}", *_TINY, "--strategy=multi_worker",
                f"--output_dir={tmp_path / f'out{i}'}"]
        jobs[f"worker-{i}"] = (argv, _env(TF_CONFIG=tf_config))
    return _run_all(jobs, tmp_path)


def test_two_workers_train_together_and_only_the_chief_writes(tmp_path, tiny_backbone):
    outs = _two_workers(tmp_path, tiny_backbone)
    prints = {n: re.findall(r"weights fingerprint (\w+)", out) for n, out in outs.items()}
    assert all(len(f) == 1 for f in prints.values()), outs["worker-1"][-2000:]
    assert prints["worker-0"] == prints["worker-1"], "the workers ended with different weights"
    fingerprint = prints["worker-0"][0]
    assert "2 replica(s), worker 1/2 (worker-0, chief)" in outs["worker-0"]
    assert "2 replica(s), worker 2/2 (worker-1)" in outs["worker-1"]
    # Each worker computed the features of its own shard (half the images).
    for out in outs.values():
        assert re.search(r"stage 1: backbone outputs .* computed", out), out[-2000:]

    chief, other = tmp_path / "out0", tmp_path / "out1"
    assert (chief / "export" / "1" / "saved_model.pb").is_file()
    report = json.loads((chief / "report.json").read_text())
    dist = report["distribution"]
    assert (dist["strategy"], dist["workers"], dist["replicas"]) == ("multi_worker", 2, 2)
    assert dist["weights_fingerprint"] == fingerprint
    # sqrt scaling: global batch 8 x 2, the learning rates x sqrt(2).
    assert dist["global_batch_size"] == 16
    assert dist["head_learning_rate"] == pytest.approx(1e-3 * 2 ** 0.5)
    assert dist["finetune_learning_rate"] == pytest.approx(3e-4 * 2 ** 0.5)
    assert json.loads((chief / "config.json").read_text())["batch_size"] == 8  # as given
    assert report["stage1"]["epochs"] == 2
    assert report["stage2"]["epochs"] == 1 and report["stage2"]["mode"] == "cached_activations"
    assert report["export"]["parity"]["passed"] is True
    assert report["val"]["n"] == 20  # the chief evaluates on all of the validation split
    # The saved model is the trained one.
    from tl_keras.run import evaluate as runs
    model, classes, _ = runs.load_run(str(chief))
    assert strategy_lib.weights_fingerprint(model) == fingerprint
    assert len(classes) == 5
    # The chief's cache is its own shard's; the other worker wrote only into
    # its own folder (its shard's cache, its pre-flight scan), nothing else.
    assert not (chief / "workers").exists()
    assert any(p.is_file() for p in (chief / "cache").rglob("*"))
    written = [p.relative_to(other) for p in other.rglob("*") if p.is_file()]
    assert any(p.parts[:3] == ("workers", "worker-1", "cache") for p in written), written
    assert all(p.parts[:2] == ("workers", "worker-1") for p in written), written


_MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from tl_keras.run import image as pipeline
    from tl_keras.config import Config
    from tl_keras.model import classifier as model_lib
    from tl_keras.train import stages
    base, out = json.loads(sys.argv[1]), sys.argv[2]
    result, seen = {}, {}
    def weights(model):
        return {w.path: w.numpy().ravel().tolist() for w in model.weights}
    # The weights as built, and before and after stage 2 (whose result the run
    # may not keep): the wrappers only look.
    build, finetune = model_lib.build_classifier, stages.fit_finetune
    def build_and_look(*args, **kwargs):
        clf = build(*args, **kwargs)
        seen["initial"] = weights(clf.model)
        return clf
    def finetune_and_look(model, *args, **kwargs):
        seen["stage1"] = weights(model)
        stage = finetune(model, *args, **kwargs)
        seen["stage2"] = weights(model)
        return stage
    model_lib.build_classifier, stages.fit_finetune = build_and_look, finetune_and_look
    for kind in ("default", "mirrored"):
        seen.clear()
        report = pipeline.train(Config(**base, strategy=kind, output_dir=f"{out}/{kind}"))
        model = keras.models.load_model(f"{out}/{kind}/model.keras", compile=False)
        result[kind] = {"report": report, "weights": weights(model), **seen}
    with open(f"{out}/result.json", "w") as f:
        json.dump(result, f)
""")


def test_mirrored_on_two_devices_matches_one_device(tmp_path, tiny_backbone):
    # --replica_scaling=none: both runs take the same global batches and
    # rates, so they take the same steps; stage 2 trains the full model on
    # the image pipeline (--cache_max_mb=0), stage 1 on cached features.
    # (Export under a distributed strategy is covered by the multi-worker test.)
    base = dict(data=str(FLOWERS_MINI), backbone=tiny_backbone, weights="none",
                image_size=32, batch_size=16, head_fit="adamw", head_epochs=3, finetune_epochs=2,
                finetune_blocks=1, cache_views=1, flip=False, rotation=0.0, zoom=0.0,
                contrast=0.0, dropout=0.0, patience=1, cache_max_mb=0,
                replica_scaling="none", tensorboard=False, export=False)
    _run_all({"mirrored": ([sys.executable, "-c", _MIRRORED, json.dumps(base), str(tmp_path)],
                           _env())}, tmp_path)
    result = json.loads((tmp_path / "result.json").read_text())
    one, two = result["default"], result["mirrored"]
    assert two["report"]["distribution"]["strategy"] == "mirrored"
    assert two["report"]["distribution"]["replicas"] == 2
    assert one["report"]["distribution"]["replicas"] == 1
    assert two["report"]["stage2"]["mode"] == "full_model"
    for stage in ("stage1", "stage2"):
        a, b = one["report"][stage], two["report"][stage]
        assert (a["epochs"], a["best_epoch"]) == (b["epochs"], b["best_epoch"]), stage
        assert b["val_loss"] == pytest.approx(a["val_loss"], abs=1e-4), stage
        assert b["val_accuracy"] == pytest.approx(a["val_accuracy"], abs=1e-6), stage
    assert one["report"]["kept"] == two["report"]["kept"]
    assert two["report"]["val"]["accuracy"] == pytest.approx(one["report"]["val"]["accuracy"])
    import numpy as np

    def max_diff(a: dict, b: dict) -> dict:
        assert a.keys() == b.keys()
        return {k: float(np.max(np.abs(np.subtract(a[k], b[k])))) for k in a}

    # Measured 1.5e-8 apart (float rounding of the cross-replica sums).
    tolerance = 1e-5
    diff = max(max_diff(one["weights"], two["weights"]).values())
    print(f"mirrored on 2 devices vs 1 device: max weight difference {diff:.1e}")
    assert diff < tolerance, diff
    # Stage 2's own result too (the run keeps the better stage, maybe stage 1's).
    assert max(max_diff(one["stage2"], two["stage2"]).values()) < tolerance
    # Two runs that trained nothing would match as well: in both, stage 1
    # moved the head (measured 7e-3) and stage 2 the unfrozen block4 and the
    # head (3.5e-4 to 6e-4), each by far more than the tolerance, and nothing
    # else moved.
    for run in (one, two):
        for stage, before, trained in (
                ("stage1", "initial", {"head/kernel", "head/bias"}),
                ("stage2", "stage1", {"block4_1_conv/kernel", "block4_2_conv/kernel",
                                      "head/kernel", "head/bias"})):
            moved = {k: m for k, m in max_diff(run[stage], run[before]).items() if m > 0}
            assert set(moved) == trained, (stage, moved)
            assert min(moved.values()) > 20 * tolerance, (stage, moved)
