"""Proposal scoring on a real held-out tile, with the embedded detector (skipped without ../shared/data)."""

from __future__ import annotations

from nuclick_wsi.evaluation.detection import evaluate_proposals
from nuclick_wsi.evaluation.protocol import load_eval_tiles
from nuclick_wsi.model.weights import load_model


def test_embedded_detector_on_a_held_out_tile(shared_data):
    det = load_model(None, task="detect")
    assert det.arch == "s2d-detector" and det.mpp == 0.5 and det.task == "detect"
    tiles = load_eval_tiles([str(shared_data / "monuseg-train")], ["TCGA-AR-A1AS-01Z-00-DX1"])
    result = evaluate_proposals(tiles, det)
    o = result["overall"]
    assert o["tp"] + o["fn"] == 405  # every outlined nucleus counted
    assert o["f1"] > 0.8, o
