"""Image bytes to pixels, the one way training and serving both use.

`decode_image` (and `decode_and_resize`) is what the tf.data pipelines
(`tl_keras.data.pipeline`), the pre-flight scan (`tl_keras.data.preflight`),
`tl-keras predict` and the exported model's bytes signature
(`tl_keras.export.saved_model`) call, all in the graph, so a served image is
decoded exactly as training saw it. It does what the pre-flight's Pillow
reference does (see `GRAPH_LIMITS` for where it cannot):

* the header is read first (`image_header`): empty, truncated, non-image and
  unsupported bytes, and images over `max_pixels`, are refused with one line
  naming the image and the reason, before any pixel is allocated;
* a JPEG's EXIF orientation is applied (turned upright, as `ImageOps.exif_transpose`);
* transparency (RGBA, LA, palette and colour-key PNGs, WebP alpha, a GIF's
  transparent colour) is composited on white with Pillow's integer arithmetic;
* a 16-bit PNG is reduced to 8 bits as the pre-flight does;
* a GIF gives its first frame; grayscale, palette and CMYK images give RGB.

Plain RGB JPEGs are decoded by the same TensorFlow kernel as before, so their
pixels are bit-identical.
"""
from __future__ import annotations

import re

import tensorflow as tf

from tl_keras.data import image_header as header_lib

# Where the graph cannot do what Pillow does; written to OUT/preflight.json and
# stated in the README. Training follows the graph in each case (the pre-flight
# trains on the original bytes whenever the graph decodes them), so served and
# trained pixels never differ; the pre-flight notes each file whose pixels
# differ from Pillow's.
GRAPH_LIMITS = (
    "JPEG: decoded by TensorFlow's libjpeg-turbo, not Pillow's: pixels differ by about "
    "1 level on average (another IDCT and chroma upsampling); CMYK JPEGs use TensorFlow's "
    "conversion",
    "EXIF orientation is read from JPEG files only, from an Exif segment at the start (first, "
    "or after a JFIF segment: where cameras and phones write it): a PNG or WebP whose EXIF "
    "chunk says to turn it, or a JPEG with its Exif segment further on, is used as stored",
    "GIF: the first frame as TensorFlow's decoder (giflib) draws it; where a first frame does "
    "not cover the whole screen, the rest may be filled otherwise than by Pillow",
    "BMP: 24- and 32-bit uncompressed only (alpha of 32-bit BMPs dropped, as Pillow "
    "does); others are refused when served and converted by the pre-flight for training",
    "TIFF, HEIC/HEIF, AVIF and other formats are not decoded in the graph: the pre-flight "
    "converts them to PNG for training, and the served model refuses them (clients send "
    "JPEG, PNG or WebP)",
)

# One-byte strings (Python values: a tensor made at import would start
# TensorFlow's runtime before the run configures its devices).
_BYTE = [bytes([i]) for i in range(256)]


# Downscale factor (on either axis) above which the resize is antialiased.
# Up to 2x, bilinear interpolation with half-pixel centres already averages
# the two nearest source pixels per axis (at exactly 2x it is a 2x2 box
# filter), as the backbones' own ImageNet training resized (TF-slim's
# bilinear `resize_images`, no antialiasing); beyond that it would skip
# pixels and alias (phone photos). TensorFlow's antialiased kernel costs
# 0.6 CPU ms per flowers photo (320x240 to 160 px) against 0.04 ms for plain
# bilinear: half of each image's decode + resize (benchmarks/README.md,
# "Antialiasing only beyond 2x").
ANTIALIAS_ABOVE = 2.0


def resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
    """Resizes an RGB image (any dtype, 0..255) to size x size uint8.

    Bilinear resize, antialiased when the image shrinks by more than
    `ANTIALIAS_ABOVE` on either axis, then rounding to uint8: this is what
    both the training pipeline and the exported SavedModel do, so they see
    identical pixels.
    """
    x = tf.cast(image, tf.float32)
    shape = tf.shape(image)
    limit = tf.cast(tf.math.ceil(ANTIALIAS_ABOVE * size), tf.int32)
    shrinks = tf.reduce_any(shape[-3:-1] > limit)

    def smooth():
        return tf.image.resize(x, [size, size], method="bilinear", antialias=True)

    def plain():
        return tf.image.resize(x, [size, size], method="bilinear")

    x = tf.cond(shrinks, smooth, plain)
    return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def composite_on_white(rgb: tf.Tensor, alpha: tf.Tensor) -> tf.Tensor:
    """RGB int32 [H, W, 3] with alpha int32 [H, W, 1] (0..255) on white, as uint8.

    Pillow's `Image.alpha_composite(white, image)` to the bit (its 7-bit
    fixed point and rounded division by 255, AlphaComposite.c; checked
    against Pillow for every colour and alpha value). Opaque images are
    returned as they are, which the formula would also give.
    """

    def blend():
        t = (rgb * alpha + 255 * (255 - alpha)) * 128 + (0x80 << 7)
        return ((t // 256 + t) // 256) // 128  # (x >> 8) for these non-negative ints

    out = tf.cond(tf.reduce_min(alpha) < 255, blend, lambda: rgb)
    return tf.cast(out, tf.uint8)


# For EXIF orientations 1..8, what turns the stored image upright (as
# ImageOps.exif_transpose): transpose it, then reverse its rows, its columns.
_TRANSPOSE = (0, 0, 0, 0, 1, 1, 1, 1)
_REVERSE_ROWS = (0, 0, 1, 1, 0, 0, 1, 1)
_REVERSE_COLUMNS = (0, 1, 1, 0, 0, 1, 1, 0)


def apply_orientation(image: tf.Tensor, orientation: tf.Tensor) -> tf.Tensor:
    """Turns an image stored with EXIF orientation 1..8 upright (`ImageOps.exif_transpose`).

    Straight-line ops (a permutation and two gathers), no branches.
    """
    i = tf.clip_by_value(orientation, 1, 8) - 1
    perm = tf.where(tf.gather(tf.constant(_TRANSPOSE), i) > 0, [1, 0, 2], [0, 1, 2])
    image = tf.transpose(image, perm)
    for axis, table in ((0, _REVERSE_ROWS), (1, _REVERSE_COLUMNS)):
        size = tf.shape(image)[axis]
        forward = tf.range(size)
        index = tf.where(tf.gather(tf.constant(table), i) > 0, size - 1 - forward, forward)
        image = tf.gather(image, index, axis=axis)
    return image


def _jpeg(data, header):
    # decode_jpeg runs the kernel tf.io.decode_image ran for JPEGs, with the
    # same settings: plain JPEGs decode to the same pixels as before.
    image = tf.io.decode_jpeg(data, channels=3)
    return tf.cond(tf.equal(header["orientation"], 1), lambda: image,
                   lambda: apply_orientation(image, header["orientation"]))


def _png(data, header):
    def deep():
        x = tf.cast(tf.io.decode_png(data, channels=4, dtype=tf.uint16), tf.int32)

        def gray():
            # Pillow reads 16-bit grayscale at full depth (mode I;16) and the
            # pre-flight reduces it by round(v / 257), keeping the values as
            # they are when none is over 255; it ignores a colour key there.
            v = x[..., :3]
            v = tf.where(tf.reduce_max(v) > 255, (2 * v + 257) // 514, v)
            return v, tf.fill(tf.shape(x[..., 3:]), 255)

        # Colour (and gray + alpha) 16-bit PNGs: Pillow keeps the high byte.
        return tf.cond(tf.equal(header["png_color"], 0), gray,
                       lambda: (x[..., :3] // 256, x[..., 3:] // 256))

    def shallow():
        # Four channels: libpng expands palettes, gray and colour keys (tRNS)
        # to RGBA, as Pillow's convert("RGBA") does.
        x = tf.cast(tf.io.decode_png(data, channels=4), tf.int32)
        return x[..., :3], x[..., 3:]

    rgb, alpha = tf.cond(tf.equal(header["png_depth"], 16), deep, shallow)
    return composite_on_white(rgb, alpha)


def _replace_byte(data, pos, value):
    n = tf.strings.length(data)
    byte = tf.gather(tf.constant(_BYTE), value)
    return tf.strings.join([tf.strings.substr(data, 0, pos), byte,
                            tf.strings.substr(data, pos + 1, n)])


def _gif(data, header):
    # TensorFlow draws a GIF's transparent pixels black. With the first
    # frame's transparency flag cleared and its transparent colour's palette
    # entry set to white, it draws them white: Pillow's result of compositing
    # the (on/off) transparency on white. (Computed for every GIF and kept
    # only for transparent ones: string ops on a small file, no branch.)
    flag_pos = tf.maximum(header["gif_flag_pos"], 0)
    color_pos = tf.maximum(header["gif_color_pos"], 0)
    flags = tf.cast(tf.io.decode_raw(tf.strings.substr(data, flag_pos, 1), tf.uint8)[0],
                    tf.int32)
    patched = _replace_byte(data, flag_pos, flags - flags % 2)
    for i in range(3):
        patched = _replace_byte(patched, color_pos + i, 255)
    return _first_frame(tf.where(header["gif_color_pos"] >= 0, patched, data))


def _first_frame(data):
    image = tf.io.decode_image(data, channels=3, expand_animations=False, dtype=tf.uint8)
    image.set_shape([None, None, 3])
    return image


def _webp(data, header):
    def with_alpha():
        x = tf.cast(tf.io.decode_webp(data, channels=4)[0], tf.int32)
        return composite_on_white(x[..., :3], x[..., 3:])

    return tf.cond(tf.equal(header["channels"], 4), with_alpha,
                   lambda: tf.io.decode_webp(data, channels=3)[0])


def _refusal(data, header, max_pixels, name) -> tf.Tensor:
    """True, or an InvalidArgumentError "image NAME: REASON" when the header is refused."""
    def refuse():
        reason = header_lib.describe_problem(data, header, max_pixels)
        if name is None:
            what = "image"
        else:  # an empty name (the traced decoder's default) says "image" too
            shown = name if name.dtype == tf.string else tf.strings.as_string(name)
            what = tf.where(tf.equal(shown, ""), tf.constant("image"),
                            tf.strings.join(["image ", shown]))
        message = tf.strings.join([what, ": ", reason])
        with tf.control_dependencies([tf.debugging.Assert(False, [message])]):
            return tf.constant(False)

    return tf.cond(tf.equal(header["problem"], header_lib.OK), lambda: tf.constant(True), refuse)


def decode_image(data: tf.Tensor, max_pixels=None, name=None) -> tf.Tensor:
    """Decodes JPEG/PNG/GIF/BMP/WebP bytes to an RGB uint8 [H, W, 3], as the pre-flight sees them.

    Args:
        data: the encoded bytes (a scalar string tensor).
        max_pixels: refuse images whose header claims more pixels; None: no limit.
        name: what the refusal message calls the image (an index or a path
            tensor); None: "image".

    Raises:
        tf.errors.InvalidArgumentError: "assertion failed: [image NAME: REASON]"
            when the header is refused (see `refusal_reason`); a decoder's
            own error for bytes that are corrupt past a sound header.
    """
    if name is not None:
        name = tf.convert_to_tensor(name)
    header = header_lib.read_header(data, max_pixels)
    with tf.control_dependencies([_refusal(data, header, max_pixels, name)]):
        data = tf.identity(data)
    branches = [lambda: tf.zeros([1, 1, 3], tf.uint8),
                lambda: _jpeg(data, header), lambda: _png(data, header),
                lambda: _gif(data, header), lambda: _first_frame(data),
                lambda: _webp(data, header)]
    image = tf.switch_case(header["kind"], branches)
    image.set_shape([None, None, 3])
    return image


def decode_and_resize(data: tf.Tensor, size: int, max_pixels=None, name=None) -> tf.Tensor:
    """Encoded bytes -> size x size RGB uint8 (`decode_image`, then `resize_image`)."""
    return resize_image(decode_image(data, max_pixels, name), size)


# No limit on the pixels a header may claim (the training pipelines': the
# pre-flight scan already refused what --max_pixels refuses).
NO_PIXEL_LIMIT = 2 ** 62


@tf.function(input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([], tf.int64),
                              tf.TensorSpec([], tf.string)], autograph=False)
def _decode_traced(data, max_pixels, name):
    return decode_image(data, max_pixels, name)


def decode_traced(data, max_pixels=NO_PIXEL_LIMIT, name="") -> tf.Tensor:
    """`decode_image` through one function traced once per process.

    The pre-flight scan, every training pipeline and `predict` decode with
    it: tracing the decoder (every format's branch, the header checks) took
    about 0.4 s each time. (The SavedModel traces its own, for its graph.)

    Args:
        data: the encoded bytes (a scalar string tensor or bytes).
        max_pixels: as `decode_image` (an int or an int64 scalar tensor).
        name: what a refusal calls the image (a path); "": "image".
    """
    return _decode_traced(data, tf.cast(max_pixels, tf.int64), name)


def decode_bytes(data: bytes, max_pixels: int = NO_PIXEL_LIMIT):
    """`decode_image` on Python bytes (`decode_traced`): RGB uint8 numpy array.

    Raises:
        tf.errors.InvalidArgumentError: as `decode_image`.
    """
    return decode_traced(tf.constant(data), int(max_pixels)).numpy()


def refusal_reason(error: Exception) -> str:
    """The one-line reason in a refusal or decoder error, without TensorFlow's graph text.

    "... assertion failed: [image 3: empty (0 bytes)] ..." -> "image 3: empty (0 bytes)";
    for a decoder's error, its own message (the line before the failing node).
    """
    text = getattr(error, "message", None) or str(error)
    found = re.search(r"assertion failed: \[(.*?)\]\s*(?:\n|$)", text, re.S)
    if found:
        return " ".join(found.group(1).split())
    lines = [line.strip() for line in text.splitlines()]
    for i, line in enumerate(lines):
        if line.startswith("[[") and i and lines[i - 1]:
            return " ".join(lines[i - 1].split())[:200]
    for line in lines:
        line = re.sub(r"\{\{function_node [^}]*\}\}|\{\{node [^}]*\}\}|\[Op:[^\]]*\]", "",
                      line).strip()
        if line and not line.startswith(("Graph execution error", "Detected at node",
                                         "<stack traces", "[[", "File ")):
            return " ".join(line.split())[:200]
    return "could not be decoded"
