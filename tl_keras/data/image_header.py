"""What an encoded image's header says, read with TensorFlow string ops (no decoding).

`read_header` runs inside the graph (the tf.data pipelines and the exported
model's bytes signature), so the size of an image is known before its pixels
are allocated: a decompression bomb (a 1 MB PNG that decodes to 768 MB) is
refused from its header, and empty, truncated and non-image bytes get a
reason instead of a decoder's error. It also reads what decoding needs that
TensorFlow's decoders do not do by themselves: a JPEG's EXIF orientation, a
PNG's bit depth and colour type, whether a WebP has alpha, and where a GIF's
transparent colour is.

Formats: JPEG (the SOF segment, through libjpeg's header reader), PNG
(IHDR), GIF (the logical screen), BMP (BITMAPINFOHEADER and later, 24/32 bits
uncompressed: what TensorFlow's BMP decoder reads correctly) and WebP (VP8,
VP8L, VP8X). Everything is bounds
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

_EXIF_ORIENTATION = 0x0112
# At most this many IFD0 entries are searched for the orientation (real files: 5-20).
_MAX_IFD_ENTRIES = 256
# The GIF block walk stops after this many steps (a real header needs a few).
_MAX_STEPS = 4096


class Header(dict):
    """The header fields, all scalar tensors.

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


def _bytes(data: tf.Tensor, pos, count: int) -> tf.Tensor:
    """`count` bytes of `data` from `pos` (clipped to the data) as int32, zeros past the end."""
    n = tf.strings.length(data)
    inside = tf.strings.substr(data, tf.clip_by_value(tf.cast(pos, tf.int32), 0, n), count)
    padded = tf.strings.join([inside, tf.constant(b"\0" * count)])
    raw = tf.io.decode_raw(tf.strings.substr(padded, 0, count), tf.uint8)
    return tf.reshape(tf.cast(raw, tf.int32), [count])


# Header checks run for every image of every training pipeline and request,
# and TensorFlow sets up their graph again for each tf.data iterator, so they
# are written to make few graph nodes: numbers are read by one gather from all
# the numbers a header holds (`_numbers`), signatures compared as one matrix
# (`_matches`), and branches kept to format-specific or rare steps.

def _numbers(b: tf.Tensor) -> tf.Tensor:
    """Bytes `b` [L] and the LE/BE 16- and 32-bit numbers at each offset, as one int64 vector."""
    b = tf.cast(b, tf.int64)
    le16 = b[:-1] + b[1:] * 256
    be16 = b[:-1] * 256 + b[1:]
    return tf.concat([b, le16, be16, le16[:-2] + le16[2:] * 65536,
                      be16[:-2] * 65536 + be16[2:]], 0)


def _read(numbers: tf.Tensor, length: int, wanted: list) -> list:
    """The numbers `wanted` ([(kind, offset)], kind one of u8 le16 be16 le32 be32) of `_numbers`."""
    base = {"u8": 0, "le16": length, "be16": 2 * length - 1, "le32": 3 * length - 2,
            "be32": 4 * length - 5}
    return tf.unstack(tf.gather(numbers, [base[k] + i for k, i in wanted]), len(wanted))


def _matches(b: tf.Tensor, patterns: list) -> tf.Tensor:
    """For each of `patterns` ([{offset: bytes}]): whether `b` holds those bytes (bool [P])."""
    size = int(b.shape[0])
    want = [[0] * size for _ in patterns]
    mask = [[False] * size for _ in patterns]
    for row, pattern in enumerate(patterns):
        for offset, expected in pattern.items():
            for i, value in enumerate(expected):
                want[row][offset + i], mask[row][offset + i] = value, True
    return tf.reduce_all(tf.logical_or(tf.equal(b[None, :], want),
                                       tf.logical_not(tf.constant(mask))), axis=1)


# The signatures (first bytes) of the formats decoded, and each one's id.
_SIGNATURES = [({0: b"\xff\xd8\xff"}, JPEG), ({0: b"\x89PNG\r\n\x1a\n"}, PNG),
               ({0: b"GIF87a"}, GIF), ({0: b"GIF89a"}, GIF), ({0: b"BM"}, BMP),
               ({0: b"RIFF", 8: b"WEBP"}, WEBP)]


def _kind(b: tf.Tensor) -> tf.Tensor:
    """The format id (int32) from the first 12 (or more) bytes."""
    found = _matches(b[:12], [p for p, _ in _SIGNATURES])
    kinds = tf.constant([k for _, k in _SIGNATURES], tf.int32)
    return tf.where(tf.reduce_any(found), tf.gather(kinds, tf.argmax(tf.cast(found, tf.int32))),
                    UNKNOWN)


def sniff(data: tf.Tensor) -> tf.Tensor:
    """The format id (int32) of encoded bytes, from their signature."""
    return _kind(_bytes(data, 0, 12))


def _exif_orientation(data: tf.Tensor, start: tf.Tensor, length: tf.Tensor) -> tf.Tensor:
    """The orientation tag (0x0112) of IFD0 of the TIFF structure at `start` (1 if none).

    Both byte orders ("II" little-endian, "MM" big-endian); the value is a
    SHORT (or a LONG, which some writers use). Entries outside the APP1
    segment are not read; a value outside 1..8 counts as 1, as in Pillow.
    """
    head = _bytes(data, start, 8)
    little, big = tf.unstack(_matches(head, [{0: b"II*\0"}, {0: b"MM\0*"}]), 2)
    le_ifd, be_ifd = _read(_numbers(head), 8, [("le32", 4), ("be32", 4)])
    ifd = tf.cast(tf.where(little, le_ifd, be_ifd), tf.int32)
    # IFD0: its entry count, then 12-byte entries: tag, type, count, value.
    block = tf.reshape(_bytes(data, start + ifd, 2 + _MAX_IFD_ENTRIES * 12 + 10),
                       [-1, 2])  # byte pairs: [entry count, entries...]
    pairs = tf.where(little, block[:, 0] + block[:, 1] * 256, block[:, 0] * 256 + block[:, 1])
    count = tf.clip_by_value(pairs[0], 0, _MAX_IFD_ENTRIES)
    entries = tf.reshape(pairs[1:1 + _MAX_IFD_ENTRIES * 6], [_MAX_IFD_ENTRIES, 6])
    tag, kind, value_lo, value_hi = (entries[:, 0], entries[:, 1], entries[:, 4],
                                     entries[:, 5])
    # A SHORT is the first two bytes of the value field; a LONG all four.
    value = tf.where(tf.equal(kind, 4),
                     tf.where(little, value_lo + value_hi * 65536, value_lo * 65536 + value_hi),
                     value_lo)
    used = tf.range(_MAX_IFD_ENTRIES) < count
    match = tf.logical_and(tf.logical_and(used, tf.equal(tag, _EXIF_ORIENTATION)),
                           tf.logical_or(tf.equal(kind, 3), tf.equal(kind, 4)))
    # The last such entry wins, as when Pillow fills its dict in order.
    last = tf.reduce_max(tf.where(match, tf.range(_MAX_IFD_ENTRIES), -1))
    orientation = tf.gather(value, tf.maximum(last, 0))
    valid = tf.logical_and(tf.logical_or(little, big),
                           tf.logical_and(ifd >= 8, ifd + 2 + count * 12 <= length))
    ok = tf.logical_and(tf.logical_and(valid, last >= 0),
                        tf.logical_and(orientation >= 1, orientation <= 8))
    return tf.where(ok, orientation, 1)


def _jpeg_exif(data: tf.Tensor):
    """(start, length) of the TIFF data of a JPEG's Exif APP1 segment; start -1 if none.

    The Exif segment comes first, or after a JFIF APP0 (cameras and phones
    write it there; Pillow reads the first Exif segment, wherever it is).
    """
    first = _bytes(data, 2, 10)
    first_len = first[2] * 256 + first[3]
    second_pos = 4 + first_len
    second = _bytes(data, second_pos, 10)
    exif = {0: b"\xff\xe1", 4: b"Exif\0\0"}
    exif_first, app0 = tf.unstack(_matches(first, [exif, {0: b"\xff\xe0"}]), 2)
    exif_second = tf.logical_and(app0, _matches(second, [exif])[0])
    start = tf.where(exif_first, 12, tf.where(exif_second, second_pos + 10, -1))
    length = tf.where(exif_first, first_len, second[2] * 256 + second[3]) - 8
    return start, length


def _contains(data: tf.Tensor, start, marker: bytes) -> tf.Tensor:
    """Whether `marker` occurs in `data` from byte `start` on (splits a copy of it)."""
    n = tf.strings.length(data)
    rest = tf.strings.substr(data, tf.clip_by_value(tf.cast(start, tf.int32), 0, n), n)
    return tf.size(tf.strings.split(rest, sep=marker)) > 1


def _gif_transparency(data: tf.Tensor, n: tf.Tensor, table_size: tf.Tensor):
    """Walks a GIF's blocks to its first image; returns (flag_pos, color_pos, status).

    flag_pos: the offset of the first frame's Graphic Control Extension flags
    when its transparency flag is set, else -1; color_pos: the offset of the
    transparent colour's palette entry (local table, else global), else -1;
    status: 1 at the image, 2 corrupt, 0 the data ended first.
    """
    # state: pos, in sub-blocks, flag_pos, transparent index, image_pos, status, steps
    def step(pos, sub, flag_pos, index, image_pos, status, steps):
        c = tf.unstack(_bytes(data, pos, 7), 7)
        # In sub-blocks: skip one (its size byte first; size 0 ends them).
        # Else a block: an extension (0x21: its sub-blocks follow its label),
        # the image descriptor (0x2C: done) or anything else (corrupt).
        block = tf.logical_not(sub)
        is_ext = tf.logical_and(block, tf.equal(c[0], 0x21))
        is_image = tf.logical_and(block, tf.equal(c[0], 0x2C))
        gce = tf.logical_and(is_ext, tf.logical_and(tf.equal(c[1], 0xF9), tf.equal(c[2], 4)))
        flag_pos = tf.where(gce, tf.where(tf.equal(c[3] % 2, 1), pos + 3, -1), flag_pos)
        index = tf.where(gce, c[6], index)
        image_pos = tf.where(is_image, pos, image_pos)
        status = tf.where(sub, status, tf.where(is_image, 1, tf.where(is_ext, 0, 2)))
        next_pos = tf.where(sub, pos + 1 + c[0], tf.where(is_ext, pos + 2, pos))
        in_sub = tf.where(sub, c[0] > 0, is_ext)
        return next_pos, in_sub, flag_pos, index, image_pos, status, steps + 1

    def walking(pos, sub, flag_pos, index, image_pos, status, steps):
        return tf.logical_and(tf.logical_and(tf.equal(status, 0), pos < n), steps < _MAX_STEPS)

    state = (13 + table_size, tf.constant(False), tf.constant(-1), tf.constant(0),
             tf.constant(-1), tf.constant(0), tf.constant(0))
    _, _, flag_pos, index, image_pos, status, _ = tf.while_loop(walking, step, state)
    packed = _bytes(data, image_pos + 9, 1)[0]
    local = tf.logical_and(image_pos >= 0, packed >= 128)
    local_size = 3 * tf.bitwise.left_shift(tf.constant(2), packed % 8)
    color_pos = tf.where(local, image_pos + 10 + 3 * index, 13 + 3 * index)
    in_table = 3 * index + 3 <= tf.where(local, local_size, table_size)
    transparent = tf.logical_and(flag_pos >= 0, in_table)
    return (tf.where(transparent, flag_pos, -1), tf.where(transparent, color_pos, -1),
            status)


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
    n64 = tf.cast(n, tf.int64)
    b = _bytes(data, 0, 34)
    kind = _kind(b)
    is_jpeg, is_png, is_gif = tf.equal(kind, JPEG), tf.equal(kind, PNG), tf.equal(kind, GIF)
    # Each format's fixed-offset fields, all read at once (one is kept). PNG:
    # IHDR. GIF: the logical screen, the global colour table's flags. BMP:
    # BITMAPINFOHEADER (a height over 2^31 is negative: rows top-down). WebP:
    # the first chunk (VP8: a key frame's size; VP8L: packed bits; VP8X: the
    # canvas, 24-bit numbers).
    (png_w, png_h, png_depth, png_color, gif_w, gif_h, gif_flags, bmp_offset, bmp_dib, bmp_w,
     bmp_h, bmp_bits, bmp_compression, riff_size, vp8_w, vp8_h, vp8l_bits, vp8x_w, vp8x_w_hi,
     vp8x_h, vp8x_h_hi, vp8x_flags, vp8l_signature) = _read(_numbers(b), 34, [
        ("be32", 16), ("be32", 20), ("u8", 24), ("u8", 25), ("le16", 6), ("le16", 8),
        ("u8", 10), ("le32", 10), ("le32", 14), ("le32", 18), ("le32", 22), ("le16", 28),
        ("le32", 30), ("le32", 4), ("le16", 26), ("le16", 28), ("le32", 21), ("le16", 24),
        ("u8", 26), ("le16", 27), ("u8", 29), ("u8", 20), ("u8", 20)])
    ihdr, vp8, vp8l, vp8x, vp8_key = tf.unstack(_matches(b, [
        {12: b"IHDR"}, {12: b"VP8 "}, {12: b"VP8L"}, {12: b"VP8X"}, {23: b"\x9d\x01\x2a"}]), 5)
    bmp_h = tf.where(bmp_h >= 2 ** 31, 2 ** 32 - bmp_h, bmp_h)
    webp_w = tf.where(vp8, vp8_w % 16384,
                      tf.where(vp8l, vp8l_bits % 16384, vp8x_w + vp8x_w_hi * 65536) + 1)
    webp_h = tf.where(vp8, vp8_h % 16384,
                      tf.where(vp8l, vp8l_bits // 16384 % 16384, vp8x_h + vp8x_h_hi * 65536) + 1)
    # What libwebp's WebPGetFeatures reports, which TensorFlow's decoder needs
    # as its channel count: alpha (the VP8L hint bit, the VP8X flag) or an
    # animation (decoded as RGBA only).
    webp_alpha = tf.where(vp8l, tf.equal(vp8l_bits // 2 ** 28 % 2, 1),
                          tf.logical_and(vp8x, vp8x_flags // 2 % 2 + vp8x_flags // 16 % 2 > 0))
    webp_known = tf.logical_or(tf.logical_and(vp8, vp8_key), tf.logical_or(
        tf.logical_and(vp8l, tf.equal(vp8l_signature, 0x2F)), vp8x))
    gif_table = tf.cast(tf.where(gif_flags >= 128, 3 * 2 ** (gif_flags % 8 + 1), 0), tf.int32)
    bmp_supported = tf.logical_and(
        tf.logical_and(bmp_dib >= 40, bmp_w < 2 ** 31),
        tf.logical_and(tf.logical_or(tf.equal(bmp_bits, 24), tf.equal(bmp_bits, 32)),
                       tf.equal(bmp_compression, 0)))
    bmp_row = (bmp_bits * bmp_w + 31) // 32 * 4

    # Whole files end with an end marker: a JPEG's end-of-image marker after
    # its scans, a PNG's IEND chunk, a GIF's trailer byte; a cut download does
    # not. Usually they are the last bytes; else (trailing bytes, which
    # decoders allow) the data after the header is searched, skipping a JPEG's
    # Exif segment (its thumbnail has an end marker of its own).
    exif_start, exif_len = _jpeg_exif(data)
    exif_start = tf.where(is_jpeg, exif_start, -1)
    ends = _matches(_bytes(data, n - 12, 12), [{10: b"\xff\xd9"}, {4: b"IEND"}, {11: b";"}])
    at_end = tf.gather(tf.concat([[True], ends, [True, True]], 0), kind)
    search = tf.logical_and(tf.logical_or(is_jpeg, is_png), tf.logical_not(at_end))
    after_exif = tf.where(exif_start >= 0, exif_start + exif_len, 2)
    found = tf.cond(search, lambda: tf.where(is_jpeg, _contains(data, after_exif, b"\xff\xd9"),
                                             _contains(data, 33, b"IEND")),
                    lambda: tf.constant(False))
    complete = tf.logical_or(at_end, found)

    # A JPEG's size: libjpeg's header reader (jpeg_read_header: the SOFn
    # segment, no pixels), once the bytes are known to be whole.
    jpeg_shape = tf.cond(tf.logical_and(is_jpeg, complete),
                         lambda: tf.io.extract_jpeg_shape(data, tf.int64),
                         lambda: tf.zeros([3], tf.int64))
    orientation = tf.cond(exif_start >= 0,
                          lambda: _exif_orientation(data, exif_start, exif_len),
                          lambda: tf.constant(1))
    gif_flag, gif_color, gif_status = tf.cond(
        tf.logical_and(is_gif, n >= 13), lambda: _gif_transparency(data, n, gif_table),
        lambda: (tf.constant(-1), tf.constant(-1), tf.constant(2)))

    def by_kind(unknown, jpeg, png, gif, bmp, webp):
        return tf.gather(tf.stack([unknown, jpeg, png, gif, bmp, webp]), kind)

    zero = tf.constant(0, tf.int64)
    width = by_kind(zero, jpeg_shape[1], png_w, gif_w, tf.where(bmp_w < 2 ** 31, bmp_w, 0),
                    webp_w)
    height = by_kind(zero, jpeg_shape[0], png_h, gif_h, bmp_h, webp_h)
    whole = tf.where(complete, OK, TRUNCATED)
    problem = by_kind(
        tf.where(tf.equal(n, 0), EMPTY, NOT_IMAGE),
        whole,
        tf.where(n < 33, TRUNCATED_HEADER, tf.where(ihdr, whole, CORRUPT)),
        tf.where(n < 13, TRUNCATED_HEADER, tf.gather([TRUNCATED_HEADER, whole, CORRUPT],
                                                     gif_status)),
        tf.where(n < 34, TRUNCATED_HEADER, tf.where(
            bmp_supported, tf.where(n64 < bmp_offset + bmp_row * bmp_h, TRUNCATED, OK),
            UNSUPPORTED)),
        tf.where(n < 30, TRUNCATED_HEADER, tf.where(
            webp_known, tf.where(n64 < riff_size + 8, TRUNCATED, OK), UNSUPPORTED)))
    empty = tf.logical_or(tf.equal(width, 0), tf.equal(height, 0))
    problem = tf.where(tf.logical_and(tf.equal(problem, OK), empty), ZERO_SIZE, problem)
    if max_pixels is not None:
        over = width * height > tf.cast(max_pixels, tf.int64)
        problem = tf.where(tf.logical_and(tf.equal(problem, OK), over), TOO_MANY_PIXELS,
                           problem)
    return Header(kind=kind, width=width, height=height, problem=tf.cast(problem, tf.int32),
                  orientation=orientation, png_depth=tf.cast(png_depth, tf.int32),
                  png_color=tf.cast(png_color, tf.int32), channels=tf.where(webp_alpha, 4, 3),
                  gif_flag_pos=gif_flag, gif_color_pos=gif_color, detail=bmp_bits)


# (Python values: a tensor made at import would start TensorFlow's runtime
# before the run configures its devices.)
_HEX = [f"{i:02x}" for i in range(256)]


def describe_problem(data: tf.Tensor, header: Header, max_pixels=None) -> tf.Tensor:
    """Why the bytes are refused, in words (a string tensor); for the refusal message.

    Straight-line string ops, run only when an image is refused.
    """
    n = tf.strings.length(data)
    fmt = tf.gather(tf.constant(FORMAT_NAMES), header["kind"])

    def num(x):
        return tf.strings.as_string(x)

    size = tf.strings.join([num(header["width"]), "x", num(header["height"])])
    head = _bytes(data, 0, 32)
    shown = tf.minimum(n, 32)
    printable = tf.logical_or(tf.logical_and(head >= 32, head < 127),
                              tf.reduce_any(tf.equal(head[:, None], [9, 10, 13]), axis=1))
    text = tf.reduce_all(tf.logical_or(printable, tf.range(32) >= shown))
    snippet = tf.strings.regex_replace(tf.strings.substr(data, 0, shown), r"\s+", " ")
    hex_head = tf.strings.reduce_join(tf.gather(tf.constant(_HEX), head[:tf.minimum(n, 8)]),
                                      separator=" ")
    not_image = tf.where(text, tf.strings.join(["not an image: looks like text: ", snippet]),
                         tf.strings.join(["not an image: not JPEG, PNG, GIF, BMP or WebP "
                                          "(starts with ", hex_head, ")"]))
    cap = tf.constant(-1, tf.int64) if max_pixels is None else tf.cast(max_pixels, tf.int64)
    unsupported = tf.where(tf.equal(header["kind"], BMP),
                           tf.strings.join(["unsupported BMP (", num(header["detail"]),
                                            " bits per pixel or compressed)"]),
                           tf.strings.join(["unsupported ", fmt]))
    # One phrase per problem code. (No quotes in them: tf.debugging.Assert
    # would escape them in the message.)
    words = tf.stack([
        tf.constant("no problem"),
        tf.constant("empty (0 bytes)"),
        not_image,
        tf.strings.join(["truncated ", fmt, " header (", num(n), " bytes)"]),
        tf.strings.join(["truncated ", fmt, ": the data ends before the image does (", num(n),
                         " bytes)"]),
        tf.strings.join(["corrupt ", fmt, " header"]),
        tf.strings.join([unsupported, "; send JPEG, PNG or WebP"]),
        tf.strings.join([fmt, " of ", size, " pixels: an empty image"]),
        tf.strings.join([size, " = ", num(header["width"] * header["height"]),
                         " pixels is over --max_pixels=", num(cap),
                         " (decompression bomb?); not decoded"]),
    ])
    return tf.gather(words, header["problem"])
