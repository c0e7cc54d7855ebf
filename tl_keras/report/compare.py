"""`tl-keras compare OUT1 OUT2 ...`: the key figures of finished runs side by side."""

from __future__ import annotations

import json
import os
from typing import Callable, Optional, Sequence

from tl_keras.errors import ConfigError


def _load_json(path: str) -> Optional[dict]:
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load(run_dir: str) -> dict:
    """Reads what `compare` shows of one run folder.

    Returns:
        {"report", "config", "manifest"} (the last two may be {}).

    Raises:
        ConfigError: `run_dir` is not a finished run (no readable report.json).
    """
    try:
        report = _load_json(os.path.join(run_dir, "report.json"))
        config = _load_json(os.path.join(run_dir, "config.json")) or {}
        manifest = _load_json(os.path.join(run_dir, "manifest.json")) or {}
    except (OSError, ValueError) as e:
        raise ConfigError(f"run {run_dir!r}: cannot read its JSON files: "
                          f"{' '.join(str(e).split())[:200]}") from None
    if report is None:
        raise ConfigError(f"run {run_dir!r}: no report.json there "
                          "(expected the --output_dir of a finished tl-keras train)")
    return {"report": report, "config": config, "manifest": manifest}


def _eval(run: dict) -> dict:
    r = run["report"]
    return r.get("test") or r.get("val") or {}


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
    ("backbone", lambda r: r["report"].get("backbone", r["config"].get("backbone"))),
    ("alpha", lambda r: r["config"].get("alpha")),
    ("image size", lambda r: r["report"].get("image_size", r["config"].get("image_size"))),
    ("classes", lambda r: len(r["report"].get("classes", []))),
    ("data hash", lambda r: (r["manifest"].get("data", {}).get("hash") or "")[:12] or None),
    ("stage 1 epochs", lambda r: r["report"].get("stage1", {}).get("epochs")),
    ("stage 1 val acc", lambda r: r["report"].get("stage1", {}).get("val_accuracy")),
    ("stage 2 epochs", lambda r: r["report"].get("stage2", {}).get("epochs")),
    ("stage 2 val acc", lambda r: r["report"].get("stage2", {}).get("val_accuracy")),
    ("kept", lambda r: r["report"].get("kept")),
    ("evaluated on", lambda r: "test" if "test" in r["report"] else
     "val" if "val" in r["report"] else None),
    ("examples", lambda r: _eval(r).get("n")),
    ("accuracy", lambda r: _eval(r).get("accuracy")),
    ("top-k accuracy", lambda r: _topk(_eval(r))),
    ("macro F1", lambda r: _eval(r).get("macro_avg", {}).get("f1")),
    ("ROC-AUC", lambda r: _eval(r).get("roc_auc")),
    ("PR-AUC", lambda r: _eval(r).get("pr_auc")),
    ("ECE", lambda r: _eval(r).get("ece")),
    ("seconds", lambda r: r["report"].get("seconds")),
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
