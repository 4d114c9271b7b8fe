"""Helpers shared by the annotation readers and writers: file loading, colours, numbers, XML."""

from __future__ import annotations

import gzip
import math
import os
import zipfile
import zlib
from pathlib import Path
from typing import Any

from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import RGB

GZIP_MAGIC = b"\x1f\x8b"
ZIP_MAGIC = b"PK\x03\x04"
UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")  #: Notepad's "Unicode", Windows PowerShell 5 redirection
GEOJSON_SUFFIXES = (".geojson", ".json")

#: Fixed palette for classes without a colour (Okabe-Ito-like, then Tableau-like): readable on H&E.
PALETTE: tuple[RGB, ...] = (
    (230, 159, 0),
    (86, 180, 233),
    (0, 158, 115),
    (240, 228, 66),
    (0, 114, 178),
    (213, 94, 0),
    (204, 121, 167),
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
    (227, 119, 194),
    (188, 189, 34),
    (23, 190, 207),
)


def default_color(class_name: str) -> RGB:
    """A deterministic colour for a class that has none.

    Parameters
    ----------
    class_name : str
        The class name; the same name gives the same colour in every run and on every machine
        (CRC-32 of the UTF-8 name, not Python's salted ``hash``).

    Returns
    -------
    tuple of int
        ``(r, g, b)``, each 0-255.
    """
    return PALETTE[zlib.crc32(class_name.encode("utf-8")) % len(PALETTE)]


def color_for(class_name: str | None, color: RGB | None) -> RGB | None:
    """The colour to write: the given one, else the palette colour of the class, else None."""
    if color is not None:
        return tuple(int(c) for c in color)  # type: ignore[return-value]
    if class_name is None:
        return None
    return default_color(class_name)


def hex_color(rgb: RGB) -> str:
    """``(r, g, b)`` -> ``"#rrggbb"``."""
    return "#{:02x}{:02x}{:02x}".format(*rgb)


def parse_hex_color(text: str | None) -> RGB | None:
    """``"#rrggbb"`` (or ``"rrggbb"``) -> ``(r, g, b)``; None when absent or not a colour."""
    if not text:
        return None
    text = text.strip().lstrip("#")
    if len(text) != 6:
        return None
    try:
        value = int(text, 16)
    except ValueError:
        return None
    return ((value >> 16) & 255, (value >> 8) & 255, value & 255)


def unpack_rgb(value: int) -> RGB:
    """A packed (A)RGB integer, as QuPath stores it (possibly negative), -> ``(r, g, b)``."""
    value = int(value) & 0xFFFFFF
    return ((value >> 16) & 255, (value >> 8) & 255, value & 255)


def fmt_number(value: float, decimals: int = 2) -> float | int:
    """Round for output; integral values become ints so pixel-edge outlines stay compact.

    ``-0.0`` becomes ``0`` so that equal inputs always give equal bytes.
    """
    value = round(float(value), decimals)
    if value.is_integer():
        return int(value)
    return value


def parse_float(text: str) -> float:
    """A number from a text field, tolerating a decimal comma (``"12,5"``); raises ValueError."""
    text = text.strip()
    if "," in text and "." not in text and text.count(",") == 1:
        text = text.replace(",", ".")
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"not a finite number: {text!r}")
    return value


def check_exists(path: str | os.PathLike) -> Path:
    """Return ``path`` as a Path, or raise AnnotationError when it is not a readable file."""
    path = Path(path)
    if not path.exists():
        raise AnnotationError(f"{path}: annotation file does not exist")
    if not path.is_file():
        raise AnnotationError(f"{path}: not a file")
    return path


def read_head(path: Path, size: int = 65536) -> bytes:
    """The first ``size`` bytes of a file."""
    try:
        with open(path, "rb") as fh:
            return fh.read(size)
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read: {exc.strerror or exc}") from exc


def decode_text(data: bytes, path: Path) -> str:
    """Text of an annotation file: UTF-8 (a BOM is dropped), UTF-16 with a BOM, else Latin-1; binary is an error."""
    if data[:2] in UTF16_BOMS:
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError as exc:
            raise AnnotationError(f"{path}: broken UTF-16 text: {exc.reason}") from exc
    if b"\x00" in data:
        raise AnnotationError(f"{path}: not a text annotation file (binary content)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError:
        return data.decode("latin-1")


def load_json_text(path: Path) -> tuple[str, str]:
    """The GeoJSON text of a plain, gzip or zip file, and a description of where it came from.

    Gzip and zip are recognised by their magic bytes, whatever the suffix. A zip must hold exactly
    one ``.geojson``/``.json`` member (or exactly one member).
    """
    data = read_head(path, -1)
    where = str(path)
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as exc:
            raise AnnotationError(f"{path}: broken gzip file: {exc}") from exc
        where = f"{path} (after gunzip)"
    elif data[:4] == ZIP_MAGIC:
        data, member = _zip_member(path)
        where = f"{path}!{member}"
    return decode_text(data, path), where


def _zip_member(path: Path) -> tuple[bytes, str]:
    try:
        with zipfile.ZipFile(path) as zf:
            names = [n for n in zf.namelist() if not n.endswith("/")]
            candidates = [n for n in names if n.lower().endswith(GEOJSON_SUFFIXES)]
            if not candidates and len(names) == 1:
                candidates = names
            if len(candidates) != 1:
                found = ", ".join(names) if names else "nothing"
                raise AnnotationError(
                    f"{path}: a zip must hold exactly one .geojson or .json file; it holds {found}"
                )
            return zf.read(candidates[0]), candidates[0]
    except zipfile.BadZipFile as exc:
        raise AnnotationError(f"{path}: broken zip file: {exc}") from exc


def parse_xml(path: Path) -> Any:
    """Parse an XML file with defusedxml and return its root element.

    Raises
    ------
    AnnotationError
        For malformed XML (naming the line and column), for entity declarations (entity-expansion
        "bombs" are refused before any expansion) and for external references.
    """
    import defusedxml
    import defusedxml.ElementTree as DET

    try:
        return DET.parse(str(path)).getroot()
    except DET.ParseError as exc:
        line, col = getattr(exc, "position", (None, None))
        raise AnnotationError(f"{path}: malformed XML at line {line}, column {col}: {exc}") from exc
    except defusedxml.EntitiesForbidden as exc:
        raise AnnotationError(
            f"{path}: XML declares entities (entity '{exc.name}'); refused, as entity expansion "
            "can blow up memory (an 'XML bomb')"
        ) from exc
    except defusedxml.DefusedXmlException as exc:
        raise AnnotationError(f"{path}: XML refused for safety: {exc}") from exc
    except OSError as exc:
        raise AnnotationError(f"{path}: cannot read: {exc.strerror or exc}") from exc
