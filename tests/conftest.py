"""Shared fixtures: paths to the real shared data, tiny real models."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data"
WEIGHTS_MNV2_035 = DATA / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
FLOWERS_MINI = DATA / "flowers_mini"
FLOWERS = DATA / "flowers"


def run_cli(*args: str, timeout: int = 900, cwd: Path = REPO) -> subprocess.CompletedProcess:
    """Runs `python -m tl_keras ARGS` in a subprocess; returns the completed process."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")
    return subprocess.run([sys.executable, "-m", "tl_keras", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    assert DATA.is_dir(), f"the shared data is missing at {DATA} (see its README)"
    return DATA


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory, data_dir) -> Path:
    """One real end-to-end CLI run on flowers_mini with the real MobileNetV2-0.35 weights.

    Shared by the CLI, evaluate and export tests so the suite trains once.
    """
    out = tmp_path_factory.mktemp("run") / "out"
    proc = run_cli(
        "train", f"--data={FLOWERS_MINI}", "--test_fraction=0.3", "--backbone=mobilenet_v2",
        "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=128",
        "--finetune_epochs=2", "--finetune_blocks=1", f"--output_dir={out}")
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return out


# Small real runs (64 px, the real MobileNetV2-0.35 weights, an AdamW head for 6 epochs on a
# validation split, stage 2 through the full model with augmentation in tf.data) seeded and
# deterministic: the determinism test compares two of them. (The resume test has its own
# settings and uninterrupted run: see test_resume.py.)
SMALL_RUN_ARGS = (f"--data={FLOWERS_MINI}", "--test_fraction=0.3", "--backbone=mobilenet_v2",
                  "--alpha=0.35", f"--weights={WEIGHTS_MNV2_035}", "--image_size=64",
                  "--head_fit=adamw", "--head_epochs=6", "--finetune_epochs=2", "--finetune_blocks=2",
                  "--cache_views=2", "--cache_max_mb=0", "--batch_size=16",
                  "--deterministic", "--seed=7")


@pytest.fixture(scope="session")
def deterministic_runs(tmp_path_factory, data_dir) -> tuple[Path, Path]:
    """Two uninterrupted `SMALL_RUN_ARGS` runs, side by side in separate processes."""
    root = tmp_path_factory.mktemp("deterministic")
    outs = (root / "a", root / "b")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
    procs = [subprocess.Popen([sys.executable, "-m", "tl_keras", "train", *SMALL_RUN_ARGS,
                               f"--output_dir={o}", "--export=false"], cwd=REPO, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for o in outs]
    for p in procs:
        stdout, stderr = p.communicate(timeout=900)
        assert p.returncode == 0, stderr[-3000:] + stdout[-2000:]
    return outs


def heldout_flowers(class_names: list[str], per_class: int):
    """`per_class` photos of each class from flowers/ that flowers_mini does not hold.

    flowers/ and flowers_mini share 20 photos (same bytes, same names); the
    others are unseen by a model trained on flowers_mini, and many enough to
    measure its accuracy far more finely than its 30 test images can.

    Returns:
        A `Split` (labels index `class_names`), the first photos by name.
    """
    import hashlib

    import numpy as np

    from tl_keras.data import sources as sources_lib

    def digest(p: Path) -> str:
        return hashlib.sha256(p.read_bytes()).hexdigest()

    seen = {digest(p) for p in FLOWERS_MINI.rglob("*") if p.is_file()}
    items, labels = [], []
    for i, name in enumerate(class_names):
        photos = [p for p in sorted((FLOWERS / name).iterdir()) if digest(p) not in seen]
        assert len(photos) >= per_class, (name, len(photos))
        items += [str(p) for p in photos[:per_class]]
        labels += [i] * per_class
    return sources_lib.Split(items, np.asarray(labels, dtype=np.int64), "flowers, held out")
