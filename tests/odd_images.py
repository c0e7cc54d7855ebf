"""Bad and odd image files, made with Pillow from real photos.

Used by the pre-flight tests and by `benchmarks/dirty_flowers.py`. Each kind
says what the scan must decide ("skipped", "converted" or "ok") and a piece
of the reason it must give, and, for usable kinds, the RGB pixels a person
sees (what training must get).
"""

from __future__ import annotations

import dataclasses
import io
import struct
import zlib
from pathlib import Path
from typing import Callable, Optional

import numpy as np
from PIL import Image

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
    return Odd("rgba_png", p, "converted", "composited on white", expected, tolerance=0.5)


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


def exif_rotated_jpeg(photo: Path, dst: Path) -> Odd:
    upright = _rgb(photo)
    # Stored sideways (turned 90 degrees counter-clockwise); EXIF orientation 6
    # tells viewers to turn it back clockwise, as phone cameras do.
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[EXIF_ORIENTATION] = 6
    p = dst.with_suffix(".jpg")
    p.write_bytes(_jpeg(stored, exif=exif.tobytes()))
    return Odd("exif_rotated_jpeg", p, "converted", "EXIF orientation 6", np.asarray(upright),
               tolerance=4.0)


KINDS: list[Callable[[Path, Path], Odd]] = [
    zero_byte, truncated_jpeg, corrupt_png, text_named_jpg, decompression_bomb, tiff, cmyk_jpeg,
    png_16bit, palette_png, rgba_png, grayscale_jpeg, animated_gif, exif_rotated_jpeg]


def make_odd_files(photos: list[Path], folder: Path, prefix: str = "odd") -> list[Odd]:
    """Writes one file of every kind into `folder`, each from the next photo."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i, make in enumerate(KINDS):
        photo = photos[i % len(photos)]
        out.append(make(photo, folder / f"{prefix}_{make.__name__}_{i}"))
    return out
