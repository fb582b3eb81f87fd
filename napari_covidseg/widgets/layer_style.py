"""How masks look and are named in the viewer (no Qt here: the reader and sample data use it too).

Colours are fixed so a screenshot means the same thing to every reader, and no two roles share a
hue:

* predictions of a network: lung blue, infection orange;
* reference masks (ground truth, masks opened from files): lung cyan, infection magenta;
* the Compare overlay: green = true positive, red = missed, yellow = extra (``overlay.py``).

A case of a training folder (``images/cc01.nii.gz``, ``lung/cc01.nii.gz``,
``infection/cc01.nii.gz``; or the Zenodo ``Lung_Mask``/``Infection_Mask`` folders) opens as
"cc01", "cc01 lung" and "cc01 infection": the class comes from the folder the mask lies in.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Dict, Optional

TRANSPARENT = (0.0, 0.0, 0.0, 0.0)
LUNG_COLOR = (0.20, 0.55, 1.00, 1.0)
INFECTION_COLOR = (1.00, 0.45, 0.05, 1.0)
PREDICTION_COLORS = {"lung": LUNG_COLOR, "infection": INFECTION_COLOR}
REFERENCE_COLORS = {"lung": (0.00, 0.85, 0.85, 1.0), "infection": (0.95, 0.20, 0.85, 1.0)}
#: a mask from a file whose class is unknown
OTHER_MASK_COLOR = (0.95, 0.85, 0.55, 1.0)

# Folder or file-name words that say which class a mask holds (lower case, "_" and "-" as spaces).
_CLASS_WORDS = {
    "lung": ("lung", "lungs", "lung mask", "lung masks", "rp lung msk", "lungmask"),
    "infection": ("infection", "infections", "infection mask", "infection masks", "lesion", "lesions",
                  "rp msk", "tr mask", "ggo"),
}
_IMAGE_FOLDERS = ("images", "image", "imagestr", "ct", "cts", "scans", "volumes")


def _words(text: str) -> str:
    return re.sub(r"[_\-\s]+", " ", str(text).strip().lower())


def class_of_text(text: str) -> Optional[str]:
    """``"lung"`` or ``"infection"`` when ``text`` (a folder or layer name) names one, else None."""
    words = _words(text)
    for cls, names in _CLASS_WORDS.items():
        if words in names:
            return cls
    tokens = set(words.split())
    if tokens & {"infection", "lesion", "lesions", "ggo", "infected"}:
        return "infection"
    if tokens & {"lung", "lungs", "lungmask"}:
        return "lung"
    return None


def mask_class(path) -> Optional[str]:
    """Class of a mask file, from its folder (``lung/cc01.nii.gz``) or its own name (``cc01_lung``)."""
    path = Path(str(path))
    return class_of_text(path.parent.name) or class_of_text(path.name.split(".")[0])


def case_layer_name(stem: str, path, is_mask: bool) -> str:
    """``"cc01 lung"`` for ``lung/cc01.nii.gz``; the stem itself when it already says its class or
    when the folder names no class."""
    if not is_mask:
        return stem
    cls = class_of_text(Path(str(path)).parent.name)
    if cls is None or class_of_text(stem) == cls:
        return stem
    return f"{stem} {cls}"


def reference_color(cls: Optional[str]) -> tuple:
    return REFERENCE_COLORS.get(cls or "", OTHER_MASK_COLOR)


def mask_color_dict(color) -> Dict[Optional[int], tuple]:
    """A ``DirectLabelColormap`` dict painting every non-zero label in ``color`` (multi-label
    masks, e.g. 1 = left and 2 = right lung, keep one colour)."""
    return {None: tuple(color), 0: TRANSPARENT}


def reference_color_dict(cls: Optional[str]) -> Dict[Optional[int], tuple]:
    return mask_color_dict(reference_color(cls))
