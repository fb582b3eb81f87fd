"""A small matplotlib plot of training curves (loss and Dice per epoch) for the Training widget."""

from __future__ import annotations

from typing import Sequence

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure


class TrainingPlot(FigureCanvasQTAgg):
    """Loss (left) and validation Dice (right) per epoch, redrawn from metrics-log records."""

    def __init__(self, parent=None):
        self.figure = Figure(figsize=(4.2, 2.2), tight_layout=True)
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(180)
        self.ax_loss = self.figure.add_subplot(1, 2, 1)
        self.ax_dice = self.figure.add_subplot(1, 2, 2)
        self.n_points = 0
        self.clear()

    def clear(self):
        self.n_points = 0
        for ax, title in ((self.ax_loss, "loss"), (self.ax_dice, "validation Dice")):
            ax.clear()
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("epoch", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
        self.draw_idle()

    def set_records(self, records: Sequence[dict]):
        self.clear()
        epochs = [r.get("epoch") for r in records]
        series = {
            "train": [r.get("train_loss") for r in records],
            "val": [r.get("val_loss") for r in records],
        }
        for label, values in series.items():
            pts = [(e, v) for e, v in zip(epochs, values) if isinstance(v, (int, float))]
            if pts:
                self.ax_loss.plot(*zip(*pts), marker="o", ms=3, label=label)
        for cls, colour in (("lung", "tab:blue"), ("infection", "tab:red")):
            pts = [(e, ((r.get("val") or {}).get(cls) or {}).get("dice")) for e, r in zip(epochs, records)]
            pts = [(e, v) for e, v in pts if isinstance(v, (int, float))]
            if pts:
                self.ax_dice.plot(*zip(*pts), marker="o", ms=3, color=colour, label=cls)
        self.ax_dice.set_ylim(0, 1)
        for ax in (self.ax_loss, self.ax_dice):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        self.n_points = len(records)
        self.draw_idle()
