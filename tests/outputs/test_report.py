"""The report's helpers."""

from __future__ import annotations

import json

import pytest

from nuclick_wsi.outputs.report import comparable_digests


def test_comparable_digests_ignore_only_what_differs_between_equal_runs(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d, secs in ((a, 1.0), (b, 2.0)):
        (d / "s.labels.zarr").mkdir(parents=True)
        (d / "s.labels.zarr" / "0.0").write_bytes(b"\x01\x02")
        rep = {"totals": {"clicks": 3}, "timings_s": {"wall": secs}, "device": str(d), "rerun": {"mode": str(d)},
               "outputs": {"qupath": str(d / "s.geojson")}}
        (d / "s.report.json").write_text(json.dumps(rep))
    assert comparable_digests(a) == comparable_digests(b)
    assert set(comparable_digests(a)) == {"s.labels.zarr/0.0", "s.report.json"}
    (b / "s.labels.zarr" / "0.0").write_bytes(b"\x01\x03")
    assert comparable_digests(a)["s.labels.zarr/0.0"] != comparable_digests(b)["s.labels.zarr/0.0"]
    rep = json.loads((b / "s.report.json").read_text())
    rep["totals"]["clicks"] = 4
    (b / "s.report.json").write_text(json.dumps(rep))
    assert comparable_digests(a)["s.report.json"] != comparable_digests(b)["s.report.json"]
    del rep["rerun"]  # a report without a run-only field is not one a run wrote
    (b / "s.report.json").write_text(json.dumps(rep))
    with pytest.raises(KeyError):
        comparable_digests(b)
