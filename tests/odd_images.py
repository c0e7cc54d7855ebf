"""Bad and odd image files, made with Pillow from real photos.

Used by the pre-flight and serving tests and by `benchmarks/dirty_flowers.py`.
Each kind says what the scan must decide ("skipped", "converted" or "ok") and
a piece of the reason it must give, and, for usable kinds, the RGB pixels a
person sees (what training must get). "ok" kinds are decoded by the model's
own decoder (`tl_keras.data.decode`), in training and when served; "converted"
kinds are formats it does not read (the server refuses them).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps, features

EXIF_ORIENTATION = 0x0112


@dataclasses.dataclass
class Odd:
    """One generated file."""

    kind: str
    path: Path
    status: str  # what the scan must decide
    reason: str  # a piece of the reason it must give ("" for a plain ok)
    expected: Optional[np.ndarray] = None  # RGB a person sees, for usable kinds
    tolerance: float = 0.0  # allowed mean |diff| against `expected` (lossy formats)


def _rgb(photo: Path) -> Image.Image:
    return Image.open(photo).convert("RGB")


def _jpeg(im: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    im.save(b, "JPEG", quality=95, **kw)
    return b.getvalue()


def _png(im: Image.Image) -> bytes:
    b = io.BytesIO()
    im.save(b, "PNG")
    return b.getvalue()


def _with_png_size(png: bytes, width: int, height: int) -> bytes:
    """The same PNG with the header claiming another size (CRC fixed)."""
    assert png[12:16] == b"IHDR"
    ihdr = b"IHDR" + struct.pack(">II", width, height) + png[24:29]
    return png[:8] + struct.pack(">I", 13) + ihdr + struct.pack(">I", zlib.crc32(ihdr)) + png[33:]


def zero_byte(photo: Path, dst: Path) -> Odd:
    p = dst.with_suffix(".jpg")
    p.write_bytes(b"")
    return Odd("zero_byte", p, "skipped", "empty file (0 bytes)")


def truncated_jpeg(photo: Path, dst: Path) -> Odd:
    raw = _jpeg(_rgb(photo))
    p = dst.with_suffix(".jpg")
    p.write_bytes(raw[: len(raw) // 2])
    return Odd("truncated_jpeg", p, "skipped", "truncated or corrupt JPEG")


def corrupt_png(photo: Path, dst: Path) -> Odd:
    raw = bytearray(_png(_rgb(photo)))
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(64)  # zeroes in the middle of the compressed data
    p = dst.with_suffix(".png")
    p.write_bytes(bytes(raw))
    return Odd("corrupt_png", p, "skipped", "truncated or corrupt PNG")


def text_named_jpg(photo: Path, dst: Path) -> Odd:
    p = dst.with_suffix(".jpg")
    p.write_text("<html><body>404 Not Found</body></html>\n")
    return Odd("text_named_jpg", p, "skipped", "not an image: looks like text")


def decompression_bomb(photo: Path, dst: Path) -> Odd:
    # A real photo's PNG whose header claims 50000 x 50000 pixels.
    p = dst.with_suffix(".png")
    p.write_bytes(_with_png_size(_png(_rgb(photo).resize((64, 64))), 50000, 50000))
    return Odd("decompression_bomb", p, "skipped", "over --max_pixels")


def tiff(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    p = dst.with_suffix(".tif")
    im.save(p, "TIFF")
    return Odd("tiff", p, "converted", "TensorFlow cannot decode it", np.asarray(im))


def cmyk_jpeg(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    p = dst.with_suffix(".jpg")
    p.write_bytes(_jpeg(im.convert("CMYK")))
    # TensorFlow may or may not get CMYK right; either way training must see
    # the photo's colours, so only the pixels are checked, not the status.
    return Odd("cmyk_jpeg", p, "", "", np.asarray(im), tolerance=4.0)


def png_16bit(photo: Path, dst: Path) -> Odd:
    gray = np.asarray(_rgb(photo).convert("L"))
    p = dst.with_suffix(".png")
    Image.fromarray(gray.astype(np.uint16) * 257).save(p, "PNG")
    return Odd("png_16bit", p, "ok", "16-bit", np.repeat(gray[..., None], 3, axis=2),
               tolerance=0.5)


def palette_png(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    p = dst.with_suffix(".png")
    im.save(p, "PNG")
    return Odd("palette_png", p, "ok", "palette", np.asarray(im.convert("RGB")), tolerance=0.5)


def rgba_png(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    a = np.full((im.height, im.width), 255, np.uint8)
    a[:, : im.width // 2] = 0  # left half fully transparent
    rgba = np.dstack([np.asarray(im), a])
    rgba[:, : im.width // 2, :3] = 0  # what editors often leave under alpha 0: black
    p = dst.with_suffix(".png")
    Image.fromarray(rgba, "RGBA").save(p, "PNG")
    expected = np.asarray(im).copy()
    expected[:, : im.width // 2] = 255  # composited on white
    return Odd("rgba_png", p, "ok", "composited on white", expected, tolerance=0.5)


def grayscale_jpeg(photo: Path, dst: Path) -> Odd:
    g = _rgb(photo).convert("L")
    p = dst.with_suffix(".jpg")
    p.write_bytes(_jpeg(g))
    ref = np.asarray(Image.open(p).convert("RGB"))
    return Odd("grayscale_jpeg", p, "ok", "grayscale", ref, tolerance=1.5)


def animated_gif(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    frames = [im, im.transpose(Image.Transpose.FLIP_LEFT_RIGHT), im.rotate(180)]
    p = dst.with_suffix(".gif")
    frames[0].save(p, "GIF", save_all=True, append_images=frames[1:], duration=100, loop=0)
    first = np.asarray(Image.open(p).convert("RGB"))
    return Odd("animated_gif", p, "ok", "first of 3 frames", first, tolerance=1.0)


def _upright(path: Path) -> np.ndarray:
    # What a viewer shows: Pillow's decoding, turned as the EXIF tag says (the
    # tolerance then covers two JPEG decoders, not the JPEG compression).
    return np.asarray(ImageOps.exif_transpose(Image.open(path)).convert("RGB"))


def exif_rotated_jpeg(photo: Path, dst: Path) -> Odd:
    upright = _rgb(photo)
    # Stored sideways (turned 90 degrees counter-clockwise); EXIF orientation 6
    # tells viewers to turn it back clockwise, as phone cameras do.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    p = dst.with_suffix(".jpg")
    p.write_bytes(_jpeg(stored, exif=exif.tobytes()))
    return Odd("exif_rotated_jpeg", p, "ok", "EXIF orientation 6", _upright(p), tolerance=2.0)


# What ImageOps.exif_transpose does for each orientation; each is undone by
# the one named here, which is how the stored image is made from the upright one.
_UNDO = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180,
         4: Image.Transpose.FLIP_TOP_BOTTOM, 5: Image.Transpose.TRANSPOSE,
         6: Image.Transpose.ROTATE_90, 7: Image.Transpose.TRANSVERSE,
         8: Image.Transpose.ROTATE_270}


def _exif_oriented(orientation: int) -> Callable[[Path, Path], Odd]:
    def make(photo: Path, dst: Path) -> Odd:
        upright = _rgb(photo)
        exif = Image.Exif()
        exif[EXIF_ORIENTATION] = orientation
        p = dst.with_suffix(".jpg")
        p.write_bytes(_jpeg(upright.transpose(_UNDO[orientation]), exif=exif.tobytes()))
        return Odd(f"exif_orientation_{orientation}", p, "ok", f"EXIF orientation {orientation}",
                   _upright(p), tolerance=2.0)

    make.__name__ = f"exif_orientation_{orientation}"
    return make


def _half_transparent(im: Image.Image) -> np.ndarray:
    a = np.full((im.height, im.width), 255, np.uint8)
    a[:, : im.width // 3] = 0           # fully transparent
    a[:, im.width // 3: im.width // 2] = 96  # partly
    return a


def _on_white(rgb: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    src = Image.fromarray(np.dstack([rgb, alpha]), "RGBA")
    return np.asarray(Image.alpha_composite(Image.new("RGBA", src.size, "white"), src)
                      .convert("RGB"))


def la_png(photo: Path, dst: Path) -> Odd:
    gray = np.asarray(_rgb(photo).convert("L"))
    a = _half_transparent(_rgb(photo))
    p = dst.with_suffix(".png")
    Image.fromarray(np.dstack([gray, a]), "LA").save(p, "PNG")
    return Odd("la_png", p, "ok", "composited on white",
               _on_white(np.repeat(gray[..., None], 3, axis=2), a), tolerance=0.0)


def palette_transparent_png(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    idx = np.asarray(im).copy()
    idx[:, : im.width // 3] = 255  # a palette entry marked transparent (tRNS)
    pal = Image.fromarray(idx, "P")
    pal.putpalette(im.getpalette()[:765] + [0, 0, 0])
    p = dst.with_suffix(".png")
    pal.save(p, "PNG", transparency=255)
    expected = np.asarray(Image.open(p).convert("RGB")).copy()
    expected[:, : im.width // 3] = 255
    return Odd("palette_transparent_png", p, "ok", "composited on white", expected,
               tolerance=0.0)


def transparent_gif(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=255)
    idx = np.asarray(im).copy()
    idx[: im.height // 3] = 255
    gif = Image.fromarray(idx, "P")
    gif.putpalette(im.getpalette()[:765] + [10, 200, 10])  # a colour never shown
    p = dst.with_suffix(".gif")
    gif.save(p, "GIF", transparency=255)
    expected = np.asarray(Image.open(p).convert("RGB")).copy()
    expected[: im.height // 3] = 255
    return Odd("transparent_gif", p, "ok", "composited on white", expected, tolerance=0.0)


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_16bit_rgba(photo: Path, dst: Path) -> Odd:
    """A 16-bit RGBA PNG (Pillow cannot write one: the file is assembled here)."""
    rgb = np.asarray(_rgb(photo)).astype(np.uint16)
    a = _half_transparent(_rgb(photo)).astype(np.uint16)
    # Low bytes that differ from the high ones: reducing by rounding and by
    # dropping the low byte give different pixels.
    deep = (np.dstack([rgb, a]) * 256 + 77).astype(">u2")
    rows = b"".join(b"\0" + row.tobytes() for row in deep)
    h, w = rgb.shape[:2]
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    png = (b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
           + _png_chunk(b"IDAT", zlib.compress(rows)) + _png_chunk(b"IEND", b""))
    p = dst.with_suffix(".png")
    p.write_bytes(png)
    return Odd("png_16bit_rgba", p, "ok", "composited on white",
               _on_white(rgb.astype(np.uint8), a.astype(np.uint8)), tolerance=0.0)


def bmp(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    p = dst.with_suffix(".bmp")
    im.save(p, "BMP")
    return Odd("bmp", p, "ok", "", np.asarray(im))


def palette_bmp(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo).convert("P", palette=Image.Palette.ADAPTIVE, colors=256)
    p = dst.with_suffix(".bmp")
    im.save(p, "BMP")
    return Odd("palette_bmp", p, "converted", "TensorFlow cannot decode it",
               np.asarray(im.convert("RGB")))


def webp(photo: Path, dst: Path) -> Odd:
    p = dst.with_suffix(".webp")
    _rgb(photo).save(p, "WEBP", quality=90)
    return Odd("webp", p, "ok", "", np.asarray(Image.open(p).convert("RGB")), tolerance=0.5)


def webp_alpha(photo: Path, dst: Path) -> Odd:
    im = _rgb(photo)
    a = _half_transparent(im)
    p = dst.with_suffix(".webp")
    Image.fromarray(np.dstack([np.asarray(im), a]), "RGBA").save(p, "WEBP", lossless=True)
    return Odd("webp_alpha", p, "ok", "composited on white", _on_white(np.asarray(im), a),
               tolerance=0.0)


def heic(photo: Path, dst: Path) -> Odd:
    import pillow_heif

    pillow_heif.register_heif_opener()
    p = dst.with_suffix(".heic")
    _rgb(photo).save(p, "HEIF", quality=90)
    return Odd("heic", p, "converted", "TensorFlow cannot decode it",
               np.asarray(Image.open(p).convert("RGB")), tolerance=0.0)


def avif(photo: Path, dst: Path) -> Odd:
    p = dst.with_suffix(".avif")
    _rgb(photo).save(p, "AVIF", quality=90)
    return Odd("avif", p, "converted", "TensorFlow cannot decode it",
               np.asarray(Image.open(p).convert("RGB")), tolerance=0.0)


KINDS: list[Callable[[Path, Path], Odd]] = [
    zero_byte, truncated_jpeg, corrupt_png, text_named_jpg, decompression_bomb, tiff, cmyk_jpeg,
    png_16bit, palette_png, rgba_png, grayscale_jpeg, animated_gif, exif_rotated_jpeg,
    *(_exif_oriented(o) for o in (2, 3, 4, 5, 7, 8)), la_png, palette_transparent_png,
    transparent_gif, png_16bit_rgba, bmp, palette_bmp, webp, webp_alpha, heic,
    *([avif] if features.check("avif") else [])]


def png_bomb(path: Path, side: int = 16000) -> Path:
    """A valid side x side RGB PNG of one colour: about 1 MB that decodes to side^2 x 3 bytes.

    Written row by row, so making it never holds the pixels.
    """
    z = zlib.compressobj(9)
    row = b"\0" + b"\x80" * (3 * side)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n"
                     + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0))
                     + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b""))
    return path


def make_odd_files(photos: list[Path], folder: Path, prefix: str = "odd") -> list[Odd]:
    """Writes one file of every kind into `folder`, each from the next photo."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, make in enumerate(KINDS):
        photo = photos[i % len(photos)]
        out.append(make(photo, folder / f"{prefix}_{make.__name__}_{i}"))
    return out
