"""Numeric precision policy, chosen once before any model is built.

`auto` picks what is fast and safe on the device at hand:
bfloat16 on GPUs of compute capability 8.0 or newer (Ampere, Hopper: no loss
scaling needed), float16 with loss scaling on older GPUs, float32 on CPU
(CPUs gain little from reduced precision in Keras and lose accuracy).
The classifier's head always computes and outputs float32.
"""

from __future__ import annotations

import keras
import tensorflow as tf

from tl_keras.errors import fail

POLICIES = ("auto", "float32", "mixed_float16", "mixed_bfloat16")


def gpu_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of the first visible GPU, or None without a GPU."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return None
    details = tf.config.experimental.get_device_details(gpus[0])
    cc = details.get("compute_capability")
    return tuple(cc) if cc else (0, 0)


def resolve(name: str, compute_capability: tuple[int, int] | None = ...) -> str:
    """Maps a --precision value to a Keras dtype policy name.

    Args:
        name: one of POLICIES.
        compute_capability: the GPU's (major, minor), None for no GPU; by
            default the first visible GPU is asked.

    Returns:
        "float32", "mixed_float16" or "mixed_bfloat16".
    """
    if name not in POLICIES:
        raise fail("precision", name, "choose one of " + ", ".join(POLICIES))
    if name != "auto":
        return name
    cc = gpu_compute_capability() if compute_capability is ... else compute_capability
    if cc is None:
        return "float32"
    return "mixed_bfloat16" if cc >= (8, 0) else "mixed_float16"


def apply(name: str) -> str:
    """Sets Keras's global dtype policy from a --precision value; returns the policy."""
    policy = resolve(name)
    keras.mixed_precision.set_global_policy(policy)
    return policy


def describe_device() -> str:
    """A short name of the device training runs on, e.g. 'GPU (NVIDIA H100, cc 9.0)'."""
    gpus = tf.config.list_physical_devices("GPU")
    if not gpus:
        return "CPU"
    d = tf.config.experimental.get_device_details(gpus[0])
    cc = d.get("compute_capability")
    name = d.get("device_name", "GPU")
    return f"GPU x{len(gpus)} ({name}" + (f", cc {cc[0]}.{cc[1]})" if cc else ")")
