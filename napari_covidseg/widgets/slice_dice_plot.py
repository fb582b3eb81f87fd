"""Dice per axial slice for the Compare widget, with the slice on screen marked; a click on the
plot goes to that slice."""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


class SliceDicePlot(FigureCanvasQTAgg):
    """Dice per axial slice (NaN slices left blank) with a vertical line at the current slice."""

    def __init__(self, on_click=None, parent=None):
        self.figure = Figure(figsize=(4.0, 1.9), tight_layout=True)
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(160)
        self.setMinimumWidth(200)  # the figure's own size hint must not widen the dock
        self.ax = self.figure.add_subplot(1, 1, 1)
        self.marker = None
        self._on_click = on_click
        self.mpl_connect("button_press_event", self._clicked)
        self.show_dice(np.array([]), 0)

    def show_dice(self, slice_dice: np.ndarray, current: int):
        ax = self.ax
        ax.clear()
        ax.set_xlabel("slice", fontsize=8)
        ax.set_ylabel("Dice", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(True, alpha=0.3)
        if len(slice_dice):
            z = np.arange(len(slice_dice))
            ax.plot(z, slice_dice, "-", color="tab:blue", lw=1.2)
            ax.plot(z, slice_dice, ".", color="tab:blue", ms=3)
            ax.set_xlim(-0.5, len(slice_dice) - 0.5)
        self.marker = ax.axvline(current, color="tab:red", lw=1.2)
        self.draw_idle()

    def move_marker(self, current: int):
        if self.marker is not None:
            self.marker.set_xdata([current, current])
            self.draw_idle()

    def _clicked(self, event):
        if event.inaxes is self.ax and event.xdata is not None and self._on_click is not None:
            self._on_click(int(round(event.xdata)))
