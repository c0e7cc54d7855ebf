"""tl_keras: fast, correct, ready-to-serve transfer learning with Keras 3.

Typical use::

    from tl_keras import Config, run_training
    report = run_training(Config(data="photos/", backbone="mobilenet_v2",
                                 weights="imagenet", output_dir="out"))
"""

__version__ = "0.1.0"

from tl_keras.config import Config  # noqa: E402,F401
from tl_keras.errors import ConfigError  # noqa: E402,F401


def run_training(config):
    """Runs the two-stage pipeline; see `tl_keras.run.image.train`."""
    from tl_keras.run import image as pipeline

    return pipeline.train(config)
