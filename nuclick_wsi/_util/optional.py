"""Optional extras: whether one is installed (without importing it) and how to get it."""

from __future__ import annotations

import importlib.util

EXTRA_HINT = 'pip install "nuclick-wsi[tiatoolbox]"'
"""How to get the extra (quoted for shells that expand brackets)."""


def tiatoolbox_installed() -> bool:
    """True when the ``tiatoolbox`` package can be found (it is not imported)."""
    return importlib.util.find_spec("tiatoolbox") is not None
