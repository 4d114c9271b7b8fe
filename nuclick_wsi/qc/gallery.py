"""The gallery: zoomed crops at full resolution (region reads), outline and click drawn on the tissue.

Two sets: a random sample (seeded by the slide's stem, so a rebuilt report shows the same crops)
and the least confident outlines. Each crop is a small JPEG with a caption that finds it in QuPath.
"""

from __future__ import annotations

import io
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from nuclick_wsi.qc.data import Outline, QcInputs

TILE = 144  #: displayed crop size, px


@dataclass
class Crop:
    outline: Outline
    jpeg: bytes
    flagged: list[str]


def pick(inputs: QcInputs, n_random: int = 24, n_low: int = 24) -> tuple[list[Outline], list[Outline]]:
    """A random sample and the least confident outlines (disjoint)."""
    outs = inputs.outlines
    low = sorted((o for o in outs if np.isfinite(o.value)), key=lambda o: (o.value, o.label))[:n_low]
    rng = np.random.default_rng(zlib.crc32(inputs.stem.encode("utf-8")))
    taken = {o.label for o in low}
    rest = [o for o in outs if o.label not in taken]
    idx = sorted(rng.choice(len(rest), size=min(n_random, len(rest)), replace=False)) if rest else []
    return [rest[i] for i in idx], low


def crop(slide, o: Outline, colour: tuple[float, float, float]) -> bytes:
    """One JPEG: the tissue around the outline (level 0, or a little coarser for large objects)."""
    bx0, by0, bx1, by1 = o.geometry.bounds
    side = max(48.0, 2.2 * max(bx1 - bx0, by1 - by0))
    cx, cy = (bx0 + bx1) / 2, (by0 + by1) / 2
    x0, y0 = round(cx - side / 2), round(cy - side / 2)
    side = round(side)
    n = min(side, TILE)  # read at level 0 unless the crop is larger than the tile
    img = Image.fromarray(slide.read_region(x0, y0, side, side, n, n)).resize((TILE, TILE), Image.Resampling.LANCZOS)
    f = TILE / side
    draw = ImageDraw.Draw(img)
    rgb = tuple(int(255 * v) for v in colour)
    polys = getattr(o.geometry, "geoms", [o.geometry])
    for p in polys:
        for ring in [p.exterior, *p.interiors]:
            draw.line([((x - x0) * f, (y - y0) * f) for x, y in ring.coords], fill=rgb, width=2)
    px, py = (o.x - x0) * f, (o.y - y0) * f
    draw.line([(px - 5, py), (px + 5, py)], fill=(255, 255, 0), width=2)
    draw.line([(px, py - 5), (px, py + 5)], fill=(255, 255, 0), width=2)
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


def crops(inputs: QcInputs, slide, chosen: list[Outline], colours, reasons: dict[int, list[str]]) -> list[Crop]:
    return [Crop(o, crop(slide, o, colours[o.class_name]), reasons.get(o.label, [])) for o in chosen]
