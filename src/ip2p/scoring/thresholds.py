"""The CLIP filter's rule for one candidate (docs/method.md section 2): which threshold it fails
first, if any. Shared by `ip2p filter` and by synthesis' early drop."""

from __future__ import annotations

import math
from typing import Mapping

# Order in which failed thresholds are reported (a candidate counts once, under its first failure).
THRESHOLD_ORDER = ("sim_image", "sim_dir", "sim_0", "sim_1", "sim_rest")


def score_column(threshold_name: str) -> str:
    return f"clip_{threshold_name}"


def first_failure(scores: Mapping[str, float | None], thresholds: Mapping[str, float]) -> str | None:
    """The reason a candidate is dropped ("nan_score", "below_<name>"), or None if it passes all."""
    for name in THRESHOLD_ORDER:
        if name not in thresholds:
            continue
        value = scores.get(score_column(name))
        if value is None:
            continue
        if math.isnan(value):
            return "nan_score"
        if value < thresholds[name]:
            return f"below_{name}"
    return None
