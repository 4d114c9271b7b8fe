"""TIAToolbox as an optional backend (:mod:`nuclick_wsi.io.slides.tiatoolbox`): its readers and its pretrained weights.

Tests that need TIAToolbox start with ``pytest.importorskip("tiatoolbox")``: they are skipped in the
core environment and run in CI's separate ``.venv-tia`` (``pip install -e ".[tiatoolbox,test]"``).
The others run everywhere and check what a user without the extra sees (TIAToolbox is hidden from
them by monkeypatching, so they also run where it is installed).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import DATA, disk_model, write_tiff_slide
from nuclick_wsi.io.slides import registry as slide_registry
from nuclick_wsi.io.slides.memory import array_source as make_array_source
from nuclick_wsi.io.slides import tiatoolbox as tia
from nuclick_wsi.model import tiatoolbox_weights
from nuclick_wsi.errors import ModelError, NuclickError, SlideError
from nuclick_wsi.model.architectures.tia_unet import TiaLightUNet
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.pipeline import Models, SegmentOptions, segment
from nuclick_wsi.io.slides.registry import open_slide
from nuclick_wsi.store.labels import open_labels

LIGHT_KEYS_JSON = DATA / "tiatoolbox_nuclick_light_keys.json"
EXTRA = 'pip install "nuclick-wsi[tiatoolbox]"'


@pytest.fixture
def without_tiatoolbox(monkeypatch):
    """Make TIAToolbox look absent (as in an environment without the extra)."""
    monkeypatch.setattr(tia, "tiatoolbox_installed", lambda: False)
    monkeypatch.setattr(tiatoolbox_weights, "tiatoolbox_installed", lambda: False)
    monkeypatch.setattr(slide_registry.REGISTRY, "auto_order", [n for n in slide_registry.AUTO_ORDER if n != "tiatoolbox"])


def _write_clicks(path: Path, clicks) -> Path:
    path.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in clicks))
    return path


def _randomize(net: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Random parameters and BatchNorm statistics (so that a wrong key or layer order shows)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():
            sd[k] = v.clone()
        elif k.endswith("running_var"):
            sd[k] = torch.rand(v.shape, generator=gen) + 0.5
        elif k.endswith("unpool_mat"):
            sd[k] = v.clone()
        else:
            fan_in = max(1, v[0].numel()) if v.ndim > 1 else 1
            sd[k] = torch.randn(v.shape, generator=gen) / fan_in ** 0.5
    net.load_state_dict(sd, strict=True)
    return sd


# --------------------------------------------------------------------------------------------
# without the extra (core suite)
# --------------------------------------------------------------------------------------------


def test_core_never_imports_tiatoolbox(tmp_path):
    p = write_tiff_slide(tmp_path / "s.tif", 512, 384, 0.25)
    code = ("import sys; import nuclick_wsi.cli.main, nuclick_wsi.pipeline, nuclick_wsi.model.weights; "
            "from nuclick_wsi.io.slides.registry import open_slide; s = open_slide(sys.argv[1]); s.read_region(0, 0, 64, 64, 32, 32); "
            "assert 'tiatoolbox' not in sys.modules and 'nuclick_wsi.io.slides.tiatoolbox' not in sys.modules, 'imported'")
    subprocess.run([sys.executable, "-c", code, str(p)], check=True, timeout=120)


def test_weights_name_without_extra_says_how(without_tiatoolbox):
    with pytest.raises(ModelError) as err:
        load_model("tiatoolbox:nuclick_original-pannuke")
    msg = str(err.value)
    assert EXTRA in msg and "--weights /path/to/nuclick_original-pannuke.pth" in msg
    assert "https://huggingface.co/TIACentre/TIAToolbox_pretrained_weights/resolve/main/nuclick_original-pannuke.pth" in msg
    assert "\n" not in msg


def test_unknown_weights_name():
    with pytest.raises(ModelError, match=r"unknown TIAToolbox NuClick weights .*tiatoolbox:nuclick_light-pannuke"):
        load_model("tiatoolbox:hovernet_fast-pannuke")


def test_reader_without_extra_is_a_clear_error(without_tiatoolbox, tmp_path):
    p = write_tiff_slide(tmp_path / "s.tif", 512, 384, 0.25)
    with pytest.raises(SlideError, match=r"tiatoolbox: TIAToolbox is not installed \(pip install \"nuclick-wsi\[tiatoolbox\]\"\)"):
        open_slide(p, reader="tiatoolbox")
    assert open_slide(p).reader in ("openslide", "tifffile")  # auto does not need it
    folder = tmp_path / "image.zarr"
    folder.mkdir()
    with pytest.raises(SlideError, match="is a directory, not a slide file"):
        open_slide(folder)
    with pytest.raises(SlideError, match=r"nuclick-wsi\[tiatoolbox\]"):
        open_slide(folder, reader="tiatoolbox")


def test_segment_with_tiatoolbox_reader_without_extra(without_tiatoolbox, tmp_path):
    p = write_tiff_slide(tmp_path / "s.tif", 512, 384, 0.25)
    pts = _write_clicks(tmp_path / "c.csv", [(100, 100)])
    out = tmp_path / "out"
    with pytest.raises(NuclickError, match=r"nuclick-wsi\[tiatoolbox\]"):
        segment(p, pts, out, options=SegmentOptions(reader="tiatoolbox", progress=False, device="cpu"),
                models=Models(nuclei=disk_model()))
    assert not out.exists() or not any(out.iterdir())


def test_light_layout_matches_tiatoolbox_keys(tmp_path):
    """Our TiaLightUNet has the keys and shapes of TIAToolbox's nuclick_light-pannuke network."""
    ref = json.loads(LIGHT_KEYS_JSON.read_text())
    net = TiaLightUNet()
    ours = {k: list(v.shape) for k, v in net.state_dict().items()}
    assert ours == ref["keys"] and len(ours) == ref["num_keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters"]
    # a bare state dict of that layout loads through load_model, at TIAToolbox's NuClick settings
    _randomize(net, 3)
    path = tmp_path / "nuclick_light-pannuke.pth"
    torch.save(net.state_dict(), path)
    model = load_model(path)
    assert model.arch == "tia-light-unet" and model.mpp == 0.25 and model.patch_size == 128
    assert model.postprocess["threshold"] == 0.33 and "nuclick_light-pannuke" in model.metadata["source"]
    x = torch.rand(2, 5, 128, 128)
    with torch.no_grad():
        assert torch.equal(model.net(x), net.eval()(x))


# --------------------------------------------------------------------------------------------
# with the extra
# --------------------------------------------------------------------------------------------

REGIONS = [  # x, y, w, h (level 0), output w, h: copies, resampling, off-slide parts
    (100, 200, 128, 128, 128, 128),
    (100.5, 200.25, 512, 512, 128, 128),
    (0, 0, 2220, 2967, 300, 400),
    (-50, -50, 200, 200, 64, 64),
    (2100.3, 2900.7, 256, 256, 200, 200),
]


def test_tia_reader_reads_what_openslide_reads(shared_data):
    pytest.importorskip("tiatoolbox")
    path = shared_data / "slides" / "CMU-1-Small-Region.svs"
    ours, theirs = open_slide(path, reader="openslide"), open_slide(path, reader="tiatoolbox")
    assert theirs.reader == "tiatoolbox" and isinstance(theirs, tia.TiaSource)
    assert (theirs.width, theirs.height, theirs.mpp, theirs.mpp_source) == (ours.width, ours.height, ours.mpp, ours.mpp_source)
    for args in REGIONS:
        assert np.array_equal(theirs.read_region(*args), ours.read_region(*args)), args


def _bigtiff_pyramid(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """A BigTIFF with two levels and resolution tags (TIAToolbox's TIFFWSIReader opens BigTIFFs)."""
    import tifffile

    res = 1e4 / mpp
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        tw.write(rgb, tile=(256, 256), photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER")
        tw.write(rgb[::2, ::2], tile=(256, 256), photometric="rgb", resolution=(res / 2, res / 2),
                 resolutionunit="CENTIMETER", subfiletype=1)
    return path


def test_mpp_rule_holds_with_tiatoolbox(tmp_path):
    pytest.importorskip("tiatoolbox")
    from tiatoolbox.wsicore.wsireader import TIFFWSIReader

    rgb = np.random.default_rng(1).integers(0, 255, (1000, 1200, 3), dtype=np.uint8)
    # through open_slide (TIAToolbox opens this one with OpenSlide): um/px from our rule
    p = write_tiff_slide(tmp_path / "s.tif", 1200, 1000, 0.2527, rgb=rgb)
    s = open_slide(p, reader="tiatoolbox")
    assert s.mpp == pytest.approx(0.2527, rel=1e-5) and s.mpp_source.startswith("file:")
    given = open_slide(p, reader="tiatoolbox", mpp=0.3)
    assert given.mpp == 0.3 and given.mpp_source == "given (--mpp)"
    assert any("overrides" in n for n in given.notes)
    # TIAToolbox's own TIFF reader, told a wrong um/px: the resolution tags (our rule) still win
    b = _bigtiff_pyramid(tmp_path / "b.tif", rgb, 0.2527)
    wrong = tia.tiatoolbox_source(TIFFWSIReader(b, mpp=(9.0, 9.0)))
    assert wrong.mpp == pytest.approx(0.2527, rel=1e-5) and wrong.mpp_source == "file: TIFF resolution tags"
    ref = open_slide(b, reader="tifffile")
    assert wrong.level_count == ref.level_count == 2
    for args in [(10, 20, 100, 50, 100, 50), (0, 0, 1200, 1000, 150, 125), (33.3, 17.1, 400, 400, 100, 100),
                 (-40, -40, 200, 200, 50, 50)]:
        assert np.array_equal(wrong.read_region(*args), ref.read_region(*args)), args


def test_ome_tiff_um_per_px_from_tiatoolbox(tmp_path):
    """OME-XML sizes (no resolution tags) are read by TIAToolbox: a further source after ours."""
    pytest.importorskip("tiatoolbox")
    import tifffile

    rgb = np.random.default_rng(2).integers(0, 255, (300, 400, 3), dtype=np.uint8)
    p = tmp_path / "x.ome.tif"
    tifffile.imwrite(p, rgb, tile=(128, 128), photometric="rgb", ome=True,
                     metadata={"axes": "YXS", "PhysicalSizeX": 0.3, "PhysicalSizeY": 0.3})
    s = open_slide(p, reader="tiatoolbox")
    assert s.mpp == pytest.approx(0.3) and "TIAToolbox" in s.mpp_source
    assert np.array_equal(s.read_region(10, 20, 64, 32, 64, 32), rgb[20:52, 10:74])


def _write_ngff(path: Path, rgb: np.ndarray, mpp: float) -> Path:
    """A small OME-NGFF 0.4 image as TIAToolbox's NGFF reader expects it (omero, _ARRAY_DIMENSIONS)."""
    import zarr

    group = zarr.open_group(str(path), mode="w", zarr_format=2)  # NGFF 0.4 is zarr v2
    levels = [rgb, rgb[::2, ::2]]
    datasets = []
    for i, lev in enumerate(levels):
        group.create_array(str(i), shape=lev.shape, dtype=lev.dtype, chunks=(128, 128, 3))[...] = lev
        datasets.append({"path": str(i), "coordinateTransformations": [
            {"type": "scale", "scale": [mpp * 2 ** i, mpp * 2 ** i, 1.0]}]})
    window = {"start": 0, "end": 255, "min": 0, "max": 255}
    group.attrs.update({
        "multiscales": [{"version": "0.4", "datasets": datasets, "axes": [
            {"name": "y", "type": "space", "unit": "micrometer"},
            {"name": "x", "type": "space", "unit": "micrometer"}, {"name": "c", "type": "channel"}]}],
        "omero": {"name": "test", "version": "0.4", "rdefs": {"defaultT": 0, "defaultZ": 0, "model": "color"},
                  "channels": [{"color": c, "window": window} for c in ("FF0000", "00FF00", "0000FF")]},
        "_ARRAY_DIMENSIONS": ["y", "x", "c"],
    })
    return path


def test_auto_falls_back_to_tiatoolbox_and_segments(tmp_path):
    """An NGFF zarr (a folder none of our readers opens): auto picks TIAToolbox; the report says so."""
    pytest.importorskip("tiatoolbox")
    rgb = np.random.default_rng(3).integers(0, 255, (400, 500, 3), dtype=np.uint8)
    z = _write_ngff(tmp_path / "img.zarr", rgb, 0.5)
    s = open_slide(z)
    assert s.reader == "tiatoolbox" and s.mpp == pytest.approx(0.5) and "TIAToolbox" in s.mpp_source
    assert np.array_equal(s.read_region(30, 40, 100, 60, 100, 60), rgb[40:100, 30:130])
    assert np.array_equal(s.read_region(0, 0, 500, 400, 250, 200),
                          open_slide_array(rgb, 0.5).read_region(0, 0, 500, 400, 250, 200))
    res = segment(z, _write_clicks(tmp_path / "c.csv", [(100, 100), (300, 200)]), tmp_path / "out",
                  options=SegmentOptions(progress=False, device="cpu"), models=Models(nuclei=disk_model()))
    assert res.report["slide"]["reader"] == "tiatoolbox"
    assert res.report["totals"]["segmented"] == 2
    plain = tmp_path / "plain"  # any other folder is still not a slide
    plain.mkdir()
    with pytest.raises(SlideError, match="is a directory, not a slide file"):
        open_slide(plain)


def open_slide_array(rgb, mpp):
    return make_array_source(rgb, mpp)


def test_segment_with_tiatoolbox_reader_matches_ours(tmp_path):
    pytest.importorskip("tiatoolbox")
    rng = np.random.default_rng(4)
    p = write_tiff_slide(tmp_path / "slide.tif", 1024, 768, 0.25,
                         rgb=rng.integers(0, 255, (768, 1024, 3), dtype=np.uint8))
    pts = _write_clicks(tmp_path / "c.csv", [(100.5, 120.5), (110, 130), (500, 400), (1000, 10)])
    labels = {}
    for reader in ("tiatoolbox", "tifffile"):
        res = segment(p, pts, tmp_path / reader, options=SegmentOptions(reader=reader, progress=False, device="cpu"),
                      models=Models(nuclei=disk_model()))
        assert res.report["slide"]["reader"] == reader
        labels[reader] = open_labels(res.outputs["labels"])[:]
    assert labels["tiatoolbox"].max() == 4 and np.array_equal(labels["tiatoolbox"], labels["tifffile"])


def test_cli_segment_reader_tiatoolbox(tmp_path, monkeypatch):
    pytest.importorskip("tiatoolbox")
    from click.testing import CliRunner

    import nuclick_wsi.model.weights as weights
    from tests.helpers import DiskNet
    from nuclick_wsi import cli  # noqa: F401 - cli.main is the command group

    real = weights.build_network
    monkeypatch.setattr(weights, "build_network",
                        lambda arch, args=None: DiskNet(**(args or {})) if arch == "test-disk" else real(arch, args))
    m = disk_model(5.5)
    weights.save_checkpoint(tmp_path / "disk.pt", m.net, "test-disk", {"radius": 5.5}, m.metadata)
    p = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = _write_clicks(tmp_path / "c.csv", [(100, 100), (300, 200)])
    out = tmp_path / "out"
    result = CliRunner().invoke(cli.main, ["segment", str(p), "--points", str(pts), "-o", str(out),
                                           "--weights", str(tmp_path / "disk.pt"),
                                           "--reader", "tiatoolbox", "-q", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "slide.report.json").read_text())
    assert report["slide"]["reader"] == "tiatoolbox" and report["totals"]["segmented"] == 2


def test_tiatoolbox_nuclick_equals_ours_on_the_same_state_dict():
    """TIAToolbox's NuClick with random weights and ours, loaded with its state dict unchanged, agree."""
    pytest.importorskip("tiatoolbox")
    from tiatoolbox.models.architecture.nuclick import NuClick

    from nuclick_wsi.model.architectures.nuclick import NuClickNet

    theirs = NuClick(num_input_channels=5, num_output_channels=1)
    sd = _randomize(theirs, 5)
    ours = NuClickNet()
    ours.load_state_dict(theirs.state_dict(), strict=True)  # unchanged keys, strict
    theirs.eval(), ours.eval()
    x = torch.rand(1, 5, 64, 64)  # fully convolutional: a 64 px patch keeps the test fast (19 GFLOP at 128)
    x[:, 3:] = 0
    x[:, 3, 32, 32] = 1
    with torch.inference_mode():
        a, b = theirs(x), ours(x)
    assert a.shape == b.shape == (1, 1, 64, 64)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())
    assert len(sd) == 360


def test_tiatoolbox_light_equals_ours_on_the_same_state_dict(tmp_path):
    pytest.importorskip("tiatoolbox")
    from tiatoolbox.models.architecture.unet import UNetModel

    theirs = UNetModel(num_input_channels=5, num_output_channels=1, encoder="unet",
                       encoder_levels=[32, 64, 128, 256], decoder_block=[3, 3], skip_type="add")
    _randomize(theirs, 6)
    path = tmp_path / "light.pth"
    torch.save(theirs.state_dict(), path)
    model = load_model(path)
    assert model.arch == "tia-light-unet"
    theirs.eval()
    x = torch.rand(2, 5, 128, 128)
    with torch.inference_mode():
        a = theirs(x * 255.0)  # TIAToolbox's forward divides its input by 255
        b = model.net(x)
    assert torch.allclose(a, b, rtol=1e-4, atol=1e-4 * float(a.abs().max())), float((a - b).abs().max())


def test_weights_through_tiatoolbox_cache(tmp_path, monkeypatch):
    """tiatoolbox:NAME uses TIAToolbox's cache and download; offline it names the file and the place."""
    tiatoolbox = pytest.importorskip("tiatoolbox")
    import tiatoolbox.models.architecture as arch

    monkeypatch.setitem(tiatoolbox.rcParam, "TIATOOLBOX_HOME", tmp_path / "home")
    calls = []

    def offline(name, *args, **kwargs):
        calls.append(name)
        raise ConnectionError(f"Failed to resolve host for {name}")

    monkeypatch.setattr(arch, "fetch_pretrained_weights", offline)
    with pytest.raises(ModelError) as err:
        load_model("tiatoolbox:nuclick_original-pannuke")
    msg = str(err.value)
    cached, url = tiatoolbox_weights.cache_file("nuclick_original-pannuke")
    assert cached.parent == tmp_path / "home" / "models" and url.startswith("https://")
    assert (f"tiatoolbox:nuclick_original-pannuke: weights not in the TIAToolbox cache ({cached}) and could not "
            f"be downloaded") in msg
    assert f"download {cached.name} from {url} and put it at {cached}, or pass --weights /path/to/file.pth" in msg
    assert calls == ["nuclick_original-pannuke"]

    # a download (simulated: TIAToolbox's fetch writes the file into its cache) then loads
    net = TiaLightUNet()
    _randomize(net, 7)
    light_cached, _ = tiatoolbox_weights.cache_file("nuclick_light-pannuke")

    def download(name, *args, **kwargs):
        light_cached.parent.mkdir(parents=True, exist_ok=True)
        torch.save(net.state_dict(), light_cached)
        return light_cached

    monkeypatch.setattr(arch, "fetch_pretrained_weights", download)
    model = load_model("tiatoolbox:nuclick_light-pannuke")
    assert model.arch == "tia-light-unet" and model.source == str(light_cached)
    # later runs use the cache without asking TIAToolbox to download again
    monkeypatch.setattr(arch, "fetch_pretrained_weights", offline)
    assert load_model("tiatoolbox:nuclick_light-pannuke").arch == "tia-light-unet"
    assert calls == ["nuclick_original-pannuke"]
