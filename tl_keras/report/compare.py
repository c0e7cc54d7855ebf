"""`tl-keras compare OUT1 OUT2 ...`: the key figures of finished runs side by side."""

from __future__ import annotations

import os
from typing import Callable, Optional, Sequence

from tl_keras.core import outputs
from tl_keras.errors import ConfigError
from tl_keras.report import evaluations


def _load_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    return outputs.read_json_object(path)


def load(run_dir: str) -> dict:
    """Reads what `compare` shows of one run folder.

    Returns:
        {"report", "config", "manifest"} (the last two may be {}).

    Raises:
        ConfigError: `run_dir` is not a finished run (no report.json), or one
            of its files is unreadable, not JSON or not a JSON object (the
            cause on one line).
    """
    try:
        report = _load_json(os.path.join(run_dir, "report.json"))
        config = _load_json(os.path.join(run_dir, "config.json")) or {}
        manifest = _load_json(os.path.join(run_dir, "manifest.json")) or {}
    except ValueError as e:
        raise ConfigError(f"run {run_dir!r}: {e}") from None
    if report is None:
        raise ConfigError(f"run {run_dir!r}: no report.json there "
                          "(expected the --output_dir of a finished tl-keras train)")
    return {"report": report, "config": config, "manifest": manifest}


def _at(d, *keys):
    """d[k1][k2]...; None where a level is missing or not an object (a hand-edited
    or older report shows as "-" in its cell, never as a traceback)."""
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return d


def _length(v):
    return len(v) if isinstance(v, list) else None


def _eval(run: dict) -> dict:
    split = evaluations.evaluated_split(run.get("report") or {})
    ev = _at(run, "report", split) if split else None
    return ev if isinstance(ev, dict) else {}


def _num(v, spec: str = ".4f") -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    return str(v) if isinstance(v, int) else format(v, spec)


def _topk(ev: dict):
    return next((ev[k] for k in ev if k.startswith("top_") and k.endswith("_accuracy")), None)


# (row label, how to get it from a loaded run); floats print with 4 decimals
# unless FORMATS says otherwise.
ROWS: list[tuple[str, Callable[[dict], object]]] = [
    ("backbone", lambda r: _at(r, "report", "backbone") or _at(r, "config", "backbone")),
    ("alpha", lambda r: _at(r, "config", "alpha")),
    ("image size", lambda r: _at(r, "report", "image_size") or _at(r, "config", "image_size")),
    ("classes", lambda r: _length(_at(r, "report", "classes"))),
    ("data hash", lambda r: str(_at(r, "manifest", "data", "hash") or "")[:12] or None),
    ("stage 1 epochs", lambda r: _at(r, "report", "stage1", "epochs")),
    ("stage 1 val acc", lambda r: _at(r, "report", "stage1", "val_accuracy")),
    ("stage 2 epochs", lambda r: _at(r, "report", "stage2", "epochs")),
    ("stage 2 val acc", lambda r: _at(r, "report", "stage2", "val_accuracy")),
    ("kept", lambda r: _at(r, "report", "kept")),
    ("evaluated on", lambda r: evaluations.evaluated_split(r["report"])),
    ("examples", lambda r: _eval(r).get("n")),
    ("accuracy", lambda r: _eval(r).get("accuracy")),
    ("top-k accuracy", lambda r: _topk(_eval(r))),
    ("macro F1", lambda r: _at(_eval(r), "macro_avg", "f1")),
    ("ROC-AUC", lambda r: _eval(r).get("roc_auc")),
    ("PR-AUC", lambda r: _eval(r).get("pr_auc")),
    ("ECE", lambda r: _eval(r).get("ece")),
    ("seconds", lambda r: _at(r, "report", "seconds")),
]
FORMATS = {"alpha": "g", "seconds": ".1f"}


def table(run_dirs: Sequence[str]) -> str:
    """The side-by-side table of `run_dirs` (one column per run), as plain text."""
    if not run_dirs:
        raise ConfigError("compare: no run folders given (tl-keras compare OUT1 OUT2 ...)")
    runs = [load(d) for d in run_dirs]
    header = ["", *[d.rstrip("/\\") for d in run_dirs]]
    body = [[label, *[_num(get(r), FORMATS.get(label, ".4f")) for r in runs]]
            for label, get in ROWS]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]

    def fmt(row):
        return "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths))).rstrip()

    return "\n".join([fmt(header), "  ".join("-" * w for w in widths), *map(fmt, body)])
