"""Safe writing of run outputs.

Every file or folder is written under a temporary name in the same directory
and renamed into place, so an interrupted run never leaves a truncated file
and never replaces a good one with a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile

from tl_keras.config import fail


def ensure_writable_dir(path: str, flag: str = "output_dir") -> str:
    """Creates `path` if needed and checks it can be written; ConfigError if not."""
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write_check_"):
            pass
    except OSError as e:
        raise fail(flag, path, f"cannot write there: {e.strerror or e}") from None
    return path


def atomic_write_text(path: str, text: str) -> None:
    """Writes `text` to `path` through a temporary file and a rename."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix="." + os.path.basename(path) + ".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp creates 0600; give the file the permissions a plain open() would.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def atomic_write_json(path: str, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o):
    import numpy as np

    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")


@contextlib.contextmanager
def atomic_path(path: str):
    """Yields a temporary path next to `path`; on success renames it into place.

    Works for files and folders. An existing `path` is replaced only after the
    new one is complete; on error the temporary is removed and `path` is
    left as it was.
    """
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    # The temporary keeps the extension (Keras insists on ".keras").
    tmp = os.path.join(d, f".tmp{os.getpid()}.{os.path.basename(path)}")
    _remove(tmp)
    try:
        yield tmp
        if os.path.isdir(path) and os.path.isdir(tmp):
            old = tmp + ".old"
            _remove(old)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        _remove(tmp)
        raise


def _remove(p: str) -> None:
    if os.path.isdir(p) and not os.path.islink(p):
        shutil.rmtree(p, ignore_errors=True)
    elif os.path.lexists(p):
        os.unlink(p)
