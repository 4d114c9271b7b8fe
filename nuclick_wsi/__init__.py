"""nuclick-wsi: NuClick interactive segmentation on whole-slide images.

One click inside each nucleus (or a squiggle inside each gland) in QuPath or ASAP becomes a
precise instance outline, written back as QuPath GeoJSON / ASAP XML polygons and a zarr label store.
"""

__version__ = "0.1.0"
