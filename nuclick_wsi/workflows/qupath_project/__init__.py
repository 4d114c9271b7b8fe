"""QuPath projects: segment the exported clicks of every image of a ``project.qpproj``.

The round trip a QuPath user makes (see README, "QuPath users")::

    QuPath: workflows/qupath/export_clicks.groovy   -> PROJECT/nuclick/clicks/<name>.geojson
    shell:  nuclick-wsi qupath run PROJECT/project.qpproj
                                                     -> PROJECT/nuclick/results/<name>.geojson
                                                        (+ <name>.labels.zarr, <name>.report.json)
    QuPath: workflows/qupath/import_results.groovy  <- PROJECT/nuclick/results/<name>.geojson

``<name>`` is the project entry's ``imageName`` with the characters that are illegal in file
names on some system replaced by ``_`` (:func:`safe_name`; the Groovy scripts use the very same
pattern, and a test checks that they do).

Facts about ``project.qpproj`` this module relies on (QuPath 0.2-0.6, ``qupath-core``
``DefaultProject``/``ImageServers``/``ImageServerBuilder``; real project files confirm them):

- It is plain JSON with an ``images`` array; each entry has ``entryID``, ``imageName``,
  ``randomizedName`` and ``serverBuilder``. The project's own ``uri`` is where it was saved.
- ``serverBuilder.builderType`` is ``"uri"`` for an image read directly from a file
  (``providerClassName``, ``uri``, ``args``, ``metadata``), and ``"rotated"``, ``"affine"``,
  ``"cropped"``, ``"pyramidize"``, ``"channels"`` or ``"sparse"`` for wrapped servers (these hold
  the wrapped builder in ``builder``).
- ``uri`` is a ``file:`` URI written by Java: ``file:/home/u/a%20b.svs``, ``file:/D:/x.svs``
  (percent-encoded; spaces become ``%20``).
- ``args`` are the server's arguments, e.g. ``["--series", "0"]`` for Bio-Formats or
  ``["--no-crop"]`` for OpenSlide.
- ``metadata`` (when present) holds the image ``width``/``height`` as QuPath sees it and its
  ``pixelCalibration``.

Which frame QuPath's coordinates are in (``qupath-extension-openslide``,
``OpenslideImageServer``): the OpenSlide server offsets every read by ``openslide.bounds-x/-y``
when all four ``openslide.bounds-*`` properties exist, unless ``--no-crop`` is among its args.
Other servers (Bio-Formats, ImageIO) know nothing of OpenSlide bounds: QuPath's frame is the image
as that library decodes it, which for most formats is OpenSlide's full level 0; where it is not
(e.g. a Leica SCN image, which Bio-Formats opens as its own series), the image size stored in the
project tells which frame it is. See :func:`bounds_rule`.
"""

from nuclick_wsi.workflows.qupath_project.project import (CLICK_SUFFIXES, CLICKS_DIR, EMPTY_NAME, RESULT_MARKER,
                                                          RESULTS_DIR, UNSAFE_FILENAME, ProjectError, ProjectImage,
                                                          QuPathProject, bounds_rule, read_project, resolve_uri,
                                                          safe_name)
from nuclick_wsi.workflows.qupath_project.run import ImageOutcome, ProjectRun, run_project

__all__ = ["CLICKS_DIR", "CLICK_SUFFIXES", "EMPTY_NAME", "RESULTS_DIR", "RESULT_MARKER", "UNSAFE_FILENAME",
           "ImageOutcome", "ProjectError", "ProjectImage", "ProjectRun", "QuPathProject", "bounds_rule",
           "read_project", "resolve_uri", "run_project", "safe_name"]
