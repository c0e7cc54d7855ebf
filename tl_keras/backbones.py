"""The keras.applications backbone families, as data.

Each `Family` says how to build the model, how its inputs are preprocessed,
which input sizes it takes, and how its layers group into blocks. Blocks are
what stage 2 unfreezes: "the top N blocks" always means whole blocks (a whole
residual or inverted-residual unit with its add/concat), never a raw layer
count.

Block rules are an ordered tuple of `(regex, template)`: the first regex that
`re.fullmatch`es a layer name assigns the layer to the block named by
`template.format(*match.groups())`. Layers that match no rule belong to the
block of the layer before them (the input layer belongs to the first block).
Blocks are ordered by where their first layer appears in `model.layers`.
"""

from __future__ import annotations

import dataclasses
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


_A = keras.applications

FAMILIES: dict[str, Family] = {
    f.name: f
    for f in [
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


def block_map(model: keras.Model, family: Family) -> list[tuple[str, list[str]]]:
    """Groups the backbone's layers into ordered blocks.

    Returns:
        A list of (block name, [layer names]) in model order; every layer is
        in exactly one block.
    """
    rules = [(re.compile(rx), tpl) for rx, tpl in family.block_rules]
    order: list[str] = []
    members: dict[str, list[str]] = {}
    current = None
    for layer in model.layers:
        block = None
        for rx, tpl in rules:
            m = rx.fullmatch(layer.name)
            if m:
                block = tpl.format(*m.groups())
                break
        if block is None:
            block = current if current is not None else (order[0] if order else "stem")
        if block not in members:
            order.append(block)
            members[block] = []
        members[block].append(layer.name)
        current = block
    return [(b, members[b]) for b in order]


def num_blocks(model: keras.Model, family: Family) -> int:
    """Number of blocks of a built backbone."""
    return len(block_map(model, family))


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
