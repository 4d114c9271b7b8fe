"""The overview: the slide at low resolution with every outline (colour = class), skipped clicks
marked by reason, and a density view of where the clicks were.

Memory stays flat on whole slides: the tissue is one region read at a low-resolution level (the
reader picks the pyramid level), the outlines come from the label store's pyramid level nearest to
the overview's scale, never from level 0.

The tissue picture is kept in the user's cache (``overview/`` under ``$NUCLICK_WSI_CACHE_DIR`` or
``~/.cache/nuclick-wsi``, the newest :data:`CACHE_KEEP`), keyed by the slide file's path, size and
modification time and the frame it was read in: a rerun's page does not read the slide again
(seconds on a slide without a pyramid, where every level-0 pixel is read).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from nuclick_wsi.store.ngff import read_ngff

from nuclick_wsi._util.fs import atomic_output, parse_temporary, user_cache_dir
from nuclick_wsi.errors import NuclickError, OutputError
from nuclick_wsi.io.slides.registry import open_slide
from nuclick_wsi.qc.data import QcInputs

MAX_SIDE = 1000  #: overview size (px) of the slide's longer side
CACHE_KEEP = 32  #: cached overviews kept (PNG, at most MAX_SIDE px a side: about 1-2 MB each)

log = logging.getLogger("nuclick_wsi")


def open_report_slide(inputs: QcInputs):
    """The slide of the report, opened in the frame and with the reader the run used."""
    s = inputs.report["slide"]
    if not inputs.slide_path.exists():
        raise NuclickError(f"{inputs.slide_path}: slide not found (named in {inputs.stem}.report.json); "
                           "run the report from the folder segment ran in, or keep the slide where it was")
    slide = open_slide(inputs.slide_path, bounds_offset=any(s.get("bounds_offset") or ()),
                       reader=s.get("reader") or "auto")
    if (slide.width, slide.height) != (s["width"], s["height"]):
        slide.close()
        raise NuclickError(f"{inputs.slide_path}: {slide.width} x {slide.height} px, but the report says "
                           f"{s['width']} x {s['height']}; another file than the one segmented?")
    return slide


def overview_scale(width: int, height: int, max_side: int = MAX_SIDE) -> tuple[float, int, int]:
    """Level-0 px per overview px, and the overview's width and height."""
    ds = max(1.0, max(width, height) / max_side)
    return ds, max(1, math.ceil(width / ds)), max(1, math.ceil(height / ds))


def read_overview(slide, ds: float, ow: int, oh: int, max_read: int = 2048) -> np.ndarray:
    """The slide at ``ds`` level-0 px per pixel, read in blocks of at most ``max_read`` level-0 px a side.

    On a pyramidal slide each block comes from a coarse level; on a slide without a pyramid, memory
    stays at one block instead of the whole level 0.
    """
    out = np.empty((oh, ow, 3), np.uint8)
    step = max(16, int(max_read // ds))  # overview px per block
    for oy in range(0, oh, step):
        for ox in range(0, ow, step):
            bw, bh = min(step, ow - ox), min(step, oh - oy)
            out[oy:oy + bh, ox:ox + bw] = slide.read_region(ox * ds, oy * ds, bw * ds, bh * ds, bw, bh)
    return out


def overview_key(slide, slide_path: str | os.PathLike, ds: float, ow: int, oh: int) -> str | None:
    """The cache key of a slide's overview: file (path, size, mtime), frame and scale; None for no file."""
    try:
        st = os.stat(slide_path)
    except OSError:
        return None
    ident = {"format": 1, "path": str(Path(slide_path).resolve()), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
             "reader": slide.reader, "size": [slide.width, slide.height], "bounds_offset": list(slide.bounds_offset),
             "ds": ds, "overview": [ow, oh]}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:40]


def cached_overview(slide, slide_path: str | os.PathLike, ds: float, ow: int, oh: int) -> np.ndarray:
    """:func:`read_overview`, through the user's cache (see the module docstring)."""
    from PIL import Image

    key = overview_key(slide, slide_path, ds, ow, oh)
    path = user_cache_dir() / "overview" / f"{key}.png"
    if key is not None and path.exists():
        try:
            with Image.open(path) as im:
                arr = np.asarray(im.convert("RGB"))
            if arr.shape == (oh, ow, 3):
                os.utime(path)  # the newest are kept
                return arr
        except (OSError, ValueError) as exc:
            log.debug("cached overview %s unreadable (%s): read again", path, exc)
    arr = read_overview(slide, ds, ow, oh)
    if key is not None:
        _cache_overview(path, arr)
    return arr


def _cache_overview(path: Path, arr: np.ndarray) -> None:
    """Write one overview atomically and keep the newest :data:`CACHE_KEEP`; a cache that cannot be
    written (read-only home) only costs the next page a slide read."""
    from PIL import Image

    try:
        with atomic_output(path) as tmp:
            Image.fromarray(arr).save(tmp, format="PNG", compress_level=1)
        done = [p for p in path.parent.glob("*.png") if parse_temporary(p.name) is None]  # not others' writes
        for old in sorted(done, key=lambda p: p.stat().st_mtime_ns, reverse=True)[CACHE_KEEP:]:
            old.unlink(missing_ok=True)
    except (OSError, OutputError) as exc:
        log.debug("overview not cached in %s: %s", path.parent, exc)


def label_thumbnail(labels_path, ds: float, ow: int, oh: int) -> np.ndarray:
    """The label image at the overview's scale, nearest-neighbour, from the coarsest pyramid level
    no coarser than ``ds`` (one level read, never level 0 unless the slide is small)."""
    group = zarr.open_group(str(labels_path), mode="r")
    found = read_ngff(group.attrs.asdict())  # NGFF 0.4 (top level) or 0.5 (under "ome")
    n_levels = len(found[1][0]["datasets"]) if found else 1
    level = max(0, min(n_levels - 1, int(math.floor(math.log2(ds))) if ds >= 1 else 0))
    arr = group[str(level)]
    f = 2 ** level
    rows = np.minimum(((np.arange(oh) + 0.5) * ds / f).astype(np.int64), arr.shape[0] - 1)
    cols = np.minimum(((np.arange(ow) + 0.5) * ds / f).astype(np.int64), arr.shape[1] - 1)
    return np.asarray(arr[:, :])[np.ix_(rows, cols)]


def class_colours(inputs: QcInputs) -> dict[str, tuple[float, float, float]]:
    """Colour per class: QuPath's (from the outlines' file) where known, else matplotlib's tab10."""
    from matplotlib import colormaps

    tab = colormaps["tab10"]
    names = sorted({o.class_name for o in inputs.outlines} | {"Unclassified"})
    out = {}
    for k, name in enumerate(names):
        rgb = inputs.class_rgb.get(name)
        out[name] = tuple(v / 255 for v in rgb) if rgb else tab(k % 10)[:3]
    return out


def paint_overview(tissue: np.ndarray, lab: np.ndarray, inputs: QcInputs, colours) -> np.ndarray:
    """Tissue with outlines filled lightly and their boundaries drawn in their class's colour."""
    top = int(lab.max(initial=0))
    lut = np.zeros((top + 1, 3), np.float32)
    for o in inputs.outlines:
        if o.label <= top:
            lut[o.label] = colours[o.class_name]
    img = tissue.astype(np.float32) / 255
    inside = lab > 0
    edge = np.zeros_like(inside)
    edge[:, :-1] |= lab[:, :-1] != lab[:, 1:]
    edge[:-1] |= lab[:-1] != lab[1:]
    edge &= inside
    col = lut[lab]
    img[inside] = 0.65 * img[inside] + 0.35 * col[inside]
    img[edge] = col[edge]
    return img


def overview_figures(inputs: QcInputs, slide) -> dict[str, bytes]:
    """PNG bytes of ``overview`` (outlines, skipped clicks) and ``density`` (clicks per area)."""
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    W, H = inputs.report["slide"]["width"], inputs.report["slide"]["height"]
    ds, ow, oh = overview_scale(W, H)
    tissue = cached_overview(slide, inputs.slide_path, ds, ow, oh)
    lab = label_thumbnail(inputs.labels_path, ds, ow, oh)
    colours = class_colours(inputs)
    img = paint_overview(tissue, lab, inputs, colours)
    dpi = 100
    out: dict[str, bytes] = {}
    fig = Figure(figsize=(ow / dpi + 2.0, oh / dpi + 0.3), dpi=dpi)
    ax = fig.add_axes([0.0, 0.0, ow / (ow + 200), 1.0])
    ax.imshow(img, extent=(0, W, H, 0), interpolation="nearest")
    ax.set_axis_off()
    from matplotlib.patches import Patch

    counts: dict[str, int] = {}
    for o in inputs.outlines:
        counts[o.class_name] = counts.get(o.class_name, 0) + 1
    handles = [Patch(color=colours[name], label=f"{name} ({n})") for name, n in sorted(counts.items())]
    small = bool(inputs.outlines) and math.sqrt(float(np.median([o.area_px for o in inputs.outlines]))) / ds < 3
    if small:  # nuclei smaller than 3 overview px: a dot per outline shows where they are
        ax.scatter([o.x for o in inputs.outlines], [o.y for o in inputs.outlines], s=3, linewidths=0,
                   c=[colours[o.class_name] for o in inputs.outlines])
    reasons = sorted({c.get("reason", "").split(" (")[0].split(":")[0] for c in inputs.skipped})
    markers = colormaps["Set1"]
    for k, why in enumerate(reasons):
        pts = np.array([(c["x"], c["y"]) for c in inputs.skipped
                        if c.get("reason", "").split(" (")[0].split(":")[0] == why
                        and all(isinstance(v, (int, float)) and math.isfinite(v) for v in (c["x"], c["y"]))]
                       ).reshape(-1, 2)
        handles.append(ax.scatter(pts[:, 0], pts[:, 1], s=40, marker="x", color=markers(k % 9), linewidths=1.5,
                                  label=f"skipped: {why} ({len(pts)})"))
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    if handles:
        fig.legend(handles=handles, loc="upper right", fontsize=9, frameon=False)
    out["overview"] = png_bytes(fig)
    out["density"] = _density(inputs, tissue, W, H, ds)
    return out


def _density(inputs: QcInputs, tissue: np.ndarray, W: int, H: int, ds: float) -> bytes:
    from matplotlib.figure import Figure

    oh, ow = tissue.shape[:2]
    scale = 420 / max(ow, oh)  # inches at 100 dpi: the map at most 420 px, and a colour bar
    fig = Figure(figsize=(ow * scale / 100 + 1.3, oh * scale / 100 + 0.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.imshow(tissue.mean(axis=2), cmap="gray", extent=(0, W, H, 0), vmin=0, vmax=255)
    xy = np.array([(o.x, o.y) for o in inputs.outlines]).reshape(-1, 2)
    bins = max(4, int(max(W, H) / ds / 40))
    if len(xy):
        hb = ax.hexbin(xy[:, 0], xy[:, 1], gridsize=bins, extent=(0, W, 0, H), mincnt=1, cmap="magma", alpha=0.75)
        fig.colorbar(hb, ax=ax, label="outlines per cell", fraction=0.04)
    ax.set_xlim(0, W)
    ax.set_ylim(H, 0)
    ax.set_axis_off()
    return png_bytes(fig)


def png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
