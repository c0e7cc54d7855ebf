"""The package's layering (README: "How the code is laid out"), checked by import-linter.

The contracts live in pyproject.toml ([tool.importlinter]): a package imports
only the packages below it, and no modules import each other in a cycle.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_imports_point_one_way_with_no_cycles():
    exe = shutil.which("lint-imports")
    assert exe, "lint-imports is missing: pip install -e '.[test]' installs import-linter"
    # The repository's own package, whatever is installed elsewhere.
    env = {"PYTHONPATH": str(REPO), "PATH": str(Path(sys.executable).parent) + ":/usr/bin:/bin"}
    run = subprocess.run([exe, "--config", str(REPO / "pyproject.toml")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "Contracts: 2 kept, 0 broken." in run.stdout, run.stdout[-2000:]


def test_the_library_never_reads_flags():
    # Only the CLI defines and reads absl flags; the library takes a Config or plain values.
    reads = re.compile(r"^\s*(from absl import|import absl)|\bflags\.FLAGS\b|\bFLAGS\.", re.M)
    readers = [str(p.relative_to(REPO)) for p in (REPO / "tl_keras").rglob("*.py")
               if p.name != "cli.py" and reads.search(p.read_text())]
    assert readers == []
    assert reads.search((REPO / "tl_keras" / "cli.py").read_text())  # the pattern does match


def _modules_after(code: str) -> set:
    """The modules loaded by running `code` in a fresh interpreter on this checkout."""
    code += "\nimport sys; print(' '.join(sys.modules))"
    out = subprocess.run([sys.executable, "-c", code],
                         cwd=REPO, env={"PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "3",
                                        "PATH": "/usr/bin:/bin"},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    return set(out.stdout.split())


def test_the_command_line_and_the_image_run_import_only_what_they_use():
    # Parsing the command line loads no TensorFlow: `tl-keras --help` and a bad
    # flag answer at once.
    cli = _modules_after("import tl_keras.cli")
    assert not {"tensorflow", "keras", "numpy"} & cli
    # An image training run imports the data sources, the audit, the text task,
    # the notebook helpers and the serving protos only when a run uses them
    # (tfds:NAME, --audit, --task=text, notebooks, the export's warmup file).
    # (scikit-learn, matplotlib and pandas come with Keras itself.)
    image = _modules_after("import tl_keras.cli; from tl_keras.run import image")
    lazy = {"tensorflow_datasets", "cleanlab", "tensorflow_serving", "tl_keras.notebook",
            "tl_keras.run.text", "tl_keras.text.vectors", "pillow_heif", "tqdm"}
    assert not lazy & image, sorted(lazy & image)
    assert "tensorflow" in image  # the check sees what it claims to
