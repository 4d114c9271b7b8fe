"""One prompt run for every prompt kind: batches -> predictor -> post-processing -> stitcher -> store.

A click and a squiggle differ only in a :class:`Strategy` (how patches are planned and read, what
guidance is drawn, where a patch lies on the slide and which pixels seed its instance); how batches
run, how masks are post-processed, stitched, stored and traced is this module's, once.

Threads and what each owns:

- the **producer** thread (:func:`~nuclick_wsi.engine.background.background` over
  ``strategy.batches``) owns the slide reads and fills the batch buffers; it touches nothing else of
  the run but the timer (``Timer.add`` takes its lock);
- an **inference** thread (a second ``background`` around :meth:`PromptRun._predict`) owns the
  predictor (the network and its device memory), and hands each batch buffer back to the producer
  (``strategy.release``, a thread-safe queue) once the predictor has returned. So a predictor must be
  done with its input when it returns: it may not keep it, return a view of it, or read it later
  (an asynchronous inference request would have to copy it first);
- the **caller's** thread owns everything else: the stitcher, the label store, ``instances``,
  ``table``, ``reasons`` and the progress bar. Both background threads are stopped and joined
  before :meth:`PromptRun.run` returns or raises, so nothing still reads the slide after it.
"""

from __future__ import annotations

import hashlib
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, Protocol

import numpy as np
import shapely

from nuclick_wsi.engine.background import Timer, background
from nuclick_wsi.engine.reuse import Entry, MergedChunks
from nuclick_wsi.engine.reuse import plan as reuse_plan
from nuclick_wsi.io.slides.base import SlideSource
from nuclick_wsi.model.predictor import Predictor
from nuclick_wsi.postprocess.confidence import RING_MODEL_PX, outline_confidence
from nuclick_wsi.postprocess.stitch import Piece, Stitcher
from nuclick_wsi.postprocess.threshold import PostParams, instance_from_probability
from nuclick_wsi.postprocess.trace import trace_mask
from nuclick_wsi.records import Instance, outcome
from nuclick_wsi.store.labels import open_labels
from nuclick_wsi.store.rerun import PackedPiece, final_key


class Strategy(Protocol):
    """What one kind of prompt (click, squiggle) decides; see :mod:`nuclick_wsi.engine.clicks`.

    Optional, for incremental reruns (clicks only): ``cache`` (the earlier run's pieces by signature),
    ``pieces`` (this run's), ``signature_of(item)``, ``source_of(item)`` (the earlier run's signature of
    a reused piece); and ``release(batch)``, to refill batch buffers.
    """

    kind: str  #: "nucleus" or "gland" (instances' kind, uuid salt)
    prompts: list  #: the prompts (Click or Squiggle records)
    slide: SlideSource
    scale: float  #: level-0 px per model px
    lost: str  #: the reason for an instance that lost every pixel to its neighbours

    def plan(self, reasons: dict[int, str]) -> list[int]: ...  # noqa: E704 - the prompts to run, in order
    def batches(self, order: list[int], timer: Timer) -> Iterator[tuple[np.ndarray, list]]: ...  # noqa: E704
    def flush_y(self, item: Any) -> float | None: ...  # noqa: E704 - level-0 y above which rows are final
    def locate(self, prob: np.ndarray, item: Any) -> tuple[np.ndarray, int, int, Any, int]: ...  # noqa: E704
    def label_of(self, index: int) -> int: ...  # noqa: E704
    def uuid_of(self, index: int) -> str: ...  # noqa: E704
    def slot(self, item: Any, position: int) -> int | None: ...  # noqa: E704 - its batch row; None: reused
    def reuse(self, item: Any) -> PackedPiece: ...  # noqa: E704 - the earlier run's piece of a reused item
    def remember(self, item: Any, piece: PackedPiece) -> None: ...  # noqa: E704 - keep a new piece
    def anchor(self, index: int) -> tuple[float, float]: ...  # noqa: E704 - the prompt's point in the report
    def record(self, index: int) -> dict[str, Any]: ...  # noqa: E704 - its report record (without outcome)


def outline_key(mask: np.ndarray, x0: int, y0: int) -> str:
    """A final instance mask and its place, hashed (its outline is a function of them)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(np.array([x0, y0, *mask.shape], np.int64).tobytes())
    h.update(np.packbits(mask, axis=None).tobytes())
    return h.hexdigest()


class ArrayLabels:
    """An in-memory stand-in for a label store (``write_chunk`` only), for tiles and evaluation."""

    def __init__(self, width: int, height: int, chunk: int) -> None:
        self.labels = np.zeros((height, width), np.uint32)
        self.chunk = chunk

    def write_chunk(self, cy: int, cx: int, block: np.ndarray) -> None:
        c = self.chunk
        self.labels[cy * c:cy * c + block.shape[0], cx * c:cx * c + block.shape[1]] = block


class PromptRun:
    """Segmentation of one kind of prompt on one slide.

    Parameters
    ----------
    strategy : Strategy
    predictor : Predictor
    params : PostParams
        Post-processing thresholds in model pixels (the model's metadata).
    mpp : float
        Level-0 um/px (areas in um^2).
    """

    def __init__(self, strategy: Strategy, predictor: Predictor, params: PostParams, mpp: float, *,
                 reasons: dict[int, str] | None = None, timer: Timer | None = None,
                 outlines: dict[str, bytes] | None = None, finals: dict[str, tuple] | None = None) -> None:
        self.strategy, self.predictor, self.mpp = strategy, predictor, mpp
        self.model_params = params
        self.params = params.scaled(strategy.scale ** 2)
        self.timer = timer or Timer()
        self.instances: list[Instance] = []
        self.table: list[dict[str, Any]] = []
        self.reasons: dict[int, str] = dict(reasons or {})
        #: traced outlines (WKB) by :func:`outline_key`: an earlier run's, to skip tracing the same mask again
        self.known_outlines = outlines or {}
        self.outlines: dict[str, bytes] = {}  #: this run's, for the next
        #: the earlier run's final instances by piece (:mod:`.reuse`: those no edit reaches are taken)
        self.earlier_finals = finals or {}
        self.finals: dict[str, tuple] = {}  #: this run's, for the next
        self.taken = 0  #: instances taken from the earlier run without stitching
        self._stitched: list[str] = []  #: final keys of the pieces handed to the stitcher

    @property
    def n_pending(self) -> int:
        return len(self.strategy.prompts) - len(self.reasons)

    def _predict(self, batches: Iterable[tuple[np.ndarray, Any]]) -> Iterator[tuple[np.ndarray, Any]]:
        for batch, meta in background(batches):
            if batch is None:  # every item reused
                yield None, meta
                continue
            t = time.perf_counter()
            prob = self.predictor(batch)
            self.timer.add("infer", time.perf_counter() - t)
            release = getattr(self.strategy, "release", None)
            if release is not None:  # the network is done with it: the producer fills it again
                release(batch)
            yield prob, meta

    def _write_chunk(self, store):
        def write(cy: int, cx: int, block: np.ndarray) -> None:
            t = time.perf_counter()
            store.write_chunk(cy, cx, block)
            self.timer.add("write", time.perf_counter() - t)
        return write

    def _can_take(self, store) -> bool:
        """Whether this run may take instances from the earlier run (:mod:`.reuse`): it recorded its
        final instances (with their outlines: read_state checks that), and the earlier label store's
        level 0 is intact."""
        ledger = getattr(store, "ledger", None)
        if not self.earlier_finals or ledger is None or not hasattr(self.strategy, "signature_of"):
            return False
        return ledger.earlier_intact()

    def run(self, store, progress=None) -> None:
        """Segment every pending prompt; labels go to ``store.write_chunk`` (chunk side ``store.chunk``)."""
        s = self.strategy
        order = s.plan(self.reasons)
        if self._can_take(store):
            self._run_taking(order, store, progress)
        else:
            self._run_all(order, store, progress)
        self.instances.sort(key=lambda i: i.label)
        self.table.sort(key=lambda r: r["label"])

    def _run_all(self, order: list[int], store, progress) -> None:
        """Stitch every piece as it comes (streamed: rows are written as soon as they are final)."""
        s = self.strategy
        stitcher = Stitcher(s.slide.width, s.slide.height, store.chunk, self._write_chunk(store), self._retire)
        for prob, items in background(self._predict(s.batches(order, self.timer)), depth=2):
            t = time.perf_counter()
            for k, item in enumerate(items):
                t += self._flush(stitcher, s.flush_y(item))
                piece = self._piece_of(prob, item, k)
                if piece is not None:
                    self._add(stitcher, piece)
            self.timer.add("post", time.perf_counter() - t)
            if progress is not None:
                progress.update(len(items))
        self._close(stitcher)

    def _flush(self, stitcher: Stitcher, y: float | None) -> float:
        """Flush the stitcher above ``y`` (None: nothing to flush); the seconds spent writing, which the
        caller leaves out of its post-processing time."""
        if y is None:
            return 0.0
        tw = self.timer.seconds["write"]
        stitcher.flush(y)
        return self.timer.seconds["write"] - tw

    def _add(self, stitcher: Stitcher, piece: Piece) -> None:
        if piece.meta.get("sig") is not None:
            self._stitched.append(final_key(piece.meta["sig"], piece.label))
        stitcher.add(piece)

    def _close(self, stitcher: Stitcher) -> None:
        tw = self.timer.seconds["write"]
        t = time.perf_counter()
        stitcher.close()
        self.timer.add("post", time.perf_counter() - t - (self.timer.seconds["write"] - tw))
        for key in self._stitched:  # stitched but never retired: it lost every pixel
            self.finals.setdefault(key, ())

    def _run_taking(self, order: list[int], store, progress) -> None:
        """Compute what must be, then stitch only the instances an edit can reach (:mod:`.reuse`)."""
        s = self.strategy
        entries: list[Entry] = []
        for prob, items in background(self._predict(s.batches(order, self.timer)), depth=2):
            t = time.perf_counter()
            for k, item in enumerate(items):
                y, idx, slot, sig = s.flush_y(item), item[0], s.slot(item, k), s.signature_of(item)
                if slot is not None:  # kept packed (as the next run's state keeps it) until it is stitched
                    piece = None if self._piece(prob[slot], item) is None else s.pieces[sig]
                else:
                    piece = s.reuse(item)
                    if piece.reason is not None:
                        self.reasons[idx] = piece.reason
                        piece = None
                entries.append(Entry(y, idx, s.label_of(idx), sig, piece, new=slot is not None,
                                     earlier=s.source_of(item)))
            self.timer.add("post", time.perf_counter() - t)
            if progress is not None:
                progress.update(len(items))
        t = time.perf_counter()
        how = reuse_plan(entries, s.cache, self.earlier_finals, store.chunk)
        earlier = store.ledger.earlier
        merged = MergedChunks(store, open_labels(earlier.path), [(cy, cx) for lv, cy, cx in earlier.table.rows if lv == 0],
                              how.clear, self._write_chunk(store))
        stitcher = Stitcher(s.slide.width, s.slide.height, store.chunk, merged, self._retire)
        for e, again in zip(entries, how.restitch):
            t += self._flush(stitcher, e.flush_y)
            if e.piece is None:
                continue
            if not again:
                self._take(e)
            else:
                self._add(stitcher, self._unpacked(e.piece, e.index, e.signature))
        self.timer.add("post", time.perf_counter() - t)
        self._close(stitcher)
        t = time.perf_counter()
        merged.finish(how.dirty_chunks)
        self.timer.add("write", time.perf_counter() - t)
        self.taken = how.taken

    def _take(self, e: Entry) -> None:
        """The earlier run's final instance of an entry no edit reaches."""
        rec = self.finals[final_key(e.signature, e.label)] = self.earlier_finals[e.earlier_key()]
        if not rec:  # it lost every pixel there, and does here
            return
        area, score, cx, cy, okey = rec
        wkb = self.outlines[okey] = self.known_outlines[okey]
        self._record(e.index, e.label, shapely.from_wkb(wkb), area, score, cx, cy, e.piece.confidence, okey)

    def _piece_of(self, prob: np.ndarray | None, item: Any, position: int) -> Piece | None:
        """The item's instance crop: the earlier run's (reused) or a new one from its probabilities."""
        s = self.strategy
        slot = s.slot(item, position)
        if slot is not None:
            return self._piece(prob[slot], item)
        packed, idx = s.reuse(item), item[0]
        if packed.reason is not None:
            self.reasons[idx] = packed.reason
            return None
        return self._unpacked(packed, idx, self._signature(item))

    def _signature(self, item: Any) -> str | None:
        of = getattr(self.strategy, "signature_of", None)
        return None if of is None else of(item)

    def _unpacked(self, packed: PackedPiece, idx: int, sig: str | None) -> Piece:
        mask, pr, seed = packed.unpack()
        return Piece(label=self.strategy.label_of(idx), x0=packed.x0, y0=packed.y0, mask=mask, prob=pr, seed=seed,
                     meta={"index": idx, "confidence": packed.confidence, "sig": sig})

    def _piece(self, prob: np.ndarray, item: Any) -> Piece | None:
        """A probability patch -> a level-0 instance crop (or None, the reason recorded)."""
        grid, u0, v0, seed, idx = self.strategy.locate(prob, item)
        mask, where = instance_from_probability(grid, seed, self.params)
        if mask is None:
            self.reasons[idx] = where
            self.strategy.remember(item, PackedPiece(reason=where))
            return None
        (r0, c0), (h, w) = where, mask.shape
        if isinstance(seed, tuple):
            seed_mask = np.zeros_like(mask)
            seed_mask[seed[0] - r0, seed[1] - c0] = True
        else:
            seed_mask = seed[r0:r0 + h, c0:c0 + w] & mask
        conf = outline_confidence(grid, mask, where, ring_px=round(RING_MODEL_PX * self.strategy.scale))
        piece = Piece(label=self.strategy.label_of(idx), x0=u0 + c0, y0=v0 + r0, mask=mask,
                      prob=grid[r0:r0 + h, c0:c0 + w].astype(np.float16), seed=seed_mask,
                      meta={"index": idx, "confidence": conf, "sig": self._signature(item)})
        self.strategy.remember(item, PackedPiece.pack(piece.x0, piece.y0, mask, piece.prob, seed_mask, conf))
        return piece

    def _retire(self, piece: Piece) -> None:
        """An instance whose pixels are final: trace it, record it for the outputs and the table."""
        t = time.perf_counter()
        area = float(piece.mask.sum())
        score = float(piece.prob[piece.mask].astype(np.float32).mean())
        rr, cc = np.nonzero(piece.mask)
        cxm, cym = float(piece.x0 + cc.mean() + 0.5), float(piece.y0 + rr.mean() + 0.5)
        key = outline_key(piece.mask, piece.x0, piece.y0)
        wkb = self.known_outlines.get(key)
        geom = trace_mask(piece.mask, piece.x0, piece.y0) if wkb is None else shapely.from_wkb(wkb)
        self.outlines[key] = shapely.to_wkb(geom) if wkb is None else wkb
        if piece.meta.get("sig") is not None:
            self.finals[final_key(piece.meta["sig"], piece.label)] = (area, score, cxm, cym, key)
        self._record(piece.meta["index"], piece.label, geom, area, score, cxm, cym, piece.meta["confidence"], key)
        self.timer.add("write", time.perf_counter() - t)

    def _record(self, idx: int, label: int, geom, area: float, score: float, cxm: float, cym: float,
                confidence: float, outline: str) -> None:
        """An instance and its table row (centroids rounded as numpy rounds, as they always were)."""
        prompt, kind = self.strategy.prompts[idx], self.strategy.kind
        x, y = self.strategy.anchor(idx)
        area_um2 = area * self.mpp ** 2
        self.instances.append(Instance(label=label, uuid=self.strategy.uuid_of(idx), geometry=geom,
                                       class_name=prompt.class_name, color=prompt.color, area_px=area,
                                       area_um2=area_um2, score=score, confidence=confidence, prompt_index=idx,
                                       kind=kind, outline=outline))
        self.table.append({"label": label, "prompt_index": idx, "class_name": prompt.class_name,
                           "x": x, "y": y, "centroid_x": round(np.float64(cxm), 3), "centroid_y": round(np.float64(cym), 3),
                           "area_px": area, "area_um2": area_um2, "score": round(score, 6),
                           "confidence": round(confidence, 6), "kind": kind})

    def into_store(self, create_store, *, progress: bool = False, desc: str = "", unit: str = ""):
        """Run into a new label store (``create_store()``) with an optional progress bar, finalize it and
        return it."""
        bar = None
        if progress and self.n_pending:
            from tqdm.auto import tqdm

            bar = tqdm(total=self.n_pending, desc=desc, unit=unit, file=sys.stderr, dynamic_ncols=True)
        try:
            store = create_store()
            self.run(store, bar)
            t = time.perf_counter()
            store.finalize(self.table, colors=None)
            self.timer.add("write", time.perf_counter() - t)
        finally:
            if bar is not None:
                bar.close()
        return store

    def in_memory(self, chunk: int = 1024) -> tuple[np.ndarray, list[Instance], dict[int, str]]:
        """Run into an array: the label image, the instances and, per prompt index, why it gave none."""
        store = ArrayLabels(self.strategy.slide.width, self.strategy.slide.height, chunk)
        self.run(store, None)
        return store.labels, self.instances, self.reasons

    def records(self) -> list[dict[str, Any]]:
        """One report record per prompt, in input order."""
        by_index = {i.prompt_index: i for i in self.instances}
        out = []
        for k in range(len(self.strategy.prompts)):
            rec = self.strategy.record(k)
            rec.update(outcome(by_index.get(k), self.reasons.get(k, self.strategy.lost)))
            out.append(rec)
        return out
