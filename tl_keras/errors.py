"""The error every bad setting raises: one line that names the flag and value.

Imports nothing from tl_keras, so every layer can raise it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting. Its message is one line that names the flag and value."""


def fail(flag: str, value, why: str) -> "ConfigError":
    """Returns a ConfigError whose one-line message names the flag and value."""
    return ConfigError(f"--{flag}={value!r}: {why}")


def one_line(e: BaseException, limit: int = 300) -> str:
    """`Type: message` of an exception on one line (whitespace collapsed), at most `limit` chars."""
    text = " ".join(str(e).split())
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


def network_failure(e: BaseException):
    """The exception in `e`'s chain (itself, its causes and contexts) that says a
    network request failed, or None when none does.

    By type, never by wording: a connection refused or reset, a name that
    does not resolve, a timeout, a URL that cannot be opened, an HTTP error
    (urllib's, or any from `requests`/`urllib3`), TFDS's DownloadError.
    """
    import socket
    import urllib.error

    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        module = type(e).__module__ or ""
        if (isinstance(e, (ConnectionError, TimeoutError, socket.gaierror, urllib.error.URLError))
                or module.split(".")[0] in ("requests", "urllib3")
                or (type(e).__name__ == "DownloadError"
                    and module.startswith("tensorflow_datasets"))):
            return e
        e = e.__cause__ or e.__context__
    return None
