"""Copy descriptors: a grid of mid-level backbone activations, from the frozen pass.

Globally pooled features of the last block are too semantic to tell a copy
from another photo of the same kind of flower: an altered copy (10% crop,
70% size, JPEG quality 60) and two different daisies score alike. Activations
of a middle block keep where things are and what they look like; averaged
over a coarse grid they survive a small crop and re-encoding. Measured on
flowers128 photos that are not in flowers/ (`benchmarks/audit_quality.py
--tune`): the output of the last stride-16 block (MobileNetV2's block_12,
10x10 at 160 px), pooled over a 5x5 grid, separates 24 of 25 altered copies
from all distinct photos, where the pooled features overlap by 0.3 in cosine.

The grid comes out of the same inference pass as the pooled features (one
more output of the extraction model), so it costs no second pass.
"""

from __future__ import annotations

import keras

from tl_keras.model import blocks as blocks_lib

# Cells per side of the grid the copy descriptor averages over.
GRID = 5


def available(clf) -> bool:
    """Whether the backbone has a spatial map to pool (`copy_tensor` is not None)."""
    return len(clf.backbone.output.shape) == 4


def copy_tensor(clf):
    """The backbone tensor the copy descriptor pools: the last block at twice the final map's side.

    Falls back to the backbone's output when no block has that side (or the
    blocks cannot be mapped); None when that output is not a spatial map.
    """
    if not available(clf):
        return None
    backbone = clf.backbone
    final = backbone.output
    side = final.shape[1]
    try:
        blocks = blocks_lib.block_map(backbone, clf.family)
    except (RuntimeError, ValueError):
        return final
    found = final
    for _, names in blocks:
        out = backbone.get_layer(names[-1]).output
        if not isinstance(out, (list, tuple)) and len(out.shape) == 4 and out.shape[1] == 2 * side:
            found = out
    return found


def grid_pool(x, grid: int = GRID):
    """[B, H, W, C] -> [B, g * g * C]: the mean of each cell of a g x g grid (g <= H, W)."""
    h, w = int(x.shape[1]), int(x.shape[2])
    gh, gw = min(grid, h), min(grid, w)
    cells = []
    for i in range(gh):
        for j in range(gw):
            r0, r1 = (i * h) // gh, -(-((i + 1) * h) // gh)
            c0, c1 = (j * w) // gw, -(-((j + 1) * w) // gw)
            cells.append(keras.ops.mean(x[:, r0:r1, c0:c1, :], axis=(1, 2)))
    return keras.ops.concatenate(cells, axis=-1)


# The last few extraction models, by (classifier, cut): the train and val
# passes share one, so its prediction function is traced once, as
# `clf.features` (or `cut.joint`) is for training.
_MODELS: dict = {}


def extraction_model(clf, cut=None):
    """images -> [(activations below the cut,) pooled features, copy grid] in one pass.

    The same outputs as `clf.features` (or `cut.joint`), with the copy grid
    appended; None when the backbone has no spatial map to pool. The same
    model object for the same `clf` and `cut`.
    """
    key = (id(clf.model), id(cut))
    if key in _MODELS and _MODELS[key][0] is clf.model and _MODELS[key][1] is cut:
        return _MODELS[key][2]
    model = _build(clf, cut)
    if len(_MODELS) >= 4:
        _MODELS.pop(next(iter(_MODELS)))
    _MODELS[key] = (clf.model, cut, model)
    return model


def _build(clf, cut):
    mid = copy_tensor(clf)
    if mid is None:
        return None
    backbone = clf.backbone
    outs = [mid, backbone.output]
    if cut is not None:
        outs = [cut.bottom.get_layer("backbone_bottom").output] + outs
    inner = keras.Model(backbone.input, outs, name="backbone_with_copy_grid")
    images = clf.model.input
    res = inner(clf.model.get_layer("preprocess")(images), training=False)
    pooled = clf.model.get_layer("features")(res[-1])
    grid = grid_pool(keras.ops.cast(res[-2], "float32"))
    return keras.Model(images, list(res[:-2]) + [pooled, grid], name="features_and_copy_grid")
