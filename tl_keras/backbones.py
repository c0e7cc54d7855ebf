"""The keras.applications backbone families, as data.

Each `Family` says how to build the model, how its inputs are preprocessed,
which input sizes it takes, and how its layers group into blocks. Blocks are
what stage 2 unfreezes: "the top N blocks" always means whole blocks (a whole
residual, inverted-residual, inception, dense or NASNet unit with its
add/concat), never a raw layer count.

Block rules are an ordered tuple of `(regex, template)`: the first regex that
`re.fullmatch`es a layer name names the layer's block,
`template.format(*match.groups())`. Only layers that Keras names explicitly
should be matched; auto-named layers ("conv2d_12", "add_3", "activation_7")
get numeric suffixes that depend on what else was built in the process, so
they are placed by graph structure instead, in one of two ways
(`Family.grouping`):

* "cuts" (every family but NASNet): the layer graph is split at its cut
  points, layers that every input-to-output path passes through (the output
  of a residual unit, an inception concat, a plain conv of a stem). No skip
  connection crosses a cut, so a segment between two cuts can never hold half
  a residual unit. A segment is named by the last layer in it that matches a
  rule (the unit's closing add/concat decides); a segment with no matching
  layer joins the block before it, or forms "stem" when it comes first. The
  input layer joins the first block.
* "names" (NASNet): each cell reads the outputs of the two cells before it, so
  there are no cut points between cells. Layers matching a rule go to that
  block; every other layer (the generic relus, paddings and concats inside a
  cell) goes to the block of the layer that consumes it, or of its producer
  when nothing consumes it (the final relu).

Blocks are ordered by where their first layer appears in `model.layers`.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import re
from typing import Callable, Optional

import keras

from tl_keras.config import ConfigError, fail


@dataclasses.dataclass(frozen=True)
class Family:
    """One backbone family of keras.applications.

    Attributes:
        name: lower-case CLI name, e.g. "mobilenet_v2".
        constructor: the keras.applications callable.
        preprocess: "tf" (x/127.5-1), "caffe" (BGR, ImageNet mean), "torch"
            (x/255, ImageNet mean/std) or "none" (the model preprocesses
            itself and expects 0..255), matching the family's own
            `preprocess_input`.
        default_size: the size its ImageNet weights were trained at.
        min_size: smallest square input the architecture accepts.
        alphas: width multipliers with ImageNet weights; () if no alpha.
        default_alpha: alpha used when none is given (None if no alpha).
        block_rules: see the module docstring.
        extra_kwargs: extra constructor arguments (e.g. include_preprocessing).
        grouping: "cuts" or "names"; see the module docstring.
        path: the model file a custom family was made from
            (`family_from_model_file`); "" for keras.applications.
        identity: what caches must key on instead of `name` ("" = name):
            for a model file, its fingerprint, cut, blocks and preprocessing.
        notes: how a model file was cut, grouped and preprocessed, for the log.
    """

    name: str
    constructor: Callable[..., keras.Model]
    preprocess: str
    default_size: int
    min_size: int
    block_rules: tuple
    alphas: tuple = ()
    default_alpha: Optional[float] = None
    extra_kwargs: tuple = ()
    grouping: str = "cuts"
    path: str = ""
    identity: str = ""
    notes: tuple = ()


_A = keras.applications

# The preprocessing layers are part of the graph for these families, so
# preprocess="none" is only right if they are built; pass the flag explicitly
# rather than trusting Keras' default to stay True.
_SELF_PREPROCESSING = (("include_preprocessing", True),)

# Shared rules. Regexes end in `(?:_.*)?` or name whole layers so that they
# never depend on auto-generated numeric suffixes.
_RESNET_RULES = (
    (r"(?:conv1|pool1)_.*", "stem"),
    (r"(conv\d+_block\d+)_.*", "{0}"),
    # ResNetV2's trailing post_bn/post_relu match nothing and so join the
    # last unit: a "top" block of only a BatchNormalization (kept frozen)
    # would have nothing to train.
)
_MOBILENET_V3_RULES = (
    (r"conv(?:_bn)?", "stem"),
    # The first unit is "expanded_conv_*" without a number.
    (r"expanded_conv_(\d+)_.*", "block_{0}"),
    (r"expanded_conv_.*", "block_0"),
    (r"conv_1(?:_bn)?", "top"),
)
_EFFICIENTNET_RULES = (
    (r"stem_.*", "stem"),
    # One block per (inverted) residual unit, e.g. "block2b".
    (r"(block\d+[a-z])_.*", "{0}"),
    (r"top_.*", "top"),
)
_DENSENET_RULES = (
    (r"conv1_.*|pool1", "stem"),
    # One block per dense layer (its bn-relu-conv pair and concat) ...
    (r"(conv\d+_block\d+)_.*", "{0}"),
    # ... and one per transition layer between dense blocks.
    (r"(pool\d+)_.*", "{0}"),
    # The trailing "bn"/"relu" join the last dense layer (see _RESNET_RULES).
)
_VGG_RULES = ((r"(block\d+)_.*", "{0}"),)
_CONVNEXT_RULES = (
    # Layer names start with the model name ("convnext_tiny_...").
    (r".*_(?:prestem_normalization|stem)", "stem"),
    (r".*_stage_(\d+)_block_(\d+)_.*", "stage_{0}_block_{1}"),
    (r".*_downsampling_block_(\d+)", "downsampling_block_{0}"),
    # The final auto-named LayerNormalization joins stage_3's last block.
)
_NASNET_RULES = (
    (r"stem_conv1|stem_bn1", "stem"),
    # Cell layers end in the cell id: "stem_1", "reduce_4" or a number; the
    # lazy `.*?` makes "..._add_1_stem_1" end in "stem_1", not "1".
    (r"(?:.*_)?(?:normal|reduction|adjust)_.*?_(stem_\d+|reduce_\d+|\d+)", "cell_{0}"),
)


def _efficientnet(name, ctor, size, extra=()):
    """An EfficientNet (V1 or V2) family; they share layer names and min size."""
    return Family(name=name, constructor=ctor, preprocess="none", default_size=size,
                  min_size=32, block_rules=_EFFICIENTNET_RULES, extra_kwargs=extra)


def _convnext(name, ctor):
    """A ConvNeXt family; all five share rules, sizes and built-in preprocessing."""
    return Family(name=name, constructor=ctor, preprocess="none", default_size=224,
                  min_size=32, block_rules=_CONVNEXT_RULES, extra_kwargs=_SELF_PREPROCESSING)


FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
        Family(
            name="mobilenet",
            constructor=_A.MobileNet,
            preprocess="tf",
            default_size=224,
            min_size=32,
            alphas=(0.25, 0.5, 0.75, 1.0),
            default_alpha=1.0,
            block_rules=(
                (r"conv1(?:_bn|_relu)?", "stem"),
                # A depthwise-separable unit: pad (stride 2 only), dw, pw.
                (r"conv_(?:dw|pw|pad)_(\d+)(?:_.*)?", "block_{0}"),
            ),
        ),
        Family(
            name="mobilenet_v2",
            constructor=_A.MobileNetV2,
            preprocess="tf",
            default_size=224,
            min_size=32,
            alphas=(0.35, 0.5, 0.75, 1.0, 1.3, 1.4),
            default_alpha=1.0,
            block_rules=(
                (r"(?:input.*|Conv1.*|bn_Conv1|Conv1_relu|expanded_conv_.*)", "stem"),
                (r"block_(\d+)_.*", "block_{0}"),
                (r"(?:Conv_1|Conv_1_bn|out_relu)", "top"),
            ),
        ),
        Family(
            name="mobilenet_v3_small",
            constructor=_A.MobileNetV3Small,
            preprocess="none",
            default_size=224,
            min_size=32,
            alphas=(0.75, 1.0),
            default_alpha=1.0,
            block_rules=_MOBILENET_V3_RULES,
            extra_kwargs=_SELF_PREPROCESSING,
        ),
        Family(
            name="mobilenet_v3_large",
            constructor=_A.MobileNetV3Large,
            preprocess="none",
            default_size=224,
            min_size=32,
            alphas=(0.75, 1.0),
            default_alpha=1.0,
            block_rules=_MOBILENET_V3_RULES,
            extra_kwargs=_SELF_PREPROCESSING,
        ),
        # EfficientNet (V1) always builds its Rescaling/Normalization layers.
        _efficientnet("efficientnet_b0", _A.EfficientNetB0, 224),
        _efficientnet("efficientnet_b1", _A.EfficientNetB1, 240),
        _efficientnet("efficientnet_b2", _A.EfficientNetB2, 260),
        _efficientnet("efficientnet_b3", _A.EfficientNetB3, 300),
        _efficientnet("efficientnet_b4", _A.EfficientNetB4, 380),
        _efficientnet("efficientnet_b5", _A.EfficientNetB5, 456),
        _efficientnet("efficientnet_b6", _A.EfficientNetB6, 528),
        _efficientnet("efficientnet_b7", _A.EfficientNetB7, 600),
        _efficientnet("efficientnet_v2_b0", _A.EfficientNetV2B0, 224, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_b1", _A.EfficientNetV2B1, 240, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_b2", _A.EfficientNetV2B2, 260, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_b3", _A.EfficientNetV2B3, 300, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_s", _A.EfficientNetV2S, 384, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_m", _A.EfficientNetV2M, 480, _SELF_PREPROCESSING),
        _efficientnet("efficientnet_v2_l", _A.EfficientNetV2L, 480, _SELF_PREPROCESSING),
        Family("resnet50", _A.ResNet50, "caffe", 224, 32, _RESNET_RULES),
        Family("resnet101", _A.ResNet101, "caffe", 224, 32, _RESNET_RULES),
        Family("resnet152", _A.ResNet152, "caffe", 224, 32, _RESNET_RULES),
        Family("resnet50_v2", _A.ResNet50V2, "tf", 224, 32, _RESNET_RULES),
        Family("resnet101_v2", _A.ResNet101V2, "tf", 224, 32, _RESNET_RULES),
        Family("resnet152_v2", _A.ResNet152V2, "tf", 224, 32, _RESNET_RULES),
        Family(
            name="xception",
            constructor=_A.Xception,
            preprocess="tf",
            default_size=299,
            min_size=71,
            block_rules=(
                # block1 is two plain convs; blocks 2-13 are residual units
                # whose shortcut conv and add are auto-named (placed by cuts);
                # block14 is the two separable convs at the top.
                (r"block1_.*", "stem"),
                (r"(block\d+)_.*", "{0}"),
            ),
        ),
        Family(
            name="inception_v3",
            constructor=_A.InceptionV3,
            preprocess="tf",
            default_size=299,
            min_size=75,
            # Only the closing concats are named ("mixed0".."mixed10"; the
            # inner "mixed9_0"/"mixed9_1" do not match); every branch layer
            # is auto-named and the stem is all auto-named, so it becomes
            # "stem" by position.
            block_rules=((r"(mixed\d+)", "{0}"),),
        ),
        Family(
            name="inception_resnet_v2",
            constructor=_A.InceptionResNetV2,
            preprocess="tf",
            default_size=299,
            min_size=75,
            block_rules=(
                (r"(mixed_\w+)", "{0}"),  # mixed_5b, mixed_6a, mixed_7a
                (r"(block(?:35|17|8)_\d+)_.*", "{0}"),
                (r"conv_7b(?:_bn|_ac)?", "top"),
            ),
        ),
        Family("densenet121", _A.DenseNet121, "torch", 224, 32, _DENSENET_RULES),
        Family("densenet169", _A.DenseNet169, "torch", 224, 32, _DENSENET_RULES),
        Family("densenet201", _A.DenseNet201, "torch", 224, 32, _DENSENET_RULES),
        # VGG has no stem: the input joins block1.
        Family("vgg16", _A.VGG16, "caffe", 224, 32, _VGG_RULES),
        Family("vgg19", _A.VGG19, "caffe", 224, 32, _VGG_RULES),
        _convnext("convnext_tiny", _A.ConvNeXtTiny),
        _convnext("convnext_small", _A.ConvNeXtSmall),
        _convnext("convnext_base", _A.ConvNeXtBase),
        _convnext("convnext_large", _A.ConvNeXtLarge),
        _convnext("convnext_xlarge", _A.ConvNeXtXLarge),
        Family("nasnet_mobile", _A.NASNetMobile, "tf", 224, 32, _NASNET_RULES, grouping="names"),
        Family("nasnet_large", _A.NASNetLarge, "tf", 331, 32, _NASNET_RULES, grouping="names"),
    ]
}


def get_family(name: str) -> Family:
    """Returns the family for a CLI name; ConfigError naming --backbone if unknown."""
    key = name.strip().lower()
    if key not in FAMILIES:
        raise fail("backbone", name, "unknown backbone; choose one of: " + ", ".join(sorted(FAMILIES)))
    return FAMILIES[key]


def resolve_alpha(family: Family, alpha: float) -> Optional[float]:
    """Returns the alpha to build with (family default for 0), None for families without one."""
    if not family.alphas:
        if alpha:
            raise fail("alpha", alpha, f"backbone {family.name} has no width multiplier")
        return None
    return float(alpha) if alpha else family.default_alpha


def validate(family: Family, image_size: int, alpha: float, weights: str) -> None:
    """Backbone-dependent checks on size and alpha; raises ConfigError."""
    if family.path and weights.strip().lower() not in ("imagenet", "none"):
        raise fail("weights", weights, f"{family.path} brings its own weights; leave --weights "
                   "at its default to use them, or give none to re-initialize them")
    if image_size and image_size < family.min_size:
        raise fail("image_size", image_size,
                   f"{family.name} needs at least {family.min_size} px")
    a = resolve_alpha(family, alpha)
    if a is not None and weights.lower() == "imagenet" and a not in family.alphas:
        raise fail("alpha", alpha, f"{family.name} has ImageNet weights only for alpha in "
                   + ", ".join(str(x) for x in family.alphas))


def build_backbone(family: Family, weights: str, image_size: int,
                   alpha: float = 0.0) -> keras.Model:
    """Builds the headless backbone (include_top=False, no pooling).

    Args:
        family: the family to build.
        weights: "imagenet", "none", or a path to a weights file (loads offline
            at any input size).
        image_size: square input size in pixels (0: the family default).
        alpha: width multiplier (0: the family default).

    Returns:
        A functional keras.Model from images (already preprocessed) to the
        last feature map.
    """
    import os

    size = image_size or family.default_size
    kwargs = dict(include_top=False, input_shape=(size, size, 3))
    kwargs.update(dict(family.extra_kwargs))
    a = resolve_alpha(family, alpha)
    if a is not None:
        kwargs["alpha"] = a
    w = weights.strip()
    if w.lower() == "none":
        kwargs["weights"] = None
    elif w.lower() == "imagenet":
        kwargs["weights"] = "imagenet"
    else:
        if not os.path.isfile(w):
            raise fail("weights", weights, "no such weights file (use imagenet, none or a PATH)")
        kwargs["weights"] = w
    try:
        return family.constructor(**kwargs)
    except ConfigError:
        raise
    except Exception as e:  # noqa: BLE001 - turned into one line for the user
        msg = " ".join(str(e).split())
        if kwargs["weights"] == "imagenet" and any(
            s in msg for s in ("URL fetch failure", "Name or service", "urlopen", "Errno", "HTTP")
        ):
            raise fail("weights", weights,
                       f"could not download the ImageNet weights of {family.name} (no network?); "
                       "pass --weights=PATH to a local weights file") from None
        raise fail("weights", weights, f"could not build {family.name} with these weights: {msg[:300]}") from None


def _graph(model: keras.Model) -> tuple[list, list[list[int]]]:
    """Returns the model's operations in topological order and their parents.

    Operations, not just layers: Keras 3 records `a + b` on tensors (ConvNeXt's
    residual add) as a bare Operation that `model.layers` leaves out, and a
    cut point is only a cut if no such skip edge jumps over it.

    Returns:
        (ops, parents): `parents[i]` are the indices in `ops` of the
        operations feeding `ops[i]`.
    """
    ops = list(model.operations)
    index = {id(op): i for i, op in enumerate(ops)}
    parents: list[list[int]] = [[] for _ in ops]
    for i, op in enumerate(ops):
        for node in op._inbound_nodes:  # Keras 3 Functional graph internals.
            for parent in node.parent_nodes:
                j = index.get(id(parent.operation))
                # Layers reused in another graph have nodes there too.
                if j is not None and j not in parents[i]:
                    parents[i].append(j)
    # Kahn's algorithm, stable in model order: `model.operations` is already
    # topological in practice, but the cut test below relies on it.
    children: list[list[int]] = [[] for _ in ops]
    for i, ps in enumerate(parents):
        for j in ps:
            children[j].append(i)
    missing = [len(ps) for ps in parents]
    ready = [i for i, m in enumerate(missing) if m == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for c in children[i]:
            missing[c] -= 1
            if missing[c] == 0:
                heapq.heappush(ready, c)
    pos = {old: new for new, old in enumerate(order)}
    return ([ops[i] for i in order],
            [sorted(pos[j] for j in parents[i]) for i in order])


def _rule_block(rules, name: str) -> Optional[str]:
    """The block the first matching rule names for a layer name, or None."""
    for rx, tpl in rules:
        m = rx.fullmatch(name)
        if m:
            return tpl.format(*m.groups())
    return None


def _blocks_by_cuts(ops, parents, rules, family_name: str) -> list[tuple[str, list]]:
    """Groups ops into blocks of whole segments between graph cut points."""
    # An op is a cut point iff no edge jumps over its position in a
    # topological order: such an edge would be a path that avoids it.
    jumped = [0] * (len(ops) + 1)
    for i, ps in enumerate(parents):
        for j in ps:
            if i - j > 1:
                jumped[j + 1] += 1
                jumped[i] -= 1
    segments, seg, depth = [], [], 0
    for i, op in enumerate(ops):
        depth += jumped[i]
        seg.append(op)
        if depth == 0:
            segments.append(seg)
            seg = []
    if seg:
        segments.append(seg)

    blocks: list[tuple[str, list]] = []
    pending: list = []  # leading input layers, joining the first block
    for seg in segments:
        named = [b for b in (_rule_block(rules, op.name) for op in seg
                             if isinstance(op, keras.layers.Layer)) if b]
        # The last named layer is the unit's closing add/concat/activation.
        block = named[-1] if named else (blocks[-1][0] if blocks else None)
        if block is None:
            if all(isinstance(op, keras.layers.InputLayer) for op in seg):
                pending.extend(seg)
                continue
            block = "stem"
        if blocks and blocks[-1][0] == block:
            blocks[-1][1].extend(pending + seg)
        elif any(b == block for b, _ in blocks):
            # The rules would split a block around another one: a bug in the
            # family's rules (or a Keras change), never silently "fixed".
            raise RuntimeError(f"{family_name}: block {block!r} is not contiguous "
                               f"(again at layer {seg[-1].name!r})")
        else:
            blocks.append((block, pending + seg))
        pending = []
    if pending:
        blocks.append(("stem", pending))
    return blocks


def _blocks_by_names(ops, parents, rules) -> list[tuple[str, list]]:
    """Groups ops by rule; unmatched ops follow their consumer (or producer)."""
    block: list[Optional[str]] = [
        _rule_block(rules, op.name) if isinstance(op, keras.layers.Layer) else None
        for op in ops]
    children: list[list[int]] = [[] for _ in ops]
    for i, ps in enumerate(parents):
        for j in ps:
            children[j].append(i)
    for i in reversed(range(len(ops))):  # consumers first
        if block[i] is None:
            block[i] = next((block[c] for c in children[i] if block[c]), None)
    for i in range(len(ops)):  # ops nothing consumes (the output)
        if block[i] is None:
            block[i] = next((block[p] for p in parents[i] if block[p]), "stem")
    members: dict[str, list] = {}
    for op, b in zip(ops, block):
        members.setdefault(b, []).append(op)
    return list(members.items())


def block_map(model: keras.Model, family: Family) -> list[tuple[str, list[str]]]:
    """Groups the backbone's layers into ordered blocks of whole units.

    Args:
        model: a backbone built by `build_backbone` for `family`.
        family: its family; `block_rules` and `grouping` drive the grouping
            (see the module docstring).

    Returns:
        A list of (block name, [layer names]) in model order; every layer of
        `model.layers` is in exactly one block.

    Raises:
        RuntimeError: if the family's rules do not fit the model's graph.
    """
    rules = [(re.compile(rx), tpl) for rx, tpl in family.block_rules]
    ops, parents = _graph(model)
    if family.grouping == "names":
        blocks = _blocks_by_names(ops, parents, rules)
    else:
        blocks = _blocks_by_cuts(ops, parents, rules, family.name)
    # Bare Operations (ConvNeXt's adds) have no weights and no place in
    # `model.layers`, so they are left out of the result.
    out = [(b, [op.name for op in members if isinstance(op, keras.layers.Layer)])
           for b, members in blocks]
    return [(b, names) for b, names in out if names]


def num_blocks(model: keras.Model, family: Family) -> int:
    """Number of blocks of a built backbone."""
    return len(block_map(model, family))


# Share of a backbone's blocks that stage 2 unfreezes by default. Measured with
# MobileNetV2-0.35 at 160 px, 4 views, 6 epochs, on 7 splits (the shared
# flowers with seeds 1/2/3/42 and 3 disjoint subsets of flowers128; table in
# benchmarks/README.md): 4 blocks 0.774 mean test accuracy, 8 blocks 0.781,
# within noise (one split's standard error is 0.02-0.03), at about half of
# stage 2's time (5.6-6.2 s instead of 9.3-12 s on 2 CPU cores). Earlier, one
# seed: 4 blocks 0.816, 8 blocks 0.832, 12 blocks 0.836.
AUTO_FINETUNE_FRACTION = 0.2


def auto_finetune_blocks(n_blocks: int) -> int:
    """Blocks stage 2 unfreezes when --finetune_blocks=0 (auto).

    A fraction, not a count, so the default means the same depth for a
    12-block Inception as for a 62-block DenseNet.
    """
    return max(1, math.ceil(AUTO_FINETUNE_FRACTION * n_blocks))


def set_trainable_top_blocks(model: keras.Model, family: Family, n: int) -> list[str]:
    """Freezes the backbone except its top `n` blocks.

    BatchNormalization layers stay frozen everywhere: with trainable=False,
    Keras 3 runs them in inference mode, so their moving statistics never
    change on small data.

    Returns:
        The names of the unfrozen blocks, bottom to top.
    """
    blocks = block_map(model, family)
    if n > len(blocks):
        raise fail("finetune_blocks", n, f"{family.name} has only {len(blocks)} blocks")
    top = blocks[len(blocks) - n:] if n else []
    unfrozen = {name for _, names in top for name in names}
    model.trainable = True
    for layer in model.layers:
        layer.trainable = (layer.name in unfrozen
                           and not isinstance(layer, keras.layers.BatchNormalization))
    return [b for b, _ in top]


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
    import os
    import zipfile

    from tl_keras import layers as _tl_layers  # noqa: F401  (registers tl_keras layers)

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
    ops, parents = _graph(model)
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
    import os

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
    from tl_keras.layers import Preprocess

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
    import os

    from tl_keras import cache as cache_lib

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
