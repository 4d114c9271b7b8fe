"""Fixtures shared by the tests (the builders they use live in tests/helpers.py)."""

from __future__ import annotations

import os
import tempfile

# Set before tests.helpers is imported: its SUB_ENV (the environment of CLI subprocesses) copies these.
# Precision and runtime probes go to a cache of the test session's own, never the user's ~/.cache; runs stay
# on PyTorch unless a test asks for OpenVINO (tests/model/test_runtime.py tests auto itself).
os.environ["NUCLICK_WSI_CACHE_DIR"] = tempfile.mkdtemp(prefix="nuclick-test-cache-")
os.environ.setdefault("NUCLICK_WSI_RUNTIME", "torch")

import pytest  # noqa: E402
import torch  # noqa: E402

from tests.helpers import SHARED, disk_model, write_tiff_slide  # noqa: E402

torch.set_num_threads(min(2, os.cpu_count() or 1))


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
