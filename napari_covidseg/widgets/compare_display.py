"""How the Compare widget shows a prediction against its ground truth, over the CT's texture.

Filled masks painted over each other hide the ground-glass texture under a lesion, which is
exactly what a reviewer needs to see.  Three switches (each with a key on the canvas):

* **Outlines** (Shift-C): the overlay and both masks are drawn as contours
  (:data:`OUTLINE_PX` px) instead of filled;
* **Hide the compared masks** (on while comparing): the ground truth is hidden and the
  prediction made fully transparent (not hidden: napari does not paint into hidden layers, and
  the prediction is what the brush corrects; the overlay shows every stroke);
* **Overlay** (Shift-O): the TP/FN/FP overlay on or off.

The ground truth gets the reference colour of its class (cyan lung, magenta infection), which no
prediction and no overlay colour uses.  Everything is restored when the comparison ends.
"""

from __future__ import annotations

from typing import Dict, Optional

from .layer_style import class_of_text, reference_color_dict

OUTLINE_PX = 2


def is_prediction(layer) -> bool:
    return "covidseg_source" in (getattr(layer, "metadata", None) or {})


def colour_as_reference(layer) -> None:
    """Give a ground-truth layer its class's reference colour (predictions keep theirs)."""
    from napari.utils.colormaps import DirectLabelColormap

    if layer is not None and not is_prediction(layer):
        layer.colormap = DirectLabelColormap(color_dict=reference_color_dict(class_of_text(layer.name)))


class ReviewDisplay:
    """Outline / hide / overlay switches over one (prediction, ground truth, overlay) triple."""

    def __init__(self):
        self.pred = self.gt = self.overlay = None
        self.outlines = False
        self.sources_hidden = False
        self.overlay_shown = True
        self._saved: Dict[int, tuple] = {}  # id(layer) -> (layer, visible, opacity, contour)

    def set_layers(self, pred, gt, overlay: Optional[object] = None) -> None:
        """Switch to new layers: the old ones get back how they looked."""
        if (pred, gt) != (self.pred, self.gt):
            self.restore()
            self.pred, self.gt = pred, gt
            for layer in (pred, gt):
                self._remember(layer)
        self.overlay = overlay
        self.apply()

    def set_overlay(self, overlay) -> None:
        self.overlay = overlay
        self.apply()

    def _remember(self, layer) -> None:
        if layer is not None and id(layer) not in self._saved:
            self._saved[id(layer)] = (layer, layer.visible, layer.opacity, layer.contour)

    def apply(self) -> None:
        contour = OUTLINE_PX if self.outlines else 0
        for layer in (self.pred, self.gt, self.overlay):
            if layer is not None:
                layer.contour = contour
        if self.overlay is not None:
            self.overlay.visible = self.overlay_shown
        for layer in (self.pred, self.gt):
            if layer is None:
                continue
            _, visible, opacity, _ = self._saved.get(id(layer), (layer, True, layer.opacity, 0))
            if layer is self.gt:
                layer.visible = visible and not self.sources_hidden
            else:  # stays paintable
                layer.visible = visible or self.sources_hidden
                layer.opacity = 0.0 if self.sources_hidden else opacity

    def set_outlines(self, on: bool) -> None:
        self.outlines = bool(on)
        self.apply()

    def set_sources_hidden(self, on: bool) -> None:
        self.sources_hidden = bool(on)
        self.apply()

    def set_overlay_shown(self, on: bool) -> None:
        self.overlay_shown = bool(on)
        self.apply()

    def restore(self) -> None:
        """The compared layers look as they did before the comparison."""
        for layer, visible, opacity, contour in self._saved.values():
            try:
                layer.visible, layer.opacity, layer.contour = visible, opacity, contour
            except RuntimeError:  # pragma: no cover - a layer torn down with the viewer
                pass
        self._saved = {}
        self.pred = self.gt = None

    def forget(self, layer) -> None:
        """``layer`` was removed from the viewer: nothing to restore on it."""
        self._saved.pop(id(layer), None)
        if layer is self.pred:
            self.pred = None
        if layer is self.gt:
            self.gt = None
        if layer is self.overlay:
            self.overlay = None
