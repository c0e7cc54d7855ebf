"""`.keras` model files: a user's own source model as a backbone, and loading runs.

`family_from_model_file` turns a `.keras` classifier (trained by `tl-keras
pretrain` or anywhere else) into a `Family`: where to cut it (the features
before its dense classifier), its blocks (a block-map json beside the file,
`--block_prefixes`, or found in its layer graph) and its preprocessing.
Every file is loaded in Keras's safe mode: a Lambda layer (or any other
serialized Python code) is refused with one line, never run (`load_model`).
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import keras

from tl_keras.errors import ConfigError, fail
from tl_keras.model.blocks import layer_graph, block_map
from tl_keras.model.families import Family

# ---------------------------------------------------------------------------
# Any Keras model file as a backbone (`--backbone=PATH.keras`)
# ---------------------------------------------------------------------------
#
# A family made at runtime from a `.keras` file: the file is loaded in Keras
# safe mode, cut below its old classifier, and its layers are grouped into
# blocks by the same `block_map` machinery, from rules derived from the file
# (its block-map json, --block_prefixes, merge layers, name prefixes, or one
# block per conv/dense layer, in that order).

MODEL_FILE_SUFFIX = ".keras"
BLOCK_MAP_SUFFIX = ".blocks.json"
BLOCK_MAP_FORMAT = "tl_keras.block_map/1"

# Keras says this when safe mode refuses to deserialize Python code.
_CODE_REFUSED = "arbitrary code execution"

_L = keras.layers
# Layers that may sit between the cut and the output: the old classifier.
_CLASSIFIER_TYPES = (_L.Dense, _L.Dropout, _L.Activation, _L.Softmax, _L.ReLU, _L.LeakyReLU,
                     _L.BatchNormalization, _L.LayerNormalization, _L.GaussianDropout,
                     _L.GaussianNoise, _L.AlphaDropout)
# Where the cut goes: the last of these before the classifier.
_POOL_TYPES = (_L.Flatten, _L.GlobalAveragePooling2D, _L.GlobalMaxPooling2D)
# Merge points: each closes a unit (residual add, inception concat, ...).
_MERGE_TYPES = (_L.Add, _L.Concatenate, _L.Average, _L.Maximum, _L.Minimum, _L.Multiply,
                _L.Subtract)
_CONV_DENSE_TYPES = (_L.Conv1D, _L.Conv2D, _L.Conv3D, _L.DepthwiseConv2D, _L.SeparableConv2D,
                     _L.Conv2DTranspose, _L.Dense)


def is_model_file(backbone: str) -> bool:
    """True when --backbone names a model file rather than a family."""
    return backbone.strip().lower().endswith(MODEL_FILE_SUFFIX)


def block_map_path(model_path: str) -> str:
    """The block-map json that `pretrain` writes beside a model: X.keras -> X.blocks.json."""
    return model_path[: -len(MODEL_FILE_SUFFIX)] + BLOCK_MAP_SUFFIX


def _one_line(e: Exception, limit: int = 300) -> str:
    return " ".join(str(e).split())[:limit]


def _lambda_layers(config) -> list[str]:
    """Names of Lambda layers anywhere in a serialized model config."""
    found = []
    if isinstance(config, dict):
        if config.get("class_name") == "Lambda":
            found.append(str((config.get("config") or {}).get("name", "?")))
        for v in config.values():
            found += _lambda_layers(v)
    elif isinstance(config, list):
        for v in config:
            found += _lambda_layers(v)
    return found


def load_model_file(path: str, flag: str = "backbone") -> keras.Model:
    """Loads a `.keras` file in Keras safe mode; one-line ConfigError if it cannot be.

    A Lambda layer (pickled Python code) is refused before anything is
    deserialized, so its code never runs; safe mode would refuse it too.
    """
    import json
    import zipfile

    from tl_keras.model import layers as _tl_layers  # noqa: F401  (registers tl_keras layers)

    if not path.lower().endswith(MODEL_FILE_SUFFIX):
        raise fail(flag, path, "expected a Keras 3 .keras model file (re-save other formats "
                   "with model.save('model.keras'))")
    if not os.path.isfile(path):
        raise fail(flag, path, "no such model file")
    try:
        with zipfile.ZipFile(path) as z:
            config = json.loads(z.read("config.json"))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as e:
        raise fail(flag, path, f"not a readable .keras file ({_one_line(e, 120)})") from None
    lambdas = _lambda_layers(config)
    if lambdas:
        raise fail(flag, path, f"contains a Lambda layer ({lambdas[0]!r}), i.e. arbitrary Python "
                   "code; model files are loaded in safe mode and it is not run: rebuild the "
                   "model with built-in or registered layers")
    try:
        model = keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001 - one line for the user
        raise fail(flag, path, f"cannot load it in safe mode: {_one_line(e)}") from None
    if isinstance(model, keras.Sequential):
        # A functional view of the same layers gives the graph an input layer.
        model = keras.Model(model.inputs, model.outputs, name=model.name)
    if len(model.inputs) != 1 or len(model.outputs) != 1:
        raise fail(flag, path, f"has {len(model.inputs)} inputs and {len(model.outputs)} "
                   "outputs; a backbone needs one image input and one output")
    shape = tuple(model.inputs[0].shape[1:])
    if len(shape) != 3 or shape[2] != 3 or shape[0] != shape[1]:
        raise fail(flag, path, f"takes inputs of shape {shape}; a backbone needs square RGB "
                   "images (size, size, 3)")
    return model


def find_cut(model: keras.Model, cut_layer: str = "", path: str = "") -> str:
    """Names the layer whose output becomes the backbone's output.

    Given `cut_layer`, that layer. Otherwise the last pooling or flatten
    before the dense classifier: walking back from the output through
    classifier layers (dense, dropout, activations, normalization) to the
    first Flatten or global pooling. A model whose output is already a
    feature map or a pooling (a headless model) is kept whole.

    Raises:
        ConfigError: naming --cut_layer when there is no such layer or no
            such cut can be found.
    """
    if cut_layer:
        try:
            layer = model.get_layer(cut_layer)
        except ValueError:
            names = [l.name for l in model.layers[-8:]]
            raise fail("cut_layer", cut_layer, f"no such layer in {path}; its last layers are "
                       + ", ".join(names)) from None
        try:
            shape = tuple(layer.output.shape)
        except Exception as e:  # noqa: BLE001 - e.g. a layer used at several places
            raise fail("cut_layer", cut_layer, f"has no single output: {_one_line(e, 160)}"
                       ) from None
        if len(shape) not in (2, 4):
            raise fail("cut_layer", cut_layer, f"its output has shape {shape}; the cut needs "
                       "a feature map (batch, h, w, c) or a vector (batch, d)")
        return cut_layer
    ops, parents = layer_graph(model)
    # Keras 3 has no public API from a Functional output tensor to the layer
    # that made it; `_keras_history` is how Keras itself finds it.
    out_op = model.outputs[0]._keras_history.operation
    i = next(k for k, op in enumerate(ops) if op is out_op)
    dropped = 0
    while True:
        op = ops[i]
        if isinstance(op, _POOL_TYPES):
            return op.name
        rank = len(op.output.shape)
        if rank == 4 and not dropped:
            return op.name  # a headless model: its output is the feature map
        if not isinstance(op, _CLASSIFIER_TYPES) or len(parents[i]) != 1 or rank != 2:
            raise fail("cut_layer", "", f"found no pooling or flatten layer before the dense "
                       f"classifier of {path} (stopped at layer {op.name!r}); name the layer "
                       "whose output should become the features")
        dropped += 1
        i = parents[i][0]


def _truncate(model: keras.Model, cut: str) -> keras.Model:
    """The model from its input to the output of layer `cut` (layers shared)."""
    try:
        return keras.Model(model.inputs[0], model.get_layer(cut).output,
                           name=f"{model.name}_to_{cut}")
    except Exception as e:  # noqa: BLE001 - e.g. a layer used twice, or off the input's path
        raise fail("cut_layer", cut, f"cannot cut the model there: {_one_line(e, 200)}") from None


def _read_block_map(path: str) -> tuple[Optional[dict], str]:
    """The block-map json beside a model file: (doc, "") or (None, why it was skipped)."""
    import json

    side = block_map_path(path)
    if not os.path.isfile(side):
        return None, ""
    try:
        with open(side, encoding="utf-8") as f:
            doc = json.load(f)
        blocks = doc["blocks"]
        if doc.get("format") != BLOCK_MAP_FORMAT or not all(
                isinstance(b["name"], str) and all(isinstance(n, str) for n in b["layers"])
                for b in blocks):
            raise ValueError("unexpected content")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return None, f"skipped {side}: not a tl_keras block map ({_one_line(e, 120)})"
    return doc, ""


def _template(block: str) -> str:
    return block.replace("{", "{{").replace("}", "}}")


def _prefix_rules(prefixes: list[str]) -> tuple:
    # Longest first: a layer belongs to the longest listed prefix it starts with.
    return tuple((re.escape(p) + ".*", _template(p))
                 for p in sorted(prefixes, key=len, reverse=True))


def _is_auto_named(layer) -> bool:
    """True for names Keras made up ("conv2d_3", "add"); they say nothing about blocks."""
    # Keras's own rule for default names: the class name in snake case
    # ("BatchNormalization" -> "batch_normalization"), then "_N" if taken.
    snake = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", type(layer).__name__)
    snake = re.sub(r"([a-z])([A-Z])", r"\1_\2", snake).lower()
    return re.fullmatch(re.escape(snake) + r"(?:_\d+)?", layer.name) is not None


def _discovered_rules(body: keras.Model) -> list[tuple[str, tuple]]:
    """Candidate block rules from the graph and names, best first: (how, rules)."""
    layers = [l for l in body.layers if not isinstance(l, _L.InputLayer)]
    candidates = []
    merges = [l.name for l in layers if isinstance(l, _MERGE_TYPES)]
    if merges:
        # A segment between cut points is named by its last merge: the
        # unit's closing add/concat.
        candidates.append(("merge layers", tuple((re.escape(n), _template(n)) for n in merges)))
    weighted = [l for l in layers if l.weights]
    prefix_of = {}
    for l in weighted:
        m = re.match(r"([A-Za-z]+_\d+|[A-Za-z]+\d*)_.", l.name)
        if m and not _is_auto_named(l):
            prefix_of[l.name] = m.group(1)
    if weighted and len(prefix_of) == len(weighted) and len(set(prefix_of.values())) >= 2:
        candidates.append(("layer-name prefixes", _prefix_rules(sorted(set(prefix_of.values())))))
    convs = [l.name for l in layers if isinstance(l, _CONV_DENSE_TYPES)]
    if convs:
        # Each conv/dense layer starts a block; what follows it (norm,
        # activation, pooling) joins it.
        candidates.append(("one block per conv/dense layer",
                           tuple((re.escape(n), _template(n)) for n in convs)))
    return candidates


def _preprocess_layers(model: keras.Model) -> list:
    from tl_keras.model.layers import Preprocess

    return [l for l in model.layers if isinstance(l, Preprocess)]


def family_from_model_file(path: str, image_size: int = 0, cut_layer: str = "",
                           block_prefixes: str = "", preprocess: str = "auto") -> Family:
    """Makes a Family from any Keras model file, to use as a backbone.

    Args:
        path: a `.keras` file, loaded in safe mode (Lambda layers refused).
        image_size: the input size asked for (0: the file's). A model whose
            layers allow it (convolutions and global pooling) is rebuilt at
            another size with the same weights.
        cut_layer: the layer whose output becomes the features; "" finds
            the last pooling or flatten before the dense classifier.
        block_prefixes: comma-separated layer-name prefixes, one block each;
            "" uses the block-map json beside the file (written by
            `tl-keras pretrain`), else discovers blocks from merge layers,
            layer-name prefixes or conv/dense layers.
        preprocess: "auto" (a tl_keras Preprocess layer inside the model,
            else the block-map json, else "none"), or a mode of
            `layers.Preprocess` for a model that expects it.

    Returns:
        A Family whose constructor (called by `build_backbone`) loads the
        file again and returns the cut model; `block_map` and
        `set_trainable_top_blocks` work on it as on any family.
    """
    import hashlib
    import json

    from tl_keras.core import cache as cache_lib

    model = load_model_file(path)
    cut = find_cut(model, cut_layer, path)
    body = _truncate(model, cut)
    notes = [f"{path}: cut at layer {cut!r} (output {tuple(body.output.shape[1:])})"
             + ("" if cut_layer else ", the last pooling/flatten before its classifier")]
    file_size = body.inputs[0].shape[1]
    if file_size is None and not image_size:
        raise fail("image_size", image_size, f"{path} takes any input size; give one")

    own = _preprocess_layers(body)
    doc, why = _read_block_map(path)
    if why:
        notes.append(why)
    if preprocess != "auto":
        if own:
            raise fail("preprocess", preprocess, f"{path} preprocesses its input itself (layer "
                       f"{own[0].name!r}, mode {own[0].mode!r}); leave --preprocess=auto")
        mode = preprocess
    elif own:
        mode = "none"
        notes.append(f"preprocessing: inside the model (layer {own[0].name!r}, mode "
                     f"{own[0].mode!r})")
    elif doc and doc.get("preprocess") in ("tf", "caffe", "torch", "none"):
        mode = doc["preprocess"]
        notes.append(f"preprocessing: {mode!r}, from {block_map_path(path)}")
    else:
        mode = "none"
        notes.append("preprocessing: none known, the model gets pixels 0..255 "
                     "(give --preprocess if it expects something else)")

    grouping = "cuts"
    prefixes = [p.strip() for p in block_prefixes.split(",") if p.strip()]
    if prefixes:
        names = [l.name for l in body.layers]
        for p in prefixes:
            if not any(n.startswith(p) for n in names):
                raise fail("block_prefixes", block_prefixes,
                           f"no layer of {path} below the cut starts with {p!r}")
        candidates = [("--block_prefixes", _prefix_rules(prefixes))]
    elif doc:
        grouping = "names" if doc.get("grouping") == "names" else "cuts"
        candidates = [(f"block map {block_map_path(path)}",
                       tuple((re.escape(n), _template(b["name"]))
                             for b in doc["blocks"] for n in b["layers"]))]
    else:
        candidates = _discovered_rules(body)
    name = "file_" + re.sub(r"\W+", "_", os.path.basename(path)[: -len(MODEL_FILE_SUFFIX)])

    def make(rules, grouping):
        return Family(name=name, constructor=_file_constructor(path, cut), preprocess=mode,
                      default_size=image_size or file_size, min_size=8, block_rules=rules,
                      grouping=grouping, path=path)

    family, errors = None, []
    for how, rules in candidates:
        try:
            blocks = block_map(body, make(rules, grouping))
        except RuntimeError as e:
            errors.append(f"{how}: {e}")
            continue
        family = make(rules, grouping)
        notes.append(f"{len(blocks)} blocks from {how}: " + ", ".join(b for b, _ in blocks))
        break
    if family is None:
        if prefixes:
            raise fail("block_prefixes", block_prefixes,
                       f"these prefixes do not group {path} into contiguous blocks "
                           f"({errors[0]})")
        # No rule fits: the whole model is one block (stage 2 unfreezes all of it).
        family = make((), "cuts")
        notes.append("1 block: no block structure found" +
                     (f" ({'; '.join(errors)})" if errors else ""))
    key = json.dumps([cache_lib.file_fingerprint(path), cut, family.block_rules,
                      family.grouping, mode])
    return dataclasses.replace(family, identity=f"{name}@{hashlib.sha256(key.encode()).hexdigest()[:16]}",
                               notes=tuple(notes))


def _file_constructor(path: str, cut: str):
    """A keras.applications-like constructor that loads and cuts the model file."""

    def construct(include_top=False, input_shape=None, weights="imagenet", **_):
        body = _truncate(load_model_file(path), cut)
        size = input_shape[0] if input_shape else body.inputs[0].shape[1]
        if weights is not None and size == body.inputs[0].shape[1]:
            return body  # the file's weights at the file's size
        # Another size, or fresh weights (--weights=none): rebuild the same
        # layers on a new input; the file's weights are copied if kept.
        try:
            new = keras.models.clone_model(
                body, input_tensors=keras.Input((size, size, 3), name=body.inputs[0].name))
            if weights is not None:
                new.set_weights(body.get_weights())
        except ConfigError:
            raise
        except Exception as e:  # noqa: BLE001 - e.g. a flatten fixes the size
            raise fail("image_size", size, f"{path} cannot run at this size "
                       f"({_one_line(e, 160)}); use {body.inputs[0].shape[1]}") from None
        return new

    return construct


def load_model(path: str, flag: str = "model"):
    """Loads a `.keras` file in Keras's safe mode, without compiling it.

    Raises:
        ConfigError: one line when the file holds Python code (a Lambda
            layer, a lambda activation, ...) or cannot be loaded at all.
    """
    import keras

    from tl_keras.model import layers  # noqa: F401  (registers tl_keras layers for loading)

    try:
        return keras.models.load_model(path, safe_mode=True, compile=False)
    except Exception as e:  # noqa: BLE001 - Keras raises many kinds; all become one line
        text = " ".join(str(e).split())
        if _CODE_REFUSED in text:
            kind = "a Lambda layer" if "Lambda" in text else "serialized Python code"
            raise fail(flag, path, f"refused: the model contains {kind}, which could run "
                       "arbitrary code; tl-keras loads models in Keras safe mode and never "
                       "runs code from a model file (rebuild the model without it)") from None
        raise fail(flag, path, f"cannot load the model: {text[:300]}") from None
