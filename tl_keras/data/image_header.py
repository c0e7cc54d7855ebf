"""What an encoded image's header says, read with TensorFlow string ops (no decoding).

`read_header` runs inside the graph (the tf.data pipelines and the exported
model's bytes signature), so the size of an image is known before its pixels
are allocated: a decompression bomb (a 1 MB PNG that decodes to 768 MB) is
refused from its header, and empty, truncated and non-image bytes get a
reason instead of a decoder's error. It also reads what decoding needs that
TensorFlow's decoders do not do by themselves: a JPEG's EXIF orientation, a
PNG's bit depth and colour type, whether a WebP has alpha, and where a GIF's
transparent colour is.

Formats: JPEG (the SOF segment), PNG (IHDR), GIF (the logical screen), BMP
(BITMAPINFOHEADER and later, 24/32 bits uncompressed: what TensorFlow's BMP
decoder reads correctly) and WebP (VP8, VP8L, VP8X). Everything is bounds
checked: bytes are read through `_bytes`, which pads past the end with zeros.
"""

from __future__ import annotations

import tensorflow as tf

# Format ids (`Header.kind`): 0 is "not an image we decode".
UNKNOWN, JPEG, PNG, GIF, BMP, WEBP = range(6)
FORMAT_NAMES = ("unknown", "JPEG", "PNG", "GIF", "BMP", "WebP")

# Problem codes (`Header.problem`); `describe_problem` turns them into words.
OK, EMPTY, NOT_IMAGE, TRUNCATED_HEADER, TRUNCATED, CORRUPT, UNSUPPORTED, ZERO_SIZE, \
    TOO_MANY_PIXELS = range(9)

# The JPEG markers that start a frame (SOF0-3, 5-7, 9-11, 13-15): they hold the size.
_SOF_MARKERS = (0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF)
_EXIF_ORIENTATION = 0x0112
# At most this many IFD0 entries are searched for the orientation (real files: 5-20).
_MAX_IFD_ENTRIES = 256
# Segment / block walks stop after this many steps (a real header needs tens).
_MAX_STEPS = 4096


class Header(dict):
    """The header fields, all scalar tensors (a dict so tf control flow can carry it).

    Keys:
        kind: int32 format id (JPEG, PNG, ...).
        width, height: int64, from the header (0 when unknown).
        problem: int32 problem code (OK when the bytes may be decoded).
        orientation: int32 EXIF orientation of a JPEG (1..8; 1 when absent).
        png_depth, png_color: int32 IHDR bit depth and colour type.
        channels: int32 WebP channels to decode (3, or 4 with alpha / animation).
        gif_flag_pos: int32 byte offset of the first frame's Graphic Control
            Extension flags when its transparency flag is set, else -1.
        gif_color_pos: int32 byte offset of that transparent colour's palette
            entry, else -1.
        detail: int64 a number for the problem's message (BMP bits per pixel).
    """


_FIELDS = {"kind": tf.int32, "width": tf.int64, "height": tf.int64, "problem": tf.int32,
           "orientation": tf.int32, "png_depth": tf.int32, "png_color": tf.int32,
           "channels": tf.int32, "gif_flag_pos": tf.int32, "gif_color_pos": tf.int32,
           "detail": tf.int64}


def _header(**values) -> Header:
    defaults = {"orientation": 1, "channels": 3, "gif_flag_pos": -1, "gif_color_pos": -1}
    return Header({k: tf.cast(values.get(k, defaults.get(k, 0)), dtype)
                   for k, dtype in _FIELDS.items()})


def _bytes(data: tf.Tensor, pos, count: int) -> tf.Tensor:
    """`count` bytes of `data` from `pos` as int32, zeros past the end (or before 0)."""
    n = tf.strings.length(data)
    pos = tf.cast(pos, tf.int32)
    inside = tf.strings.substr(data, tf.clip_by_value(pos, 0, n), count)
    inside = tf.where(pos < 0, tf.constant(b""), inside)
    padded = tf.strings.join([inside, tf.constant(b"\0" * count)])
    raw = tf.io.decode_raw(tf.strings.substr(padded, 0, count), tf.uint8)
    return tf.reshape(tf.cast(raw, tf.int32), [count])


def _u16be(b, i):
    return b[i] * 256 + b[i + 1]


def _u16le(b, i):
    return b[i] + b[i + 1] * 256


def _u32be(b, i):
    b = tf.cast(b, tf.int64)
    return ((b[i] * 256 + b[i + 1]) * 256 + b[i + 2]) * 256 + b[i + 3]


def _u32le(b, i):
    b = tf.cast(b, tf.int64)
    return ((b[i + 3] * 256 + b[i + 2]) * 256 + b[i + 1]) * 256 + b[i]


def _is(b, start: int, expected: bytes):
    return tf.reduce_all(tf.equal(b[start:start + len(expected)], list(expected)))


def _ends_with_or_contains(data: tf.Tensor, start, marker: bytes):
    """Whether `marker` occurs in `data` from byte `start` on.

    The common case (the marker is the last bytes) costs one substr; else the
    rest of the data is split on the marker (a copy, only for odd files).
    """
    n = tf.strings.length(data)
    k = len(marker)
    at_end = tf.logical_and(n - k >= start,
                            tf.equal(tf.strings.substr(data, tf.maximum(n - k, 0), k), marker))

    def search():
        rest = tf.strings.substr(data, tf.clip_by_value(tf.cast(start, tf.int32), 0, n), n)
        parts = tf.strings.split(rest, sep=marker)
        return tf.size(parts) > 1

    return tf.cond(at_end, lambda: tf.constant(True), search)


# --------------------------------------------------------------------------
# JPEG: walk the marker segments up to the first scan
# --------------------------------------------------------------------------

def _jpeg(data: tf.Tensor, n: tf.Tensor) -> Header:
    # state: pos, width, height, exif_pos, exif_len, status (0 walking, 1 at
    # the scan, 2 corrupt, 3 end of image before a scan), steps
    sof = tf.constant(_SOF_MARKERS, tf.int32)

    def step(pos, width, height, exif_pos, exif_len, status, steps):
        b = _bytes(data, pos, 10)
        marker = b[1]
        is_ff = tf.equal(b[0], 0xFF)
        fill = tf.logical_and(is_ff, tf.equal(marker, 0xFF))
        standalone = tf.logical_and(is_ff, tf.logical_or(
            tf.logical_and(marker >= 0xD0, marker <= 0xD7), tf.equal(marker, 0x01)))
        seg_len = _u16be(b, 2)
        is_sof = tf.logical_and(is_ff, tf.reduce_any(tf.equal(marker, sof)))
        first_sof = tf.logical_and(is_sof, height < 0)
        height = tf.where(first_sof, tf.cast(_u16be(b, 5), tf.int64), height)
        width = tf.where(first_sof, tf.cast(_u16be(b, 7), tf.int64), width)
        # The first APP1 segment that starts "Exif\0\0" (as Pillow reads it).
        exif = tf.logical_and(tf.logical_and(is_ff, tf.equal(marker, 0xE1)),
                              tf.logical_and(exif_pos < 0, _is(b, 4, b"Exif\0\0")))
        exif_pos = tf.where(exif, pos + 10, exif_pos)
        exif_len = tf.where(exif, seg_len - 8, exif_len)
        segment = tf.logical_not(tf.logical_or(fill, standalone))
        status = tf.where(tf.logical_not(is_ff), 2, status)
        status = tf.where(tf.logical_and(segment, tf.logical_and(is_ff, seg_len < 2)), 2, status)
        status = tf.where(tf.logical_and(is_ff, tf.equal(marker, 0xDA)), 1, status)
        status = tf.where(tf.logical_and(is_ff, tf.equal(marker, 0xD9)), 3, status)
        pos = tf.where(fill, pos + 1, tf.where(standalone, pos + 2, pos + 2 + seg_len))
        return pos, width, height, exif_pos, exif_len, status, steps + 1

    def walking(pos, width, height, exif_pos, exif_len, status, steps):
        # A marker and its length must be there (zeros past the end are no marker).
        return tf.logical_and(tf.logical_and(tf.equal(status, 0), pos + 4 <= n),
                              steps < _MAX_STEPS)

    # At the scan (status 1) `pos` is past the scan header: the entropy-coded data.
    state = (tf.constant(2), tf.constant(-1, tf.int64), tf.constant(-1, tf.int64),
             tf.constant(-1), tf.constant(0), tf.constant(0), tf.constant(0))
    pos, width, height, exif_pos, exif_len, status, _ = tf.while_loop(walking, step, state)
    problem = tf.where(tf.equal(status, 2), CORRUPT, OK)
    problem = tf.where(tf.logical_or(tf.equal(status, 0), tf.equal(status, 3)),
                       TRUNCATED_HEADER, problem)
    problem = tf.where(tf.logical_and(tf.equal(status, 1), height < 0), CORRUPT, problem)

    def complete():
        # A JPEG ends with the end-of-image marker after its scans; a cut
        # download does not (trailing bytes after it are allowed, as decoders allow).
        return tf.where(_ends_with_or_contains(data, pos, b"\xff\xd9"), OK, TRUNCATED)

    problem = tf.cond(tf.equal(problem, OK), complete, lambda: problem)
    orientation = tf.cond(exif_pos >= 0, lambda: _exif_orientation(data, exif_pos, exif_len),
                          lambda: tf.constant(1))
    return _header(kind=JPEG, width=tf.maximum(width, 0), height=tf.maximum(height, 0),
                   problem=problem, orientation=orientation)


def _exif_orientation(data: tf.Tensor, start: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """The orientation tag (0x0112) of IFD0 of the TIFF structure at `start` (1 if none).

    Both byte orders ("II" little-endian, "MM" big-endian); the value is a
    SHORT (or a LONG, which some writers use). Entries outside the APP1
    segment are not read; a value outside 1..8 counts as 1, as in Pillow.
    """
    head = _bytes(data, start, 8)
    little = _is(head, 0, b"II*\0")
    big = _is(head, 0, b"MM\0*")

    def u16(b, i):
        return tf.where(little, b[..., i] + b[..., i + 1] * 256, b[..., i] * 256 + b[..., i + 1])

    def u32(b, i):
        return tf.where(little, u16(b, i) + u16(b, i + 2) * 65536,
                        u16(b, i) * 65536 + u16(b, i + 2))

    ifd = tf.cast(tf.where(little, _u32le(head, 4), _u32be(head, 4)), tf.int32)
    count = u16(_bytes(data, start + ifd, 2), 0)
    count = tf.clip_by_value(count, 0, _MAX_IFD_ENTRIES)
    valid = tf.logical_and(tf.logical_or(little, big), tf.logical_and(
        ifd >= 8, ifd + 2 + count * 12 <= length))
    entries = tf.reshape(_bytes(data, start + ifd + 2, _MAX_IFD_ENTRIES * 12),
                         [_MAX_IFD_ENTRIES, 12])
    used = tf.range(_MAX_IFD_ENTRIES) < count
    kind = u16(entries, 2)
    value = tf.where(tf.equal(kind, 4), u32(entries, 8), u16(entries, 8))
    match = tf.logical_and(used, tf.logical_and(tf.equal(u16(entries, 0), _EXIF_ORIENTATION),
                                                tf.logical_or(tf.equal(kind, 3),
                                                              tf.equal(kind, 4))))
    # The last such entry wins, as when Pillow fills its dict in order.
    last = tf.reduce_max(tf.where(match, tf.range(_MAX_IFD_ENTRIES), -1))
    orientation = tf.gather(value, tf.maximum(last, 0))
    ok = tf.logical_and(tf.logical_and(valid, last >= 0),
                        tf.logical_and(orientation >= 1, orientation <= 8))
    return tf.where(ok, orientation, 1)


# --------------------------------------------------------------------------
# PNG, GIF, BMP, WebP
# --------------------------------------------------------------------------

def _png(data: tf.Tensor, n: tf.Tensor) -> Header:
    b = _bytes(data, 0, 33)
    problem = tf.where(n < 33, TRUNCATED_HEADER,
                       tf.where(_is(b, 12, b"IHDR"), OK, CORRUPT))
    problem = tf.cond(tf.equal(problem, OK),
                      lambda: tf.where(_ends_with_or_contains(data, 33, b"IEND"), OK,
                                       TRUNCATED),
                      lambda: problem)
    return _header(kind=PNG, width=_u32be(b, 16), height=_u32be(b, 20), problem=problem,
                   png_depth=b[24], png_color=b[25])


def _gif(data: tf.Tensor, n: tf.Tensor) -> Header:
    b = _bytes(data, 0, 13)
    two = tf.constant(2)
    table_size = tf.where(b[10] >= 128, 3 * tf.bitwise.left_shift(two, b[10] % 8), 0)

    # Walk the blocks to the first image descriptor, noting the Graphic
    # Control Extension before it. state: pos, in_sub_blocks, flag_pos,
    # transparent index, status (0 walking, 1 at the image, 2 corrupt), steps.
    def step(pos, sub, flag_pos, index, image_pos, status, steps):
        c = _bytes(data, pos, 4)

        def block():
            is_ext = tf.equal(c[0], 0x21)
            gce = tf.logical_and(tf.logical_and(is_ext, tf.equal(c[1], 0xF9)),
                                 tf.equal(c[2], 4))
            gce_bits = _bytes(data, pos + 3, 4)
            transparent = tf.logical_and(gce, tf.equal(gce_bits[0] % 2, 1))
            new_flag = tf.where(gce, tf.where(transparent, pos + 3, -1), flag_pos)
            new_index = tf.where(gce, gce_bits[3], index)
            is_image = tf.equal(c[0], 0x2C)
            new_status = tf.where(is_image, 1, tf.where(is_ext, 0, 2))
            return (tf.where(is_ext, pos + 2, pos), is_ext, new_flag, new_index,
                    tf.where(is_image, pos, image_pos), new_status)

        def sub_block():
            size = c[0]
            return (pos + 1 + size, size > 0, flag_pos, index, image_pos, status)

        pos, sub, flag_pos, index, image_pos, status = tf.cond(sub, sub_block, block)
        return pos, sub, flag_pos, index, image_pos, status, steps + 1

    def walking(pos, sub, flag_pos, index, image_pos, status, steps):
        return tf.logical_and(tf.logical_and(tf.equal(status, 0), pos < n), steps < _MAX_STEPS)

    state = (13 + table_size, tf.constant(False), tf.constant(-1), tf.constant(0),
             tf.constant(-1), tf.constant(0), tf.constant(0))
    _, _, flag_pos, index, image_pos, status, _ = tf.while_loop(walking, step, state)
    d = _bytes(data, image_pos + 9, 1)
    local = tf.logical_and(image_pos >= 0, d[0] >= 128)
    local_size = 3 * tf.bitwise.left_shift(two, d[0] % 8)
    color_pos = tf.where(local, image_pos + 10 + 3 * index, 13 + 3 * index)
    in_table = tf.where(local, 3 * index + 3 <= local_size, 3 * index + 3 <= table_size)
    has_transparency = tf.logical_and(flag_pos >= 0, in_table)
    problem = tf.where(n < 13, TRUNCATED_HEADER, OK)
    problem = tf.where(tf.logical_and(tf.equal(problem, OK), tf.equal(status, 2)), CORRUPT,
                       problem)
    problem = tf.where(tf.logical_and(tf.equal(problem, OK), tf.equal(status, 0)),
                       TRUNCATED_HEADER, problem)
    # A GIF ends with its trailer byte (";"); a cut download does not.
    last = _bytes(data, n - 1, 1)
    problem = tf.where(tf.logical_and(tf.equal(problem, OK), tf.not_equal(last[0], 0x3B)),
                       TRUNCATED, problem)
    return _header(kind=GIF, width=_u16le(b, 6), height=_u16le(b, 8), problem=problem,
                   gif_flag_pos=tf.where(has_transparency, flag_pos, -1),
                   gif_color_pos=tf.where(has_transparency, color_pos, -1))


def _bmp(data: tf.Tensor, n: tf.Tensor) -> Header:
    b = _bytes(data, 0, 34)
    offset, dib = _u32le(b, 10), _u32le(b, 14)
    width = _u32le(b, 18)
    height = _u32le(b, 22)
    height = tf.where(height >= 2 ** 31, 2 ** 32 - height, height)  # top-down rows
    bits = tf.cast(_u16le(b, 28), tf.int64)
    compression = _u32le(b, 30)
    row = (bits * width + 31) // 32 * 4
    problem = tf.where(n < 34, TRUNCATED_HEADER, OK)
    supported = tf.logical_and(tf.logical_and(dib >= 40, width < 2 ** 31),
                               tf.logical_and(tf.logical_or(tf.equal(bits, 24),
                                                            tf.equal(bits, 32)),
                                              tf.equal(compression, 0)))
    problem = tf.where(tf.logical_and(tf.equal(problem, OK), tf.logical_not(supported)),
                       UNSUPPORTED, problem)
    problem = tf.where(tf.logical_and(tf.equal(problem, OK),
                                      tf.cast(n, tf.int64) < offset + row * height),
                       TRUNCATED, problem)
    return _header(kind=BMP, width=tf.where(width < 2 ** 31, width, 0), height=height,
                   problem=problem, detail=bits)


def _webp(data: tf.Tensor, n: tf.Tensor) -> Header:
    b = _bytes(data, 0, 30)
    riff_size = _u32le(b, 4)
    vp8 = _is(b, 12, b"VP8 ")
    lossless = _is(b, 12, b"VP8L")
    extended = _is(b, 12, b"VP8X")
    bits = _u32le(b, 21)
    width = tf.where(vp8, tf.cast(_u16le(b, 26) % 16384, tf.int64),
                     tf.where(lossless, bits % 16384 + 1,
                              tf.cast(b[24] + b[25] * 256 + b[26] * 65536 + 1, tf.int64)))
    height = tf.where(vp8, tf.cast(_u16le(b, 28) % 16384, tf.int64),
                      tf.where(lossless, bits // 16384 % 16384 + 1,
                               tf.cast(b[27] + b[28] * 256 + b[29] * 65536 + 1, tf.int64)))
    # What libwebp's WebPGetFeatures reports, which TensorFlow's decoder needs
    # as its channel count: alpha (the VP8L hint bit or the VP8X flag) or an
    # animation (decoded as RGBA only).
    alpha = tf.where(lossless, tf.equal(bits // 2 ** 28 % 2, 1),
                     tf.logical_and(extended, tf.bitwise.bitwise_and(b[20], 0x12) > 0))
    known = tf.logical_or(tf.logical_and(vp8, _is(b, 23, b"\x9d\x01\x2a")),
                          tf.logical_or(tf.logical_and(lossless, tf.equal(b[20], 0x2F)),
                                        extended))
    problem = tf.where(n < 30, TRUNCATED_HEADER, tf.where(known, OK, UNSUPPORTED))
    problem = tf.where(tf.logical_and(tf.equal(problem, OK),
                                      tf.cast(n, tf.int64) < riff_size + 8), TRUNCATED, problem)
    return _header(kind=WEBP, width=width, height=height, problem=problem,
                   channels=tf.where(alpha, 4, 3))


def _unknown(data: tf.Tensor, n: tf.Tensor) -> Header:
    return _header(kind=UNKNOWN, problem=tf.where(tf.equal(n, 0), EMPTY, NOT_IMAGE))


def sniff(data: tf.Tensor) -> tf.Tensor:
    """The format id (int32) of encoded bytes, from their signature."""
    b = _bytes(data, 0, 12)
    return tf.cast(tf.where(
        _is(b, 0, b"\xff\xd8\xff"), JPEG, tf.where(
            _is(b, 0, b"\x89PNG\r\n\x1a\n"), PNG, tf.where(
                tf.logical_or(_is(b, 0, b"GIF87a"), _is(b, 0, b"GIF89a")), GIF, tf.where(
                    _is(b, 0, b"BM"), BMP, tf.where(
                        tf.logical_and(_is(b, 0, b"RIFF"), _is(b, 8, b"WEBP")), WEBP,
                        UNKNOWN))))), tf.int32)


def read_header(data: tf.Tensor, max_pixels=None) -> Header:
    """Reads the header of one encoded image (a scalar string tensor).

    Args:
        data: the encoded bytes.
        max_pixels: images with more pixels (width x height from the header)
            get the problem TOO_MANY_PIXELS; None: no limit.

    Returns:
        A `Header`; its `problem` is OK when the bytes may be decoded.
    """
    n = tf.strings.length(data)
    kind = sniff(data)
    branches = [_unknown, _jpeg, _png, _gif, _bmp, _webp]
    header = Header(tf.switch_case(kind, [lambda f=f: f(data, n) for f in branches]))
    ok = tf.equal(header["problem"], OK)
    empty = tf.logical_or(tf.equal(header["width"], 0), tf.equal(header["height"], 0))
    header["problem"] = tf.where(tf.logical_and(ok, empty), ZERO_SIZE, header["problem"])
    if max_pixels is not None:
        over = header["width"] * header["height"] > tf.cast(max_pixels, tf.int64)
        header["problem"] = tf.where(tf.logical_and(tf.equal(header["problem"], OK), over),
                                     TOO_MANY_PIXELS, header["problem"])
    return header


# (Python values: a tensor made at import would start TensorFlow's runtime
# before the run configures its devices.)
_HEX = [f"{i:02x}" for i in range(256)]


def describe_problem(data: tf.Tensor, header: Header, max_pixels=None) -> tf.Tensor:
    """Why the bytes are refused, in words (a string tensor); for the refusal message."""
    n = tf.strings.length(data)
    fmt = tf.gather(tf.constant(FORMAT_NAMES), header["kind"])
    size = tf.strings.join([tf.strings.as_string(header["width"]), "x",
                            tf.strings.as_string(header["height"])])

    def not_image():
        head = _bytes(data, 0, 32)
        shown = tf.minimum(n, 32)
        printable = tf.logical_or(tf.logical_and(head >= 32, head < 127),
                                  tf.reduce_any(tf.equal(head[:, None], [9, 10, 13]), axis=1))
        text = tf.reduce_all(tf.logical_or(printable, tf.range(32) >= shown))
        snippet = tf.strings.regex_replace(tf.strings.substr(data, 0, shown), r"\s+", " ")
        hex_head = tf.strings.reduce_join(
            tf.gather(tf.constant(_HEX), head[:tf.minimum(n, 8)]), separator=" ")
        return tf.cond(text,
                       lambda: tf.strings.join(["not an image: looks like text: ", snippet]),
                       lambda: tf.strings.join(["not an image: not JPEG, PNG, GIF, BMP or WebP "
                                                "(starts with ", hex_head, ")"]))

    def num(x):
        return tf.strings.as_string(x)

    cap = tf.constant(-1, tf.int64) if max_pixels is None else tf.cast(max_pixels, tf.int64)
    pixels = header["width"] * header["height"]
    unsupported = tf.where(tf.equal(header["kind"], BMP),
                           tf.strings.join(["unsupported BMP (", num(header["detail"]),
                                            " bits per pixel or compressed)"]),
                           tf.strings.join(["unsupported ", fmt]))
    words = [
        lambda: tf.constant("no problem"),
        lambda: tf.constant("empty (0 bytes)"),
        not_image,
        lambda: tf.strings.join(["truncated ", fmt, " header (", num(n), " bytes)"]),
        lambda: tf.strings.join(["truncated ", fmt, ": the data ends before the image does (",
                                 num(n), " bytes)"]),
        lambda: tf.strings.join(["corrupt ", fmt, " header"]),
        lambda: tf.strings.join([unsupported, "; send JPEG, PNG or WebP"]),
        lambda: tf.strings.join([fmt, " of ", size, " pixels: an empty image"]),
        # (No quotes in these words: tf.debugging.Assert would escape them.)
        lambda: tf.strings.join([size, " = ", num(pixels), " pixels is over --max_pixels=",
                                 num(cap), " (decompression bomb?); not decoded"]),
    ]
    return tf.switch_case(header["problem"], words)
