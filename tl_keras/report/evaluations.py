"""Where a run's report keeps its evaluation."""

from __future__ import annotations

from typing import Optional

# In order of preference: the test split; the validation split; without
# either, the held-out predictions of the cross-validation (a run that holds
# nothing out, see tl_keras.train.linear_head).
EVALUATIONS = ("test", "val", "cross_validation")


def evaluated_split(report: dict) -> Optional[str]:
    """The key of the evaluation a run's report holds (`EVALUATIONS`), or None."""
    return next((k for k in EVALUATIONS if k in report), None)
