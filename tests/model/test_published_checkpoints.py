"""Published NuClick checkpoints other than TIAToolbox's load by their key layout and run through segment.

Sources of the key layouts (``tests/data``), each written from the authors' own implementation:

* ``nuclick_torch_unet_keys.json``: ``UNet(n_channels=5, n_classes=1, bilinear=True)`` of
  github.com/mostafajahanifar/nuclick_torch at commit 4be7978 (``models/architecture.py``,
  ``models/layers.py``; built as in its ``train.py``/``predict.py``), its ``state_dict()`` keys and
  shapes in order. The port's checkpoints are bare state dicts (``torch.save(net.state_dict())``).
  Its other network, ``NuClick_NN(5, 1)``, has exactly the 360 keys and shapes of
  ``tiatoolbox_nuclick_keys.json`` (checked by hand), so it loads as ``nuclick`` (tests/test_segment.py).
* ``monai_nuclick_basicunet_keys.json``: MONAI 1.6.1 ``BasicUNet(spatial_dims=2, in_channels=5,
  out_channels=1, features=[32, 64, 128, 256, 512, 32])``, the ``network_def`` of the model-zoo bundle
  ``pathology_nuclick_annotation`` (``configs/inference.json``), ``state_dict()`` keys and shapes in
  order. The bundle's ``model.pt`` is a bare state dict (ignite's Checkpoint saves a single object
  unwrapped); MONAI's ``CheckpointLoader`` also reads ``{"model": state_dict}``. MONAI Label's
  pathology app downloads this same bundle (``sample-apps/pathology/lib/configs/nuclick.py``).

Verified by hand (2026-11-30, torch 2.13.0+cpu): with the port's ``models/`` on ``sys.path``, and
with ``monai==1.6.1`` in a throwaway venv, our networks have the same ordered keys and shapes, and
with the same random weights give identical logits (max |diff| 0.0 at 128x128 and 100x90; for the
bundle, after its RGB -> [-1, 1] scaling and x-first axis order, which our wrapper applies). Also
checked: ``NuClick_NN`` with random weights equals our ``NuClickNet`` exactly. The monai comparison
is repeated below when monai is installed.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.helpers import random_state_dict, write_tiff_slide
from nuclick_wsi.errors import ModelError
from nuclick_wsi.model.architectures.monai_basicunet import MonaiNuclickUNet
from nuclick_wsi.model.architectures.nuclick_torch import NuclickTorchUNet
from nuclick_wsi.model.models import Models
from nuclick_wsi.model.weights import load_model
from nuclick_wsi.pipeline import SegmentOptions, segment
from nuclick_wsi.store.labels import is_complete, open_labels

DATA = Path(__file__).parents[1] / "data"
LAYOUTS = {  # arch: (keys file, our network, last layer's bias key, threshold, min object px, min hole px)
    "nuclick-torch-unet": ("nuclick_torch_unet_keys.json", NuclickTorchUNet, "outc.conv.bias", 0.5, 10, 30),
    "monai-nuclick-basicunet": ("monai_nuclick_basicunet_keys.json", MonaiNuclickUNet, "final_conv.bias", 0.5, 10, 30),
}


def published_state_dict(arch: str, p_out: float | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random tensors with the published layout's exact keys and shapes (in order).

    With ``p_out``, the last 1x1 convolution is zeroed and its bias set so that the network outputs
    the probability ``p_out`` everywhere (the rest of the network still runs on random weights).
    """
    keys = json.loads((DATA / LAYOUTS[arch][0]).read_text())["keys"]
    sd = random_state_dict(keys, seed, std=lambda shape: 1 / max(1, math.prod(shape[1:])) ** 0.5)
    if p_out is not None:
        bias_key = LAYOUTS[arch][2]
        sd[bias_key.replace("bias", "weight")].zero_()
        sd[bias_key].fill_(math.log(p_out / (1 - p_out)))
    return sd


@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_our_network_has_the_published_keys(arch):
    ref = json.loads((DATA / LAYOUTS[arch][0]).read_text())
    net = LAYOUTS[arch][1]()
    ours = [(k, list(v.shape)) for k, v in net.state_dict().items()]
    assert ours == list(ref["keys"].items()) and len(ours) == ref["num_keys"]
    assert sum(p.numel() for p in net.parameters()) == ref["num_parameters"]


@pytest.mark.parametrize("arch, wrap", [("nuclick-torch-unet", "bare"), ("monai-nuclick-basicunet", "bare"),
                                        ("monai-nuclick-basicunet", "model"), ("monai-nuclick-basicunet", "module.")])
def test_published_file_is_recognised(arch, wrap, tmp_path):
    sd = published_state_dict(arch, seed=1)
    saved = {"model": sd} if wrap == "model" else {f"module.{k}": v for k, v in sd.items()} if wrap == "module." else sd
    path = tmp_path / "model.pt"
    torch.save(saved, path)
    model = load_model(path)
    _, cls, _, thr, min_obj, min_hole = LAYOUTS[arch]
    assert model.arch == arch and isinstance(model.net, cls) and not model.net.training
    assert model.mpp == 0.25 and model.patch_size == 128 and model.task == "nuclei"
    assert model.postprocess == {"threshold": thr, "min_object_px": min_obj, "min_hole_px": min_hole}
    assert model.source == str(path)
    ref = cls()
    ref.load_state_dict(sd, strict=True)
    x = torch.rand(2, 5, 128, 128)
    with torch.no_grad():
        torch.testing.assert_close(model.net(x), ref.eval()(x), rtol=0, atol=0)


def test_other_widths_of_a_published_layout_are_a_clear_error(tmp_path):
    """A BasicUNet of other widths (16 first features) is recognised by its keys, then refused in one line."""
    sd = published_state_dict("monai-nuclick-basicunet")
    sd["conv_0.conv_0.conv.weight"] = torch.zeros(16, 5, 3, 3)
    path = tmp_path / "other.pt"
    torch.save(sd, path)
    with pytest.raises(ModelError, match=r"other\.pt: weights do not fit the monai-nuclick-basicunet network") as exc:
        load_model(path)
    assert "\n" not in str(exc.value)


def test_monai_wrapper_feeds_the_bundle_convention():
    """Our batch (RGB in [0, 1], y first) reaches the bundle's network as RGB in [-1, 1], x first."""
    net = MonaiNuclickUNet().eval()
    net.load_state_dict(published_state_dict("monai-nuclick-basicunet", seed=2))
    x = torch.rand(1, 5, 128, 96)
    x[:, 3:] = 0
    x[0, 3, 60, 40] = 1.0  # this click
    x[0, 4, 10, 80] = 1.0  # another click
    bundle = torch.cat([x[:, :3] * 2 - 1, x[:, 3:]], dim=1).transpose(2, 3)
    with torch.no_grad():
        out = net(x)
        torch.testing.assert_close(out, net.forward_raw(bundle).transpose(2, 3), rtol=0, atol=0)
        assert out.shape == (1, 1, 128, 96)
        assert not torch.allclose(out, net.forward_raw(x), atol=1e-3)  # the adapter is not a no-op


def test_monai_wrapper_matches_monai():
    """Same weights, same logits as MONAI's own BasicUNet with the bundle's network_def (needs monai)."""
    nets = pytest.importorskip("monai.networks.nets")
    ref = nets.BasicUNet(spatial_dims=2, in_channels=5, out_channels=1, features=[32, 64, 128, 256, 512, 32])
    sd = published_state_dict("monai-nuclick-basicunet", seed=3)
    ref.load_state_dict(sd, strict=True)
    ours = MonaiNuclickUNet(bundle_input=False)
    ours.load_state_dict(sd, strict=True)
    x = torch.rand(2, 5, 128, 100)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(x), ref.eval()(x))


def _run_segment(tmp_path: Path, weights: Path, clicks):
    tmp_path.mkdir()
    slide = write_tiff_slide(tmp_path / "slide.tif", 512, 384, 0.25)
    pts = tmp_path / "c.csv"
    pts.write_text("x,y\n" + "".join(f"{x},{y}\n" for x, y in clicks))
    out = tmp_path / "out"
    opts = SegmentOptions(progress=False, device="cpu", precision="fp32", batch_size=2)
    report = segment(slide, pts, out, options=opts, models=Models(nuclei=str(weights))).report
    assert is_complete(out / "slide.labels.zarr")
    return report, np.asarray(open_labels(out / "slide.labels.zarr")[:])


@pytest.mark.slow
@pytest.mark.parametrize("arch", sorted(LAYOUTS))
def test_published_weights_segment(arch, tmp_path):
    """Through ``segment --weights FILE``: the file's threshold and patch size reach the outlines.

    The weights output 0.55 everywhere: above both layouts' threshold of 0.5, so the click's
    instance is the whole 128 x 128 patch (the slide is at the model's 0.25 um/px). At 0.45 (which
    TIAToolbox's threshold of 0.33 would keep) nothing is segmented, with the threshold as reason.
    """
    path = tmp_path / f"{arch}.pt"
    torch.save(published_state_dict(arch, p_out=0.55), path)
    report, labels = _run_segment(tmp_path / "hi", path, [(256.5, 192.5)])
    assert report["model"]["arch"] == arch and report["model"]["source"] == str(path)
    assert report["model"]["patch_size"] == 128
    (click,) = report["clicks"]
    assert click["status"] == "segmented"
    assert labels[192, 256] == click["instance_id"]
    rows, cols = np.nonzero(labels == click["instance_id"])
    assert len(rows) == 128 * 128 and np.ptp(rows) == np.ptp(cols) == 127

    torch.save(published_state_dict(arch, p_out=0.45), path)
    report, labels = _run_segment(tmp_path / "lo", path, [(256.5, 192.5), (100.5, 100.5)])
    assert len(report["clicks"]) == 2
    for c in report["clicks"]:
        assert c["reason"].startswith("nothing segmented: probability 0.450") and "below 0.5" in c["reason"]
    assert not labels.any()


def test_a_whole_pickled_model_is_refused_in_one_line_without_torchs_advice_to_unpickle_it(tmp_path, recwarn):
    """torch.save(model) (a whole module, as some projects publish) cannot load with weights_only; torch's
    message goes on to suggest weights_only=False (running the file's code). Ours says what the file is."""
    path = tmp_path / "whole.pt"
    torch.save(NuclickTorchUNet(), path)
    with pytest.raises(ModelError, match=r"whole\.pt: holds Python objects besides weights") as exc:
        load_model(path)
    assert "\n" not in str(exc.value) and "weights_only" not in str(exc.value)
    assert not [w for w in recwarn if "pickle" in str(w.message)]
