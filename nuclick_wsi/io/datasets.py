"""Training datasets: an RGB image and an instance label image per tile.

Readers for Aperio ImageScope XML outlines (MoNuSeg), instance label images (PNG/TIFF/NumPy,
0 = background), QuPath GeoJSON polygons drawn on an image, and binary masks (connected components;
only compact components are trusted as single nuclei).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from scipy import ndimage as ndi
from skimage import draw, measure

from nuclick_wsi.errors import NuclickError

IMAGE_SUFFIXES = (".tif", ".tiff", ".png", ".jpg", ".jpeg", ".bmp")


@dataclass
class Tile:
    """One training image with its instances.

    ``labels`` holds instance ids (0 = background). ``targets`` lists the ids that may be clicked
    during training (trusted single objects); the other ids still count as "other objects" for the
    exclusion map and the loss weights.
    """

    name: str
    image: np.ndarray  # (H, W, 3) uint8
    labels: np.ndarray  # (H, W) int32
    targets: np.ndarray  # ids that may be clicked
    mpp: float | None = None
    source: str = ""
    centroids: dict[int, tuple[float, float]] = field(default_factory=dict)  # id -> (x, y) px
    #: where an unlabelled pixel is known to be background (None: everywhere); ``export-training``'s valid/
    valid: np.ndarray | None = None

    def __post_init__(self) -> None:
        if not self.centroids:
            ids = np.unique(self.labels)
            ids = ids[ids > 0]
            if len(ids):
                cms = ndi.center_of_mass(np.ones_like(self.labels), self.labels, ids)
                self.centroids = {int(i): (float(c[1]), float(c[0])) for i, c in zip(ids, cms)}


def read_rgb(path: str | Path) -> np.ndarray:
    """Read an image file as RGB uint8 (alpha composited on white)."""
    from PIL import Image

    path = Path(path)
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    else:
        with Image.open(path) as im:
            arr = np.asarray(im.convert("RGBA") if im.mode in ("RGBA", "LA", "P") else im.convert("RGB"))
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    if arr.shape[-1] == 4:
        a = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * a + 255 * (1 - a)).round()
    if arr.dtype != np.uint8:
        arr = np.clip(arr, 0, 255)
    return np.ascontiguousarray(arr[..., :3].astype(np.uint8))


def rasterize_polygons(polygons: list[np.ndarray], shape: tuple[int, int]) -> np.ndarray:
    """Instance labels from polygons given as (n, 2) x, y vertex arrays in QuPath's pixel frame.

    A pixel belongs to a polygon when its centre (i + 0.5, j + 0.5) is inside; later polygons
    overwrite earlier ones. Ids are 1..n in input order.
    """
    labels = np.zeros(shape, np.int32)
    for k, xy in enumerate(polygons, start=1):
        if len(xy) < 3:
            continue
        rr, cc = draw.polygon(xy[:, 1] - 0.5, xy[:, 0] - 0.5, shape)
        labels[rr, cc] = k
    return labels


def _read_imagescope(path: Path) -> tuple[list[np.ndarray], float | None]:
    from nuclick_wsi.io.annotations.imagescope import read_imagescope_polygons

    polys, mpp = read_imagescope_polygons(path)
    return [np.asarray(p.exterior.coords) for p in polys], mpp


def _read_geojson_polygons(path: Path) -> list[np.ndarray]:
    from nuclick_wsi.io.annotations import read_prompts

    prompts = read_prompts(path)
    out = []
    for geom in prompts.regions:
        for poly in getattr(geom, "geoms", [geom]):
            out.append(np.asarray(poly.exterior.coords))
    return out


def compact_components(mask: np.ndarray, min_solidity: float = 0.9, min_area: int = 30) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of a binary mask; ids of the compact ones (likely single nuclei).

    Touching nuclei merge into one component in a binary mask; such merged blobs are rarely convex,
    so components with solidity below ``min_solidity`` are kept as "other objects" but never clicked.
    """
    labels = measure.label(mask > 0, connectivity=1).astype(np.int32)
    targets = [r.label for r in measure.regionprops(labels) if r.area >= min_area and r.solidity >= min_solidity]
    return labels, np.asarray(targets, np.int64)


def load_tile(image: str | Path, annotation: str | Path | None = None, *, kind: str = "auto") -> Tile:
    """Load one training tile.

    Parameters
    ----------
    image : path
        RGB image.
    annotation : path
        ImageScope XML (``.xml``), QuPath GeoJSON (``.geojson``/``.json``), instance label image
        (``.png``/``.tif``/``.npy``, 0 = background), or a binary mask when ``kind="binary"``.
    kind : {"auto", "instances", "binary"}
    """
    image = Path(image)
    rgb = read_rgb(image)
    shape = rgb.shape[:2]
    mpp = None
    if annotation is None:
        raise NuclickError(f"{image}: no annotation given")
    ann = Path(annotation)
    suffix = ann.suffix.lower()
    if suffix == ".xml":
        polys, mpp = _read_imagescope(ann)
        labels = rasterize_polygons(polys, shape)
        targets = np.unique(labels)[1:]
    elif suffix in (".geojson", ".json") or ann.name.lower().endswith(".geojson.gz"):
        labels = rasterize_polygons(_read_geojson_polygons(ann), shape)
        targets = np.unique(labels)[1:]
    else:
        arr = np.load(ann) if suffix == ".npy" else (read_rgb(ann)[..., 0] if kind == "binary" else _read_label_image(ann))
        if arr.shape[:2] != shape:
            raise NuclickError(f"{ann}: label image is {arr.shape[1]}x{arr.shape[0]}, image {image} is {shape[1]}x{shape[0]}")
        if kind == "binary":
            labels, targets = compact_components(arr)
        else:
            labels = arr.astype(np.int32)
            targets = np.unique(labels)[1:]
    valid = _read_valid_mask(image, shape)
    if valid is not None:  # only nuclei whose centroid is in the annotated part are clicked
        targets = ids_inside(labels, valid)
    return Tile(name=image.stem, image=rgb, labels=labels, targets=np.asarray(targets, np.int64), mpp=mpp,
                source=str(ann), valid=valid)


def ids_inside(labels: np.ndarray, valid: np.ndarray) -> np.ndarray:
    """Ids of the instances whose centroid pixel lies in ``valid`` (so each nucleus is a target once)."""
    ids = np.unique(labels)
    ids = ids[ids > 0]
    if not len(ids):
        return ids.astype(np.int64)
    cms = np.asarray(ndi.center_of_mass(np.ones_like(labels), labels, ids)).reshape(-1, 2)
    ij = np.clip(np.floor(cms).astype(int), 0, np.array(labels.shape) - 1)
    return ids[valid[ij[:, 0], ij[:, 1]]].astype(np.int64)


def valid_mask_path(image: Path) -> Path:
    """Where ``export-training`` puts an image's valid mask: ``images/X.png`` -> ``valid/X.png``."""
    return image.parent.parent / "valid" / f"{image.stem}.png"


def _read_valid_mask(image: Path, shape: tuple[int, int]) -> np.ndarray | None:
    """The valid mask (non-zero = annotated) of an image in an ``images/`` folder, or None without one."""
    path = valid_mask_path(image)
    if image.parent.name != "images" or not path.exists():
        return None
    mask = read_rgb(path)[..., 0] > 0
    if mask.shape != shape:
        raise NuclickError(f"{path}: valid mask is {mask.shape[1]}x{mask.shape[0]}, image {image} is {shape[1]}x{shape[0]}")
    return mask


def _read_label_image(path: Path) -> np.ndarray:
    if path.suffix.lower() in (".tif", ".tiff"):
        import tifffile

        arr = tifffile.imread(path)
    else:
        from PIL import Image

        with Image.open(path) as im:
            arr = np.asarray(im)
    if arr.ndim == 3:  # colour-coded ids (e.g. GlaS-style BMPs are single-channel; RGB ids packed)
        arr = arr[..., 0].astype(np.int64) * 65536 + arr[..., 1].astype(np.int64) * 256 + arr[..., 2]
    return arr.astype(np.int32)


def find_pairs(folder: str | Path) -> list[tuple[Path, Path, str]]:
    """Pair images with their annotations in a dataset folder.

    Recognised layouts: ``export-training`` (``images/X.png`` + ``labels/X.tif`` instance labels, and
    ``valid/X.png`` read by :func:`load_tile`), MoNuSeg (``images/X.tif`` + ``annotations/X.xml`` or ``binary_masks/X.png``;
    outlines preferred), a flat folder of ``X.<img>`` + ``X.xml``/``X.geojson``/``X_labels.<ext>``/``X.npy``,
    and GlaS (``X.bmp`` + ``X_anno.bmp``). Returns (image, annotation, kind) triples.
    """
    folder = Path(folder)
    if folder.is_file():
        raise NuclickError(f"{folder}: give a dataset folder, not a file")
    img_dir = folder / "images" if (folder / "images").is_dir() else folder
    pairs = []
    for img in sorted(img_dir.iterdir()):
        if img.suffix.lower() not in IMAGE_SUFFIXES or img.stem.endswith(("_anno", "_labels", "_mask")):
            continue
        cands = [
            (folder / "labels" / f"{img.stem}.tif", "instances"),
            (folder / "annotations" / f"{img.stem}.xml", "instances"),
            (img_dir / f"{img.stem}.xml", "instances"),
            (img_dir / f"{img.stem}.geojson", "instances"),
            (img_dir / f"{img.stem}.npy", "instances"),
            *[(img_dir / f"{img.stem}{s}{e}", "instances") for s in ("_anno", "_labels") for e in IMAGE_SUFFIXES],
            (folder / "binary_masks" / f"{img.stem}.png", "binary"),
        ]
        for cand, kind in cands:
            if cand.exists():
                pairs.append((img, cand, kind))
                break
    if not pairs:
        raise NuclickError(f"{folder}: no image/annotation pairs found")
    return pairs


def pairs_except(data, exclude=()) -> list[tuple[Path, Path, str]]:
    """:func:`find_pairs` over the folders ``data``, without the images named in ``exclude``.

    A name in ``exclude`` that matches no image is an error: a misspelt test tile would be trained on.
    """
    pairs = [p for folder in data for p in find_pairs(folder)]
    missing = sorted(set(exclude) - {img.stem for img, _, _ in pairs})
    if missing:
        raise NuclickError(f"--exclude: no image named {', '.join(missing)} in {', '.join(map(str, data))}")
    return [p for p in pairs if p[0].stem not in set(exclude)]
