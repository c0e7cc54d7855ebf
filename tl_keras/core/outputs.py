"""Safe writing of run outputs.

Every file or folder is written under a temporary name in the same directory
and renamed into place, so an interrupted run never leaves a truncated file
and never replaces a good one with a partial one.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile

from tl_keras.errors import fail, one_line

# Temporaries are named TMP_PREFIX + writer's pid + "." + ..., next to their target.
TMP_PREFIX = ".tmp"
_TMP_NAME = re.compile(r"^\.tmp(\d+)\.(.+)$")


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
    # Named like atomic_path's temporaries, so clean_temporaries finds those
    # a killed process left behind.
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f"{TMP_PREFIX}{os.getpid()}.",
                               suffix="." + os.path.basename(path))
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


def read_json_object(path: str) -> dict:
    """The JSON object a run file holds (report.json, config.json, ...).

    Raises:
        ValueError: one line naming the file and the cause, the parser's own
            message kept: unreadable, not JSON, or JSON but not an object.
    """
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read {name}: {one_line(e, 200)}") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{name} is not valid JSON: {one_line(e, 200)}") from None
    if not isinstance(obj, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
            type(obj), "a number")
        raise ValueError(f"{name} holds {kind}, not a JSON object") from None
    return obj


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
    tmp = os.path.join(d, f"{TMP_PREFIX}{os.getpid()}.{os.path.basename(path)}")
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


def check_free_space(path: str, need_bytes: int, what: str, flag: str = "output_dir") -> None:
    """Stops with one line when the file system of `path` has less than `need_bytes` free.

    Args:
        path: an existing folder on the file system to check.
        need_bytes: the estimated space the run will write there.
        what: what needs the space, for the message.
        flag: the flag that chose `path`.
    """
    free = shutil.disk_usage(path).free
    if free < need_bytes:
        raise fail(flag, path, f"only {_mb(free)} free there, {what} need about {_mb(need_bytes)}; "
                   "free some space or choose another folder")


def _mb(n: int) -> str:
    return f"{n / 2 ** 20:.0f} MB" if n < 2 ** 30 else f"{n / 2 ** 30:.1f} GB"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return True


def clean_temporaries(folder: str) -> list[str]:
    """Removes the temporaries that killed writers left under `folder`.

    A writer killed between the two renames of a folder replacement (see
    `atomic_path`) leaves its complete new folder and the previous one set
    aside, with nothing at the target: the new one is moved into place.
    Temporaries of live processes are left alone.

    Returns:
        The paths removed or moved into place.
    """
    done = []
    if not os.path.isdir(folder):
        return done
    for root, dirs, files in os.walk(folder, topdown=True):
        dead = {}
        for name in dirs + files:
            m = _TMP_NAME.match(name)
            if m and not _pid_alive(int(m.group(1))):
                dead[name] = m
        # First the folders set aside by an interrupted replacement.
        for name, m in list(dead.items()):
            p = os.path.join(root, name)
            if not (name.endswith(".old") and os.path.isdir(p)):
                continue
            new_name = name[:-len(".old")]
            target = os.path.join(root, m.group(2)[:-len(".old")])
            if new_name in dead and not os.path.lexists(target):
                os.replace(os.path.join(root, new_name), target)
                dead.pop(new_name)
                done.append(target)
        for name in dead:
            p = os.path.join(root, name)
            if os.path.lexists(p):
                _remove(p)
                done.append(p)
        dirs[:] = [d for d in dirs if d not in dead and not d.startswith(TMP_PREFIX)]
    return done
