"""The models of a run: one per prompt kind (clicks: nuclei, squiggles: glands), loaded once.

``Models`` is the one way to pass models to :func:`nuclick_wsi.pipeline.segment`, a QuPath project
run or a batch: each kind is a :class:`LoadedModel`, a weights name (loaded on first use), or None
(nuclei: the embedded default; glands: none ships, so squiggles without a gland model are an
error that says how to train one). Post-processing overrides (the CLI's ``--threshold``,
``--min-object-px``, ``--min-hole-px``) go into the metadata of the model they are for; there is no
other place thresholds come from.

A ``Models`` value owns what it loaded, its predictors and the load errors it met, so a batch
loads each checkpoint once; it may be shared between threads (a lock guards loading).
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from typing import Any

from nuclick_wsi.errors import ModelError, NuclickError
from nuclick_wsi.model.predictor import Predictor
from nuclick_wsi.model.weights import LoadedModel, load_model
from nuclick_wsi.records import Prompts

KINDS = ("nuclei", "gland")

TRAIN_HINT = ("no gland model ships with nuclick-wsi: train one on GlaS-style data with "
              "`nuclick-wsi train GLAS_FOLDER --task gland --mpp 0.62 -o gland.pt` "
              "(README, 'Glands: squiggles')")


def with_postprocess(model: LoadedModel, overrides: dict[str, float | None]) -> LoadedModel:
    """``model`` with its metadata's post-processing thresholds overridden (None: keep the model's)."""
    given = {k: float(v) for k, v in overrides.items() if v is not None}
    if not given:
        return model
    meta = dict(model.metadata)
    meta["postprocess"] = {**meta.get("postprocess", {}), **given}
    return dataclasses.replace(model, metadata=meta)


@dataclass
class Models:
    """The nucleus model (clicks) and the gland model (squiggles) of a run."""

    nuclei: LoadedModel | str | None = None  #: None: the embedded default model
    gland: LoadedModel | str | None = None  #: None: squiggles are an error (no gland model ships)
    #: per kind ("nuclei", "gland"): post-processing overrides {threshold, min_object_px, min_hole_px}
    postprocess: dict[str, dict[str, float | None]] = field(default_factory=dict)
    gland_only: bool = False  #: the user named only a gland model (``--task gland``): clicks alone are an error
    _loaded: dict[str, LoadedModel] = field(default_factory=dict, init=False, repr=False, compare=False)
    _errors: dict[str, NuclickError] = field(default_factory=dict, init=False, repr=False, compare=False)
    _predictors: dict[tuple[int, str, str], Predictor] = field(default_factory=dict, init=False, repr=False,
                                                                compare=False)
    _variants: dict[str, Models] = field(default_factory=dict, init=False, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False, compare=False)

    @classmethod
    def from_flags(cls, weights: str | None = None, gland_weights: str | None = None, *, task: str = "nuclei",
                   threshold: float | None = None, min_object_px: float | None = None,
                   min_hole_px: float | None = None) -> Models:
        """The CLI's flags: ``--weights`` is for ``--task`` (nuclei or gland), ``--gland-weights`` for
        glands beside a nucleus model; the threshold overrides are for ``--task``'s model."""
        if task not in KINDS:
            raise NuclickError(f"unknown task {task!r} (choose nuclei or gland)")
        over = {"threshold": threshold, "min_object_px": min_object_px, "min_hole_px": min_hole_px}
        if task == "gland":
            if weights and gland_weights:
                raise NuclickError("give the gland model once: --weights with --task gland, or --gland-weights")
            return cls(gland=weights or gland_weights, postprocess={"gland": over}, gland_only=True)
        return cls(nuclei=weights, gland=gland_weights, postprocess={"nuclei": over})

    def with_nuclei(self, weights: str | None) -> Models:
        """These models with another nucleus weights file (a manifest row's ``weights``), made once per name.

        A nucleus model given loaded (not by name) is used for every row.
        """
        if weights is None or weights == self.nuclei or isinstance(self.nuclei, LoadedModel):
            return self
        with self._lock:
            if weights not in self._variants:
                self._variants[weights] = Models(nuclei=weights, gland=self.gland, postprocess=self.postprocess,
                                                 gland_only=self.gland_only)
            return self._variants[weights]

    def get(self, kind: str) -> LoadedModel:
        """The model of ``kind``, loaded (once) with its overrides applied, checked to be of that task."""
        with self._lock:
            if kind in self._errors:
                raise self._errors[kind]
            if kind not in self._loaded:
                try:
                    self._loaded[kind] = self._load(kind)
                except NuclickError as exc:
                    self._errors[kind] = exc
                    raise
            return self._loaded[kind]

    def _load(self, kind: str) -> LoadedModel:
        given = self.nuclei if kind == "nuclei" else self.gland
        if kind == "gland" and given is None:
            raise ModelError(f"squiggles (lines) need a gland model: pass --gland-weights GLAND.pt "
                             f"(or --task gland --weights GLAND.pt); {TRAIN_HINT}")
        model = given if isinstance(given, LoadedModel) else load_model(given, task=kind)
        if kind == "gland" and model.task != "gland":
            raise ModelError(f"{model.source}: a {model.task} model, not a gland model (its metadata task is "
                             f"{model.task!r}); {TRAIN_HINT}")
        if kind == "nuclei" and model.task == "gland":
            raise ModelError(f"{model.source}: a gland model cannot segment clicks (nuclei); "
                             "pass it with --gland-weights (or --task gland)")
        if kind == "nuclei" and model.task == "detect":
            raise ModelError(f"{model.source}: a proposal detector cannot segment clicks; pass it to "
                             "propose --weights (or batch --propose --detector-weights)")
        return with_postprocess(model, self.postprocess.get(kind, {}))

    def for_prompts(self, prompts: Prompts, where: str) -> tuple[LoadedModel | None, LoadedModel | None]:
        """The (nuclei, gland) models a file's prompts need; None for a kind of prompt it does not hold.

        Raises
        ------
        NuclickError
            No prompts; squiggles without a gland model (says how to train one); only a gland
            model named but no squiggles; a model of the wrong task.
        """
        n_clicks, n_sq = len(prompts.clicks), len(prompts.squiggles)
        if not n_clicks and not n_sq:
            raise NuclickError(f"{where}: no clicks (points) and no squiggles (lines) found")
        if self.gland_only and not n_sq:
            raise NuclickError(f"{where}: --task gland but no squiggles (lines) found"
                               f"{f' ({n_clicks} clicks: drop --task gland)' if n_clicks else ''}")
        gland = None
        if n_sq:
            try:
                gland = self.get("gland")
            except ModelError as exc:
                if self.gland is None:
                    raise ModelError(f"{where}: {n_sq} squiggle(s) {str(exc).removeprefix('squiggles ')}") from None
                raise
        return (self.get("nuclei") if n_clicks else None), gland

    def predictor(self, model: LoadedModel, device: str = "auto", precision: str = "auto",
                  tta: bool = False, runtime: str = "auto") -> Predictor:
        """The predictor of ``model`` on ``device`` at ``precision`` (made once per Models value)."""
        key = (id(model), device, precision, tta, runtime)
        with self._lock:
            if key not in self._predictors:
                self._predictors[key] = Predictor(model, device, precision, tta, runtime)
            return self._predictors[key]

    def is_load_error(self, exc: BaseException) -> bool:
        """Whether ``exc`` is the error of loading one of these models (the same for every slide)."""
        return any(exc is err for err in self._errors.values())

    def describe(self) -> dict[str, Any]:
        """What was asked for, for messages."""
        return {k: (v.source if isinstance(v, LoadedModel) else v) for k, v in (("nuclei", self.nuclei),
                                                                                 ("gland", self.gland))}
