"""``train --task detect``: generic items, the sampler's targets, and a tiny run that lowers the loss."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.training.detect import DetectConfig, focal_loss, train_detector, validate_detector
from nuclick_wsi.training.detect_data import DetectionItem, DetectionSampler, render_target
from tests.helpers import spot_slide_rgb


def spot_items(n: int = 3, seed: int = 0) -> list[DetectionItem]:
    rng = np.random.default_rng(seed)
    items = []
    for k in range(n):
        pts = rng.uniform(20, 236, (25, 2))
        rgb = spot_slide_rgb(256, 256, pts, radius=8)
        items.append(DetectionItem(f"img{k}", rgb, pts, 0.25))
    return items


def test_target_peaks_at_points_and_ignored_area_weighs_nothing():
    t = render_target(np.array([[10.3, 20.9]]), 64, sigma=1.5)
    assert t.shape == (32, 32) and t[10, 5] == 1.0 and (t == 1).sum() == 1
    item = spot_items(1)[0]
    item.valid = np.ones((256, 256), bool)
    item.valid[:, :128] = False
    s = DetectionSampler([item], mpp=0.5, patch=64, seed=0)
    _, _, w = s.batch(8, augment=False)
    assert 0 < float(w.mean()) < 1
    with pytest.raises(NuclickError, match="valid mask"):
        DetectionItem("x", item.image, item.points, 0.25, valid=np.ones((3, 3), bool))


def test_tiny_training_lowers_the_loss(tmp_path):
    items = spot_items()
    cfg = DetectConfig(data=[], output=str(tmp_path / "d.pt"), widths=[8, 16, 32], epochs=4, samples_per_epoch=48,
                       batch_size=8, patch_size=64, lr=5e-3, device="cpu", precision="fp32")
    probe = DetectionSampler(items, mpp=0.5, patch=64, seed=123)
    x, t, w = probe.batch(16, augment=False)
    torch.manual_seed(cfg.seed)
    from nuclick_wsi.training.detect import detector_network

    with torch.no_grad():
        before = float(focal_loss(detector_network(cfg, print)[0].eval()(x), t, w))
    result = train_detector(cfg, items[:2], items[2:], progress=False, log=lambda m: None)
    model = load_model(tmp_path / "d.pt", task="detect")
    with torch.no_grad():
        after = float(focal_loss(model.net(x), t, w))
    assert after < 0.7 * before, (before, after)
    assert model.task == "detect" and model.mpp == 0.5
    assert model.postprocess["threshold"] == model.metadata["validation"]["threshold"]
    assert len(result["history"]) == 4 and (tmp_path / "d.last.pt").exists()
    v = validate_detector(model.net, items[2:], 0.5, torch.device("cpu"))
    assert 0 <= v["f1"] <= 1 and str(v["threshold"]) in v["f1_by_threshold"]


def test_warm_start_from_a_nuclick_model_is_refused(tmp_path):
    cfg = DetectConfig(data=[], output=str(tmp_path / "d.pt"), init=None)
    from nuclick_wsi.model.weights import default_weights_path

    cfg.init = str(default_weights_path("nuclei"))
    from nuclick_wsi.training.detect import detector_network

    with pytest.raises(NuclickError, match="cannot start a detector"):
        detector_network(cfg, print)


def test_train_cli_on_images_with_click_files(tmp_path):
    """A folder of images, each with a QuPath file of clicks (its area annotation: where every nucleus is clicked)."""
    import json

    from click.testing import CliRunner
    from PIL import Image

    from nuclick_wsi.cli.main import main
    from nuclick_wsi.training.detect_data import load_detection_items

    for item in spot_items(2):
        Image.fromarray(item.image).save(tmp_path / f"{item.name}.png")
        feats = [{"type": "Feature", "properties": {"objectType": "annotation"},
                  "geometry": {"type": "Point", "coordinates": [float(x), float(y)]}} for x, y in item.points]
        feats.append({"type": "Feature", "properties": {"objectType": "annotation"},
                      "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [128, 0], [128, 256], [0, 256], [0, 0]]]}})
        (tmp_path / f"{item.name}.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    items = load_detection_items([str(tmp_path)], log=lambda m: None)
    assert [len(i.points) for i in items] == [25, 25]
    assert items[0].valid[:, :127].all() and not items[0].valid[:, 129:].any()
    r = CliRunner().invoke(main, ["train", str(tmp_path), "-o", str(tmp_path / "d.pt"), "--task", "detect", "--epochs",
                                  "1", "--samples-per-epoch", "8", "--batch-size", "4", "--patch-size", "64",
                                  "--widths", "8,16,32", "--device", "cpu", "--precision", "fp32", "-q"])
    assert r.exit_code == 0, r.output
    assert "best validation F1" in r.output
    assert load_model(tmp_path / "d.pt", task="detect").metadata["training"]["val_images"] == ["img1"]
    r = CliRunner().invoke(main, ["train", str(tmp_path), "-o", str(tmp_path / "e.pt"), "--task", "detect",
                                  "--patch-size", "72"])
    assert r.exit_code == 1 and "multiple of" in r.output
