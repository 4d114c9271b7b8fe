"""Training: dataset readers, click sampler, batches, loss weights, a tiny run that learns, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import ndimage as ndi

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.io.datasets import compact_components, find_pairs, load_tile, rasterize_polygons
from nuclick_wsi.training.loss import nuclick_loss, nuclick_weights, soft_dice_loss
from nuclick_wsi.training.sampling import PatchSampler, make_batch, sample_click
from nuclick_wsi.training.train import TrainConfig, train


def blob_image(size=256, n=12, seed=0):
    """Dark elliptic nuclei on a pink background, with their instance labels."""
    rng = np.random.default_rng(seed)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = (235, 195, 215)
    labels = np.zeros((size, size), np.int32)
    yy, xx = np.mgrid[0:size, 0:size]
    k = 0
    while k < n:
        cx, cy = rng.uniform(15, size - 15, 2)
        rx, ry = rng.uniform(5, 10, 2)
        m = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 <= 1
        if (labels[m] > 0).any():
            continue
        k += 1
        labels[m] = k
        img[m] = (90 + rng.integers(-10, 10), 50, 140)
    return img, labels


def write_dataset(root, n_tiles=3, size=256):
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    for t in range(n_tiles):
        img, labels = blob_image(size, seed=t)
        Image.fromarray(img).save(root / "images" / f"tile{t}.png")
        np.save(root / "images" / f"tile{t}.npy", labels)
    return root


# --- dataset readers -----------------------------------------------------------------------------

def test_rasterize_polygons_uses_pixel_centres():
    # a 4x3 rectangle from (2, 1) to (6, 4) covers pixel columns 2..5 and rows 1..3 exactly
    square = np.array([[2, 1], [6, 1], [6, 4], [2, 4]], float)
    lab = rasterize_polygons([square], (8, 8))
    assert lab.sum() == 12
    assert lab[1:4, 2:6].all() and lab[0].sum() == 0 and lab[:, 6].sum() == 0


def test_imagescope_tile_reader(shared_data):
    name = "TCGA-21-5784-01Z-00-DX1"
    tile = load_tile(shared_data / "monuseg-train" / "images" / f"{name}.tif",
                     shared_data / "monuseg-train" / "annotations" / f"{name}.xml")
    assert tile.image.shape == (1000, 1000, 3) and tile.image.dtype == np.uint8
    assert tile.mpp == pytest.approx(0.2527)
    assert 380 <= len(tile.targets) <= 398  # 398 outlines, a few fully covered by later ones
    # the binary mask shipped with MoNuSeg agrees with our rasterisation of the outlines
    bm = np.asarray(Image.open(shared_data / "monuseg-train" / "binary_masks" / f"{name}.png").convert("L")) > 0
    fg = tile.labels > 0
    assert 2 * (fg & bm).sum() / (fg.sum() + bm.sum()) > 0.95


def test_label_image_and_geojson_readers(tmp_path):
    img, labels = blob_image(128, n=4)
    Image.fromarray(img).save(tmp_path / "a.png")
    Image.fromarray(labels.astype(np.uint16)).save(tmp_path / "a_labels.png")
    tile = load_tile(tmp_path / "a.png", tmp_path / "a_labels.png")
    assert np.array_equal(tile.labels, labels) and list(tile.targets) == [1, 2, 3, 4]
    # QuPath GeoJSON polygons outlining the same objects give the same pixels
    from nuclick_wsi.postprocess.trace import trace_mask
    from shapely.geometry import mapping

    feats = [{"type": "Feature", "geometry": mapping(trace_mask(labels == i)), "properties": {"objectType": "annotation"}}
             for i in range(1, 5)]
    (tmp_path / "b.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": feats}))
    Image.fromarray(img).save(tmp_path / "b.png")
    tile2 = load_tile(tmp_path / "b.png", tmp_path / "b.geojson")
    assert np.array_equal(tile2.labels > 0, labels > 0)
    assert len(tile2.targets) == 4


def test_label_image_size_mismatch_names_files(tmp_path):
    img, labels = blob_image(64, n=2)
    Image.fromarray(img).save(tmp_path / "a.png")
    np.save(tmp_path / "a.npy", labels[:32])
    with pytest.raises(NuclickError, match="a.npy"):
        load_tile(tmp_path / "a.png", tmp_path / "a.npy")


def test_compact_components_keep_single_blobs_only():
    mask = np.zeros((60, 60), bool)
    yy, xx = np.mgrid[0:60, 0:60]
    mask |= (xx - 12) ** 2 + (yy - 12) ** 2 <= 36  # a lone disk
    mask |= (xx - 36) ** 2 + (yy - 40) ** 2 <= 49  # two touching disks: one non-convex blob
    mask |= (xx - 48) ** 2 + (yy - 40) ** 2 <= 49
    labels, targets = compact_components(mask)
    assert labels.max() == 2
    assert list(targets) == [labels[12, 12]]


def test_find_pairs_layouts(tmp_path, shared_data):
    pairs = find_pairs(shared_data / "monuseg-train")
    kinds = {p[0].stem: p[2] for p in pairs}
    assert len(pairs) == 30 and sum(k == "instances" for k in kinds.values()) == 13
    glas = tmp_path / "glas"
    glas.mkdir()
    img, labels = blob_image(64, n=2)
    Image.fromarray(img).save(glas / "train_1.bmp")
    Image.fromarray(labels.astype(np.uint8)).save(glas / "train_1_anno.bmp")
    (p,) = find_pairs(glas)
    assert p[0].name == "train_1.bmp" and p[1].name == "train_1_anno.bmp"
    (tmp_path / "empty").mkdir()
    with pytest.raises(NuclickError, match="no image/annotation pairs"):
        find_pairs(tmp_path / "empty")


# --- click sampler and batches ---------------------------------------------------------------------

def test_sample_click_inside_and_away_from_edge():
    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[0:40, 0:40]
    mask = (xx - 20) ** 2 / 100 + (yy - 20) ** 2 / 36 <= 1
    dist = ndi.distance_transform_edt(mask)
    seen = set()
    for _ in range(300):
        r, c = sample_click(mask, rng)
        assert mask[r, c] and dist[r, c] > 2
        seen.add((r, c))
    assert len(seen) > 30  # a new random click each time
    thin = np.zeros((5, 20), bool)
    thin[2, 2:18] = True  # too thin for a 2 px margin: falls back to the innermost pixels
    r, c = sample_click(thin, rng)
    assert thin[r, c]


def test_batches_put_the_click_inside_the_target(tmp_path):
    img, labels = blob_image(256)
    from nuclick_wsi.io.datasets import Tile

    sampler = PatchSampler([Tile("t", img, labels, np.unique(labels)[1:])], seed=0)
    for augment in (False, True):
        x, g, go = make_batch(sampler, 32, augment=augment)
        assert x.shape == (32, 5, 128, 128) and g.shape == (32, 1, 128, 128)
        assert torch.all(x[:, 3].sum(dim=(1, 2)) == 1) and torch.all(x[:, 3, 64, 64] == 1)
        assert torch.all(g[:, 0, 64, 64] == 1)  # the click lies in its nucleus
        assert torch.all((g * go).sum(dim=(1, 2, 3)) == 0)  # target and others are disjoint
        assert 0 <= float(x[:, :3].min()) and float(x[:, :3].max()) <= 1
    # without augmentation the exclusion map marks the other nuclei's centroid pixels
    x, g, go = make_batch(sampler, 16, augment=False, click_at_centroid=True)
    for k in range(16):
        ex = x[k, 4].numpy() > 0
        others = ndi.label(go[k, 0].numpy() > 0)[0]
        hit = np.unique(others[ex])
        assert (hit > 0).all()  # every exclusion point sits on another nucleus


# --- loss -----------------------------------------------------------------------------------------

def test_nuclick_weights_by_hand():
    g = torch.zeros(1, 1, 4, 4)
    g[0, 0, 0, :2] = 1  # target: 2 px
    go = torch.zeros(1, 1, 4, 4)
    go[0, 0, 3, :] = 1  # others: 4 px -> a = max(4 / 2, 1) = 2
    w = nuclick_weights(g, go)
    assert w[0, 0, 0, 0] == 2 ** 2 + 1  # a^2 G + 1
    assert w[0, 0, 3, 0] == 2 + 1  # a G~ + 1
    assert w[0, 0, 1, 1] == 1
    go2 = torch.zeros(1, 1, 4, 4)
    go2[0, 0, 3, 0] = 1  # fewer others than target pixels: a = 1
    assert nuclick_weights(g, go2)[0, 0, 0, 0] == 2


def test_loss_is_small_for_the_right_answer():
    g = torch.zeros(2, 1, 8, 8)
    g[:, :, 2:5, 2:5] = 1
    go = torch.zeros_like(g)
    assert float(soft_dice_loss(g, g)) == pytest.approx(0, abs=1e-6)
    good = nuclick_loss((g * 2 - 1) * 20, g, go)
    bad = nuclick_loss((1 - 2 * g) * 20, g, go)
    assert float(good) < 1e-3 < 1 < float(bad)


# --- a tiny training run ----------------------------------------------------------------------------

def test_tiny_training_lowers_loss_and_resumes(tmp_path):
    data = write_dataset(tmp_path / "data", n_tiles=3)
    out = tmp_path / "m.pt"
    cfg = TrainConfig(data=[str(data)], output=str(out), widths=[8, 16, 32, 64], epochs=3, samples_per_epoch=128,
                      batch_size=16, lr=3e-3, val=["tile2"], seed=0)
    res = train(cfg, progress=False, log=lambda m: None)
    hist = res["history"]
    assert hist[-1]["train_loss"] < 0.95 * hist[0]["train_loss"]
    assert hist[-1]["val_iou"] > hist[0]["val_iou"] + 0.2  # it learns to outline, not only to lower a loss
    assert all(np.isfinite(h["val_loss"]) for h in hist)
    model = load_model(out)
    meta = model.metadata
    assert meta["training_precision"]["name"] in ("fp32", "bf16") and meta["training_precision"]["reason"]
    assert model.arch == "s2d-unet" and meta["mpp"] == 0.25 and meta["patch_size"] == 128
    assert meta["training"]["val_tiles"] == ["tile2"] and meta["training"]["train_tiles"] == ["tile0", "tile1"]
    assert "validation" in meta and meta["package_version"]
    # resuming continues from the last epoch instead of starting over
    cfg.epochs = 4
    res2 = train(cfg, progress=False, log=lambda m: None)
    assert [h["epoch"] for h in res2["history"]] == [1, 2, 3, 4]


def test_warm_start_keeps_the_architecture_and_trains_on_every_tile(tmp_path):
    """--init starts from a checkpoint's weights (arch, widths, threshold kept); --val none uses every tile."""
    data = write_dataset(tmp_path / "data", n_tiles=2)
    first = tmp_path / "first.pt"
    train(TrainConfig(data=[str(data)], output=str(first), widths=[8, 16, 32, 64], epochs=1, samples_per_epoch=32,
                      batch_size=16, val=["tile1"], seed=0), progress=False, log=lambda m: None)
    start = load_model(first)
    out = tmp_path / "warm.pt"
    cfg = TrainConfig(data=[str(data)], output=str(out), widths=[32, 64, 128, 256], epochs=1, samples_per_epoch=32,
                      batch_size=16, lr=1e-9, val=["none"], init=str(first), seed=0)
    res = train(cfg, progress=False, log=lambda m: None)
    warm = load_model(out)
    assert warm.arch_args == start.arch_args == {"widths": [8, 16, 32, 64]}  # the checkpoint's widths win
    assert warm.postprocess["threshold"] == start.postprocess["threshold"]
    assert warm.metadata["training"]["train_tiles"] == ["tile0", "tile1"] and warm.metadata["training"]["val_tiles"] == []
    assert "val_iou" not in res["history"][0] and np.isfinite(res["history"][0]["train_loss"])
    # at a negligible learning rate the warm-started weights are still the first run's
    for (k, a), b in zip(start.net.state_dict().items(), warm.net.state_dict().values()):
        if a.is_floating_point() and "running" not in k:
            assert torch.allclose(a, b, atol=1e-4), k
    with pytest.raises(NuclickError, match="gland model cannot start a nuclei"):
        gl = tmp_path / "gland.pt"
        torch.save(dict(torch.load(first, weights_only=False), metadata=dict(start.metadata, task="gland")), gl)
        train(TrainConfig(data=[str(data)], output=str(tmp_path / "x.pt"), epochs=1, init=str(gl)), progress=False,
              log=lambda m: None)


def test_validation_picks_the_best_threshold(monkeypatch):
    """validate scores masks as segment makes them at several cuts and reports the best one."""
    from nuclick_wsi.io.datasets import Tile
    from nuclick_wsi.training.train import validate

    img, labels = blob_image(256)
    sampler = PatchSampler([Tile("t", img, labels, np.unique(labels)[1:])], seed=0)

    class Halo(torch.nn.Module):
        """Probability 0.95 on the target nucleus and 0.75 on a 3 px ring around it: best cut above 0.75."""

        def forward(self, x):
            g = torch.zeros(x.shape[0], 1, *x.shape[-2:])
            for k in range(x.shape[0]):
                m = x[k, :3].mean(0) < 0.6  # the dark nuclei
                lab = ndi.label(m.numpy())[0]
                own = torch.from_numpy(lab == lab[64, 64])
                ring = torch.from_numpy(ndi.binary_dilation(own.numpy(), iterations=3)) & ~own
                g[k, 0][own] = 0.95
                g[k, 0][ring] = 0.75
            return torch.logit(g.clamp(0.01, 0.99))

    vm = validate(Halo(), sampler, torch.device("cpu"), 16)
    assert vm["threshold"] == 0.8 and vm["iou"] > 0.9
    assert vm["iou_by_threshold"]["0.5"] < vm["iou"]


def test_resuming_with_other_widths_is_a_one_line_error(tmp_path):
    """OUTPUT.last.pt of a run with other --widths (or --arch): a NuclickError naming the file, not torch's
    state-dict RuntimeError with one line per tensor; a file that is not a checkpoint too."""
    data = write_dataset(tmp_path / "data", n_tiles=2)
    out = tmp_path / "m.pt"
    cfg = TrainConfig(data=[str(data)], output=str(out), widths=[8, 16, 32, 64], epochs=1, samples_per_epoch=16,
                      batch_size=16, val=["tile1"], seed=0)
    train(cfg, progress=False, log=lambda m: None)
    cfg.widths, cfg.epochs = [16, 32, 64, 128], 2
    with pytest.raises(NuclickError, match=r"m\.last\.pt: .*widths") as err:
        train(cfg, progress=False, log=lambda m: None)
    assert "\n" not in str(err.value)
    (tmp_path / "m.last.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(NuclickError, match=r"m\.last\.pt: "):
        train(cfg, progress=False, log=lambda m: None)


def test_exclude_naming_no_image_is_an_error(tmp_path):
    """--exclude with a misspelt test tile excluded nothing and trained on the test tiles without a word."""
    from nuclick_wsi.training.detect_data import load_detection_items
    from nuclick_wsi.training.train import load_tiles

    data = write_dataset(tmp_path / "data", n_tiles=2)
    assert [t.name for t in load_tiles([str(data)], exclude=["tile0"], log=lambda m: None)] == ["tile1"]
    with pytest.raises(NuclickError, match=r"--exclude: no image named tile9 in .*data"):
        load_tiles([str(data)], exclude=["tile0", "tile9"], log=lambda m: None)
    with pytest.raises(NuclickError, match=r"--exclude: no image named tile9"):
        load_detection_items([str(data)], exclude=["tile9"], log=lambda m: None)


def test_val_holding_out_every_image_is_an_error(tmp_path):
    """--val naming every image left nothing to train on: a ValueError traceback from the sampler."""
    data = write_dataset(tmp_path / "data", n_tiles=2)
    cfg = TrainConfig(data=[str(data)], output=str(tmp_path / "m.pt"), widths=[8, 16, 32, 64], epochs=1,
                      samples_per_epoch=16, batch_size=16, val=["tile0", "tile1"], seed=0)
    with pytest.raises(NuclickError, match=r"--val holds out every image \(tile0, tile1\)"):
        train(cfg, progress=False, log=lambda m: None)
    cfg.data, cfg.val = [str(write_dataset(tmp_path / "one", n_tiles=1))], []
    with pytest.raises(NuclickError, match=r"the only image is held out for validation \(tile0\).*--val none"):
        train(cfg, progress=False, log=lambda m: None)
    from nuclick_wsi.training.detect import DetectConfig, split_items

    with pytest.raises(NuclickError, match=r"the only image is held out for validation \(tile0\)"):
        split_items(DetectConfig(data=cfg.data, output=str(tmp_path / "d.pt")), lambda m: None)
