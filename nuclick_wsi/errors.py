"""Exceptions raised by nuclick-wsi.

Every error a user can cause derives from :class:`NuclickError`; the CLI prints its message on one
line and exits with status 1. Messages name the offending file and, where it applies, the feature,
line or row.
"""

from __future__ import annotations


class NuclickError(Exception):
    """Base class of user-facing errors (bad input, missing capability)."""


class AnnotationError(NuclickError, ValueError):
    """A malformed or unsupported annotation file (names the file and the feature or line)."""


class SlideError(NuclickError):
    """A slide that cannot be opened or read."""


class ResolutionError(NuclickError):
    """The um/px of a slide is unknown and was not given."""


class ModelError(NuclickError):
    """Weights that are missing, do not fit the network, or lack metadata."""


class OutputError(NuclickError):
    """An output location that cannot be written."""
