"""OME-NGFF layout of the label store, per NGFF version: 0.4 in the zarr v2 format, 0.5 in zarr v3.

0.4 (the default, the version QuPath 0.6 reads and writes): ``.zgroup`` and ``.zattrs`` with
``multiscales`` and ``image-label`` at the top level of the attributes, arrays with ``.zarray``,
chunk keys ``level/cy/cx``, numcodecs Blosc. 0.5: one ``zarr.json`` per node, the metadata under
the ``ome`` attribute (``ome.version`` = "0.5", no version inside ``multiscales``/``image-label``),
arrays with ``dimension_names`` (y, x), chunk keys ``level/c/cy/cx``, the zarr v3 Blosc codec.
Both compress with Blosc zstd level 5, byte shuffle, single-threaded (see :mod:`nuclick_wsi.store.labels`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numcodecs
import zarr.codecs

__all__ = [
    "DEFAULT_NGFF",
    "NGFF_VERSIONS",
    "array_options",
    "chunk_key",
    "chunk_prefix",
    "check_version",
    "metadata_file",
    "ngff_attrs",
    "read_ngff",
    "zarr_format",
]

NGFF_VERSIONS = ("0.4", "0.5")
DEFAULT_NGFF = "0.4"
_FORMAT = {"0.4": 2, "0.5": 3}


def check_version(version: str) -> str:
    """``version`` if it is an NGFF version we write, else ValueError."""
    if version not in _FORMAT:
        raise ValueError(f"NGFF version must be one of {', '.join(NGFF_VERSIONS)}, got {version!r}")
    return version


def zarr_format(version: str) -> int:
    """The zarr format (2 or 3) of an NGFF version."""
    return _FORMAT[check_version(version)]


def metadata_file(version: str) -> str:
    """Name of the group metadata file at the root of a store of this version."""
    return ".zgroup" if zarr_format(version) == 2 else "zarr.json"


def chunk_prefix(version: str) -> str:
    """Folder inside an array that holds its chunk rows: ``""`` (v2 keys ``cy/cx``) or ``"c"`` (v3)."""
    return "" if zarr_format(version) == 2 else "c"


def chunk_key(version: str, level: int, cy: int, cx: int) -> str:
    """Relative path of chunk (cy, cx) of level ``level`` in a store: ``level/cy/cx`` (v2) or ``level/c/cy/cx`` (v3)."""
    return "/".join(p for p in (str(level), chunk_prefix(version), str(cy), str(cx)) if p)


def array_options(version: str) -> dict[str, Any]:
    """Keyword arguments of ``zarr.Group.create_array`` for a label level of this version."""
    if zarr_format(version) == 2:
        return {
            "compressors": numcodecs.Blosc(cname="zstd", clevel=5, shuffle=numcodecs.Blosc.SHUFFLE),
            "chunk_key_encoding": {"name": "v2", "separator": "/"},
        }
    return {
        "compressors": zarr.codecs.BloscCodec(cname="zstd", clevel=5, shuffle="shuffle"),
        "chunk_key_encoding": {"name": "default", "separator": "/"},
        "dimension_names": ("y", "x"),
    }


def _multiscale(version: str, name: str, mpp: float | None, n_levels: int) -> dict[str, Any]:
    axis_unit = {"unit": "micrometer"} if mpp is not None else {}
    base = mpp if mpp is not None else 1.0
    ms: dict[str, Any] = {"version": version} if version == "0.4" else {}
    ms.update({
        "name": name,
        "axes": [{"name": a, "type": "space", **axis_unit} for a in ("y", "x")],
        "datasets": [
            {"path": str(k), "coordinateTransformations": [{"type": "scale", "scale": [base * 2**k, base * 2**k]}]}
            for k in range(n_levels)
        ],
        "type": "nearest",
        "metadata": {"method": "level k pixel [i, j] = level k-1 pixel [2i, 2j] (numpy [::2, ::2])"},
    })
    return ms


def _image_label(version: str, colors: Mapping[int, Sequence[int]] | None, source_image: str | None) -> dict[str, Any]:
    meta: dict[str, Any] = {"version": version} if version == "0.4" else {}
    if source_image:
        meta["source"] = {"image": source_image}
    if colors:
        meta["colors"] = [
            {"label-value": int(label), "rgba": [int(v) for v in (list(rgb) + [255])[:4]]}
            for label, rgb in sorted(colors.items())
        ]
    return meta


def ngff_attrs(version: str, *, name: str, mpp: float | None, n_levels: int,
               colors: Mapping[int, Sequence[int]] | None = None, source_image: str | None = None) -> dict[str, Any]:
    """The OME attributes of a label image of ``n_levels`` levels (merge them into the group's).

    ``source_image`` (``image-label.source.image``) is written only when given: the store's root is
    the label image itself, so there is no parent image unless the caller places it in one.
    """
    ms = [_multiscale(check_version(version), name, mpp, n_levels)]
    label = _image_label(version, colors, source_image)
    if version == "0.4":
        return {"multiscales": ms, "image-label": label}
    return {"ome": {"version": version, "multiscales": ms, "image-label": label}}


def read_ngff(attrs: Mapping[str, Any]) -> tuple[str, list[dict[str, Any]], dict[str, Any]] | None:
    """``(version, multiscales, image-label)`` of a label image's attributes, or None if it has none."""
    ome = attrs.get("ome")
    if isinstance(ome, Mapping):
        ms, label = ome.get("multiscales"), ome.get("image-label")
        version = ome.get("version")
    else:
        ms, label = attrs.get("multiscales"), attrs.get("image-label")
        version = ms[0].get("version") if isinstance(ms, list) and ms and isinstance(ms[0], Mapping) else None
        if not isinstance(label, Mapping) or label.get("version") != version:
            return None
    if not isinstance(ms, list) or not ms or not isinstance(label, Mapping) or version not in _FORMAT:
        return None
    return version, ms, dict(label)
