"""The QC report (S.qc.html, S.review.geojson, index.html), rendered in a real headless Chromium."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers import dark_model, entry, point_feature, write_clicks, write_project, write_tiff_slide
from nuclick_wsi.errors import NuclickError
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.qc import REVIEW_CLASS, load_outputs, rebuild, write_qc
from nuclick_wsi.qc.review import shared_edges
from nuclick_wsi.workflows.cohort import BatchOptions, run_batch
from nuclick_wsi.workflows.qupath_project import run_project

BG, DARK, FAINT = (235, 200, 225), (70, 40, 100), (128, 108, 124)  # RGB means 0.86, 0.27, 0.47 (DarkNet: 0.5)


def _browser() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "chrome"):
        if shutil.which(name):
            return shutil.which(name)
    return None


CHROMIUM = _browser()
needs_browser = pytest.mark.skipif(CHROMIUM is None, reason="no Chromium on PATH (.ci/run installs Debian's chromium)")


def _disk(rgb, cx, cy, r, colour):
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = colour


def planted_case(root: Path) -> tuple[Path, Path, dict[str, int]]:
    """A slide of dark nuclei with planted bad cases, and its clicks (CSV). Returns click indices by case."""
    rgb = np.zeros((512, 640, 3), np.uint8)
    rgb[:] = BG
    clicks: list[tuple[float, float, str]] = []
    for k in range(12):  # ordinary, isolated nuclei
        cx, cy = 50 + 60 * (k % 6), 60 + 70 * (k // 6)
        _disk(rgb, cx, cy, 7, DARK)
        clicks.append((cx + 0.5, cy + 0.5, "Tumor"))
    case = {}
    _disk(rgb, 400, 300, 7, FAINT)  # a faint nucleus: the least confident
    case["faint"] = len(clicks)
    clicks.append((400.5, 300.5, "Tumor"))
    case["background"] = len(clicks)  # a click on background
    clicks.append((200.5, 330.5, "Tumor"))
    _disk(rgb, 100, 330, 7, DARK)  # two nuclei joined by a thin bridge, a click on each and one between
    _disk(rgb, 124, 330, 7, DARK)
    rgb[329:331, 100:125] = DARK
    clicks += [(100.5, 330.5, "Tumor"), (124.5, 330.5, "Tumor")]
    case["between"] = len(clicks)
    clicks.append((112.5, 330.5, "Tumor"))
    rgb[420:450, 250:420] = DARK  # a band longer than the model's 128 px patch
    case["band"] = len(clicks)
    clicks.append((335.5, 435.5, "Stroma"))
    slide = write_tiff_slide(root / "planted.tif", 640, 512, 0.5, rgb=rgb, tile=128)
    pts = root / "planted.csv"
    pts.write_text("x,y,class\n" + "".join(f"{x},{y},{c}\n" for x, y, c in clicks))
    return slide, pts, case


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("qc")
    slide, pts, case = planted_case(root)
    out = root / "out"
    res = segment(slide, pts, out, options=SegmentOptions(progress=False, qc=True),
                  models=Models(nuclei=dark_model(0.5)))
    return out, res.report, case


def _review(out: Path) -> dict[int, list[str]]:
    """Click index -> review names."""
    doc = json.loads((out / "planted.review.geojson").read_text())
    found: dict[int, list[str]] = {}
    for f in doc["features"]:
        p = f["properties"]
        assert p["objectType"] == "annotation" and p["classification"]["name"] == REVIEW_CLASS
        name = p["name"]
        if name.startswith("click "):
            k = int(name.split()[1].rstrip(":"))
            assert f["geometry"]["type"] == "Point"
        else:
            k = int(name[1:].split()[0]) - 1  # "#label ...", label = click index + 1
            assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        found.setdefault(k, []).append(name)
    return found


def test_planted_bad_outlines_are_in_the_review_list(planted):
    out, report, case = planted
    found = _review(out)
    assert "no outline: nothing segmented" in found[case["background"]][0]
    # the faint nucleus is the least confident (stand-in network: 0.76, the others 1.0): the rank rule
    assert "low confidence" in found[case["faint"]][0] and "lowest 2%" in found[case["faint"]][0]
    assert "clipped at the patch border" in found[case["band"]][0]
    between = " ".join(found[case["between"]])
    assert "click on the outline's edge" in between or "merged into a neighbour" in between
    ordinary = [k for k in range(12) if k in found]
    assert not ordinary, f"isolated ordinary nuclei flagged: {[found[k] for k in ordinary]}"


def test_shared_edges_counts_pixel_edges_across_chunks(tmp_path):
    from nuclick_wsi.store.labels import LabelStore

    lab = np.zeros((40, 40), np.uint32)
    lab[10:20, 10:20] = 1  # a 10 x 10 square...
    lab[10:20, 20:30] = 2  # ...sharing a 10-px side with another; both cross the chunk border at x = 16
    lab[30:32, 30:32] = 3
    store = LabelStore.create(tmp_path / "l.zarr", 40, 40, chunk=16, mpp=0.5)
    for cy in range(3):
        for cx in range(3):
            store.write_chunk(cy, cx, lab[cy * 16:(cy + 1) * 16, cx * 16:(cx + 1) * 16])
    store.finalize([{"label": 1}, {"label": 2}, {"label": 3}])
    perim, shared = shared_edges(tmp_path / "l.zarr")
    assert perim == {1: 40, 2: 40, 3: 8} and shared == {1: 10, 2: 10}


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_shared_edges_equal_a_count_over_the_whole_image(tmp_path, seed):
    """Blobs on a 70 x 53 image in chunks of 16 (edge chunks smaller, some chunks empty, so not stored):
    the chunk-by-chunk count equals one over the whole image, borders between chunks included."""
    from collections import Counter

    from nuclick_wsi.store.labels import LabelStore

    rng = np.random.default_rng(seed)
    lab = np.zeros((53, 70), np.uint32)
    for k in range(1, 25):
        y, x = rng.integers(0, 53), rng.integers(0, 70)
        lab[max(0, y - 4):y + rng.integers(1, 6), max(0, x - 3):x + rng.integers(1, 7)] = k
    lab[:, 32:48] = 0  # a column of chunks with nothing in it
    store = LabelStore.create(tmp_path / "l.zarr", 70, 53, chunk=16, mpp=0.5)
    for cy in range(4):
        for cx in range(5):
            store.write_chunk(cy, cx, lab[cy * 16:(cy + 1) * 16, cx * 16:(cx + 1) * 16])
    store.finalize([{"label": int(k)} for k in np.unique(lab) if k])
    perim, shared = Counter(), Counter()
    for a, b in ((lab[:, :-1], lab[:, 1:]), (lab[:-1], lab[1:])):
        for one, other in ((a, b), (b, a)):
            on = (one != other) & (one > 0)
            perim.update(one[on].tolist())
            shared.update(one[on & (other > 0)].tolist())
    assert shared_edges(tmp_path / "l.zarr") == (dict(perim), dict(shared))


def test_report_rebuilds_without_the_model_and_says_what_is_missing(planted, tmp_path):
    out, report, _ = planted
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "planted.qc.html").unlink()
    written, failures = rebuild(copy)
    assert not failures and (copy / "planted.qc.html").is_file() and (copy / "index.html").is_file()
    assert (copy / "planted.review.geojson").read_bytes() == (out / "planted.review.geojson").read_bytes()
    (copy / "planted.geojson").unlink()
    with pytest.raises(NuclickError, match=r"planted\.geojson: not found"):
        write_qc(copy, "planted")
    assert load_outputs(out, "planted").measure == "confidence"


def _with_click_records(out: Path, copy: Path, edit) -> Path:
    """A copy of the planted outputs whose report's click records went through ``edit``."""
    shutil.copytree(out, copy)
    rep_path = copy / "planted.report.json"
    rep = json.loads(rep_path.read_text())
    for c in rep["clicks"]:
        edit(c)
    rep_path.write_text(json.dumps(rep))
    return copy


def test_reports_without_confidence_fall_back_to_the_score(planted, tmp_path):
    """Reports written before the outline confidence existed: the mean score ranks the outlines."""
    out, _, case = planted
    copy = _with_click_records(out, tmp_path / "old", lambda c: c.pop("confidence", None))
    assert load_outputs(copy, "planted").measure == "score"
    write_qc(copy, "planted")
    found = _review(copy)
    assert [n for k, names in found.items() for n in names if "low score" in n] == [
        f"#{case['faint'] + 1} Tumor: low score (0.764, lowest 2%)"]
    assert "this run has no confidence measure" in (copy / "planted.qc.html").read_text()


def test_no_qc_removes_an_earlier_page(planted, tmp_path):
    out, _, _ = planted
    copy = tmp_path / "c"
    shutil.copytree(out, copy)
    rep = json.loads((copy / "planted.report.json").read_text())
    segment(rep["slide"]["path"], rep["points"]["path"], copy, options=SegmentOptions(progress=False),
            models=Models(nuclei=dark_model(0.5)))
    assert not (copy / "planted.qc.html").exists() and not (copy / "planted.review.geojson").exists()
    for name in ("planted.geojson", "planted.labels.zarr/instances.csv"):  # the QC leaves the outputs as they were
        assert (copy / name).read_bytes() == (out / name).read_bytes(), name


# --- in a real browser ---------------------------------------------------------------------------

_CHECK_JS = """
<script>
window.addEventListener('load', function () {
  var imgs = Array.from(document.images).map(function (i) { return [i.alt, i.naturalWidth]; });
  var qc = {};
  document.querySelectorAll('[data-qc]').forEach(function (e) {
    if (e.tagName !== 'IMG' && e.tagName !== 'DIV') qc[e.dataset.qc] = qc[e.dataset.qc] || [];
    if (e.tagName !== 'IMG' && e.tagName !== 'DIV') qc[e.dataset.qc].push(e.textContent.trim());
  });
  var figs = {};
  document.querySelectorAll('div.gal').forEach(function (d) { figs[d.dataset.qc] = d.querySelectorAll('img').length; });
  var rows = Array.from(document.querySelectorAll('#slides tbody tr')).map(function (r) {
    return [r.dataset.stem, r.className, (r.querySelector('a') || {}).href || ''];
  });
  var sorted = [];  // click the "status" column title twice: descending
  var th = document.querySelectorAll('#slides th.sort')[1];
  if (th) { th.click(); th.click(); sorted = Array.from(document.querySelectorAll('#slides tbody tr')).map(
    function (r) { return r.dataset.stem; }); }
  var pre = document.createElement('pre'); pre.id = 'qc-check';
  pre.textContent = JSON.stringify({imgs: imgs, qc: qc, figs: figs, rows: rows, sorted: sorted});
  document.body.appendChild(pre);
});
</script>
"""


def _chromium(*args: str) -> str:
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def _rendered(page: Path, tmp_path: Path) -> dict:
    """Load ``page`` (with a checking script added to a copy beside it) and read what the browser saw."""
    probe = page.with_name(f"probe-{page.name}")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _CHECK_JS + "</body>"), encoding="utf-8")
    try:
        dom = _chromium("--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    finally:
        probe.unlink()
    start = dom.index('<pre id="qc-check">') + len('<pre id="qc-check">')
    import html

    return json.loads(html.unescape(dom[start:dom.index("</pre>", start)]))


@needs_browser
def test_page_renders_every_image_and_the_report_counts(planted, tmp_path):
    out, report, _ = planted
    seen = _rendered(out / "planted.qc.html", tmp_path)
    assert len(seen["imgs"]) >= 4 and all(w > 0 for _, w in seen["imgs"]), seen["imgs"]
    t = report["totals"]
    assert seen["qc"]["clicks"] == [str(t["clicks"])]
    assert seen["qc"]["segmented"] == [str(t["segmented"])]
    assert seen["qc"]["skipped"] == [str(t["skipped"])]
    n_review = len(json.loads((out / "planted.review.geojson").read_text())["features"])
    assert seen["qc"]["review"] == [str(n_review)]
    assert seen["figs"].get("low", 0) + seen["figs"].get("sample", 0) == min(t["segmented"], 48)


def _overview_variance(page: Path, tmp_path: Path) -> float:
    """Screenshot of the page with only its overview shown; variance of the overview's pixels."""
    only = page.with_name(f"only-{page.name}")
    style = ("<style>body *{visibility:hidden}img[data-qc=overview]{visibility:visible;position:fixed;top:0;left:0;"
             "max-height:none}</style>")
    only.write_text(page.read_text(encoding="utf-8").replace("</head>", style + "</head>"), encoding="utf-8")
    shot = tmp_path / f"{page.stem}.png"
    try:
        _chromium("--window-size=900,700", f"--screenshot={shot}", only.as_uri())
    finally:
        only.unlink()
    grey = np.asarray(Image.open(shot).convert("L"), float)[:600, :700]
    return float(grey.var())


@needs_browser
def test_screenshot_catches_a_blank_overview(planted, tmp_path, monkeypatch):
    out, _, _ = planted
    assert _overview_variance(out / "planted.qc.html", tmp_path) > 100
    import nuclick_wsi.qc.overview as ov

    blank = tmp_path / "blank"
    shutil.copytree(out, blank)
    # a bug that paints the overview white (tissue and outlines lost) must fail the check above
    monkeypatch.setattr(ov, "paint_overview", lambda tissue, lab, inputs, colours: np.ones(tissue.shape, np.float32))
    write_qc(blank, "planted")
    assert _overview_variance(blank / "planted.qc.html", tmp_path) < 100


@needs_browser
def test_index_lists_slides_failures_first_and_links_their_reports(tmp_path):
    slide, pts, _ = planted_case(tmp_path)
    bad = tmp_path / "bad.csv"
    bad.write_text("x,y\n5000,5000\n")  # no click on the slide: that row fails
    man = tmp_path / "manifest.csv"
    man.write_text(f"slide,points,stem\n{slide},{pts},good\n{slide},{bad},bad\n")
    out = tmp_path / "out"
    res = run_batch(man, out, BatchOptions(segment=SegmentOptions(progress=False, qc=True)),
                    models=Models(nuclei=dark_model(0.5)))
    assert [r.status for r in res.results] == ["segmented", "failed"]
    seen = _rendered(out / "index.html", tmp_path)
    assert [r[:2] for r in seen["rows"]] == [["bad", "failed"], ["good", "segmented"]]
    assert seen["rows"][1][2].endswith("good.qc.html") and (out / "good.qc.html").is_file()
    assert seen["qc"]["clicks"] == ["", str(res.results[0].clicks)]
    assert seen["sorted"] == ["good", "bad"]  # sorted by status, descending, in the browser


def test_report_command_rebuilds_and_fails_in_one_line(planted, tmp_path):
    from click.testing import CliRunner

    from nuclick_wsi.cli.main import main

    out, _, _ = planted
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    for p in copy.glob("*.html"):
        p.unlink()
    res = CliRunner().invoke(main, ["report", str(copy)])
    assert res.exit_code == 0, res.output
    assert (copy / "planted.qc.html").is_file() and (copy / "index.html").is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    res = CliRunner().invoke(main, ["report", str(empty)])
    assert res.exit_code == 1 and res.stderr.strip().splitlines() == [
        f"Error: {empty}: no S.report.json here (outputs of nuclick-wsi segment)"]


def test_qupath_run_writes_the_results_index(tmp_path):
    slide, _, _ = planted_case(tmp_path)
    proj = write_project(tmp_path / "project", [entry(slide, slide.name, size=(640, 512), entry_id=1, mpp=0.5)])
    write_clicks(proj, slide.name, [point_feature(50.5, 60.5, "Tumor"), point_feature(110.5, 60.5, "Tumor")])
    run = run_project(proj, models=Models(nuclei=dark_model(0.5)), options=SegmentOptions(progress=False, qc=True))
    assert [o.status for o in run.images] == ["segmented"], run.images[0].message
    results = proj.parent / "nuclick" / "results"
    index = (results / "index.html").read_text()
    assert f'href="{slide.name}.qc.html"' in index and (results / f"{slide.name}.review.geojson").is_file()


def test_confidence_is_used_when_the_run_has_it(planted, tmp_path):
    """Runs with a per-outline ``confidence`` (issue 11): the page shows it, low values are flagged."""
    out, _, case = planted
    ordinary = 3

    def one_low(c: dict) -> None:
        if c["status"] == "segmented":
            c["confidence"] = 0.3 if c["index"] == ordinary else 0.97

    copy = _with_click_records(out, tmp_path / "conf", one_low)
    assert load_outputs(copy, "planted").measure == "confidence"
    write_qc(copy, "planted")
    names = [f["properties"]["name"] for f in json.loads((copy / "planted.review.geojson").read_text())["features"]]
    assert [n for n in names if "low confidence" in n] == [f"#{ordinary + 1} Tumor: low confidence (0.300 < 0.333)"]
    assert "NuClick confidence (soft IoU" in (copy / "planted.qc.html").read_text()


def test_review_flags_areas_far_from_their_class_median_on_many_outlines(tmp_path):
    """Each outline is compared with its class's median (classes under 5 outlines: the overall median);
    computed once per class, so thousands of outlines take no longer than a few."""
    from shapely.geometry import box

    from nuclick_wsi.qc.data import Outline, QcInputs
    from nuclick_wsi.qc.review import review
    from nuclick_wsi.store.labels import LabelStore

    def outline(k, side, cls):
        x = 40.0 * k
        return Outline(label=k + 1, index=k, uuid=f"u{k}", x=x + side / 2, y=side / 2, class_name=cls,
                       area_px=side * side, area_um2=None, value=0.9, geometry=box(x, 0, x + side, side))

    sides = [10.0] * 3000 + [20.0] + [30.0] * 3100 + [30.0, 60.0]  # A: 10 (one 20), C: 30, B: two outlines
    classes = ["A"] * 3001 + ["C"] * 3100 + ["B", "B"]
    outlines = [outline(k, s, c) for k, (s, c) in enumerate(zip(sides, classes))]
    labels = LabelStore.create(tmp_path / "s.labels.zarr", 10 ** 6, 100, mpp=0.25)  # no pixels: nothing merged
    labels.finalize([])
    inputs = QcInputs(out_dir=tmp_path, stem="s", report={"slide": {"width": 10 ** 6, "height": 100}},
                      outlines=outlines, skipped=[], measure="confidence", labels_path=tmp_path / "s.labels.zarr",
                      geojson_path=tmp_path, slide_path=tmp_path)
    found = review(inputs)
    area = {label for label, why in found.items() if any(w.startswith("area far") for w in why)}
    # A's 20 px square is 4x its class median (100 px^2); B has 2 outlines, so its 60 px square
    # (3600 px^2) is judged against the median of all (the C squares: 900 px^2): 4x
    assert area == {3001, 6103}
    assert "(4x)" in " ".join(found[3001])


def test_overview_is_read_once_per_slide_file(planted, tmp_path, monkeypatch):
    """A rerun's page takes the tissue picture from the cache; a changed slide file or frame is read again."""
    import os

    import nuclick_wsi.qc.overview as ov

    out, _, _ = planted
    monkeypatch.setenv("NUCLICK_WSI_CACHE_DIR", str(tmp_path / "cache"))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    reads = []
    real = ov.read_overview
    monkeypatch.setattr(ov, "read_overview", lambda *a, **k: reads.append(1) or real(*a, **k))
    write_qc(copy, "planted")
    first = (copy / "planted.qc.html").read_text(encoding="utf-8")
    cached = list((tmp_path / "cache" / "overview").glob("*.png"))
    assert len(reads) == 1 and len(cached) == 1
    write_qc(copy, "planted")
    assert len(reads) == 1  # not read again
    again = (copy / "planted.qc.html").read_text(encoding="utf-8")
    img = lambda page: page.split('data-qc="overview"')[0].rsplit("<img", 1)[1]  # noqa: E731
    assert img(again) == img(first)  # the same overview, pixel for pixel (PNG is lossless)
    slide = Path(json.loads((copy / "planted.report.json").read_text())["slide"]["path"])
    st = slide.stat()
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))  # the slide file changed
    try:
        write_qc(copy, "planted")
    finally:
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(reads) == 2
    # a corrupt cache entry is read again, never shown
    for p in (tmp_path / "cache" / "overview").glob("*.png"):
        p.write_bytes(b"not a png")
    write_qc(copy, "planted")
    assert len(reads) == 3
    # the newest CACHE_KEEP are kept
    monkeypatch.setattr(ov, "CACHE_KEEP", 1)
    os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns + 2_000_000))
    try:
        write_qc(copy, "planted")
    finally:
        os.utime(slide, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert len(list((tmp_path / "cache" / "overview").glob("*.png"))) == 1


def test_overview_without_a_writable_cache(planted, tmp_path, monkeypatch):
    out, _, _ = planted
    blocker = tmp_path / "file"
    blocker.write_text("a file where the cache folder should be")
    monkeypatch.setenv("NUCLICK_WSI_CACHE_DIR", str(blocker))
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    write_qc(copy, "planted")
    assert (copy / "planted.qc.html").read_text(encoding="utf-8").count('data-qc="overview"') == 1


def test_index_links_survive_hash_and_percent_in_names():
    """QuPath image names keep '#', '%' and spaces ("Case #12 50%.svs"): the index's link must be a
    URL that names that file, not one cut at '#' (a fragment) or read with '%12' as an escape."""
    from html.parser import HTMLParser
    from urllib.parse import unquote, urlsplit

    from nuclick_wsi.qc.html import index_page

    name = "Case #12 50% (HE)?.svs.qc.html"
    text = index_page("t", [{"stem": "Case #12 50% (HE)?.svs", "status": "segmented", "report": name}])
    hrefs = []

    class Links(HTMLParser):
        def handle_starttag(self, tag, attrs):
            if tag == "a":
                hrefs.append(dict(attrs)["href"])

    Links().feed(text)
    parts = urlsplit(hrefs[0])
    assert (parts.scheme, parts.netloc, parts.query, parts.fragment) == ("", "", "", "")
    assert unquote(parts.path) == name


def test_report_for_one_stem_keeps_every_slide_in_the_index(planted, tmp_path):
    """report OUT --stem S rebuilt index.html with S alone: the cohort's other slides vanished from it."""
    out, _, _ = planted
    copy = tmp_path / "o"
    shutil.copytree(out, copy)
    for suffix in (".report.json", ".review.geojson", ".qc.html"):
        shutil.copy(copy / f"planted{suffix}", copy / f"other{suffix}")
    (copy / "gone.failed.json").write_text(json.dumps({"error": "cannot open slide gone.svs"}))
    written, failures = rebuild(copy, ["planted"])
    assert not failures and copy / "index.html" in written and not (copy / "other.qc.html").stat().st_size == 0
    index = (copy / "index.html").read_text(encoding="utf-8")
    for stem in ("planted", "other", "gone"):
        assert f'data-v="{stem}"' in index, stem
    assert 'href="other.qc.html"' in index
