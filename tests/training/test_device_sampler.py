"""The device-side NuClick sampler (training/device_sampler.py): same samples as the CPU one, packed tiles, training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import ndimage as ndi

from nuclick_wsi.errors import NuclickError
from nuclick_wsi.io.datasets import Tile
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.training.device_sampler import DevicePatchSampler, load_packed, pack_tiles
from nuclick_wsi.training.sampling import PatchSampler, color_augment, make_batch, resolution_augment
from nuclick_wsi.training.train import TrainConfig, train

from tests.training.test_train import blob_image, write_dataset


def _tiles():
    out = []
    for seed, size in ((0, 256), (1, 200)):  # two tile sizes: the smaller one is padded on the device
        img, labels = blob_image(size, n=14, seed=seed)
        out.append(Tile(f"t{seed}", img, labels, np.unique(labels)[1:]))
    return out


def test_unaugmented_batches_equal_the_cpu_samplers():
    """Clicks at centroids, no augmentation: the same pixels, target and other masks as make_batch."""
    tiles = _tiles()
    dev, cpu = DevicePatchSampler(tiles, seed=0), PatchSampler(tiles, seed=0)
    assert len(dev) == len(cpu) == 28
    items = list(range(len(dev)))
    x, g, go = dev.batch(items=items, augment=False, click_at_centroid=True)
    x2, g2, go2 = make_batch(cpu, 0, augment=False, click_at_centroid=True, items=[cpu.index[i] for i in items])
    assert torch.allclose(x[:, :3], x2[:, :3], atol=1e-4)  # white outside the tile, as the CPU crop fills it
    assert torch.equal(g, g2) and torch.equal(go, go2) and torch.equal(x[:, 3], x2[:, 3])
    # exclusion marks: the pixel holding each other centroid, the same pixel in both samplers
    assert torch.equal(x[:, 4], x2[:, 4]) and float(x[:, 4].sum()) > len(items)


def test_augmented_geometry_equals_the_cpu_samplers(monkeypatch):
    """Rotation, zoom and flip drawn alike (colour and resolution jitter off): the same bilinear pixels and
    nearest labels as make_batch; the unaugmented test samples whole pixels only and cannot see either."""
    import nuclick_wsi.training.device_sampler as device_module
    import nuclick_wsi.training.sampling as cpu_module

    for module in (device_module, cpu_module):
        monkeypatch.setattr(module, "color_augment", lambda img, rng: img)
        monkeypatch.setattr(module, "resolution_augment", lambda img, rng: img)
    tiles, n = _tiles(), 28
    u = np.random.default_rng(5).random((3, n)).astype(np.float32)  # angle, zoom, flip (half of them flipped)

    class Draws:  # make_batch's geometric draws, from the same uniform numbers the device sampler gets
        def __init__(self):
            self.uniform_calls = 0

        def uniform(self, a, b, size):
            self.uniform_calls += 1
            return a + (b - a) * u[self.uniform_calls - 1].astype(np.float64)

        def random(self, size):
            return u[2]

    dev, cpu = DevicePatchSampler(tiles, seed=0, exclusion_drop=0.0), PatchSampler(tiles, seed=0, exclusion_drop=0.0)
    draws = iter(torch.from_numpy(u))
    monkeypatch.setattr(dev, "_rand", lambda *shape: next(draws))
    x, g, go = dev.batch(items=list(range(n)), augment=True, click_at_centroid=True)
    x2, g2, go2 = make_batch(cpu, 0, augment=True, click_at_centroid=True, items=cpu.index, rng=Draws())
    assert 0 < (u[2] < 0.5).sum() < n and not torch.equal(g, make_batch(cpu, 0, augment=False, click_at_centroid=True,
                                                                          items=cpu.index)[1])
    assert torch.allclose(x[:, :3], x2[:, :3], atol=1e-4)
    assert torch.equal(g, g2) and torch.equal(go, go2)
    assert (x[:, 4] != x2[:, 4]).sum() <= 2  # the same exclusion pixels (a rounding tie may fall either way)
    on_other = np.concatenate([(go[k, 0].numpy() > 0)[x[k, 4].numpy() > 0] for k in range(n)])
    assert len(on_other) > n and on_other.all()  # the inverse map puts every other click on its nucleus


def test_augmented_batches_keep_the_click_in_its_nucleus():
    sampler = DevicePatchSampler(_tiles(), seed=3)
    x, g, go = sampler.batch(64)
    assert x.shape == (64, 5, 128, 128) and g.shape == go.shape == (64, 1, 128, 128)
    assert torch.all(x[:, 3].sum(dim=(1, 2)) == 1) and torch.all(x[:, 3, 64, 64] == 1)
    assert torch.all(g[:, 0, 64, 64] == 1)  # the click lies in its (rotated, scaled) nucleus
    assert torch.all((g * go).sum(dim=(1, 2, 3)) == 0)
    assert 0 <= float(x[:, :3].min()) and float(x[:, :3].max()) <= 1
    # exclusion marks sit on other nuclei (rotation and zoom move them with the image)
    on_other = [(go[k, 0].numpy() > 0)[x[k, 4].numpy() > 0] for k in range(64)]
    marks = np.concatenate(on_other)
    assert len(marks) > 64 and marks.mean() > 0.95
    # the transform varies: the same object drawn twice gives different patches
    a = sampler.batch(items=torch.tensor([0, 0]), augment=True)[0]  # items as a tensor (on the device in training)
    assert not torch.equal(a[0, :3], a[1, :3])


def test_exclusion_drop_and_reproducibility():
    tiles = _tiles()
    full = DevicePatchSampler(tiles, seed=0, exclusion_drop=0.0).batch(items=list(range(28)), augment=False)[0]
    dropped = DevicePatchSampler(tiles, seed=0, exclusion_drop=0.5)
    # no augmentation: nothing dropped (validation sees every other click)
    assert torch.equal(dropped.batch(items=list(range(28)), augment=False)[0][:, 4], full[:, 4])
    counts = [float(dropped.batch(items=list(range(28)))[0][:, 4].sum()) for _ in range(4)]
    assert max(counts) < 0.8 * float(full[:, 4].sum())
    a = DevicePatchSampler(tiles, seed=7).batch(16)
    b = DevicePatchSampler(tiles, seed=7).batch(16)
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_augmentations_draw_from_a_torch_generator():
    img = torch.rand(8, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    out = color_augment(img, gen)
    assert out.shape == img.shape and 0 <= float(out.min()) and float(out.max()) <= 1
    assert not torch.allclose(out, img)
    res = resolution_augment(img, torch.Generator().manual_seed(1), p=1.0)
    assert not torch.allclose(res, img) and torch.allclose(res.mean(dim=(2, 3)), img.mean(dim=(2, 3)), atol=0.02)
    again = color_augment(img, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_pack_round_trip(tmp_path):
    tiles = _tiles()
    tiles[0].source, tiles[0].mpp = "a.xml (instances)", 0.2527
    pack_tiles(tiles, tmp_path / "p.npz")
    back = load_packed(tmp_path / "p.npz")
    assert [t.name for t in back] == ["t0", "t1"] and back[0].mpp == 0.2527 and back[1].mpp is None
    for a, b in zip(tiles, back):
        assert np.array_equal(a.image, b.image) and np.array_equal(a.labels, b.labels)  # lossless
        assert np.array_equal(a.targets, b.targets) and a.centroids == b.centroids and a.source == b.source
    np.savez(tmp_path / "other.npz", x=np.zeros(3))
    with pytest.raises((ValueError, KeyError)):
        load_packed(tmp_path / "other.npz")


def test_train_with_the_device_sampler_learns_and_resumes(tmp_path):
    """--sampler device on this CPU: the loss falls, validation (CPU sampler) rises, resume continues its stream."""
    data = write_dataset(tmp_path / "data", n_tiles=3)
    out = tmp_path / "m.pt"
    cfg = TrainConfig(data=[str(data)], output=str(out), widths=[8, 16, 32, 64], epochs=3, samples_per_epoch=128,
                      batch_size=16, lr=3e-3, val=["tile2"], seed=0, sampler="device", precision="fp32")
    logs = []
    hist = train(cfg, progress=False, log=logs.append)["history"]
    assert "sampler: device" in logs
    assert hist[-1]["train_loss"] < 0.95 * hist[0]["train_loss"]
    assert hist[-1]["val_iou"] > hist[0]["val_iou"] + 0.2
    assert load_model(out).metadata["training"]["sampler"] == "device"
    cfg.epochs = 4
    assert [h["epoch"] for h in train(cfg, progress=False, log=lambda m: None)["history"]] == [1, 2, 3, 4]
    cfg.epochs, cfg.sampler = 5, "cpu"
    with pytest.raises(NuclickError, match="resume it with --sampler device"):
        train(cfg, progress=False, log=lambda m: None)


def test_resumed_device_run_equals_an_uninterrupted_one(tmp_path, monkeypatch):
    """Stopped after epoch 1 and resumed: the same weights as a run that never stopped (the device generator's
    state travels in OUTPUT.last.pt); the test above only counts epochs."""
    import shutil

    import nuclick_wsi.training.train as train_module

    data = write_dataset(tmp_path / "data", n_tiles=2)
    out = tmp_path / "m.pt"
    last, snapshot = tmp_path / "m.last.pt", tmp_path / "epoch1.pt"
    save_state = train_module.save_state

    def keep_epoch1(path, *args, epoch, **kw):
        save_state(path, *args, epoch=epoch, **kw)
        if epoch == 1:
            shutil.copy(path, snapshot)

    monkeypatch.setattr(train_module, "save_state", keep_epoch1)
    cfg = TrainConfig(data=[str(data)], output=str(out), widths=[8, 16, 32, 64], epochs=2, samples_per_epoch=32,
                      batch_size=16, val=["none"], seed=0, sampler="device", precision="fp32")
    train(cfg, progress=False, log=lambda m: None)
    straight = torch.load(last, weights_only=False)
    shutil.copy(snapshot, last)
    train(cfg, progress=False, log=lambda m: None)
    resumed = torch.load(last, weights_only=False)
    assert torch.equal(straight["rng"], resumed["rng"])
    assert all(torch.equal(v, resumed["state_dict"][k]) for k, v in straight["state_dict"].items())
    ck = torch.load(last, weights_only=False)
    ck["rng"], cfg.epochs = torch.zeros(16, dtype=torch.uint8), 3  # a CUDA generator's state, resumed on this CPU
    torch.save(ck, last)
    with pytest.raises(NuclickError, match="another kind of device than cpu"):
        train(cfg, progress=False, log=lambda m: None)


def test_sampler_choice_is_checked(tmp_path):
    with pytest.raises(NuclickError, match="unknown sampler"):
        TrainConfig(data=[], output=str(tmp_path / "m.pt"), sampler="gpu")
    with pytest.raises(NuclickError, match="device sampler"):
        TrainConfig(data=[], output=str(tmp_path / "m.pt"), task="gland", sampler="device")


def test_click_candidates_keep_away_from_the_edge():
    tiles = _tiles()
    sampler = DevicePatchSampler(tiles)
    for obj in range(len(sampler)):
        t, oid = int(sampler.obj_tile[obj]), int(sampler.obj_id[obj])
        s, n = int(sampler.obj_start[obj]), int(sampler.obj_count[obj])
        rows, cols = sampler.cand[s:s + n].T.numpy()
        mask = tiles[t].labels == oid
        dist = ndi.distance_transform_edt(np.pad(mask, 1))[1:-1, 1:-1]
        assert n > 0 and (dist[rows, cols] > 2).all()


def test_border_weights_by_hand():
    """--loss border: 1 + 2 on other nuclei + 2 on the background within 3 px (a 7x7 square) of the target."""
    from nuclick_wsi.training.loss import border_weights, nuclick_loss

    g = torch.zeros(1, 1, 16, 16)
    g[0, 0, 6:9, 6:9] = 1  # 3x3 target
    go = torch.zeros_like(g)
    go[0, 0, 6:9, 11:13] = 1  # another nucleus, 2 px to the right of the target's edge
    w = border_weights(g, go)[0, 0]
    assert w[7, 7] == 1  # inside the target
    assert w[7, 9] == 3 and w[3, 3] == 3 and w[11, 11] == 3  # ring: up to 3 px out, square corners included
    assert w[2, 7] == 1 and w[7, 12] == 3  # 4 px out: plain background; other nucleus: 1 + 2 (not 5)
    assert w[7, 11] == 3 and float(w.max()) == 3
    # the ring's weight raises the loss of an outline that spills into it
    tight = (g * 2 - 1) * 8
    spill = tight.clone()
    spill[0, 0, 5:10, 5:10] = 8
    ratio = lambda x: float(nuclick_loss(x, g, go, "border")) / float(nuclick_loss(x, g, go, "calibrated"))  # noqa: E731
    assert ratio(spill) > 1.2 and ratio(tight) < 1.05


def test_cli_sampler_option(tmp_path):
    """`train --sampler device` reaches the training loop; on --task detect it is a one-line error."""
    from click.testing import CliRunner

    from nuclick_wsi.cli.main import main

    data = write_dataset(tmp_path / "data", n_tiles=2)
    r = CliRunner().invoke(main, ["train", str(data), "-o", str(tmp_path / "m.pt"), "--sampler", "device", "--epochs",
                                  "1", "--samples-per-epoch", "16", "--batch-size", "8", "--widths", "8,8,8,8",
                                  "--val", "tile1", "--device", "cpu", "--precision", "fp32", "-q"])
    assert r.exit_code == 0, r.output
    assert load_model(tmp_path / "m.pt").metadata["training"]["sampler"] == "device"
    r = CliRunner().invoke(main, ["train", str(data), "-o", str(tmp_path / "d.pt"), "--task", "detect",
                                  "--sampler", "device"])
    assert r.exit_code == 1 and "--task detect has its own sampler" in r.output
