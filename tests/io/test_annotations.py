"""Tests of nuclick_wsi.io.annotations: readers of prompts, writers of outlines, round trips."""

from __future__ import annotations

import gzip
import json
import time
import uuid
import zipfile
from pathlib import Path

import pytest
from shapely.geometry import MultiPolygon, Polygon

from nuclick_wsi.io.annotations import (
    default_color,
    detect_format,
    read_asap_polygons,
    read_imagescope_polygons,
    read_prompts,
    read_qupath_polygons,
    write_asap,
    write_geoparquet,
    write_qupath,
)
from nuclick_wsi.errors import AnnotationError
from nuclick_wsi.records import Instance

from tests.helpers import SHARED  # noqa: E402
ASAP_SAMPLES = SHARED / "annotations-samples"
DEMO_CSV = SHARED / "nuclick-demo" / "test_img.csv"
MONUSEG = SHARED / "monuseg-train" / "annotations" / "TCGA-21-5784-01Z-00-DX1.xml"


def point(x, y, **props):
    return {"type": "Feature", "geometry": {"type": "Point", "coordinates": [x, y]}, "properties": props}


def feature(geometry, **props):
    return {"type": "Feature", "geometry": geometry, "properties": props}


def square(x0, y0, size):
    return [[x0, y0], [x0 + size, y0], [x0 + size, y0 + size], [x0, y0 + size], [x0, y0]]


def write_json(path: Path, obj) -> Path:
    path.write_text(json.dumps(obj, indent=2))
    return path


def collection(*features):
    return {"type": "FeatureCollection", "features": list(features)}


# ------------------------------------------------------------------------------------------
# QuPath GeoJSON


def test_qupath_feature_collection_points(tmp_path):
    tumor = {"name": "Tumor", "color": [200, 0, 0]}
    path = write_json(
        tmp_path / "clicks.geojson",
        collection(
            point(10.5, 20.5, objectType="annotation", classification=tumor),
            point(30, 40),
            point(1, 2, classification={"name": "Stroma", "color": -16711936}),  # packed ARGB green
        ),
    )
    prompts = read_prompts(path)
    assert prompts.format == "qupath" and prompts.path == str(path)
    assert [(c.x, c.y) for c in prompts.clicks] == [(10.5, 20.5), (30, 40), (1, 2)]
    assert [c.index for c in prompts.clicks] == [0, 1, 2]
    assert [c.source for c in prompts.clicks] == ["feature 0", "feature 1", "feature 2"]
    assert prompts.clicks[0].class_name == "Tumor" and prompts.clicks[0].color == (200, 0, 0)
    assert prompts.clicks[1].class_name is None and prompts.clicks[1].color is None
    assert prompts.clicks[2].color == (0, 255, 0)
    assert prompts.skipped == [] and prompts.squiggles == [] and prompts.regions == []


@pytest.mark.parametrize(
    "obj",
    [
        point(5, 6),  # single Feature
        [point(5, 6)],  # list of Features
        {"type": "Point", "coordinates": [5, 6]},  # bare geometry
        [{"type": "Point", "coordinates": [5, 6]}],  # list of bare geometries
        {"features": [point(5, 6)]},  # QuPath reads any object with a features array
    ],
    ids=["feature", "list", "geometry", "geometry-list", "untyped-collection"],
)
def test_qupath_shapes(tmp_path, obj):
    prompts = read_prompts(write_json(tmp_path / "a.json", obj))
    assert [(c.x, c.y) for c in prompts.clicks] == [(5, 6)]


def test_qupath_multipoint_in_file_order(tmp_path):
    geom = {"type": "MultiPoint", "coordinates": [[3, 3], [1, 1], [2, 2]]}
    path = write_json(tmp_path / "a.geojson", collection(point(0, 0), feature(geom, classification={"name": "T"})))
    clicks = read_prompts(path).clicks
    assert [(c.x, c.y) for c in clicks] == [(0, 0), (3, 3), (1, 1), (2, 2)]
    assert [c.index for c in clicks] == [0, 1, 2, 3]
    assert clicks[1].source.startswith("feature 1") and clicks[1].class_name == "T"
    assert clicks[1].color is None  # no colour is invented when reading


def test_qupath_gzip_by_suffix_and_by_magic(tmp_path):
    data = json.dumps(collection(point(1, 2), point(3, 4))).encode()
    for name in ("a.geojson.gz", "disguised.json"):
        path = tmp_path / name
        path.write_bytes(gzip.compress(data))
        prompts = read_prompts(path)
        assert prompts.format == "qupath" and len(prompts.clicks) == 2


def test_qupath_zip(tmp_path):
    path = tmp_path / "a.zip"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("clicks.geojson", json.dumps(collection(point(1, 2))))
    assert len(read_prompts(path).clicks) == 1
    with zipfile.ZipFile(tmp_path / "two.zip", "w") as zf:
        zf.writestr("a.geojson", "{}")
        zf.writestr("b.geojson", "{}")
    with pytest.raises(AnnotationError, match="two.zip"):
        read_prompts(tmp_path / "two.zip")


def test_qupath_object_type_aliases(tmp_path):
    poly = {"type": "Polygon", "coordinates": [square(0, 0, 10)]}
    path = write_json(
        tmp_path / "a.geojson",
        collection(
            feature(poly, objectType="detection"),
            feature(poly, object_type="detection"),
            feature(poly, type="detection"),
            feature(poly, type="Feature"),  # not an object type: annotation
            feature(poly),  # missing: annotation
            feature(poly, objectType="cell"),
        ),
    )
    prompts = read_prompts(path)
    assert len(prompts.regions) == 2
    assert len(prompts.skipped) == 6
    assert sum("detection" in s for s in prompts.skipped) == 3
    assert any(s.startswith("feature 3") and "annotation" in s for s in prompts.skipped)
    assert any(s.startswith("feature 5") and "cell" in s for s in prompts.skipped)


def test_qupath_child_objects_are_read(tmp_path):
    """QuPath writes a hierarchy (FeatureCollection.wrap(objects, true), hierarchy JSON) with each object's
    children nested in its properties, as "childObjects" (read also as "children"); QuPath imports them all.
    Points nested under an area annotation are clicks, not silently dropped."""
    area = feature({"type": "Polygon", "coordinates": [square(0, 0, 100)]}, objectType="annotation")
    inner = point(30, 30, objectType="annotation", classification={"name": "Tumor", "color": [255, 0, 0]},
                  childObjects=[point(40, 40)])
    area["properties"]["childObjects"] = [point(10, 10), inner]
    legacy = point(60, 60, children=[point(70, 70)])
    path = write_json(tmp_path / "tree.geojson", collection(area, legacy, point(90, 90)))
    prompts = read_prompts(path)
    assert [(c.x, c.y) for c in prompts.clicks] == [(10, 10), (30, 30), (40, 40), (60, 60), (70, 70), (90, 90)]
    assert [c.source for c in prompts.clicks] == ["feature 0, child 0", "feature 0, child 1",
                                                  "feature 0, child 1, child 0", "feature 1", "feature 1, child 0",
                                                  "feature 2"]
    assert prompts.clicks[1].class_name == "Tumor" and len(prompts.regions) == 1
    bad = collection(point(1, 1, childObjects=["x"]))
    with pytest.raises(AnnotationError, match=r"bad\.geojson: feature 0, child 0 is not a JSON object"):
        read_prompts(write_json(tmp_path / "bad.geojson", bad))


def test_qupath_names_classification_and_legacy_colors(tmp_path):
    path = write_json(
        tmp_path / "a.geojson",
        collection(
            point(1, 1, classification={"names": ["Tumor", "Positive"], "color": [1, 2, 3]}),
            point(2, 2, classification={"name": "Old", "colorRGB": -65536}),  # QuPath 0.2/0.3
            point(3, 3, classification="Plain"),
            point(4, 4, color=[9, 8, 7]),  # object colour, no class
        ),
    )
    clicks = read_prompts(path).clicks
    assert clicks[0].class_name == "Tumor: Positive" and clicks[0].color == (1, 2, 3)
    assert clicks[1].class_name == "Old" and clicks[1].color == (255, 0, 0)
    assert clicks[2].class_name == "Plain"
    assert clicks[3].class_name is None and clicks[3].color == (9, 8, 7)


def test_qupath_plane(tmp_path):
    ok = point(1, 1, plane={"c": -1, "z": 0, "t": 0})
    bad_props = point(2, 2, plane={"c": -1, "z": 3, "t": 0})
    path = write_json(tmp_path / "planes.geojson", collection(ok, bad_props))
    with pytest.raises(AnnotationError, match=r"planes\.geojson.*feature 1.*z=3"):
        read_prompts(path)
    bad_geom = {"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 1], "plane": {"z": 0, "t": 2}}}
    path = write_json(tmp_path / "planes2.geojson", collection(ok, ok, bad_geom))
    with pytest.raises(AnnotationError, match=r"planes2\.geojson.*feature 2.*t=2"):
        read_prompts(path)
    assert len(read_prompts(write_json(tmp_path / "ok.geojson", collection(ok))).clicks) == 1


def test_qupath_lines_are_squiggles(tmp_path):
    line = {"type": "LineString", "coordinates": [[0, 0], [5, 5], [10, 0]]}
    multi = {"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[2, 2], [3, 3]]]}
    path = write_json(
        tmp_path / "a.geojson",
        collection(feature(line, classification={"name": "Gland", "color": [0, 0, 255]}), feature(multi), point(1, 1)),
    )
    prompts = read_prompts(path)
    assert len(prompts.squiggles) == 3 and len(prompts.clicks) == 1
    first = prompts.squiggles[0]
    assert first.points == ((0, 0), (5, 5), (10, 0))
    assert first.class_name == "Gland" and first.color == (0, 0, 255) and first.source == "feature 0"
    assert [s.index for s in prompts.squiggles] == [0, 1, 2]


def test_qupath_polygons_are_regions_and_skipped(tmp_path):
    hole = {"type": "Polygon", "coordinates": [square(0, 0, 10), square(2, 2, 2)]}
    multi = {"type": "MultiPolygon", "coordinates": [[square(20, 20, 5)], [square(40, 40, 5)]]}
    path = write_json(tmp_path / "a.geojson", collection(feature(hole), feature(multi), point(1, 1)))
    prompts = read_prompts(path)
    assert len(prompts.clicks) == 1
    assert len(prompts.regions) == 2 and len(prompts.skipped) == 2
    assert prompts.regions[0].area == pytest.approx(96)
    assert prompts.regions[1].geom_type == "MultiPolygon"


def test_qupath_null_geometry_skipped(tmp_path):
    path = write_json(tmp_path / "a.geojson", collection({"type": "Feature", "geometry": None, "properties": {}}, point(1, 1)))
    prompts = read_prompts(path)
    assert len(prompts.clicks) == 1 and prompts.skipped == ["feature 0: no geometry"]


def test_qupath_broken_json_names_line(tmp_path):
    path = tmp_path / "broken.geojson"
    path.write_text('{"type": "FeatureCollection",\n "features": [\n  {"type": "Feature",, }\n]}')
    with pytest.raises(AnnotationError, match=r"broken\.geojson.*line 3, column"):
        read_prompts(path)


@pytest.mark.parametrize(
    "content, message",
    [
        ("", "empty file"),
        ("   \n", "empty file"),
        ('{"type": "FeatureCollection", "features": []}', "no features"),
        ("[]", "no features"),
        ('{"type": "Nonsense"}', "not GeoJSON"),
        ('{"type": "Feature", "geometry": {"type": "Circle", "coordinates": [1, 2]}}', "feature 0.*Circle"),
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a", 2]}}', "feature 0.*coordinate"),
        ('{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]}}', "feature 0"),
        ('["x"]', "feature 0"),
        # a line of one point (hand-written or another tool's GeoJSON): one line naming the feature, no GEOS traceback
        ('{"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[1, 2]]}}', "feature 0.*2 or more"),
        ('[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1, 2]}}, {"type": "Feature", "geometry": '
         '{"type": "MultiLineString", "coordinates": [[[0, 0], [1, 1]], [[1, 2]]]}}]', "feature 1.*2 or more"),
        ('{"type": "Feature", "geometry": {"type": "MultiLineString", "coordinates": [[], [[0, 0], [1, 1]]]}}',
         "feature 0.*2 or more"),
        # an integer beyond float range (JSON allows any length): not an OverflowError traceback
        ('{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1' + "0" * 400 + ', 2]}}',
         "feature 0.*bad coordinate"),
    ],
)
def test_qupath_malformed(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(AnnotationError, match=rf"bad\.geojson.*{message}"):
        read_prompts(path)


def test_missing_file(tmp_path):
    with pytest.raises(AnnotationError, match="nothing.geojson"):
        read_prompts(tmp_path / "nothing.geojson")


# ------------------------------------------------------------------------------------------
# ASAP XML

ASAP_XML = """<?xml version="1.0"?>
<ASAP_Annotations>
\t<Annotations>
\t\t<Annotation Name="d1" Type="Dot" PartOfGroup="tumor" Color="#F4FA58">
\t\t\t<Coordinates><Coordinate Order="0" X="12,5" Y="7,25" /></Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="ps" Type="PointSet" PartOfGroup="None" Color="#112233">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="2" X="3" Y="3" />
\t\t\t\t<Coordinate Order="0" X="1" Y="1" />
\t\t\t\t<Coordinate Order="1" X="2" Y="2" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="gland" Type="Spline" PartOfGroup="squiggle" Color="#000000">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="1" X="10" Y="0" />
\t\t\t\t<Coordinate Order="0" X="0" Y="0" />
\t\t\t\t<Coordinate Order="2" X="10" Y="10" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="roi" Type="Polygon" PartOfGroup="tumor" Color="#F4FA58">
\t\t\t<Coordinates>
\t\t\t\t<Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="100" Y="0" />
\t\t\t\t<Coordinate Order="2" X="100" Y="100" /><Coordinate Order="3" X="0" Y="100" />
\t\t\t</Coordinates>
\t\t</Annotation>
\t\t<Annotation Name="m" Type="Measurement" PartOfGroup="None" Color="#F4FA58">
\t\t\t<Coordinates><Coordinate Order="0" X="0" Y="0" /><Coordinate Order="1" X="5" Y="5" /></Coordinates>
\t\t</Annotation>
\t</Annotations>
\t<AnnotationGroups>
\t\t<Group Name="tumor" PartOfGroup="None" Color="#ff0000"><Attributes /></Group>
\t\t<Group Name="squiggle" PartOfGroup="None" Color="#00ff00"><Attributes /></Group>
\t</AnnotationGroups>
</ASAP_Annotations>
"""


def test_asap_points_groups_and_decimal_commas(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(ASAP_XML)
    prompts = read_prompts(path)
    assert prompts.format == "asap" and prompts.path == str(path)
    clicks = prompts.clicks
    assert (clicks[0].x, clicks[0].y) == (12.5, 7.25)
    assert clicks[0].class_name == "tumor" and clicks[0].color == (255, 0, 0)  # the group's colour
    assert [(c.x, c.y) for c in clicks[1:]] == [(1, 1), (2, 2), (3, 3)]  # by Order
    assert clicks[1].class_name is None and clicks[1].color == (0x11, 0x22, 0x33)  # annotation colour
    assert [c.index for c in clicks] == [0, 1, 2, 3]
    assert clicks[0].source == "Annotation 'd1'"
    # without squiggle groups the spline is a region
    assert prompts.squiggles == [] and len(prompts.regions) == 2
    assert len(prompts.skipped) == 3 and any("Measurement" in s for s in prompts.skipped)


def test_asap_squiggle_groups(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(ASAP_XML)
    prompts = read_prompts(path, squiggle_groups=["squiggle"])
    assert len(prompts.squiggles) == 1 and len(prompts.regions) == 1
    sq = prompts.squiggles[0]
    assert sq.points == ((0, 0), (10, 0), (10, 10)) and sq.class_name == "squiggle" and sq.color == (0, 255, 0)


@pytest.mark.parametrize("name, count", [("asap_polygons_OC-AH-153.xml", 11), ("camelyon16_tumor_085_asap.xml", 50)])
def test_asap_real_samples(name, count):
    path = ASAP_SAMPLES / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    prompts = read_prompts(path)
    assert prompts.format == "asap"
    assert prompts.clicks == [] and len(prompts.regions) == count and len(prompts.skipped) == count
    assert all(r.area > 0 for r in prompts.regions)
    polygons = read_asap_polygons(path)
    assert len(polygons) == count and polygons[0]["name"] == "Annotation 0"


def test_asap_bad_coordinate(tmp_path):
    path = tmp_path / "a.xml"
    path.write_text(ASAP_XML.replace('X="3"', 'X="three"'))
    with pytest.raises(AnnotationError, match=r"a\.xml.*Annotation 'ps'"):
        read_prompts(path)


# ------------------------------------------------------------------------------------------
# XML safety and errors


def test_xml_malformed_names_line(tmp_path):
    path = tmp_path / "broken.xml"
    path.write_text('<?xml version="1.0"?>\n<ASAP_Annotations>\n<Annotations>\n<Annotation Name="a" >\n</ASAP_Annotations>\n')
    with pytest.raises(AnnotationError, match=r"broken\.xml.*line 5"):
        read_prompts(path)


def test_xml_bomb_is_refused_fast(tmp_path):
    entities = ['<!ENTITY lol0 "lollollollollollollollollollol">']
    entities += [f'<!ENTITY lol{i} "{f"&lol{i - 1};" * 10}">' for i in range(1, 10)]
    bomb = '<?xml version="1.0"?>\n<!DOCTYPE ASAP_Annotations [\n' + "\n".join(entities) + "\n]>\n"
    bomb += "<ASAP_Annotations><Annotations>&lol9;</Annotations></ASAP_Annotations>\n"
    path = tmp_path / "bomb.xml"
    path.write_text(bomb)
    start = time.perf_counter()
    with pytest.raises(AnnotationError, match=r"bomb\.xml.*entit"):
        read_prompts(path)
    assert time.perf_counter() - start < 2


def test_xml_unknown_root(tmp_path):
    path = tmp_path / "svg.xml"
    path.write_text("<svg><g/></svg>")
    with pytest.raises(AnnotationError, match=r"svg\.xml.*<svg>"):
        read_prompts(path)


def test_xml_without_annotations(tmp_path):
    path = tmp_path / "empty.xml"
    path.write_text("<ASAP_Annotations><Annotations/></ASAP_Annotations>")
    with pytest.raises(AnnotationError, match=r"empty\.xml.*no annotations"):
        read_prompts(path)


# ------------------------------------------------------------------------------------------
# Aperio ImageScope XML

IMAGESCOPE_XML = """<?xml version="1.0" encoding="utf-8"?>
<Annotations MicronsPerPixel="0.5">
  <Annotation Id="1" Name="tumor" LineColor="255">
    <Regions>
      <Region Id="1" Type="5"><Vertices><Vertex X="10.5" Y="20.5"/></Vertices></Region>
      <Region Id="2" Type="0"><Vertices><Vertex X="30" Y="40"/></Vertices></Region>
      <Region Id="3" Type="6"><Vertices><Vertex X="0" Y="0"/><Vertex X="5" Y="5"/><Vertex X="9" Y="1"/></Vertices></Region>
      <Region Id="4" Type="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="10" Y="0"/><Vertex X="10" Y="10"/><Vertex X="0" Y="10"/></Vertices></Region>
      <Region Id="5" Type="1"><Vertices><Vertex X="0" Y="0"/><Vertex X="4" Y="0"/><Vertex X="4" Y="4"/><Vertex X="0" Y="4"/></Vertices></Region>
      <Region Id="6" Type="2"><Vertices><Vertex X="0" Y="0"/><Vertex X="20" Y="10"/></Vertices></Region>
      <Region Id="7" Type="3"><Vertices><Vertex X="0" Y="0"/><Vertex X="5" Y="5"/></Vertices></Region>
      <Region Id="8" Type="0" NegativeROA="1"><Vertices><Vertex X="1" Y="1"/><Vertex X="2" Y="1"/><Vertex X="2" Y="2"/></Vertices></Region>
    </Regions>
  </Annotation>
  <Annotation Id="2" Name="glands" LineColor="65280">
    <Regions>
      <Region Id="9" Type="0"><Vertices><Vertex X="0" Y="0"/><Vertex X="50" Y="0"/><Vertex X="50" Y="50"/></Vertices></Region>
    </Regions>
  </Annotation>
</Annotations>
"""


def test_imagescope_points_polylines_regions(tmp_path):
    path = tmp_path / "scope.xml"
    path.write_text(IMAGESCOPE_XML)
    prompts = read_prompts(path)
    assert prompts.format == "imagescope"
    assert [(c.x, c.y) for c in prompts.clicks] == [(10.5, 20.5), (30, 40)]
    assert prompts.clicks[0].class_name == "tumor" and prompts.clicks[0].color == (255, 0, 0)
    assert len(prompts.squiggles) == 1 and prompts.squiggles[0].points == ((0, 0), (5, 5), (9, 1))
    assert len(prompts.regions) == 4  # freehand, rectangle, ellipse, the glands freehand
    ellipse = prompts.regions[2]
    assert ellipse.bounds == pytest.approx((0, 0, 20, 10))
    assert any("arrow" in s for s in prompts.skipped) and any("negative" in s for s in prompts.skipped)

    with_groups = read_prompts(path, squiggle_groups={"glands"})
    assert len(with_groups.squiggles) == 2 and len(with_groups.regions) == 3
    assert with_groups.squiggles[1].class_name == "glands" and with_groups.squiggles[1].color == (0, 255, 0)

    polygons, mpp = read_imagescope_polygons(path)
    assert mpp == 0.5 and len(polygons) == 4


def test_imagescope_monuseg():
    if not MONUSEG.exists():
        pytest.skip(f"{MONUSEG} not present")
    prompts = read_prompts(MONUSEG)
    assert prompts.format == "imagescope"
    assert prompts.clicks == [] and prompts.squiggles == []
    assert len(prompts.regions) == 398 and len(prompts.skipped) == 398
    polygons, mpp = read_imagescope_polygons(MONUSEG)
    assert len(polygons) == 398 and mpp == pytest.approx(0.2527)
    assert all(p.geom_type == "Polygon" and p.area > 0 for p in polygons)


# ------------------------------------------------------------------------------------------
# CSV


def test_demo_csv():
    if not DEMO_CSV.exists():
        pytest.skip(f"{DEMO_CSV} not present")
    prompts = read_prompts(DEMO_CSV)
    assert prompts.format == "csv" and len(prompts.clicks) == 84
    assert (prompts.clicks[0].x, prompts.clicks[0].y) == (3, 15)
    assert prompts.clicks[-1].index == 83 and prompts.clicks[-1].source == "line 84"


@pytest.mark.parametrize(
    "text, expected",
    [
        ("1,2\n3.5,4\n", [(1, 2, None), (3.5, 4, None)]),
        ("x,y,class\n1,2,Tumor\n3,4,\n", [(1, 2, "Tumor"), (3, 4, None)]),
        ("class;y;x\nT;2;1\n", [(1, 2, "T")]),
        ("1,5;2,5;Tumor\n", [(1.5, 2.5, "Tumor")]),
        ("x\ty\n1\t2\n", [(1, 2, None)]),
        ("# comment\n\n1, 2, A B\n", [(1, 2, "A B")]),
        ("Name,Centroid X px,Centroid Y px,Class\nn1,10,20,T\n", [(10, 20, "T")]),
        ("id;X (px);Y (px)\n7;1,5;2\n", [(1.5, 2, None)]),
        ("a,b\n1,2\n", [(1, 2, None)]),
        # QuPath's Counting tool, 'Save points' (PointIO.writePoints): a tab after every header name, class and
        # name and packed colour after x and y
        ("x\ty\tclass\tname\tcolor\t\n100.5\t200.25\tTumor\t\t-65536\n110.0\t210.0\tStroma\tn1\t-16711936\n",
         [(100.5, 200.25, "Tumor"), (110, 210, "Stroma")]),
    ],
    ids=["plain", "header", "named-columns", "semicolon-decimal-comma", "tab", "comment-blank", "pixel-columns",
         "pixel-units-in-brackets", "unknown-header-in-order", "qupath-save-points-tsv"],
)
def test_csv_variants(tmp_path, text, expected):
    path = tmp_path / "clicks.csv"
    path.write_text(text)
    prompts = read_prompts(path)
    assert prompts.format == "csv"
    assert [(c.x, c.y, c.class_name) for c in prompts.clicks] == expected


@pytest.mark.parametrize(
    "text, message",
    [
        ("1,2\n3,four\n", "line 2"),
        ("1,2\n\n5\n", "line 3"),
        ("x,y\n", "no clicks"),
        ("# only a comment\n", "empty"),
        # a first row with one number is data, not a header to drop
        ("nan,3\n1,2\n", "line 1"),
        # micrometres read as pixels would put every click elsewhere: QuPath's measurement export, hand-made files
        ("Centroid X \u00b5m,Centroid Y \u00b5m\n1,2\n", "line 1.*Centroid X \u00b5m.*in \u00b5m"),
        ("Image\tName\tClass\tCentroid X \u03bcm\tCentroid Y \u03bcm\ns.svs\tn\tT\t1\t2\n", "in \u00b5m"),
        ("x_um,y_um\n1,2\n", "'x_um', 'y_um' are in \u00b5m"),
        ("X (microns),Y (microns)\n1,2\n", "in \u00b5m"),
    ],
)
def test_csv_errors(tmp_path, text, message):
    path = tmp_path / "bad.csv"
    path.write_text(text)
    with pytest.raises(AnnotationError, match=rf"bad\.csv.*{message}"):
        read_prompts(path)


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be"])
@pytest.mark.parametrize("kind", ["geojson", "asap", "csv"])
def test_utf16_text_with_bom(tmp_path, kind, encoding):
    """Windows tools (Notepad's "Unicode", PowerShell 5 redirection) write UTF-16 with a byte-order mark:
    the same clicks as the UTF-8 file, not a "binary content" error."""
    text = {"geojson": json.dumps(collection(point(12.5, 7.25, classification={"name": "Tumeur épithéliale"}))),
            "asap": ASAP_XML.replace('<?xml version="1.0"?>', '<?xml version="1.0" encoding="UTF-16"?>'),
            "csv": "x,y,class\n12.5,7.25,Tumeur épithéliale\n"}[kind]
    plain, wide = tmp_path / f"a8.{kind}", tmp_path / f"a16.{kind}"
    plain.write_text(text.replace('encoding="UTF-16"', 'encoding="UTF-8"'), encoding="utf-8")
    bom = {"utf-16-le": b"\xff\xfe", "utf-16-be": b"\xfe\xff"}.get(encoding, b"")
    wide.write_bytes(bom + text.encode(encoding))
    got, want = read_prompts(wide), read_prompts(plain)
    assert got.format == want.format and len(got.clicks) >= 1
    assert [(c.x, c.y, c.class_name) for c in got.clicks] == [(c.x, c.y, c.class_name) for c in want.clicks]


def test_detect_format(tmp_path):
    (tmp_path / "a.txt").write_text(json.dumps(point(1, 1)))
    (tmp_path / "b.dat").write_text(ASAP_XML)
    (tmp_path / "c.geojson").write_text("1,2\n")
    assert detect_format(tmp_path / "a.txt") == "qupath"
    assert detect_format(tmp_path / "b.dat") == "asap"
    assert detect_format(tmp_path / "c.geojson") == "csv"


# ------------------------------------------------------------------------------------------
# writers and round trips


def make_instances() -> list[Instance]:
    holed = Polygon(square(10.123, 20.456, 30)[:-1], [square(20, 30, 5)[:-1]])
    plain = Polygon([(100, 100), (110, 100), (110, 112.5), (100, 112.5)])
    two = MultiPolygon([Polygon(square(200, 200, 4)[:-1]), Polygon(square(210, 210, 4)[:-1])])
    ns = uuid.UUID("12345678-1234-5678-1234-567812345678")
    return [
        Instance(1, str(uuid.uuid5(ns, "1")), holed, "Tumor", None, holed.area, 5.0, 0.91, 0),
        Instance(2, str(uuid.uuid5(ns, "2")), plain, None, None, plain.area, None, 0.5, 1),
        Instance(3, str(uuid.uuid5(ns, "3")), two, "Stroma", (1, 2, 3), two.area, None, 0.75, 2, "gland"),
    ]


def test_remembered_feature_text_follows_every_field_of_the_instance(tmp_path):
    """A watching process remembers the text of the features it wrote by their outline key and fields:
    an instance with the same outline key but another class colour, uuid, area, score or geometry is
    written as itself, and the memory holds only the last write of each file."""
    import dataclasses

    import shapely.affinity

    from nuclick_wsi.io.annotations.qupath_writer import FeatureMemory, instance_feature

    base = [dataclasses.replace(i, outline=f"key{i.label}") for i in make_instances()]
    variants = [base,
                [dataclasses.replace(i, color=(9, 9, 9)) for i in base],
                [dataclasses.replace(i, uuid=str(uuid.uuid4())) for i in base],
                [dataclasses.replace(i, area_px=i.area_px + 1, score=0.123) for i in base],
                [dataclasses.replace(i, geometry=shapely.affinity.translate(i.geometry, 0.5, 0)) for i in base],
                base]
    memory = FeatureMemory()
    out = tmp_path / "out.geojson"
    for k, instances in enumerate(variants):
        kind = "cell" if k == 3 else "detection"
        write_qupath(instances, out, object_type=kind, memo=memory.of(out))
        got = json.loads(out.read_text())["features"]
        assert got == [instance_feature(i, kind) for i in instances]
        assert len(memory.of(out)) == len(instances)  # this write's features only
        (tmp_path / f"{k}.geojson").write_bytes(out.read_bytes())
    assert (tmp_path / "0.geojson").read_bytes() == (tmp_path / "5.geojson").read_bytes()
    assert write_qupath(base, tmp_path / "plain.geojson").read_bytes() == out.read_bytes()  # no memory: same bytes
    for k in range(FeatureMemory.FILES):  # only the files written last are remembered
        write_qupath(base, tmp_path / f"other{k}.geojson", memo=memory.of(tmp_path / f"other{k}.geojson"))
    assert str(out.resolve()) not in memory.files and len(memory.files) == FeatureMemory.FILES


def same_shape(a, b, tol=0.01) -> bool:
    return a.normalize().equals_exact(b.normalize(), tol)


@pytest.mark.parametrize("name", ["out.geojson", "out.geojson.gz"])
def test_qupath_round_trip(tmp_path, name):
    instances = make_instances()
    path = write_qupath(instances, tmp_path / name)
    raw = path.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == name.endswith(".gz")
    back = read_qupath_polygons(path)
    assert len(back) == 3
    for inst, got in zip(instances, back):
        assert got["uuid"] == inst.uuid
        assert same_shape(got["geometry"], inst.geometry)
        assert got["class_name"] == inst.class_name
        assert got["object_type"] == "detection"
        assert got["measurements"]["Area px"] == pytest.approx(inst.area_px)
        assert got["measurements"]["NuClick score"] == pytest.approx(inst.score)
    assert len(back[0]["geometry"].interiors) == 1
    assert back[0]["color"] == default_color("Tumor")
    assert back[0]["measurements"]["Area um^2"] == 5.0
    assert "Area um^2" not in back[1]["measurements"]
    assert back[1]["color"] is None
    assert back[2]["color"] == (1, 2, 3) and back[2]["geometry"].geom_type == "MultiPolygon"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".nuclick-tmp")]


def test_qupath_output_layout(tmp_path):
    path = write_qupath(make_instances()[:2], tmp_path / "out.geojson")
    obj = json.loads(path.read_text())
    assert obj["type"] == "FeatureCollection"
    first, second = obj["features"]
    assert set(first) == {"type", "id", "geometry", "properties"}
    props = first["properties"]
    assert props["objectType"] == "detection" and props["isLocked"] is False
    assert props["classification"] == {"name": "Tumor", "color": list(default_color("Tumor"))}
    assert isinstance(props["measurements"], dict)
    assert "classification" not in second["properties"]
    ring = first["geometry"]["coordinates"][0]
    assert ring[0] == [10.12, 20.46]  # 2 decimals
    assert len(first["geometry"]["coordinates"]) == 2  # exterior + hole


def test_qupath_cell_and_annotation(tmp_path):
    path = write_qupath(make_instances(), tmp_path / "cells.json", object_type="cell")
    obj = json.loads(path.read_text())
    for feat in obj["features"]:
        assert feat["nucleusGeometry"] == feat["geometry"]
        assert feat["properties"]["objectType"] == "cell"
    back = read_qupath_polygons(path)
    assert back[0]["object_type"] == "cell" and same_shape(back[0]["nucleus_geometry"], back[0]["geometry"])
    path = write_qupath(make_instances(), tmp_path / "ann.json", object_type="annotation")
    assert {r["object_type"] for r in read_qupath_polygons(path)} == {"annotation"}
    with pytest.raises(ValueError):
        write_qupath(make_instances(), tmp_path / "x.json", object_type="tile")


def test_qupath_gzip_flag_overrides_suffix(tmp_path):
    path = write_qupath(make_instances(), tmp_path / "plain.geojson", gzip=True)
    assert path.read_bytes()[:2] == b"\x1f\x8b"
    path = write_qupath(make_instances(), tmp_path / "x.geojson.gz", gzip=False)
    assert path.read_bytes()[:1] == b"{"


def test_read_qupath_polygons_legacy_measurements(tmp_path):
    poly = {"type": "Polygon", "coordinates": [square(0, 0, 3)]}
    feat = feature(poly, objectType="detection", measurements=[{"name": "Area", "value": 9.0}])
    back = read_qupath_polygons(write_json(tmp_path / "old.json", collection(feat, point(1, 1))))
    assert len(back) == 1 and back[0]["measurements"] == {"Area": 9.0} and back[0]["uuid"] is None


def test_asap_round_trip(tmp_path):
    instances = make_instances()
    path = write_asap(instances, tmp_path / "out.xml")
    back = read_asap_polygons(path)
    assert [b["name"] for b in back] == ["1", "2", "3", "3.1"]
    assert [b["class_name"] for b in back] == ["Tumor", None, "Stroma", "Stroma"]
    # ASAP has no holes: the exterior comes back
    assert same_shape(back[0]["geometry"], Polygon(instances[0].geometry.exterior))
    assert same_shape(back[1]["geometry"], instances[1].geometry)
    assert same_shape(back[2]["geometry"], instances[2].geometry.geoms[0])
    assert same_shape(back[3]["geometry"], instances[2].geometry.geoms[1])
    assert back[2]["color"] == (1, 2, 3)
    # it reads back as prompts too: every outline is a region
    assert len(read_prompts(path).regions) == 4


def test_asap_groups_and_order(tmp_path):
    import xml.etree.ElementTree as ET

    path = write_asap(make_instances(), tmp_path / "out.xml")
    text = path.read_text()
    assert text.startswith('<?xml version="1.0"?>\n<ASAP_Annotations>\n\t<Annotations>')
    root = ET.fromstring(text)
    declared = {g.get("Name"): g.get("Color") for g in root.iter("Group")}
    used = {a.get("PartOfGroup") for a in root.iter("Annotation")} - {"None"}
    assert used == set(declared) == {"Tumor", "Stroma"}
    assert declared["Stroma"] == "#010203"
    assert all(c.startswith("#") and len(c) == 7 for c in declared.values())
    for ann in root.iter("Annotation"):
        orders = [int(c.get("Order")) for c in ann.iter("Coordinate")]
        assert orders == list(range(len(orders)))
        assert ann.get("Type") == "Polygon"
    first = next(root.iter("Annotation"))
    assert len(list(first.iter("Coordinate"))) == 4  # closing vertex not repeated


def test_geoparquet(tmp_path):
    import geopandas as gpd

    instances = make_instances()
    path = write_geoparquet(instances, tmp_path / "out.parquet", mpp=0.5)
    frame = gpd.read_parquet(path)
    assert list(frame.columns) == ["id", "label", "class_name", "area_px", "area_um2", "score", "confidence", "prompt_index", "kind", "geometry"]
    assert list(frame["id"]) == [i.uuid for i in instances]
    assert list(frame["label"]) == [1, 2, 3]
    assert frame["class_name"].isna().tolist() == [False, True, False]
    assert frame["area_um2"].tolist() == pytest.approx([5.0, instances[1].area_px * 0.25, instances[2].area_px * 0.25])
    assert list(frame["kind"]) == ["nucleus", "nucleus", "gland"]
    assert all(same_shape(a, b.geometry, 1e-9) for a, b in zip(frame.geometry, instances))


def test_writers_are_deterministic(tmp_path):
    for write, name in [
        (write_qupath, "a.geojson"),
        (write_qupath, "a.geojson.gz"),
        (write_asap, "a.xml"),
        (write_geoparquet, "a.parquet"),
    ]:
        first = write(make_instances(), tmp_path / name).read_bytes()
        second = write(make_instances(), tmp_path / name).read_bytes()
        assert first == second, name


def test_empty_outputs(tmp_path):
    assert json.loads(write_qupath([], tmp_path / "e.geojson").read_text()) == {"type": "FeatureCollection", "features": []}
    assert read_asap_polygons(write_asap([], tmp_path / "e.xml")) == []
    import geopandas as gpd

    assert len(gpd.read_parquet(write_geoparquet([], tmp_path / "e.parquet"))) == 0


def test_default_color_is_fixed():
    assert default_color("Tumor") == default_color("Tumor")
    assert all(0 <= c <= 255 for c in default_color("anything"))
    assert len({default_color(n) for n in ("Tumor", "Stroma", "Immune", "Necrosis", "Other")}) > 1


def test_qupath_odd_but_valid(tmp_path):
    collection_geom = {
        "type": "GeometryCollection",
        "geometries": [{"type": "Point", "coordinates": [1, 2]}, {"type": "LineString", "coordinates": [[0, 0], [1, 1]]}],
    }
    path = write_json(
        tmp_path / "a.geojson",
        collection({"type": "Feature", "geometry": {"type": "Point", "coordinates": [7, 8]}, "properties": None}, feature(collection_geom)),
    )
    prompts = read_prompts(path)
    assert [(c.x, c.y) for c in prompts.clicks] == [(7, 8), (1, 2)] and len(prompts.squiggles) == 1


def test_broken_gzip_and_binary(tmp_path):
    (tmp_path / "a.geojson.gz").write_bytes(b"\x1f\x8b" + b"\x00" * 20)
    with pytest.raises(AnnotationError, match=r"a\.geojson\.gz"):
        read_prompts(tmp_path / "a.geojson.gz")
    (tmp_path / "b.csv").write_bytes(b"\x00\x01\x02binary")
    with pytest.raises(AnnotationError, match=r"b\.csv.*binary"):
        read_prompts(tmp_path / "b.csv")
