"""Files a user hands us that someone else may have made.

* Model files (`.keras`) are loaded in Keras's safe mode: a Lambda layer (or
  any other serialized Python code) is refused with one line, never run
  (`tl_keras.model.model_files.load_model`).
* List files (CSV/TSV of image paths) may only name images inside the list's
  own folder unless --allow_external_paths: a downloaded list cannot make a
  run read (and report thumbnails of) arbitrary files such as ~/.ssh/id_rsa.

Image pixel counts are capped before decoding by the data pre-flight
(--max_pixels), not here.
"""
from __future__ import annotations

import os

from tl_keras.errors import fail



def check_inside(path: str, root: str, flag: str, value: str = "", allow: bool = False,
                 where: str = "") -> str:
    """Checks that `path` stays inside the folder `root`; returns it resolved.

    Symbolic links and `..` are resolved first, so a link inside `root` that
    points outside counts as outside.

    Args:
        path: the path as the list gives it (relative paths are taken from `root`).
        root: the folder it must stay inside (the list file's folder).
        flag: the flag that named the list, for the message.
        value: that flag's value (the list file); default: `root`.
        allow: the value of --allow_external_paths (True skips the check).
        where: where in the list the path is, e.g. "line 12", for the message.

    Returns:
        The absolute path (not resolved through links, so reports show what
        the list said).

    Raises:
        ConfigError: one line naming the list, the line and the path.
    """
    full = path if os.path.isabs(path) else os.path.join(root, path)
    full = os.path.abspath(full)
    if allow:
        return full
    real_root = os.path.realpath(root)
    real = os.path.realpath(full)
    if os.path.commonpath([real_root, real]) != real_root:
        at = f"{where}: " if where else ""
        raise fail(flag, value or root,
                   f"{at}{path!r} points outside the list's folder {real_root!r}; move the "
                   "images under it or pass --allow_external_paths if you trust the list")
    return full
