"""The Models value: one model per prompt kind, thresholds in each model's metadata, loaded once."""

from __future__ import annotations

import threading

import pytest

from nuclick_wsi.errors import ModelError, NuclickError
from nuclick_wsi.model.models import Models
from nuclick_wsi.model.weights import default_weights_path
from nuclick_wsi.records import Click, Prompts, Squiggle
from tests.helpers import ROOT, disk_model, make_weights

CLICK = Click(1.0, 2.0, index=0)
SQUIGGLE = Squiggle(((1.0, 1.0), (5.0, 5.0)), index=0)


def gland_like(**post):
    m = disk_model(**post)
    m.metadata["task"] = "gland"
    return m


def test_embedded_weights_ship_inside_the_model_package():
    assert default_weights_path() == ROOT / "nuclick_wsi" / "model" / "default-nuclei.pt"
    assert default_weights_path().is_file()


def test_flags_put_thresholds_into_the_named_models_metadata(tmp_path):
    w = str(make_weights(tmp_path / "w.pt"))
    nuclei = Models.from_flags(w, threshold=0.7, min_hole_px=5).get("nuclei")
    assert nuclei.postprocess["threshold"] == 0.7 and nuclei.postprocess["min_hole_px"] == 5
    assert nuclei.postprocess["min_object_px"] == 10  # the task's default where neither gives one
    gland = Models.from_flags(task="gland", threshold=0.2)
    assert gland.nuclei is None and gland.gland_only and gland.postprocess == {
        "gland": {"threshold": 0.2, "min_object_px": None, "min_hole_px": None}}
    with pytest.raises(NuclickError, match="give the gland model once"):
        Models.from_flags(w, w, task="gland")
    with pytest.raises(NuclickError, match="unknown task"):
        Models.from_flags(task="cells")


def test_for_prompts_loads_only_what_the_file_needs_and_checks_tasks():
    nuclei, gland = disk_model(), gland_like()
    models = Models(nuclei=nuclei, gland=gland)
    assert models.for_prompts(Prompts(clicks=[CLICK]), "f") == (nuclei, None)
    assert models.for_prompts(Prompts(squiggles=[SQUIGGLE]), "f") == (None, gland)
    with pytest.raises(NuclickError, match="no clicks .*and no squiggles"):
        models.for_prompts(Prompts(), "f")
    with pytest.raises(ModelError, match=r"f: 1 squiggle\(s\) \(lines\) need a gland model.*nuclick-wsi train"):
        Models(nuclei=nuclei).for_prompts(Prompts(squiggles=[SQUIGGLE]), "f")
    with pytest.raises(ModelError, match="not a gland model"):
        Models(gland=disk_model()).for_prompts(Prompts(squiggles=[SQUIGGLE]), "f")
    with pytest.raises(ModelError, match="a gland model cannot segment clicks"):
        Models(nuclei=gland_like()).for_prompts(Prompts(clicks=[CLICK]), "f")
    with pytest.raises(NuclickError, match="--task gland but no squiggles"):
        Models(gland=gland, gland_only=True).for_prompts(Prompts(clicks=[CLICK]), "f")


def test_each_checkpoint_loads_once_and_its_error_is_kept(tmp_path, monkeypatch):
    import nuclick_wsi.model.models as models_mod

    calls = []
    real = models_mod.load_model
    monkeypatch.setattr(models_mod, "load_model", lambda w, **k: calls.append(w) or real(w, **k))
    w = str(make_weights(tmp_path / "w.pt"))
    models = Models(nuclei=w)
    threads = [threading.Thread(target=models.get, args=("nuclei",)) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert calls == [w]
    assert models.with_nuclei(w) is models and models.with_nuclei(None) is models
    other = models.with_nuclei(str(tmp_path / "missing.pt"))
    assert other is models.with_nuclei(str(tmp_path / "missing.pt"))  # made once per name
    for _ in range(2):
        with pytest.raises(ModelError, match="missing.pt") as err:
            other.get("nuclei")
        assert other.is_load_error(err.value)
    assert calls == [w, str(tmp_path / "missing.pt")]  # the failure is not retried
    fixed = Models(nuclei=disk_model())
    assert fixed.with_nuclei(w) is fixed  # a loaded model is used for every row


def test_a_proposal_detector_given_as_nucleus_weights_is_a_clear_error():
    """segment/batch --weights DETECTOR.pt: a ModelError naming the file (was a KeyError traceback)."""
    det = str(default_weights_path("detect"))
    with pytest.raises(ModelError, match=r"default-detector\.pt: a proposal detector cannot segment clicks"):
        Models(nuclei=det).for_prompts(Prompts(clicks=[CLICK]), "f")
