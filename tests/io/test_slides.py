"""Tests of nuclick_wsi.io.slides.base: readers, um/px, bounds, pixel placement, errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest

from nuclick_wsi.io.slides import registry as slide_registry
from nuclick_wsi.io.slides.memory import ArraySource
from nuclick_wsi.errors import ResolutionError, SlideError
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.io.slides.memory import array_source
from nuclick_wsi.io.slides.registry import ReaderSpec, open_slide, register_reader
from nuclick_wsi.io.slides.resolution import require_mpp

openslide = pytest.importorskip("openslide")
tifffile = pytest.importorskip("tifffile")
from PIL import Image  # noqa: E402

from tests.helpers import SHARED, write_leica_scn  # noqa: E402

DATA = SHARED
SLIDES = DATA / "slides"
CMU = SLIDES / "CMU-1-Small-Region.svs"
TCGA = SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"
MONUSEG = DATA / "monuseg-train" / "images" / "TCGA-18-5592-01Z-00-DX1.tif"

needs = pytest.mark.skipif(not SLIDES.is_dir(), reason="shared test data not present")


def _openslide_rgb(path: Path, x: int, y: int, w: int, h: int, level: int = 0) -> np.ndarray:
    """Reference read through OpenSlide (RGBA composited on white)."""
    with openslide.OpenSlide(str(path)) as osl:
        rgba = np.asarray(osl.read_region((x, y), level, (w, h))).astype(np.float64)
    alpha = rgba[..., 3:] / 255
    return np.round(rgba[..., :3] * alpha + 255 * (1 - alpha)).astype(np.uint8)


def _marked(height: int, width: int, x: int, y: int) -> np.ndarray:
    """White RGB image with one black pixel at column x, row y."""
    img = np.full((height, width, 3), 255, np.uint8)
    img[y, x] = 0
    return img


def _block_mean(img: np.ndarray, factor: int) -> np.ndarray:
    """Mean over factor x factor blocks, rounded (what a 2x pyramid level holds)."""
    h, w = img.shape[0] // factor, img.shape[1] // factor
    blocks = img[:h * factor, :w * factor].reshape(h, factor, w, factor, -1).astype(float)
    return np.round(blocks.mean(axis=(1, 3))).astype(np.uint8)


# --------------------------------------------------------------------------------------
# generated files
# --------------------------------------------------------------------------------------

MARK = (21, 11)  # (x, y) of the black pixel in generated images


@pytest.fixture(scope="module")
def pyramid_tiff(tmp_path_factory) -> Path:
    """Tiled pyramidal TIFF 512x384 (+256x192, 128x96), 0.25 um/px in cm resolution tags."""
    path = tmp_path_factory.mktemp("pyr") / "pyramid.tif"
    level0 = _marked(384, 512, *MARK)
    level0[200:260, 300:400] = (200, 30, 90)
    with tifffile.TiffWriter(path) as tw:
        for i, img in enumerate([level0, _block_mean(level0, 2), _block_mean(level0, 4)]):
            tw.write(img, tile=(64, 64), photometric="rgb", compression="zlib",
                     resolution=(40000 / 2**i, 40000 / 2**i), resolutionunit="CENTIMETER",
                     subfiletype=1 if i else 0, metadata=None)
    return path


@pytest.fixture(scope="module")
def leica_scn(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A minimal Leica SCN (tiled TIFF + SCN XML) whose main image sits at (40, 60).

    OpenSlide's leica driver reports ``openslide.bounds-x/-y = 40/60`` for it: the
    smallest file with non-zero bounds that can be written here.
    """
    yy, xx = np.mgrid[0:192, 0:256]
    img = np.stack([xx % 256, yy % 256, (xx * 7 + yy * 3) % 256], -1).astype(np.uint8)
    path = write_leica_scn(tmp_path_factory.mktemp("scn") / "bounds.scn", img, offset=(40, 60), canvas=(400, 320),
                           mpp=0.5)
    return path, img


# --------------------------------------------------------------------------------------
# real slides
# --------------------------------------------------------------------------------------


@needs
def test_cmu_size_mpp_and_level0_read_equals_openslide():
    with open_slide(CMU) as src:
        assert isinstance(src, SlideSource)
        assert (src.reader, src.width, src.height) == ("openslide", 2220, 2967)
        assert src.mpp == pytest.approx(0.499)
        assert src.mpp_source == "file: openslide.mpp-x/-y"
        assert src.bounds_offset == (0, 0)
        got = src.read_region(1000, 1200, 64, 48, 64, 48)
    assert got.dtype == np.uint8 and got.shape == (48, 64, 3)
    np.testing.assert_array_equal(got, _openslide_rgb(CMU, 1000, 1200, 64, 48))


@needs
def test_cmu_downsampled_read_is_block_mean():
    with open_slide(CMU) as src:
        got = src.read_region(1000, 1000, 200, 200, 100, 100)
    expected = _block_mean(_openslide_rgb(CMU, 1000, 1000, 200, 200), 2)
    assert got.shape == (100, 100, 3)
    assert np.abs(got.astype(int) - expected).max() <= 1


@needs
def test_cmu_tifffile_reader_matches_openslide():
    with open_slide(CMU, reader="tifffile") as src:
        assert src.reader == "tifffile"
        assert src.mpp == pytest.approx(0.499)  # from the Aperio ImageDescription
        got = src.read_region(500, 700, 96, 96, 96, 96)
    ref = _openslide_rgb(CMU, 500, 700, 96, 96)
    assert np.abs(got.astype(int) - ref).mean() < 1.0


@needs
def test_tcga_pyramid_level_choice_and_level1_read():
    with open_slide(TCGA) as src:
        assert (src.width, src.height) == (4443, 3567)
        assert src.mpp is None and "unknown" in src.mpp_source
        assert src.level_downsamples == pytest.approx((1.0, 2.0005), abs=1e-3)
        assert src.best_level(1.0) == 0
        assert src.best_level(1.9) == 0
        assert src.best_level(2.0) == 1  # 2.0005 within the tolerance
        assert src.best_level(64.0) == 1
        assert src.best_level(0.5) == 0
        levels = []
        original = src.read_level_window

        def spy(level, *args):
            levels.append(level)
            return original(level, *args)

        src.read_level_window = spy
        got = src.read_region(2000, 1600, 256, 256, 128, 128)
    assert levels == [1]
    ref = _openslide_rgb(TCGA, 2000, 1600, 128, 128, level=1)
    assert np.abs(got.astype(int) - ref).mean() < 4  # same geometry, different filters
    assert got.std() > 10  # tissue, not background


@needs
def test_small_svs_and_boxes():
    with open_slide(SLIDES / "small.svs") as src:
        assert (src.width, src.height, src.mpp) == (16, 16, pytest.approx(0.499))
        np.testing.assert_array_equal(src.read_region(0, 0, 16, 16, 16, 16),
                                      _openslide_rgb(SLIDES / "small.svs", 0, 0, 16, 16))
    with open_slide(SLIDES / "boxes.tiff") as src:
        assert (src.reader, src.width, src.height, src.level_count) == ("openslide", 300, 250, 4)
        # boxes.tiff says 72 dpi (352.8 um/px): a placeholder, reported and not used
        assert src.mpp is None and "352.778" in src.mpp_source
        assert any("implausible" in note for note in src.notes)
        got = src.read_region(0, 0, 300, 250, 300, 250)
        np.testing.assert_array_equal(got, _openslide_rgb(SLIDES / "boxes.tiff", 0, 0, 300, 250))
    with open_slide(SLIDES / "boxes.tiff", reader="tifffile") as src:
        np.testing.assert_array_equal(src.read_region(0, 0, 300, 250, 300, 250), got)
        assert src.level_count == 4


@needs
def test_monuseg_tiff_lazy_strips_and_unknown_mpp():
    # The MoNuSeg TIFFs carry no resolution tags: um/px is unknown unless given
    # (the annotation XML says 0.2527).
    with open_slide(MONUSEG) as src:
        assert (src.reader, src.width, src.height) == ("tifffile", 1000, 1000)
        assert src.mpp is None and src.mpp_source == "unknown (no resolution tags in TIFF)"
        with pytest.raises(ResolutionError, match=r"TCGA-18-5592.*--mpp"):
            require_mpp(src)
        got = src.read_region(400, 500, 64, 20, 64, 20)
        assert src.chunks_decoded <= 20  # of 500 strips of 2 rows
    np.testing.assert_array_equal(got, tifffile.imread(MONUSEG)[500:520, 400:464])
    with open_slide(MONUSEG, mpp=0.2527) as src:
        assert require_mpp(src) == pytest.approx(0.2527)
        assert src.mpp_source == "given (--mpp)"


@needs
def test_given_mpp_overrides_file_with_note():
    with open_slide(CMU, mpp=0.25) as src:
        assert src.mpp == 0.25 and src.mpp_source == "given (--mpp)"
        assert any("overrides 0.499" in note for note in src.notes)
    with pytest.raises(ResolutionError):
        open_slide(CMU, mpp=-1)


# --------------------------------------------------------------------------------------
# bad files and dispatch
# --------------------------------------------------------------------------------------


@needs
@pytest.mark.parametrize("name", ["unopenable.tiff", "unreadable.svs"])
def test_bad_files_raise_one_line_slide_error(name):
    with pytest.raises(SlideError) as info:
        open_slide(SLIDES / name)
    message = str(info.value)
    assert name in message and "\n" not in message
    assert "openslide:" in message and "tifffile:" in message


def test_missing_directory_and_junk_files(tmp_path):
    with pytest.raises(SlideError, match=r"nope\.svs: file not found"):
        open_slide(tmp_path / "nope.svs")
    with pytest.raises(SlideError, match="is a directory"):
        open_slide(tmp_path)
    junk = tmp_path / "junk.svs"
    junk.write_text("not a slide\n")
    with pytest.raises(SlideError, match=r"junk\.svs") as info:
        open_slide(junk)
    assert "\n" not in str(info.value)


@pytest.mark.filterwarnings("ignore:Truncated File Read")
def test_unknown_and_unavailable_readers(tmp_path, pyramid_tiff, monkeypatch):
    with pytest.raises(SlideError, match="unknown reader 'bioformats'.*openslide"):
        open_slide(pyramid_tiff, reader="bioformats")
    spec = ReaderSpec("fake", lambda p, b: None, available=lambda: "fakelib is not installed")
    monkeypatch.setitem(slide_registry.REGISTRY.readers, "fake", spec)
    with pytest.raises(SlideError, match="fake: fakelib is not installed"):
        open_slide(pyramid_tiff, reader="fake")
    truncated = tmp_path / "truncated.tif"
    truncated.write_bytes(pyramid_tiff.read_bytes()[:64])
    with pytest.raises(SlideError, match=r"truncated\.tif: truncated TIFF"):  # said before any reader tries
        open_slide(truncated, reader="pillow")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(56))
    with pytest.raises(SlideError, match=r"broken\.png: pillow: "):
        open_slide(broken, reader="pillow")


def test_register_reader_extends_dispatch(monkeypatch, tmp_path):
    reg = slide_registry.REGISTRY
    monkeypatch.setattr(reg, "readers", dict(reg.readers))
    monkeypatch.setattr(reg, "auto_order", list(reg.auto_order))
    calls = []

    def opener(path, bounds_offset):
        calls.append((path, bounds_offset))
        src = ArraySource(np.zeros((4, 5, 3), np.uint8), path)
        src.reader = "toy"
        return src

    register_reader(ReaderSpec("toy", opener), before="openslide")
    assert reg.auto_order[0] == "toy"
    target = tmp_path / "x.toy"
    target.write_bytes(b"toy")
    src = open_slide(target, bounds_offset=False)
    assert src.reader == "toy" and (src.width, src.height) == (5, 4)
    assert calls == [(target, False)]
    assert src.mpp is None


# --------------------------------------------------------------------------------------
# generated files: tiled pyramid, PNG, JPEG, resolution tags
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_generated_pyramid(pyramid_tiff, reader):
    with open_slide(pyramid_tiff, reader=reader) as src:
        assert src.reader == reader
        assert (src.width, src.height, src.level_count) == (512, 384, 3)
        assert src.mpp == pytest.approx(0.25)
        assert src.mpp_source.startswith("file:")
        full = src.read_region(0, 0, 512, 384, 512, 384)
        assert full[MARK[1], MARK[0]].tolist() == [0, 0, 0]
        assert (full == 0).all(axis=2).sum() == 1
        half = src.read_region(0, 0, 512, 384, 256, 192)  # level 1, copied as is
        assert half[5, 10].tolist() == [191, 191, 191]
        assert (half < 255).all(axis=2).sum() == 1 + 50 * 30  # the mark + the block
        quarter = src.read_region(0, 0, 512, 384, 128, 96)
        assert np.argwhere(quarter.min(axis=2) < 255)[0].tolist() == [2, 5]


def test_tifffile_decodes_only_touched_tiles(pyramid_tiff):
    with open_slide(pyramid_tiff, reader="tifffile") as src:
        probe = src.chunks_decoded
        src.read_region(100, 100, 50, 50, 50, 50)
        assert src.chunks_decoded - probe == 4  # of 48 tiles at level 0
        src.read_region(100, 100, 50, 50, 50, 50)
        assert src.chunks_decoded - probe == 4  # cached


def test_resolution_tags_inch_and_mismatch(tmp_path):
    img = np.full((64, 64, 3), 128, np.uint8)
    inch = tmp_path / "inch.tif"
    tifffile.imwrite(inch, img, photometric="rgb", resolution=(101600, 101600),
                     resolutionunit="INCH", metadata=None)  # stripped: tifffile reader
    with open_slide(inch) as src:
        assert src.reader == "tifffile"
        assert src.mpp == pytest.approx(0.25) and src.mpp_source == "file: TIFF resolution tags"
    skew = tmp_path / "skew.tif"
    tifffile.imwrite(skew, img, photometric="rgb", resolution=(40000, 42000),
                     resolutionunit="CENTIMETER", metadata=None)
    with open_slide(skew) as src:
        assert src.mpp == pytest.approx((0.25 + 10000 / 42000) / 2)
        assert any("differs between x" in note for note in src.notes)
    none = tmp_path / "none.tif"
    tifffile.imwrite(none, img, photometric="rgb", resolution=(4, 4), resolutionunit="NONE",
                     metadata=None)
    with open_slide(none) as src:
        assert src.mpp is None and "none" in src.mpp_source


def test_png_alpha_and_phys(tmp_path):
    rgba = np.zeros((40, 60, 4), np.uint8)
    rgba[..., :3] = (10, 120, 30)
    rgba[..., 3] = 255
    rgba[5, 7, 3] = 0  # transparent -> white
    rgba[6, 7, 3] = 128  # half -> blend with white
    path = tmp_path / "tile.png"
    Image.fromarray(rgba).save(path, dpi=(50800, 50800))  # 0.5 um/px as pHYs
    with open_slide(path) as src:
        assert (src.reader, src.width, src.height) == ("pillow", 60, 40)
        assert src.mpp == pytest.approx(0.5) and src.mpp_source == "file: PNG pHYs"
        got = src.read_region(0, 0, 60, 40, 60, 40)
    assert got[5, 7].tolist() == [255, 255, 255]
    assert got[6, 7].tolist() == [132, 187, 142]
    assert got[0, 0].tolist() == [10, 120, 30]
    plain = tmp_path / "plain.png"
    Image.fromarray(rgba[..., :3]).save(plain)
    with open_slide(plain) as src:
        assert src.mpp is None
        with pytest.raises(ResolutionError, match=r"plain\.png.*--mpp"):
            require_mpp(src)


def test_jpeg_placeholder_dpi_is_not_a_resolution(tmp_path):
    path = tmp_path / "photo.jpg"
    Image.fromarray(np.full((16, 16, 3), 90, np.uint8)).save(path, dpi=(72, 72))
    with open_slide(path) as src:
        assert src.reader == "pillow" and src.mpp is None
        assert "352.778" in src.mpp_source


# --------------------------------------------------------------------------------------
# geometry: placement, padding, bounds
# --------------------------------------------------------------------------------------


def test_exact_pixel_placement_scale_1_and_2x():
    src = array_source(_marked(64, 64, *MARK), mpp=0.25)
    assert src.mpp_source == "given" and src.reader == "array"
    same = src.read_region(0, 0, 64, 64, 64, 64)
    assert np.argwhere(same.min(axis=2) < 255).tolist() == [[11, 21]]
    shifted = src.read_region(1, 1, 64, 64, 64, 64)
    assert np.argwhere(shifted.min(axis=2) < 255).tolist() == [[10, 20]]
    half = src.read_region(0, 0, 64, 64, 32, 32)  # pixel (5, 10) covers x 20..22, y 10..12
    assert np.argwhere(half.min(axis=2) < 255).tolist() == [[5, 10]]
    assert np.abs(half[5, 10].astype(float) - 191.25).max() <= 1  # mean of 3 white + 1 black
    half_shifted = src.read_region(1, 1, 64, 64, 32, 32)  # (5, 10) covers x 21..23, y 11..13
    assert np.argwhere(half_shifted.min(axis=2) < 255).tolist() == [[5, 10]]
    zoom = src.read_region(20, 10, 4, 4, 8, 8)  # 2x enlargement: the mark covers rows/cols 2..3
    darkest = np.argwhere(zoom.min(axis=2) == zoom.min())
    assert {tuple(p) for p in darkest} <= {(2, 2), (2, 3), (3, 2), (3, 3)}
    assert zoom[2:4, 2:4].max() < zoom[0, 0].min()


def test_fractional_region_centres():
    # A horizontal ramp: output centres must sample the ramp where the formula says.
    ramp = np.repeat(np.repeat(np.arange(200, dtype=np.uint8)[None, :, None], 10, 0), 3, 2)
    src = array_source(ramp, mpp=None)
    got = src.read_region(10.25, 0, 30.0, 10, 12, 4)[1, :, 0].astype(float)
    centres = 10.25 + (np.arange(12) + 0.5) * 30.0 / 12
    np.testing.assert_allclose(got, centres - 0.5, atol=0.6)


def test_outside_slide_is_white():
    red = np.zeros((10, 10, 3), np.uint8)
    red[..., 0] = 255
    src = array_source(red, mpp=0.5)
    got = src.read_region(-5, -5, 20, 20, 20, 20)
    np.testing.assert_array_equal(got[5:15, 5:15], red)
    inner = np.zeros((20, 20), bool)
    inner[5:15, 5:15] = True
    assert (got[~inner] == 255).all()
    assert (src.read_region(100, 100, 20, 20, 7, 5) == 255).all()
    assert (src.read_region(-50, 0, 20, 20, 4, 4) == 255).all()


@needs
def test_outside_openslide_slide_is_white():
    with open_slide(CMU) as src:
        got = src.read_region(2200, 0, 40, 10, 40, 10)
    np.testing.assert_array_equal(got[:, :20], _openslide_rgb(CMU, 2200, 0, 20, 10))
    assert (got[:, 20:] == 255).all()


def test_array_source_gray_and_rgba():
    gray = array_source(np.full((3, 4), 7, np.uint8), mpp=None)
    assert gray.read_region(0, 0, 4, 3, 4, 3).tolist() == np.full((3, 4, 3), 7).tolist()
    assert gray.mpp is None and "unknown" in gray.mpp_source
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0, 3] = 255
    got = array_source(rgba, mpp=1.0).read_region(0, 0, 2, 2, 2, 2)
    assert got[0, 0].tolist() == [0, 0, 0] and (got.reshape(-1, 3)[1:] == 255).all()


def test_bounds_from_leica_scn(leica_scn):
    path, img = leica_scn
    with open_slide(path) as src:  # QuPath's frame: cropped to the bounds
        assert src.reader == "openslide"
        assert src.bounds_offset == (40, 60)
        assert (src.width, src.height) == (256, 192)
        assert src.mpp == pytest.approx(0.5)
        assert any("bounds" in note for note in src.notes)
        np.testing.assert_array_equal(src.read_region(0, 0, 256, 192, 256, 192), img)
        np.testing.assert_array_equal(src.read_region(30, 20, 16, 8, 16, 8), img[20:28, 30:46])
        left = src.read_region(-10, 0, 20, 10, 20, 10)  # outside the frame: white
        assert (left[:, :10] == 255).all()
        np.testing.assert_array_equal(left[:, 10:], img[:10, :10])
        half = src.read_region(0, 0, 256, 192, 128, 96)  # level 1 (ds 2) at (20, 30)
        np.testing.assert_array_equal(half, _block_mean(img, 2))
    with open_slide(path, bounds_offset=False) as src:  # full OpenSlide level 0
        assert src.bounds_offset == (0, 0) and (src.width, src.height) == (400, 320)
        np.testing.assert_array_equal(src.read_region(40, 60, 256, 192, 256, 192), img)
        assert (src.read_region(0, 0, 40, 60, 40, 60) == 255).all()  # transparent -> white


# --------------------------------------------------------------------------------------
# read failures, closing, pickling
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_corrupt_tile_read_names_file_and_region(pyramid_tiff, tmp_path, reader):
    broken = tmp_path / "corrupt.tif"
    data = bytearray(pyramid_tiff.read_bytes())
    with tifffile.TiffFile(pyramid_tiff) as tif:
        page = tif.pages[0]
        offset, count = page.dataoffsets[9], page.databytecounts[9]  # tile row 1, col 1
    data[offset:offset + count] = b"\x00garbage" * (count // 8) + b"\x00" * (count % 8)
    broken.write_bytes(bytes(data))
    with open_slide(broken, reader=reader) as src:  # the probe reads the coarsest level only
        assert src.read_region(0, 0, 32, 32, 32, 32).shape == (32, 32, 3)
        with pytest.raises(SlideError, match=r"x=70 y=80 w=20 h=20 .*corrupt\.tif"):
            src.read_region(70, 80, 20, 20, 20, 20)


def test_closed_source_raises(pyramid_tiff):
    src = open_slide(pyramid_tiff)
    src.close()
    src.close()
    with pytest.raises(SlideError, match="closed"):
        src.read_region(0, 0, 4, 4, 4, 4)


def test_bad_request_is_value_error():
    src = array_source(np.zeros((4, 4, 3), np.uint8), mpp=None)
    with pytest.raises(ValueError):
        src.read_region(0, 0, 0, 4, 4, 4)
    with pytest.raises(ValueError):
        src.read_region(0, 0, 4, 4, 0, 4)
    with pytest.raises(ValueError):
        src.read_region(float("nan"), 0, 4, 4, 4, 4)


@pytest.mark.parametrize("reader", ["openslide", "tifffile"])
def test_pickle_reopens(pyramid_tiff, reader):
    with open_slide(pyramid_tiff, reader=reader, mpp=0.3) as src:
        clone = pickle.loads(pickle.dumps(src))
        with clone:
            assert (clone.reader, clone.mpp, clone.mpp_source) == (reader, 0.3, "given (--mpp)")
            np.testing.assert_array_equal(clone.read_region(10, 10, 40, 40, 20, 20),
                                          src.read_region(10, 10, 40, 40, 20, 20))


def test_pickle_array_source():
    src = array_source(_marked(8, 8, 3, 2), mpp=0.5, name="tile-7")
    clone = pickle.loads(pickle.dumps(src))
    assert (str(clone.path), clone.mpp) == ("tile-7", 0.5)
    np.testing.assert_array_equal(clone.read_region(0, 0, 8, 8, 8, 8), _marked(8, 8, 3, 2))


def test_min_is_white_and_palette_tiffs(tmp_path):
    gray = np.array([[0, 255], [100, 200]], np.uint8)
    path = tmp_path / "miniswhite.tif"
    tifffile.imwrite(path, gray, photometric="miniswhite", metadata=None)
    with open_slide(path) as src:
        assert src.read_region(0, 0, 2, 2, 2, 2)[..., 0].tolist() == [[255, 0], [155, 55]]
    palette = tmp_path / "palette.tif"
    colormap = np.zeros((3, 256), np.uint16)
    colormap[:, 1] = (65535, 0, 0)
    tifffile.imwrite(palette, np.array([[0, 1]], np.uint8), photometric="palette",
                     colormap=colormap, metadata=None)
    with open_slide(palette) as src:
        assert src.read_region(0, 0, 2, 1, 2, 1).tolist() == [[[0, 0, 0], [255, 0, 0]]]


def _png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width`` x ``height`` (IHDR) and holds no pixels: enough for Image.open."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_a_plain_image_beyond_pillows_bomb_guard_opens_and_one_beyond_ours_is_a_one_line_error(tmp_path, monkeypatch):
    """Pillow refuses images over 179 million px as decompression bombs ("DOS attack"); a 15000 x 12000
    region export is a slide the user named. Ours allows up to PILLOW_MAX_PIXELS and says how to go beyond;
    Pillow's own limit is left as it was."""
    from PIL import Image

    import nuclick_wsi.io.slides.memory as memory

    # scaled down: Pillow's guard at 100 px (refusing above 200), ours at 1000 px
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    monkeypatch.setattr(memory, "PILLOW_MAX_PIXELS", 1000)
    rgb = np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8)  # 600 px: Pillow alone refuses
    Image.fromarray(rgb).save(tmp_path / "region.png")
    with open_slide(tmp_path / "region.png", mpp=0.5) as slide:
        assert (slide.width, slide.height) == (30, 20)
        assert np.array_equal(slide.read_region(0, 0, 30, 20, 30, 20), rgb)
    assert Image.MAX_IMAGE_PIXELS == 100
    big = _png_header_only(tmp_path / "big.png", 40, 30)  # 1200 px > ours
    with pytest.raises(SlideError, match=r"big\.png.*too large to decode whole.*tiled pyramidal TIFF") as err:
        open_slide(big, mpp=0.5)
    assert "\n" not in str(err.value) and Image.MAX_IMAGE_PIXELS == 100
