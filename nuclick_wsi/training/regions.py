"""Training tiles read by region from a whole slide and a QuPath GeoJSON of outlines and/or points.

The slide is never held in memory: tiles lie on a grid of ``tile`` model pixels (at the model's
um/px) anchored at the slide's origin, and each is read with ``read_region`` (plus ``margin`` model
pixels of context on every side). A tile is kept when it meets the areas the user marked (``roi``),
or, without areas, when an outline's centroid or a point lies in it.

Each :class:`RegionTile` carries the RGB image at the model's um/px, instance labels rasterised from
the outlines on that grid (a pixel belongs to an outline when its centre is inside, by GEOS; holes
stay background; later outlines overwrite earlier ones), the points in tile pixels, and a ``valid`` mask:
the tile's core (margin excluded) inside the areas, or, without areas, the outlines and points grown
by ``grow_um``: there, and only there, an unlabelled pixel is known to be background.

Coordinates: outline and point coordinates are level-0 pixels in QuPath's frame; tile pixel
``(i, j)`` has its centre at level-0 ``(rx + (j + 0.5) * s, ry + (i + 0.5) * s)`` where ``(rx, ry)``
is the region's corner and ``s`` the level-0 pixels per model pixel (the slide readers' convention).
"""

from __future__ import annotations

import math
import os
from contextlib import closing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from scipy import ndimage as ndi

from nuclick_wsi.errors import AnnotationError, NuclickError
from nuclick_wsi.io.annotations import detect_format, read_prompts, read_qupath_polygons
from nuclick_wsi.io.datasets import Tile, ids_inside
from nuclick_wsi.io.slides import SlideSource, require_mpp


@dataclass
class Outlines:
    """What a QuPath GeoJSON holds for training: outlines (level-0 shapely polygons) and points."""

    path: str
    geometries: list[Any] = field(default_factory=list)
    classes: list[str | None] = field(default_factory=list)
    points: np.ndarray = field(default_factory=lambda: np.zeros((0, 2)))  # (n, 2) level-0 x, y


@dataclass
class RegionTile:
    """One tile of a slide at the model's um/px (see the module docstring for the frame)."""

    name: str
    image: np.ndarray  # (S, S, 3) uint8, S = tile + 2 * margin
    labels: np.ndarray  # (S, S) int32, ids 1..n
    valid: np.ndarray  # (S, S) bool
    points: np.ndarray  # (k, 2) x, y in tile pixels
    classes: list[str | None]  # class of instance id i at index i - 1
    geometries: list[Any]  # outlines in tile pixels, instance id i at index i - 1
    region: tuple[float, float, float, float]  # level-0 x, y, width, height read
    scale: float  # level-0 pixels per tile pixel


def read_outlines(path: str | os.PathLike) -> Outlines:
    """Outlines (Polygon/MultiPolygon objects, with their class) and points of a QuPath GeoJSON."""
    path = Path(path)
    if detect_format(path) != "qupath":
        raise AnnotationError(f"{path}: training reads QuPath GeoJSON (export the objects from QuPath as GeoJSON)")
    polys = read_qupath_polygons(path)
    clicks = read_prompts(path).clicks
    pts = np.asarray([(c.x, c.y) for c in clicks], float).reshape(-1, 2)
    if not polys and not len(pts):
        raise AnnotationError(f"{path}: no outlines (polygons) or points to learn from")
    return Outlines(str(path), [p["geometry"] for p in polys], [p["class_name"] for p in polys], pts)


def read_roi(path: str | os.PathLike) -> Any:
    """The union of the area annotations (polygons) of a GeoJSON/XML file, as one shapely geometry."""
    from shapely import make_valid, union_all

    prompts = read_prompts(path)
    if not prompts.regions:
        raise AnnotationError(f"{path}: --roi file has no area annotations (polygons)")
    return union_all([make_valid(g) for g in prompts.regions])


def rasterize(geometries: list[Any], shape: tuple[int, int]) -> np.ndarray:
    """Instance labels 1..n (in order, later on top) of shapely polygons given in tile pixels.

    A pixel belongs to a polygon when its centre ``(j + 0.5, i + 0.5)`` is inside (GEOS, holes excluded);
    only the pixels of each polygon's bounding box are tested.
    """
    import shapely

    labels = np.zeros(shape, np.int32)
    h, w = shape
    for k, geom in enumerate(geometries, start=1):
        if geom.is_empty:
            continue
        x0, y0, x1, y1 = geom.bounds
        c0, r0 = max(int(math.floor(x0 - 0.5)), 0), max(int(math.floor(y0 - 0.5)), 0)
        c1, r1 = min(int(math.ceil(x1 + 0.5)), w), min(int(math.ceil(y1 + 0.5)), h)
        if c1 <= c0 or r1 <= r0:
            continue
        cc, rr = np.meshgrid(np.arange(c0, c1), np.arange(r0, r1))
        inside = shapely.contains_xy(geom, cc + 0.5, rr + 0.5)
        labels[rr[inside], cc[inside]] = k
    return labels


def grid_cells(step: float, *, roi: Any = None, outlines: Outlines | None = None) -> list[tuple[int, int]]:
    """Grid cells (column, row) of side ``step`` level-0 px that meet ``roi`` (area > 0), or, without it,
    that hold an outline's centroid or a point; sorted row by row."""
    from shapely import box

    if roi is not None:
        x0, y0, x1, y1 = roi.bounds
        cells = [(c, r) for r in range(int(math.floor(y0 / step)), int(math.ceil(y1 / step)))
                 for c in range(int(math.floor(x0 / step)), int(math.ceil(x1 / step)))]
        return [(c, r) for c, r in cells
                if roi.intersection(box(c * step, r * step, (c + 1) * step, (r + 1) * step)).area > 0]
    xy = [np.asarray([[g.centroid.x, g.centroid.y] for g in outlines.geometries]).reshape(-1, 2), outlines.points]
    xy = np.concatenate(xy)
    xy = xy[np.isfinite(xy).all(axis=1)]
    cells = {(int(c), int(r)) for c, r in np.floor(xy / step)}
    return sorted(cells, key=lambda cr: (cr[1], cr[0]))


def _to_tile(geom: Any, rx: float, ry: float, s: float) -> Any:
    from shapely import affinity

    return affinity.affine_transform(geom, [1 / s, 0, 0, 1 / s, -rx / s, -ry / s])


def _drop_empty(labels: np.ndarray) -> tuple[np.ndarray, list[int]]:
    """Labels renumbered 1..m over the ids that cover a pixel, and the kept ids' 0-based indices."""
    present = np.unique(labels)[1:]
    if len(present) == labels.max():
        return labels, list(range(len(present)))
    lut = np.zeros(int(labels.max()) + 1, np.int32)
    lut[present] = np.arange(1, len(present) + 1)
    return lut[labels], [int(i) - 1 for i in present]


def _valid_mask(shape: tuple[int, int], margin: int, roi_px: Any, labels: np.ndarray, pts: np.ndarray,
                grow_px: float) -> np.ndarray:
    """Core of the tile inside the areas; without areas, the outlines and points grown by ``grow_px``."""
    core = np.zeros(shape, bool)
    core[margin:shape[0] - margin, margin:shape[1] - margin] = True
    if roi_px is not None:
        return core & (rasterize([roi_px], shape) > 0)
    seeds = labels > 0
    ij = np.floor(pts[:, ::-1]).astype(int) if len(pts) else np.zeros((0, 2), int)
    ok = (ij >= 0).all(axis=1) & (ij[:, 0] < shape[0]) & (ij[:, 1] < shape[1])
    seeds[ij[ok, 0], ij[ok, 1]] = True
    if not seeds.any():
        return np.zeros(shape, bool)
    return core & (ndi.distance_transform_edt(~seeds) <= grow_px)


def iter_region_tiles(slide: SlideSource, outlines: Outlines, *, mpp: float, tile: int = 256, margin: int = 0,
                      roi: Any = None, grow_um: float = 2.0, stem: str | None = None) -> Iterator[RegionTile]:
    """Tiles of ``tile`` model px (plus ``margin`` of context) at ``mpp`` um/px, read one region at a time.

    With ``roi`` (a shapely geometry, level-0), every grid cell meeting it; without, every cell holding
    an outline's centroid or a point (see the module docstring for ``valid``).
    """
    from shapely import STRtree, box

    s = mpp / require_mpp(slide)
    step = tile * s
    size = tile + 2 * margin
    stem = stem or Path(str(slide.path)).stem
    tree = STRtree(outlines.geometries) if outlines.geometries else None
    pts = outlines.points
    for c, r in grid_cells(step, roi=roi, outlines=outlines):
        rx, ry = c * step - margin * s, r * step - margin * s
        region = box(rx, ry, rx + size * s, ry + size * s)
        hits = sorted(int(i) for i in tree.query(region, predicate="intersects")) if tree is not None else []
        geoms = [_to_tile(outlines.geometries[i], rx, ry, s) for i in hits]
        labels = rasterize(geoms, (size, size))
        labels, kept = _drop_empty(labels)
        hits, geoms = [hits[k] for k in kept], [geoms[k] for k in kept]
        inside = (pts[:, 0] >= rx) & (pts[:, 0] < rx + size * s) & (pts[:, 1] >= ry) & (pts[:, 1] < ry + size * s)
        tile_pts = (pts[inside] - [rx, ry]) / s
        roi_px = None if roi is None else _to_tile(roi.intersection(region), rx, ry, s)
        valid = _valid_mask((size, size), margin, roi_px, labels, tile_pts, grow_um / mpp)
        image = slide.read_region(rx, ry, size * s, size * s, size, size)
        yield RegionTile(name=f"{stem}_x{int(round(c * step))}_y{int(round(r * step))}", image=image,
                         labels=labels, valid=valid, points=tile_pts,
                         classes=[outlines.classes[i] for i in hits], geometries=geoms,
                         region=(rx, ry, size * s, size * s), scale=s)


def slide_tiles(slide_path: str, annotations: str, *, mpp: float, patch: int, roi: str | None = None,
                slide_mpp: float | None = None, tile: int = 512, reader: str = "auto", log=print) -> list[Tile]:
    """NuClick training tiles from a slide and its corrected outlines (``train --slide/--annotations``).

    Each tile has ``patch // 2 + 48`` px of context around its core so that the sampler's crops hold
    real tissue; an outline is clicked only in the tile whose core (inside the areas) holds its centroid.
    """
    from nuclick_wsi.io.slides import open_slide

    outlines = read_outlines(annotations)
    if not outlines.geometries:
        raise AnnotationError(f"{annotations}: no outlines (polygons) to learn from")
    area = read_roi(roi) if roi else None
    out: list[Tile] = []
    with closing(open_slide(slide_path, mpp=slide_mpp, reader=reader)) as slide:
        for rt in iter_region_tiles(slide, outlines, mpp=mpp, tile=tile, margin=patch // 2 + 48, roi=area):
            targets = ids_inside(rt.labels, rt.valid)
            if len(targets):
                out.append(Tile(name=rt.name, image=rt.image, labels=rt.labels, targets=targets, mpp=mpp,
                                source=f"{annotations} on {slide_path}", valid=rt.valid))
    if not out:
        raise NuclickError(f"{annotations}: no outline has its centroid inside the slide"
                           f"{' and the --roi areas' if roi else ''} ({slide_path})")
    log(f"{slide_path}: {len(out)} tiles, {sum(len(t.targets) for t in out)} corrected outlines")
    return out
