"""The error every bad setting raises: one line that names the flag and value.

Imports nothing from tl_keras, so every layer can raise it.
"""

from __future__ import annotations


class ConfigError(ValueError):
    """A bad setting. Its message is one line that names the flag and value."""


def fail(flag: str, value, why: str) -> "ConfigError":
    """Returns a ConfigError whose one-line message names the flag and value."""
    return ConfigError(f"--{flag}={value!r}: {why}")
