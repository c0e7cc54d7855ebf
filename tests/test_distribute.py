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

import keras
import pytest

from conftest import FLOWERS_MINI, REPO, WEIGHTS_MNV2_035

from tl_keras import distribute
from tl_keras.config import Config, ConfigError


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
    assert distribute.resolve_strategy(name, tpu, gpus, cluster) == want


def test_bad_strategy_settings_name_the_flag():
    with pytest.raises(ConfigError, match=r"--strategy='horovod'"):
        distribute.resolve_strategy("horovod", "", 0, 0)
    with pytest.raises(ConfigError, match=r"--tpu='my-tpu'.*--strategy=mirrored"):
        distribute.resolve_strategy("mirrored", "my-tpu", 0, 0)
    with pytest.raises(ConfigError, match=r"--replica_scaling='cube'"):
        distribute.create("default", "", "cube")


def test_bad_tf_config_is_one_clear_error(monkeypatch):
    monkeypatch.setenv("TF_CONFIG", "{not json")
    with pytest.raises(ConfigError, match="TF_CONFIG"):
        distribute.create("auto", "", "sqrt")


def _dist(replicas: int, scaling: str, workers: int = 1, index: int = 0):
    return distribute.Distribution(None, "mirrored", replicas, workers, index,
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
    from tl_keras.data import Split

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
    from tl_keras import pipeline

    cfg = Config(data=str(FLOWERS_MINI), output_dir=str(tmp_path / "o"), strategy="horovod")
    with pytest.raises(ConfigError, match=r"^--strategy='horovod': choose one of"):
        pipeline.train(cfg)
    assert not (tmp_path / "o").exists()


def test_one_device_commands_refuse_a_strategy_before_any_work(tmp_path):
    from tl_keras import pipeline, pretrain

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


def test_the_loop_gives_callbacks_what_model_fit_gives(tmp_path):
    # The default strategy runs Keras's model.fit; one device and one
    # replica under MirroredStrategy run the strategy-aware loop. Same data
    # order, same steps: the same per-epoch logs reach the callbacks, class
    # weights included, early stopping keeps the same epoch, same weights.
    import numpy as np
    import tensorflow as tf
    from tl_keras import train as train_lib

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 6)).astype("float32")
    y = np.eye(3, dtype="float32")[rng.integers(0, 3, 60)]
    runs = {}
    for name, strategy in (("default", tf.distribute.get_strategy()),
                           ("one_device", tf.distribute.OneDeviceStrategy("/cpu:0")),
                           ("loop", tf.distribute.MirroredStrategy(["/cpu:0"]))):
        keras.utils.set_random_seed(3)
        with strategy.scope():
            inp = keras.Input((6,))
            model = keras.Model(inp, keras.layers.Dense(3, activation="softmax")(inp))
            seen = _Seen()
            result = train_lib.fit_head(model, x[:48], y[:48], x[48:], y[48:], epochs=4,
                                        learning_rate=0.05, weight_decay=0.0, batch_size=16,
                                        patience=1, label_smoothing=0.1,
                                        class_weight={0: 2.0, 1: 0.5, 2: 1.0},
                                        callbacks=[seen], verbose=0)
        runs[name] = (seen, result, [w.numpy() for w in model.weights])
    assert not distribute.uses_custom_loop(tf.distribute.get_strategy())
    assert distribute.uses_custom_loop(tf.distribute.OneDeviceStrategy("/cpu:0"))
    a, ra, wa = runs["default"]
    for name in ("one_device", "loop"):
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

def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1",
               PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


# Tiny and fast: MobileNetV2-0.35 at 32 px, no augmentation, no dropout.
_TINY = ["--backbone=mobilenet_v2", "--alpha=0.35", "--image_size=32", "--batch_size=8",
         "--head_epochs=2", "--finetune_epochs=1", "--finetune_blocks=1", "--cache_views=1",
         "--flip=false", "--rotation=0", "--zoom=0", "--contrast=0", "--dropout=0",
         "--tensorboard=false"]


def test_two_workers_train_together_and_only_the_chief_writes(tmp_path):
    ports = _free_ports(2)
    cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
    procs = []
    for i in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}})
        args = ["train", f"--data={FLOWERS_MINI}", "--weights=none", *_TINY,
                "--strategy=multi_worker", f"--output_dir={tmp_path / f'out{i}'}"]
        procs.append(subprocess.Popen([sys.executable, "-m", "tl_keras", *args], cwd=REPO,
                                      env=_env(TF_CONFIG=tf_config), text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    outs = []
    try:
        for p in procs:
            outs.append(p.communicate(timeout=400)[0])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]
    prints = [re.findall(r"weights fingerprint (\w+)", out) for out in outs]
    assert all(len(f) == 1 for f in prints), outs[1][-2000:]
    assert prints[0] == prints[1], "the workers ended with different weights"
    assert "2 replica(s), worker 1/2 (worker-0, chief)" in outs[0]

    chief, other = tmp_path / "out0", tmp_path / "out1"
    assert (chief / "export" / "1" / "saved_model.pb").is_file()
    report = json.loads((chief / "report.json").read_text())
    assert report["distribution"]["workers"] == 2 and report["distribution"]["replicas"] == 2
    assert report["distribution"]["weights_fingerprint"] == prints[0][0]
    # sqrt scaling: global batch 8 x 2, the stage 1 rate x sqrt(2).
    assert report["distribution"]["global_batch_size"] == 16
    assert report["distribution"]["head_learning_rate"] == pytest.approx(1e-3 * 2 ** 0.5)
    assert json.loads((chief / "config.json").read_text())["batch_size"] == 8  # as given
    assert report["stage2"]["epochs"] == 1 and report["stage2"]["mode"] == "cached_activations"
    # The saved model is the trained one.
    from tl_keras import runs
    model, classes, _ = runs.load_run(str(chief))
    assert distribute.weights_fingerprint(model) == prints[0][0]
    assert len(classes) == 5
    # The other worker wrote only into its own folder (its shard's cache, its scan).
    written = [p.relative_to(other) for p in other.rglob("*") if p.is_file()]
    assert any(p.parts[:3] == ("workers", "worker-1", "cache") for p in written), written
    assert all(p.parts[:2] == ("workers", "worker-1") for p in written), written


_MIRRORED = textwrap.dedent("""
    import json, sys
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras, numpy as np
    from tl_keras import pipeline
    from tl_keras.config import Config
    base = json.loads(sys.argv[1])
    result = {}
    for kind in ("default", "mirrored"):
        out = f"{sys.argv[2]}/{kind}"
        report = pipeline.train(Config(**base, strategy=kind, output_dir=out))
        model = keras.models.load_model(out + "/model.keras", compile=False)
        result[kind] = {"report": report, "weights": [w.numpy().ravel().tolist()
                                                      for w in model.weights]}
    print("RESULT " + json.dumps(result))
""")


def test_mirrored_on_two_devices_matches_one_device(tmp_path):
    # --replica_scaling=none: both runs take the same global batches and
    # rates, so they take the same steps; stage 2 trains the full model on
    # the image pipeline (--cache_max_mb=0), stage 1 on cached features.
    # (Export under a distributed strategy is covered by the multi-worker test.)
    base = dict(data=str(FLOWERS_MINI), backbone="mobilenet_v2", alpha=0.35,
                weights=str(WEIGHTS_MNV2_035), image_size=32, batch_size=16, head_epochs=3,
                finetune_epochs=2, finetune_blocks=1, cache_views=1, flip=False, rotation=0.0,
                zoom=0.0, contrast=0.0, dropout=0.0, patience=1, cache_max_mb=0,
                replica_scaling="none", tensorboard=False, export=False)
    proc = subprocess.run([sys.executable, "-c", _MIRRORED, json.dumps(base), str(tmp_path)],
                          cwd=REPO, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    line = next(l for l in proc.stdout.splitlines() if l.startswith("RESULT "))
    result = json.loads(line[len("RESULT "):])
    one, two = result["default"], result["mirrored"]
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
    diff = max(float(np.max(np.abs(np.subtract(a, b))))
               for a, b in zip(one["weights"], two["weights"]))
    print(f"mirrored on 2 devices vs 1 device: max weight difference {diff:.1e}")
    assert diff < 1e-4, diff
