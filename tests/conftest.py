"""Fixtures shared by the tests (the builders they use live in tests/helpers.py)."""

from __future__ import annotations

import os

import pytest
import torch

from tests.helpers import SHARED, disk_model, write_tiff_slide

torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True, scope="session")
def _precision_cache(tmp_path_factory):
    """Precision probes go to a cache of the test session's own, never the user's ~/.cache."""
    os.environ["NUCLICK_WSI_CACHE_DIR"] = str(tmp_path_factory.mktemp("nuclick-cache"))


@pytest.fixture
def disk():
    return disk_model


@pytest.fixture
def tiff_slide(tmp_path):
    def make(width=1024, height=768, mpp=0.25, name="slide.tif", **kw):
        return write_tiff_slide(tmp_path / name, width, height, mpp, **kw)

    return make


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED.exists():
        pytest.skip(f"shared data folder {SHARED} not found")
    return SHARED
