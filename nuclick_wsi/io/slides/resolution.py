"""The um/px rules: read from the file, given by the user, plausible or refused, never guessed."""

from __future__ import annotations

import math

from nuclick_wsi.io.slides.base import PyramidSource, SlideSource
from nuclick_wsi.io.slides.pixels import fmt_number
from nuclick_wsi.errors import ResolutionError


MPP_PLAUSIBLE_RANGE = (0.01, 25.0)
"""um/px values from a file outside this range are treated as unknown (72 dpi = 352.8 um/px
is a typical placeholder written by image libraries, not a microscope resolution)."""

MPP_MISMATCH = 0.01
"""Relative x/y um/px difference above which a note is added (the mean is used)."""


def mpp_from_resolution(value: float | None, unit: str | None) -> float | None:
    """um/px from a pixels-per-unit resolution; None for no value, zero or no unit."""
    microns = {"inch": 25400.0, "centimeter": 1e4, "millimeter": 1e3, "micrometer": 1.0}
    if value is None or unit not in microns or not math.isfinite(value) or value <= 0:
        return None
    return microns[unit] / value


# --------------------------------------------------------------------------------------
# um/px
# --------------------------------------------------------------------------------------


def check_given_mpp(mpp: float) -> None:
    """Raise ResolutionError unless ``mpp`` is a positive finite number."""
    if not isinstance(mpp, (int, float)) or not math.isfinite(mpp) or mpp <= 0:
        raise ResolutionError(f"--mpp must be a positive number of um/px, got {mpp!r}")


def settle_mpp(source: PyramidSource, given: float | None) -> None:
    """Set ``mpp``, ``mpp_source`` and notes from the given value or the file."""
    found = source._file_mpp()
    values = [v for v in (found.x, found.y) if v is not None]
    file_mpp = sum(values) / len(values) if values else None
    if len(values) == 2 and abs(values[0] - values[1]) > MPP_MISMATCH * max(values):
        source.notes.append(f"um/px differs between x ({fmt_number(values[0])}) and y "
                            f"({fmt_number(values[1])}) in {found.source}; using the mean "
                            f"{fmt_number(file_mpp)}")
    if given is not None:
        check_given_mpp(given)
        source.mpp, source.mpp_source = float(given), "given (--mpp)"
        if file_mpp is not None and abs(file_mpp - given) > MPP_MISMATCH * given:
            source.notes.append(f"given --mpp {fmt_number(given)} overrides {fmt_number(file_mpp)} um/px "
                                f"from the file ({found.source})")
        return
    low, high = MPP_PLAUSIBLE_RANGE
    if file_mpp is not None and not low <= file_mpp <= high:
        source.mpp = None
        source.mpp_source = (f"unknown (file says {fmt_number(file_mpp)} um/px in {found.source}, "
                             f"outside the plausible {low}-{high}: likely a placeholder)")
        source.notes.append(f"ignored implausible resolution {fmt_number(file_mpp)} um/px "
                            f"({found.source}); pass --mpp")
        return
    source.mpp, source.mpp_source = file_mpp, found.source


def require_mpp(source: SlideSource) -> float:
    """Return the um/px of a source, or raise if it is unknown.

    Raises
    ------
    ResolutionError
        Naming the file and saying to pass ``--mpp``.
    """
    if source.mpp is None:
        raise ResolutionError(
            f"{source.path}: resolution (um/px) is unknown ({source.mpp_source}); "
            f"pass --mpp with the slide's level-0 um/px (e.g. --mpp 0.25 for 40x)")
    return float(source.mpp)

