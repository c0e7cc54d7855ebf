"""A grid of titled thumbnails drawn with Pillow (the audit's pictures).

The audit shows up to 16 photos a picture, three pictures a run. Drawn as
matplotlib figures they took about 1 s each (laying out 16 axes and encoding
a 1200x1400 figure); pasted and captioned with Pillow the same grid takes a
few tens of milliseconds, which keeps the audit cheap next to the caching
pass it shares with training.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence

from tl_keras.core import outputs

CELL = 240  # thumbnail box, pixels
COLUMNS = 4
LINE = 16  # caption line height, pixels
PAD = 8


def _thumbnail(item, size: int):
    from PIL import Image, ImageOps

    try:
        src = item if isinstance(item, str) else io.BytesIO(bytes(item))
        with Image.open(src) as img:
            img = ImageOps.exif_transpose(img).convert("RGB")
            img.thumbnail((size, size))
            return img
    except (OSError, ValueError):  # unreadable: the cell says so
        return None


def grid_png(items: Sequence, titles: Sequence[str], path: str, title: str) -> str:
    """Writes `items` (paths or encoded bytes) as a grid, each above its (multi-line) title.

    Args:
        items: the images.
        titles: one caption per image ("\\n" between lines).
        path: the PNG to write.
        title: the picture's heading.

    Returns:
        `path`.
    """
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default(size=13)
    head = ImageFont.load_default(size=16)
    n = len(items)
    cols = max(1, min(COLUMNS, n))
    rows = max(1, math.ceil(n / cols))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    cell_w, cell_h = CELL + PAD, CELL + lines * LINE + 2 * PAD
    top = 2 * LINE + PAD
    canvas = Image.new("RGB", (cols * cell_w + PAD, top + rows * cell_h), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((PAD, PAD), title, fill="black", font=head)
    for k, (item, text) in enumerate(zip(items, titles)):
        x, y = PAD + (k % cols) * cell_w, top + (k // cols) * cell_h
        img = _thumbnail(item, CELL)
        if img is None:
            draw.text((x + PAD, y + CELL // 2), "(unreadable)", fill="black", font=font)
        else:
            canvas.paste(img, (x + (CELL - img.width) // 2, y + (CELL - img.height) // 2))
        draw.multiline_text((x, y + CELL + 4), text, fill="darkred", font=font, spacing=3)
    with outputs.atomic_path(path) as tmp:
        canvas.save(tmp, format="PNG", compress_level=1)
    return path
