"""GeoParquet output of instances, through geopandas (imported only when used)."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

from nuclick_wsi._util.fs import atomic_output
from nuclick_wsi.records import Instance

COLUMNS = ("id", "label", "class_name", "area_px", "area_um2", "score", "confidence", "prompt_index", "kind", "geometry")


def _area_um2(inst: Instance, mpp: float | None) -> float:
    if inst.area_um2 is not None and math.isfinite(inst.area_um2):
        return float(inst.area_um2)
    if mpp is not None:
        return float(inst.area_px) * float(mpp) ** 2
    return math.nan


def write_geoparquet(
    instances: Sequence[Instance], path: str | os.PathLike, *, mpp: float | None = None
) -> Path:
    """Write instances as a GeoParquet table, atomically.

    Parameters
    ----------
    instances : sequence of Instance
        One row each, in the given order.
    path : str or os.PathLike
        Output ``.parquet`` file.
    mpp : float, optional
        Microns per pixel, to fill ``area_um2`` where an instance lacks it (else NaN).

    Returns
    -------
    Path
        The written file, with columns ``id`` (uuid), ``label``, ``class_name``, ``area_px``,
        ``area_um2``, ``score``, ``confidence``, ``prompt_index``, ``kind`` and ``geometry`` (level-0 pixels,
        no CRS).
    """
    import geopandas as gpd
    import numpy as np
    import pandas as pd

    data = {
        "id": pd.array([i.uuid for i in instances], dtype="string"),
        "label": np.array([i.label for i in instances], dtype=np.int64),
        "class_name": pd.array([i.class_name for i in instances], dtype="string"),
        "area_px": np.array([i.area_px for i in instances], dtype=np.float64),
        "area_um2": np.array([_area_um2(i, mpp) for i in instances], dtype=np.float64),
        "score": np.array([i.score for i in instances], dtype=np.float64),
        "confidence": np.array([np.nan if i.confidence is None else i.confidence for i in instances], dtype=np.float64),
        "prompt_index": np.array([i.prompt_index for i in instances], dtype=np.int64),
        "kind": pd.array([i.kind for i in instances], dtype="string"),
    }
    frame = gpd.GeoDataFrame(data, geometry=gpd.GeoSeries([i.geometry for i in instances]), crs=None)
    path = Path(path)
    with atomic_output(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path
