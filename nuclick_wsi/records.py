"""Plain records passed between stages: prompts in, instances out.

Coordinates are level-0 pixels of the full slide in QuPath's frame: x right, y down, floats;
pixel (i, j) covers [i, i+1) x [j, j+1), so a click at (10.5, 20.5) is the centre of pixel (10, 20)
and the pixel a click falls in is ``(floor(x), floor(y))``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

RGB = tuple[int, int, int]


@dataclass(frozen=True)
class Click:
    """One click inside one object (a nucleus)."""

    x: float
    y: float
    class_name: str | None = None
    color: RGB | None = None
    source: str = ""  #: where it came from, for messages: "feature 3", "line 12", "Annotation 'a1'"
    index: int = 0  #: position in the input, 0-based, across clicks of one file


@dataclass(frozen=True)
class Squiggle:
    """A polyline drawn inside one large object (a gland)."""

    points: tuple[tuple[float, float], ...]
    class_name: str | None = None
    color: RGB | None = None
    source: str = ""
    index: int = 0  #: position among the squiggles of one file, 0-based


@dataclass
class Prompts:
    """Everything read from one annotation file."""

    clicks: list[Click] = field(default_factory=list)
    squiggles: list[Squiggle] = field(default_factory=list)
    #: polygons (shapely geometries, level-0 QuPath frame) that are not prompts; ``--roi`` may use them
    regions: list[Any] = field(default_factory=list)
    #: one line per input object that was not taken as a prompt, and why
    skipped: list[str] = field(default_factory=list)
    path: str = ""
    format: str = ""  #: "qupath", "asap", "imagescope" or "csv"


@dataclass
class Instance:
    """One segmented object, ready for export.

    ``geometry`` is a shapely Polygon (or MultiPolygon, only if unavoidable) in level-0 QuPath frame,
    tracing pixel edges. ``label`` is its id in the zarr label store; ``uuid`` is deterministic.
    """

    label: int
    uuid: str
    geometry: Any
    class_name: str | None = None
    color: RGB | None = None
    area_px: float = 0.0
    area_um2: float | None = None
    score: float = 0.0  #: mean model probability over the instance's pixels
    prompt_index: int = 0  #: index of the click (or squiggle) it came from
    kind: str = "nucleus"  #: "nucleus" (from a click) or "gland" (from a squiggle)
    #: soft IoU of the outline with the probability map around it (postprocess/confidence.py); None if unknown
    confidence: float | None = None
    #: a hash of the mask ``geometry`` traces and its place (engine/run.py ``outline_key``): the same key,
    #: the same geometry; None if unknown
    outline: str | None = None


def outcome(instance: Instance | None, reason: str) -> dict[str, Any]:
    """The report fields of one prompt: its instance, or ``reason`` when it has none."""
    if instance is None:
        return {"status": "skipped", "instance_id": None, "reason": reason}
    return {"status": "segmented", "instance_id": instance.label, "uuid": instance.uuid,
            "area_px": instance.area_px, "score": round(instance.score, 4),
            "confidence": None if instance.confidence is None else round(instance.confidence, 4)}
