"""napari sample data: the synthetic chest CT phantom with its lung and infection ground truth.

``File > Open Sample > napari-covidseg`` adds three layers: the CT in a lung window, and the
lung and infection ground-truth masks.  They carry the phantom's :class:`Geometry` in
``metadata[GEOMETRY_KEY]`` (so masks drawn on them save as NIfTI with the right affine) and the
seed in ``metadata["phantom_seed"]``.  The lung mask starts hidden so the CT stays readable.
"""

from __future__ import annotations

from typing import List, Tuple

from .io.geometry import GEOMETRY_KEY
from .phantom import DEFAULT_SHAPE, DEFAULT_SPACING, make_phantom
from .widgets.layer_style import reference_color_dict

LUNG_WINDOW = (-1350.0, 150.0)  # W 1500 / L -600
SMALL_SHAPE = (24, 128, 128)
SMALL_SPACING = (10.0, 2.8, 2.8)  # same patient size as the default, a quarter of the voxels
# ground truth in the reference colours (cyan lung, magenta infection), which no prediction uses
LUNG_COLOR = reference_color_dict("lung")
INFECTION_COLOR = reference_color_dict("infection")


def phantom_layers(shape=DEFAULT_SHAPE, spacing=DEFAULT_SPACING, seed: int = 0) -> List[Tuple]:
    """LayerData tuples (CT image, lung GT labels, infection GT labels) of one phantom."""
    ph = make_phantom(shape=shape, spacing=spacing, seed=seed)
    scale = tuple(ph.spacing)

    def metadata():
        # one dict per layer: napari layers must not share a mutable metadata dict
        return {GEOMETRY_KEY: ph.geometry.copy(), "phantom_seed": ph.seed}

    ct = (
        ph.ct,
        {"name": "phantom CT", "colormap": "gray", "contrast_limits": LUNG_WINDOW, "scale": scale, "metadata": metadata()},
        "image",
    )
    lung = (
        ph.lung,
        {"name": "phantom lung GT", "scale": scale, "metadata": metadata(), "opacity": 0.4, "visible": False, "colormap": LUNG_COLOR},
        "labels",
    )
    infection = (
        ph.infection,
        {"name": "phantom infection GT", "scale": scale, "metadata": metadata(), "opacity": 0.4, "colormap": INFECTION_COLOR},
        "labels",
    )
    return [ct, lung, infection]


def chest_phantom() -> List[Tuple]:
    """Full-size phantom: 48 x 256 x 256 voxels of 5 x 1.4 x 1.4 mm."""
    return phantom_layers(DEFAULT_SHAPE, DEFAULT_SPACING, seed=0)


def chest_phantom_small() -> List[Tuple]:
    """Small, fast phantom: 24 x 128 x 128 voxels of 10 x 2.8 x 2.8 mm (same anatomy size)."""
    return phantom_layers(SMALL_SHAPE, SMALL_SPACING, seed=0)
