"""The evaluation protocol: ground-truth clicks, jitter, scores of model and baselines."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from nuclick_wsi.evaluation.protocol import evaluate, format_table, gt_clicks
from nuclick_wsi.io.datasets import Tile

from tests.helpers import disk_model


def test_click_at_centroid_or_innermost_pixel():
    labels = np.zeros((40, 40), np.int32)
    labels[5:12, 5:12] = 1  # a square: centroid pixel (8, 8)
    # a C shape whose centroid falls in its hole
    labels[20:35, 20:23] = 2
    labels[20:23, 20:35] = 2
    labels[32:35, 20:35] = 2
    xs, ys = gt_clicks(labels)
    assert (xs[0], ys[0]) == (8, 8)
    assert labels[ys[1], xs[1]] == 2  # moved inside the object


def test_jittered_clicks_stay_inside_and_move():
    rng = np.random.default_rng(0)
    labels = np.zeros((200, 200), np.int32)
    yy, xx = np.mgrid[0:200, 0:200]
    for k, (cx, cy) in enumerate([(40, 40), (120, 60), (80, 150)], start=1):
        labels[(xx - cx) ** 2 + (yy - cy) ** 2 <= 15 ** 2] = k
    x0, y0 = gt_clicks(labels)
    x5, y5 = gt_clicks(labels, jitter=5.0, rng=rng)
    assert all(labels[y, x] == k + 1 for k, (x, y) in enumerate(zip(x5, y5)))
    assert np.any((x5 != x0) | (y5 != y0))


def _tile(seed=0):
    rng = np.random.default_rng(seed)
    img = np.full((160, 160, 3), (235, 200, 220), np.uint8)
    labels = np.zeros((160, 160), np.int32)
    yy, xx = np.mgrid[0:160, 0:160]
    for k, (cx, cy) in enumerate([(30, 30), (90, 40), (50, 110), (120, 120)], start=1):
        r = rng.uniform(5, 7)
        m = (xx + 0.5 - cx) ** 2 + (yy + 0.5 - cy) ** 2 <= r * r
        labels[m] = k
        img[m] = (80, 40, 130)
    return Tile("t", img, labels, np.arange(1, 5), mpp=0.25)


def test_evaluate_scores_model_and_baselines():
    res = evaluate([_tile()], disk_model(6.0), baselines=True)
    assert set(res["overall"]) == {"model", "disk", "watershed"}
    assert res["objects"] == 4 and res["tiles"][0]["objects"] == 4
    m = res["overall"]["model"]
    assert m["dq"] == 1.0 and 0.6 < m["aji"] <= 1.0  # one disk per dark disk of similar size
    assert res["overall"]["watershed"]["aji"] > 0.8  # dark disks on a light ground: the watershed's best case
    table = format_table(res)
    assert "mean over tiles" in table and "watershed" in table
    json.dumps(res)


def test_evaluate_cli_writes_json(tmp_path, monkeypatch):
    from PIL import Image

    from nuclick_wsi import cli  # noqa: F401 - cli.main is the command group

    tile = _tile()
    (tmp_path / "d").mkdir()
    Image.fromarray(tile.image).save(tmp_path / "d" / "a.png")
    np.save(tmp_path / "d" / "a.npy", tile.labels)
    monkeypatch.setattr("nuclick_wsi.model.weights.load_model", lambda w=None, **k: disk_model(6.0))
    out = tmp_path / "r.json"
    r = CliRunner().invoke(cli.main, ["evaluate", str(tmp_path / "d"), "--mpp", "0.25", "--json", str(out), "--no-baselines"])
    assert r.exit_code == 0, r.output
    assert "model" in r.output and json.loads(out.read_text())["overall"]["model"]["dq"] == 1.0
    r = CliRunner().invoke(cli.main, ["evaluate", str(tmp_path / "d"), "--tiles", "nope"])
    assert r.exit_code == 1 and "nope" in r.output
