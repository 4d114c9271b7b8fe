"""TIAToolbox's pretrained NuClick weights (``tiatoolbox:NAME``): names, cache and download.

Nothing here imports TIAToolbox at module level.
"""

from __future__ import annotations

from pathlib import Path

from nuclick_wsi._util.optional import EXTRA_HINT, tiatoolbox_installed
from nuclick_wsi._util.text import reason
from nuclick_wsi.errors import ModelError

_HF = "https://huggingface.co/TIACentre/TIAToolbox_pretrained_weights/resolve/main"

TIA_WEIGHTS: dict[str, dict[str, str]] = {
    "nuclick_original-pannuke": {"arch": "nuclick", "file": "nuclick_original-pannuke.pth",
                                 "url": f"{_HF}/nuclick_original-pannuke.pth"},
    "nuclick_light-pannuke": {"arch": "tia-light-unet", "file": "nuclick_light-pannuke.pth",
                              "url": f"{_HF}/nuclick_light-pannuke.pth"},
}
"""TIAToolbox's pretrained NuClick weights that load here: our architecture, and where TIAToolbox 2.x
hosts the file (TIAToolbox 1.x names its own URL in ``pretrained_model.yaml``; see
:func:`cache_file`)."""


def _known(name: str) -> dict[str, str]:
    if name not in TIA_WEIGHTS:
        raise ModelError(f"tiatoolbox:{name}: unknown TIAToolbox NuClick weights "
                         f"(known: {', '.join('tiatoolbox:' + k for k in TIA_WEIGHTS)})")
    return TIA_WEIGHTS[name]


def cache_file(name: str) -> tuple[Path, str]:
    """Where TIAToolbox caches ``name`` and where it downloads it from (per TIAToolbox version)."""
    from tiatoolbox import rcParam

    info = rcParam["pretrained_model_info"].get(name, {})
    models = Path(rcParam["TIATOOLBOX_HOME"]) / "models"
    if "url" in info:  # TIAToolbox 1.x: the URL's file name in TIATOOLBOX_HOME/models
        return models / str(info["url"]).rsplit("/", 1)[-1], str(info["url"])
    if "hf_repo_id" in info:  # TIAToolbox 2.x: Hugging Face, NAME.pth in TIATOOLBOX_HOME/models
        return models / f"{name}.pth", f"https://huggingface.co/{info['hf_repo_id']}/resolve/main/{name}.pth"
    return models / TIA_WEIGHTS[name]["file"], TIA_WEIGHTS[name]["url"]


def tiatoolbox_weights_path(spec: str) -> tuple[Path, str]:
    """Resolve ``tiatoolbox:NAME`` to a local weights file through TIAToolbox's download and cache.

    Returns
    -------
    path : Path
        The cached ``.pth`` file.
    arch : str
        Our architecture for it (``"nuclick"`` or ``"tia-light-unet"``).

    Raises
    ------
    ModelError
        Unknown name; TIAToolbox not installed; not cached and the download failed (offline): the
        message names the file, where to put it and where to get it.
    """
    name = spec.removeprefix("tiatoolbox:")
    known = _known(name)
    if not tiatoolbox_installed():
        raise ModelError(
            f"{spec}: TIAToolbox's pretrained weights need the extra ({EXTRA_HINT}); or download "
            f"{known['file']} from {known['url']} and pass --weights /path/to/{known['file']}")
    try:
        cached, url = cache_file(name)
    except Exception as exc:  # noqa: BLE001 - a TIAToolbox that does not import
        raise ModelError(f"{spec}: TIAToolbox cannot be imported ({reason(exc)}); download "
                         f"{known['file']} from {known['url']} and pass --weights /path/to/{known['file']}") from exc
    if cached.is_file() and cached.stat().st_size > 0:
        return cached, known["arch"]
    try:
        from tiatoolbox.models.architecture import fetch_pretrained_weights

        path = Path(fetch_pretrained_weights(name))
    except Exception as exc:  # noqa: BLE001 - requests / huggingface_hub raise many types offline
        raise ModelError(
            f"{spec}: weights not in the TIAToolbox cache ({cached}) and could not be downloaded "
            f"({reason(exc)[:200]}); download {cached.name} from {url} and put it at {cached}, "
            f"or pass --weights /path/to/file.pth") from exc
    if not path.is_file():
        raise ModelError(f"{spec}: TIAToolbox reported {path}, which is not a file; download {cached.name} "
                         f"from {url} and put it at {cached}, or pass --weights /path/to/file.pth")
    return path, known["arch"]
