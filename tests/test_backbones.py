"""Tests for tl_keras.backbones: the family table, blocks and freezing.

Every family is built once, with weights=None at its minimum input size (the
build cost is the graph, not the pixels) and without drawing initial values
(see `_build`), and all per-family checks run on that one model; the Keras
session is cleared after each so the ~40 graphs do not pile up in memory.
"""

from __future__ import annotations

import importlib
from pathlib import Path

import keras
import numpy as np
import pytest
from tl_keras.model.blocks import block_map, set_trainable_top_blocks
from tl_keras.model.families import FAMILIES, build_backbone, get_family

from tl_keras.errors import ConfigError
from tl_keras.model import families as families_lib



@pytest.fixture(scope="module")
def weights_dir(data_dir) -> Path:
    """The shared weight files; a missing data folder fails (conftest.data_dir), never skips."""
    return data_dir / "weights"

# The CLI names the brief asks for; a missing or extra family fails.
EXPECTED_NAMES = (
    ["mobilenet", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large"]
    + [f"efficientnet_b{i}" for i in range(8)]
    + [f"efficientnet_v2_b{i}" for i in range(4)]
    + ["efficientnet_v2_s", "efficientnet_v2_m", "efficientnet_v2_l"]
    + ["resnet50", "resnet101", "resnet152", "resnet50_v2", "resnet101_v2", "resnet152_v2"]
    + ["xception", "inception_v3", "inception_resnet_v2"]
    + ["densenet121", "densenet169", "densenet201", "vgg16", "vgg19"]
    + [f"convnext_{s}" for s in ("tiny", "small", "base", "large", "xlarge")]
    + ["nasnet_mobile", "nasnet_large"]
)

def _parents(model: keras.Model) -> dict[str, list[str]]:
    """Direct producers of every operation (layers and bare ops), by name.

    Read from the serialized functional config, not from the graph internals
    that block_map uses, so the structural checks are independent of it.
    """
    def histories(obj, out):
        if isinstance(obj, dict):
            if "keras_history" in obj:
                out.append(obj["keras_history"][0])
            for v in obj.values():
                histories(v, out)
        elif isinstance(obj, (list, tuple)):
            for v in obj:
                histories(v, out)
        return out

    return {cfg["name"]: histories(cfg["inbound_nodes"], [])
            for cfg in model.get_config()["layers"]}


def _op_blocks(model, blocks, parents) -> tuple[list[str], dict[str, int]]:
    """Op names in model order and each op's block index.

    Bare Operations (ConvNeXt's `a + b`) are not in block_map; each is put in
    the block of its latest producer, i.e. it closes the unit that computed
    its last input.
    """
    order = [op.name for op in model.operations]
    pos = {n: i for i, n in enumerate(order)}
    for n in order:  # model.operations must be topological for the checks
        assert all(pos[p] < pos[n] for p in parents[n]), n
    of = {name: i for i, (_, names) in enumerate(blocks) for name in names}
    for n in order:
        if n not in of:
            assert parents[n], f"unassigned source op {n}"
            of[n] = of[max(parents[n], key=pos.get)]
    return order, of


def _check_whole_units(model, family, blocks, parents):
    """A block is a whole unit: only its final output leaves it.

    Every edge between two blocks must start at the last op of its block and
    end in the next block (NASNet cells also read older cells). This
    fails if a boundary cuts a residual unit: the unit's input would then
    feed both halves, skipping a block, and the first half's inner tensor
    would leave it besides its last op.
    """
    order, of = _op_blocks(model, blocks, parents)
    last = {}
    for n in order:
        last[of[n]] = n  # positions rise, so this ends at each block's last op
    # A NASNet cell reads the two cells before it; NASNetLarge also carries
    # that second input past each reduction cell (skip_reduction), so it can
    # come from three blocks back.
    max_skip = 3 if family.grouping == "names" else 1
    for n in order:
        for p in parents[n]:
            if of[p] == of[n]:
                continue
            assert of[p] < of[n], f"{family.name}: edge {p} -> {n} runs backwards"
            assert of[n] - of[p] <= max_skip, f"{family.name}: edge {p} -> {n} skips a block"
            assert p == last[of[p]], (
                f"{family.name}: {p} (block {blocks[of[p]][0]}) feeds {n} "
                f"(block {blocks[of[n]][0]}) but is not its block's output")
    if family.grouping == "cuts":  # blocks are contiguous in model order
        idx = [of[n] for n in order]
        assert idx == sorted(idx), f"{family.name}: blocks interleave"


def _check_adds(model, blocks, parents):
    """Each Add and the layers feeding it share a block, except the block input."""
    of = {name: i for i, (_, names) in enumerate(blocks) for name in names}
    adds = [l for l in model.layers if isinstance(l, keras.layers.Add)]
    assert adds
    for add in adds:
        b = of[add.name]
        inside = [p for p in parents[add.name] if of[p] == b]
        outside = [p for p in parents[add.name] if of[p] != b]
        assert inside, f"{add.name} shares no block with its inputs"
        for p in outside:
            # Only the identity shortcut: the previous block's output.
            assert of[p] == b - 1 and blocks[b - 1][1][-1] == p, (
                f"{add.name} in {blocks[b][0]} takes {p} from {blocks[of[p]][0]}")


def _check_freezing(model, family, blocks):
    bn = keras.layers.BatchNormalization
    n = len(blocks)

    assert set_trainable_top_blocks(model, family, 1) == [blocks[-1][0]]
    top = set(blocks[-1][1])
    for layer in model.layers:
        want = layer.name in top and not isinstance(layer, bn)
        assert layer.trainable == want, (family.name, layer.name)
    assert model.trainable_weights, f"{family.name}: last block has no weights"

    set_trainable_top_blocks(model, family, n)
    for layer in model.layers:
        if isinstance(layer, bn):
            assert not layer.trainable, layer.name
        elif layer.weights:
            assert layer.trainable, layer.name
    assert not any(isinstance(l, bn) and l.trainable for l in model.layers)

    set_trainable_top_blocks(model, family, 0)
    assert not model.trainable_weights

    with pytest.raises(ConfigError, match="--finetune_blocks"):
        set_trainable_top_blocks(model, family, n + 1)


def _build(fam, size):
    """Builds for structure checks only, without drawing initial values.

    Drawing random initial values is about half the build time, and these
    tests read no value: in a StatelessScope that does not initialize on
    exit, the graph, the variables and their trainable flags are the same,
    just never filled (keras.backend.clear_session drops them).
    """
    keras.backend.clear_session()
    with keras.StatelessScope(initialize_variables=False):
        return build_backbone(fam, "none", size)


def test_family_table_is_complete():
    assert sorted(FAMILIES) == sorted(EXPECTED_NAMES)
    for name, fam in FAMILIES.items():
        assert fam.name == name and name == name.lower()
        assert fam.preprocess in ("tf", "caffe", "torch", "none")
        assert fam.grouping in ("cuts", "names")
        assert fam.min_size <= fam.default_size
        assert (fam.default_alpha in fam.alphas) if fam.alphas else fam.default_alpha is None


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_preprocess_matches_keras(name):
    """The mode reproduces the family's own keras preprocess_input."""
    fam = FAMILIES[name]
    # The module that defines the constructor holds its preprocess_input.
    module = importlib.import_module(fam.constructor.__module__)
    x = np.linspace(0, 255, 2 * 4 * 4 * 3, dtype="float32").reshape(2, 4, 4, 3)
    got = np.asarray(module.preprocess_input(x.copy()))
    from keras.applications import imagenet_utils

    if fam.preprocess == "none":
        want = x
    else:
        want = np.asarray(imagenet_utils.preprocess_input(x.copy(), mode=fam.preprocess))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_family_blocks_and_freezing(name):
    fam = get_family(name)
    try:
        model = _build(fam, fam.min_size)
        blocks = block_map(model, fam)
        names = [n for _, ns in blocks for n in ns]
        assert sorted(names) == sorted(l.name for l in model.layers)  # each exactly once
        assert len(set(b for b, _ in blocks)) == len(blocks)
        assert len(blocks) >= 3, [b for b, _ in blocks]
        assert all(ns for _, ns in blocks)
        assert blocks[0][1][0] == model.layers[0].name  # the input opens the first block
        if fam.preprocess == "none":  # it must then scale 0..255 inputs itself
            assert any(isinstance(l, (keras.layers.Rescaling, keras.layers.Normalization))
                       for l in model.layers[:4]), [l.name for l in model.layers[:4]]
        parents = _parents(model)
        _check_whole_units(model, fam, blocks, parents)
        if name in ("resnet50", "mobilenet_v2", "efficientnet_b0"):
            _check_adds(model, blocks, parents)
        _check_freezing(model, fam, blocks)
    finally:
        keras.backend.clear_session()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_min_size_is_the_keras_minimum(name):
    """One pixel below min_size is rejected by keras' own input check.

    (That min_size itself builds is shown by test_family_blocks_and_freezing.)
    """
    fam = FAMILIES[name]
    with pytest.raises(ValueError, match="at least"):
        fam.constructor(include_top=False, weights=None,
                        input_shape=(fam.min_size - 1, fam.min_size - 1, 3))


def test_split_residual_unit_is_detected():
    """The structural check itself fails on a block map that halves a unit."""
    fam = get_family("resnet50")
    model = _build(fam, 32)
    blocks = block_map(model, fam)
    i = next(i for i, (b, _) in enumerate(blocks) if b == "conv2_block2")
    names = blocks[i][1]
    cut = names.index("conv2_block2_3_conv")
    broken = blocks[:i] + [("half_a", names[:cut]), ("half_b", names[cut:])] + blocks[i + 1:]
    parents = _parents(model)
    _check_whole_units(model, fam, blocks, parents)  # the real map passes
    with pytest.raises(AssertionError):
        _check_whole_units(model, fam, broken, parents)
    with pytest.raises(AssertionError):
        _check_adds(model, broken, parents)
    keras.backend.clear_session()


def test_block_names():
    """Spot checks that blocks are the units a reader would expect."""
    fam = get_family("inception_v3")
    blocks = block_map(_build(fam, 75), fam)
    assert [b for b, _ in blocks] == ["stem"] + [f"mixed{i}" for i in range(11)]
    assert all(ns[-1] == b for b, ns in blocks[1:])  # each closes at its concat
    fam = get_family("resnet50")
    blocks = dict(block_map(_build(fam, 32), fam))
    assert "conv2_block1_0_conv" in blocks["conv2_block1"]  # shortcut with its unit
    assert list(blocks)[:3] == ["stem", "conv2_block1", "conv2_block2"]
    assert len(blocks) == 17
    keras.backend.clear_session()


@pytest.mark.parametrize("name,size", [("xception", 71), ("inception_v3", 75), ("nasnet_mobile", 32)])
def test_blocks_ignore_name_suffixes(name, size):
    """A second build in one process gets "add_12", "conv2d_94", ...: same blocks."""
    fam = get_family(name)
    first = block_map(_build(fam, size), fam)
    with keras.StatelessScope(initialize_variables=False):
        second_model = build_backbone(fam, "none", size)  # no clear_session
    second = block_map(second_model, fam)
    assert set(l.name for l in second_model.layers) - set(n for _, ns in first for n in ns)
    assert [(b, len(ns)) for b, ns in second] == [(b, len(ns)) for b, ns in first]
    keras.backend.clear_session()


def test_unknown_backbone():
    with pytest.raises(ConfigError) as e:
        get_family("resnet9000")
    assert "--backbone" in str(e.value) and "resnet9000" in str(e.value)


def test_get_family_is_case_insensitive():
    assert get_family(" ResNet50 ") is FAMILIES["resnet50"]


@pytest.mark.parametrize("name,alpha,file", [
    ("mobilenet_v2", 0.35, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"),
    ("mobilenet", 0.25, "mobilenet_2_5_224_tf_no_top.h5"),
])
def test_weights_from_path(name, alpha, file, weights_dir):
    fam = get_family(name)
    path = weights_dir / file
    assert path.is_file(), path
    keras.backend.clear_session()
    keras.utils.set_random_seed(0)
    loaded = build_backbone(fam, str(path), 96, alpha)
    keras.utils.set_random_seed(0)
    fresh = build_backbone(fam, "none", 96, alpha)
    assert loaded.output.shape == fresh.output.shape
    kernels = [(a, b) for a, b in zip(loaded.get_weights(), fresh.get_weights())]
    assert len(kernels) > 10
    # Same seed, so any difference comes from the file.
    assert sum(not np.array_equal(a, b) for a, b in kernels) > len(kernels) // 2
    # BN moving variance is 1 at init; trained statistics are not.
    bn = next(l for l in loaded.layers if isinstance(l, keras.layers.BatchNormalization))
    assert not np.allclose(bn.moving_variance.numpy(), 1.0)
    keras.backend.clear_session()


def test_weights_path_errors(weights_dir):
    fam = get_family("mobilenet_v2")
    with pytest.raises(ConfigError, match="--weights"):
        build_backbone(fam, "/nonexistent/weights.h5", 96, 0.35)
    # The 0.35 file does not fit an alpha 1.0 graph: a one-line ConfigError
    # that blames the file and keeps Keras's own words.
    path = str(weights_dir / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5")
    with pytest.raises(ConfigError) as e:
        build_backbone(fam, path, 96, 1.0)
    msg = str(e.value)
    assert msg.startswith(f"--weights={path!r}: could not load these weights into mobilenet_v2 "
                          "at --image_size=96 and --alpha=1: ValueError: ") and "\n" not in msg
    assert "Shape mismatch" in msg, msg
    keras.backend.clear_session()


def test_a_build_that_fails_without_weights_blames_the_backbone_not_the_weights():
    # InceptionV3 takes 75 px at least (validate() refuses less before any
    # build; here the build itself is asked): the architecture fails, with
    # or without weights, so --weights is not the cause.
    for weights in ("none", "imagenet"):
        with pytest.raises(ConfigError) as e:
            build_backbone(get_family("inception_v3"), weights, 40)
        assert str(e.value) == ("--backbone='inception_v3': could not be built at "
                                "--image_size=40: ValueError: Input size must be at least "
                                "75x75; Received: input_shape=(40, 40, 3)")
    keras.backend.clear_session()


def test_imagenet_weights_that_cannot_be_fetched_name_the_real_cause(monkeypatch):
    import urllib.error

    from keras.src.utils import file_utils

    def unreachable(fname, origin, **kwargs):  # what Keras raises offline
        try:
            raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
        except urllib.error.URLError as e:
            raise Exception(f"URL fetch failure on {origin}: None -- {e.reason}")

    def unwritable(fname, origin, **kwargs):  # a download that is not the network's fault
        raise PermissionError(13, "Permission denied", "/home/user/.keras/models")

    fam = get_family("mobilenet_v2")
    monkeypatch.setattr(file_utils, "get_file", unreachable)
    with pytest.raises(ConfigError) as e:
        build_backbone(fam, "imagenet", 96, 0.35)
    msg = str(e.value)
    assert msg.startswith("--weights='imagenet': could not download the ImageNet weights of "
                          "mobilenet_v2 (Exception: URL fetch failure on https://")
    assert "Temporary failure in name resolution" in msg and "--weights=PATH" in msg
    # An error that merely mentions "[Errno ...]" is not taken for a network failure.
    monkeypatch.setattr(file_utils, "get_file", unwritable)
    with pytest.raises(ConfigError) as e:
        build_backbone(fam, "imagenet", 96, 0.35)
    assert str(e.value) == ("--weights='imagenet': could not load these weights into "
                            "mobilenet_v2 at --image_size=96 and --alpha=0.35: PermissionError: "
                            "[Errno 13] Permission denied: '/home/user/.keras/models'")
    keras.backend.clear_session()


def test_validate():
    fam = get_family("xception")
    with pytest.raises(ConfigError, match="--image_size"):
        families_lib.validate(fam, 70, 0, "none")
    families_lib.validate(fam, 71, 0, "none")
    with pytest.raises(ConfigError, match="--alpha"):
        families_lib.validate(fam, 0, 0.5, "none")
    v3 = get_family("mobilenet_v3_small")
    with pytest.raises(ConfigError, match="--alpha"):
        families_lib.validate(v3, 224, 0.5, "imagenet")
    families_lib.validate(v3, 224, 0.75, "imagenet")
