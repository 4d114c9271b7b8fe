"""``batch --propose``: proposals for every manifest row, skipped when fresh, a failed row reported."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from nuclick_wsi.cli.main import main
from nuclick_wsi.io.annotations import read_prompts
from nuclick_wsi.model.weights import save_checkpoint
from tests.helpers import SpotNet, make_cohort, spot_detector, spot_slide_rgb, write_tiff_slide


@pytest.fixture(autouse=True)
def spot_arch(monkeypatch):
    import nuclick_wsi.model.weights as weights

    real = weights.build_network
    monkeypatch.setattr(weights, "build_network",
                        lambda arch, args=None: SpotNet() if arch == "test-spot" else real(arch, args))


def test_batch_propose(tmp_path):
    root = tmp_path / "cohort"
    (root / "slides").mkdir(parents=True)
    for k, spots in enumerate([[(100, 100), (250, 200)], [(150, 120)]]):
        write_tiff_slide(root / "slides" / f"s{k}.tif", 384, 320, 0.25, rgb=spot_slide_rgb(384, 320, spots))
    manifest = make_cohort(root, n=2, weights=False)
    det = spot_detector()
    save_checkpoint(tmp_path / "spot.pt", det.net, "test-spot", {}, det.metadata)
    out = tmp_path / "out"
    args = ["batch", str(manifest), "-o", str(out), "--propose", "--detector-weights", str(tmp_path / "spot.pt")]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    counts = [len(read_prompts(out / "proposals" / f"s{k}.proposals.geojson").clicks) for k in range(2)]
    assert counts == [2, 1]
    assert not list(out.glob("s0.*"))  # nothing segmented
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0 and r.output.count("complete") == 2
    (root / "slides" / "s1.tif").write_bytes(b"not a slide")  # newer than its proposals: redone, and fails
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 1
    lines = dict(line.split("\t", 1) for line in r.stdout.splitlines() if "\t" in line)
    assert lines["s0"].startswith("complete") and lines["s1"].startswith("failed") and "s1.tif" in lines["s1"]
