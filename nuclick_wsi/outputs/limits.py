"""The one um/px plausibility range used by ``segment``, ``batch`` and the slide readers."""

from __future__ import annotations

import math

#: level-0 um/px a slide can plausibly have (100x oil ~0.05 ... 0.4x overview ~25)
MPP_RANGE = (0.01, 25.0)


def mpp_problem(value: object) -> str | None:
    """Why ``value`` is not a plausible level-0 um/px, or None when it is."""
    low, high = MPP_RANGE
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
        return f"{value!r} is not a positive number of um/px"
    if not low <= value <= high:
        hint = " (that looks like a magnification; um/px at 40x is about 0.25)" if value > high else ""
        return f"{value:g} um/px is outside the plausible {low:g}-{high:g}{hint}"
    return None


def plausible_mpp(value: object) -> bool:
    """True when ``value`` is a plausible level-0 um/px."""
    return mpp_problem(value) is None
