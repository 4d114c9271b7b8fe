"""Hostile input (issue 12): every reader either reads prompts or raises NuclickError naming the file.

Property-based (Hypothesis) over the annotation readers (QuPath GeoJSON plain/.gz/.zip, ASAP XML,
ImageScope XML, CSV), the batch manifest and QuPath's project.qpproj: random bytes, random JSON and
XML trees, huge coordinates, deep nesting, mixed encodings, BOMs, CRLF. Only two outcomes are
allowed; any other exception, or an example slower than the deadline, fails. A fixed example budget
keeps the file well under a minute on two cores.
"""

from __future__ import annotations

import gzip
import io
import json
import tempfile
import time
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nuclick_wsi.io.annotations import asap, imagescope, qupath, read_prompts
from nuclick_wsi.io.annotations import csv as csv_clicks
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.records import Prompts

#: a fixed example budget per test; the deadline is the "never a hang" bound (generous: CI machines are shared)
BUDGET = settings(max_examples=40, deadline=10_000, derandomize=True, database=None,
                  suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

# --- strategies ---------------------------------------------------------------------------------

NUMBERS = st.one_of(st.integers(min_value=-10**40, max_value=10**40), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 1e308, -1e308, 5e-324, 2**63, 2**64 + 1]))
GEOJSON_WORDS = ["type", "features", "geometry", "coordinates", "properties", "classification", "name", "color",
                 "colorRGB", "objectType", "object_type", "isLocked", "measurements", "plane", "z", "t", "id",
                 "Feature", "FeatureCollection", "Point", "MultiPoint", "LineString", "Polygon", "MultiPolygon",
                 "GeometryCollection", "geometries", "annotation", "detection", "value"]
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, st.text(max_size=8), st.sampled_from(GEOJSON_WORDS))
JSON_TREES = st.recursive(SCALARS, lambda kids: st.one_of(
    st.lists(kids, max_size=5), st.dictionaries(st.one_of(st.sampled_from(GEOJSON_WORDS), st.text(max_size=5)), kids,
                                                max_size=6)), max_leaves=40)
COORDS = st.lists(NUMBERS, min_size=0, max_size=3)


@st.composite
def geojson_like(draw):
    """FeatureCollections that look right, with random geometries, coordinates and properties."""
    def geometry():
        kind = draw(st.sampled_from(["Point", "MultiPoint", "LineString", "Polygon", "MultiPolygon", "Nope", None]))
        if kind == "Point":
            coords = draw(COORDS)
        elif kind in ("MultiPoint", "LineString"):
            coords = draw(st.lists(COORDS, max_size=4))
        else:
            coords = draw(st.lists(st.lists(COORDS, max_size=5), max_size=2))
        return {"type": kind, "coordinates": coords} if draw(st.booleans()) else draw(JSON_TREES)

    feats = [{"type": "Feature", "geometry": geometry(),
              "properties": draw(st.one_of(JSON_TREES, st.fixed_dictionaries(
                  {"objectType": st.sampled_from(["annotation", "detection", "cell", 3]),
                   "classification": JSON_TREES}, optional={"name": JSON_TREES, "plane": JSON_TREES})))}
             for _ in range(draw(st.integers(0, 4)))]
    return {"type": "FeatureCollection", "features": feats} if draw(st.booleans()) else feats


def deep(n: int, open_: str, close: str) -> str:
    return open_ * n + close * n


ENCODINGS = st.sampled_from(["utf-8", "utf-8-sig", "utf-16", "utf-16-le", "latin-1", "cp1252"])


@st.composite
def encoded(draw, text: str) -> bytes:
    enc = draw(ENCODINGS)
    if draw(st.booleans()):
        text = text.replace("\n", "\r\n")
    return text.encode(enc, errors="replace")


@st.composite
def json_bytes(draw) -> bytes:
    text = draw(st.one_of(
        st.builds(lambda o: json.dumps(o, allow_nan=True), geojson_like()),
        st.builds(lambda o: json.dumps(o, allow_nan=True), JSON_TREES),
        st.builds(deep, st.integers(1, 3000), st.just("["), st.just("]")),
        st.builds(lambda n: '{"a":' * n + "1" + "}" * n, st.integers(1, 3000)),
        st.text(max_size=200).map(lambda t: "{" + t),
    ))
    return draw(encoded(text))


XML_ATTRS = ["X", "Y", "Order", "Name", "Type", "PartOfGroup", "Color", "Id", "LineColor", "Text", "Value"]
XML_TAGS_ASAP = ["ASAP_Annotations", "Annotations", "Annotation", "Coordinates", "Coordinate", "AnnotationGroups",
                 "Group", "Attributes"]
XML_TAGS_SCOPE = ["Annotations", "Annotation", "Regions", "Region", "Vertices", "Vertex", "Attributes", "Attribute",
                  "RegionAttributeHeaders", "AttributeHeader", "Plots"]
ATTR_VALUES = st.one_of(st.sampled_from(["Dot", "PointSet", "Polygon", "Spline", "0", "1", "2", "4", "nan", "inf",
                                         "-1e400", "1e400", "", "12,5", "#F4FA58", "None", "0x10"]),
                        NUMBERS.map(str), st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=6))


@st.composite
def xml_tree(draw, tags: list[str], depth: int = 0) -> str:
    tag = draw(st.sampled_from(tags))
    attrs = draw(st.dictionaries(st.sampled_from(XML_ATTRS), ATTR_VALUES, max_size=4))
    attr_text = "".join(f' {k}="{_xml_escape(v)}"' for k, v in attrs.items())
    kids = "" if depth > 4 else "".join(draw(st.lists(xml_tree(tags, depth + 1), max_size=3)))
    return f"<{tag}{attr_text}>{kids}</{tag}>"


def _xml_escape(v: str) -> str:
    v = "".join(c for c in v if c in "\t\n\r" or (ord(c) >= 32 and ord(c) not in (0xFFFE, 0xFFFF)))
    return v.replace("&", "&amp;").replace("<", "&lt;").replace('"', "&quot;")


@st.composite
def xml_bytes(draw, root: str, tags: list[str]) -> bytes:
    body = draw(st.one_of(
        st.lists(xml_tree(tags), max_size=3).map("".join),
        st.builds(deep, st.integers(1, 2000), st.just("<Annotation>"), st.just("</Annotation>")),
        st.text(max_size=100).map(_xml_escape),
    ))
    text = f"<{root}>{body}</{root}>" if draw(st.booleans()) else f"<{root}>{body}"
    if draw(st.booleans()):
        text = '<?xml version="1.0" encoding="UTF-8"?>\n' + text
    return draw(encoded(text))


CSV_CELLS = st.one_of(NUMBERS.map(str), st.sampled_from(["x", "y", "class", "", '"', '"a,b"', "1,5", "nan", "-inf",
                                                         "1e999", "\ufeff", "x;y"]),
                      st.text(max_size=5))


@st.composite
def csv_bytes(draw) -> bytes:
    sep = draw(st.sampled_from([",", ";", "\t"]))
    rows = draw(st.lists(st.lists(CSV_CELLS, max_size=4), max_size=8))
    head = ["x,y", "x,y,class", "X;Y", ""][draw(st.integers(0, 3))]
    return draw(encoded("\n".join([head] + [sep.join(r) for r in rows]) + "\n"))


# --- the property --------------------------------------------------------------------------------


def only_two_outcomes(reader, data: bytes, name: str, kind: type = Prompts, **kw) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / name
        path.write_bytes(data)
        try:
            got = reader(path, **kw)
        except NuclickError as exc:
            assert str(path) in str(exc), f"error does not name the file: {exc}"
            return
        assert isinstance(got, kind), type(got)


def gz(data: bytes) -> bytes:
    return gzip.compress(data, mtime=0)


def zipped(data: bytes) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("clicks.geojson", data)
    return buf.getvalue()


@BUDGET
@given(st.binary(max_size=2000), st.sampled_from(["c.geojson", "c.json", "c.xml", "c.csv", "c.txt", "c.geojson.gz"]))
def test_random_bytes(data, name):
    only_two_outcomes(read_prompts, data, name)


@BUDGET
@given(json_bytes(), st.sampled_from([None, gz, zipped]))
def test_qupath_geojson(data, wrap):
    name = "c.geojson" if wrap is None else ("c.geojson.gz" if wrap is gz else "c.zip")
    data = data if wrap is None else wrap(data)
    only_two_outcomes(read_prompts, data, name)
    only_two_outcomes(qupath.read_prompts, data, name)


@BUDGET
@given(xml_bytes("ASAP_Annotations", XML_TAGS_ASAP))
def test_asap_xml(data):
    only_two_outcomes(read_prompts, data, "c.xml")
    only_two_outcomes(asap.read_prompts, data, "c.xml", squiggle_groups=["None"])


@BUDGET
@given(xml_bytes("Annotations", XML_TAGS_SCOPE))
def test_imagescope_xml(data):
    only_two_outcomes(read_prompts, data, "c.xml")
    only_two_outcomes(imagescope.read_prompts, data, "c.xml")


@BUDGET
@given(csv_bytes())
def test_csv(data):
    only_two_outcomes(read_prompts, data, "c.csv")
    only_two_outcomes(csv_clicks.read_prompts, data, "c.csv")


@BUDGET
@given(st.one_of(csv_bytes(), st.binary(max_size=500),
                 st.builds(lambda rows: ("slide,points,mpp,weights,stem,bounds_offset\n" + "\n".join(
                     ",".join(r) for r in rows)).encode(),
                           st.lists(st.lists(CSV_CELLS, min_size=2, max_size=7), max_size=5))))
def test_manifest(data):
    from nuclick_wsi.workflows.cohort.manifest import Manifest, read_manifest

    only_two_outcomes(read_manifest, data, "manifest.csv", Manifest, check_files=False)


@BUDGET
@given(st.one_of(json_bytes(), st.binary(max_size=500), st.builds(
    lambda imgs: json.dumps({"version": "0.4.3", "images": imgs}).encode(),
    st.lists(st.one_of(JSON_TREES, st.fixed_dictionaries(
        {"imageName": JSON_TREES, "entryID": JSON_TREES, "serverBuilder": JSON_TREES},
        optional={"uri": JSON_TREES, "metadata": JSON_TREES})), max_size=3))))
def test_qupath_project(data):
    from nuclick_wsi.workflows.qupath_project.project import QuPathProject, read_project

    only_two_outcomes(read_project, data, "project.qpproj", QuPathProject)


DEEP = {
    "deep.geojson": "[" * 100_000 + "]" * 100_000,
    "deep-object.geojson": '{"type":' * 50_000 + "1" + "}" * 50_000,
    "deep-asap.xml": "<ASAP_Annotations>" + deep(50_000, "<Annotation>", "</Annotation>") + "</ASAP_Annotations>",
    "deep-scope.xml": "<Annotations>" + deep(50_000, "<Region>", "</Region>") + "</Annotations>",
}


@pytest.mark.parametrize("name", sorted(DEEP))
def test_deep_nesting(tmp_path, name):
    """Very deep nesting: prompts or a one-line error naming the file, in bounded time."""
    path = tmp_path / name
    path.write_text(DEEP[name])
    t0 = time.perf_counter()
    try:
        got = read_prompts(path)
    except NuclickError as exc:
        assert str(path) in str(exc)
    else:
        assert isinstance(got, Prompts)
    assert time.perf_counter() - t0 < 30
