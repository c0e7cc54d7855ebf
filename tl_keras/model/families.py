"""The keras.applications backbone families, as data.

Each `Family` says how to build the model, how its inputs are preprocessed,
which input sizes it takes, and how its layers group into blocks. Blocks are
what stage 2 unfreezes: "the top N blocks" always means whole blocks (a whole
residual, inverted-residual, inception, dense or NASNet unit with its
add/concat), never a raw layer count.

Each family's block rules are data in its entry of `FAMILIES`;
`tl_keras.model.blocks` applies them to a built model.
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import keras

from tl_keras.errors import ConfigError, fail, network_failure, one_line


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
        failure = e
    error = one_line(failure)
    # Whose fault: the weights only if the same architecture builds without them.
    if kwargs["weights"] is not None:
        if kwargs["weights"] == "imagenet" and network_failure(failure) is not None:
            raise fail("weights", weights,
                       f"could not download the ImageNet weights of {family.name} ({error}); "
                       "pass --weights=PATH to a local weights file") from None
        try:
            family.constructor(**{**kwargs, "weights": None})
        except Exception:  # noqa: BLE001 - the architecture itself fails: said below
            pass
        else:
            raise fail("weights", weights, f"could not load these weights into {family.name}"
                       f"{_settings(a, size)}: {error}") from None
    raise fail("backbone", family.name, f"could not be built{_settings(a, size)}: "
               f"{error}") from None


def _settings(alpha: Optional[float], size: int) -> str:
    """ " at --image_size=S [and --alpha=A]": what a build depends on besides weights."""
    return f" at --image_size={size}" + (f" and --alpha={alpha:g}" if alpha is not None else "")
