"""Nucleus proposals: a centre-heatmap detector run tile by tile over the tissue of a whole slide.

``peaks`` turns heatmaps into points, ``tissue`` finds tissue on a low-resolution level, ``slide``
runs the detector over a slide (background reading, batched inference, one owner per seam).
"""
