"""Cohorts: a manifest of slides, run one after another or by many processes at once.

A manifest is a CSV file with a header and one row per slide::

    slide,points,mpp,weights,stem
    slides/A.svs,clicks/A.geojson,,,
    slides/B.tif,clicks/B.geojson,0.25,models/other.pt,B-rescan

``slide`` and ``points`` are required; ``mpp`` (level-0 um/px, overriding the slide's own),
``weights`` (a checkpoint), ``stem`` (output name, default: the slide's file name without
extension) and ``bounds_offset`` (true/false: QuPath's frame for this slide, see ``segment
--bounds-offset``) are optional. Relative paths are taken from the manifest's folder. Other columns are
ignored (they are listed as a warning).

:func:`run_batch` segments every row into ``OUT/<stem>.*`` (the outputs of
:func:`nuclick_wsi.pipeline.segment`). It is safe to run several batch processes on one manifest
and one output folder at the same time, on one machine or many (SLURM array tasks, Snakemake
jobs):

* a slide is worked on only while its lock file ``OUT/<stem>.lock`` is held. The lock is created
  atomically (hard link of a complete file, or ``O_CREAT | O_EXCL``) and names its holder (host, pid,
  process start time, a random token); the holder refreshes its modification time every few
  seconds. A lock is stale, and is removed, when its process is gone (same host), or when it has
  not been refreshed for ``stale_after`` seconds (any host);
* outputs are written under temporary names and renamed when complete (``report.json`` last), so a
  killed process leaves no partial output; its temporaries are removed by the next process that
  takes the slide's lock;
* a slide whose outputs are complete (and newer than its slide and clicks files, and made with the
  same options: :mod:`nuclick_wsi.workflows.redo`) is skipped, so a rerun resumes where a killed or
  failed run stopped, and redoes a slide whose clicks were exported again or whose earlier run was
  asked for something else (saying why); ``--full`` redoes every slide;
* a slide that fails leaves ``OUT/<stem>.failed.json`` (its error) and the others go on.

``OUT/batch-summary.csv`` records every row's state at the end of each run.
"""

from nuclick_wsi.workflows.cohort.batch import BatchOptions, disk_state, process_row, run_batch, summary_only
from nuclick_wsi.workflows.cohort.locks import (FAILED_SUFFIX, LOCK_SUFFIX, FileLock, LockInfo, LockKeeper,
                                                remove_temporaries, stem_file_names)
from nuclick_wsi.workflows.cohort.manifest import (SUMMARY_NAME, Manifest, ManifestError, ManifestRow, manifest_from_qupath,
                                                   read_manifest, select_rows, write_manifest)
from nuclick_wsi.workflows.cohort.summary import BatchResult, SlideResult, format_summary, write_summary

__all__ = ["FAILED_SUFFIX", "LOCK_SUFFIX", "SUMMARY_NAME", "BatchOptions", "BatchResult", "FileLock", "LockInfo", "LockKeeper", "Manifest", "ManifestError",
           "ManifestRow", "SlideResult", "disk_state", "format_summary", "manifest_from_qupath", "process_row",
           "read_manifest", "remove_temporaries", "run_batch", "select_rows", "stem_file_names", "summary_only",
           "write_manifest", "write_summary"]
