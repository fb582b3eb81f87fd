"""A small matplotlib plot of training curves for the Training widget: loss (top) and validation
Dice per class (bottom) against the epoch, stacked so both stay readable in a narrow dock."""

from __future__ import annotations

from typing import Sequence

from matplotlib.backends.backend_qtagg import FigureCanvasQTAgg
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

CLASS_COLOURS = (("lung", "tab:blue"), ("infection", "tab:red"))


class TrainingPlot(FigureCanvasQTAgg):
    """Redrawn from the metrics-log epoch records; ``n_points`` is the number of epochs shown."""

    def __init__(self, parent=None):
        self.figure = Figure(figsize=(3.6, 3.4), layout="constrained")
        super().__init__(self.figure)
        self.setParent(parent)
        self.setMinimumHeight(150)
        self.ax_loss, self.ax_dice = self.figure.subplots(2, 1, sharex=True)
        self.n_points = 0
        self.clear()

    def clear(self):
        self.n_points = 0
        for ax, title in ((self.ax_loss, "loss"), (self.ax_dice, "validation Dice")):
            ax.clear()
            ax.set_ylabel(title, fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        self.ax_dice.set_xlabel("epoch", fontsize=8)
        self.ax_dice.set_ylim(0, 1)
        self.draw_idle()

    def set_records(self, records: Sequence[dict]):
        """Plot train/validation loss and per-class validation Dice of ``records`` (epoch events)."""
        self.clear()
        epochs = [r.get("epoch") for r in records]
        for key, label, style in (("train_loss", "train (network loss)", "-"), ("val_loss", "validation (BCE)", "--")):
            pts = [(e, r.get(key)) for e, r in zip(epochs, records)]
            pts = [(e, v) for e, v in pts if isinstance(e, int) and isinstance(v, (int, float))]
            if pts:
                self.ax_loss.plot(*zip(*pts), style, marker="o", ms=3, color="0.25" if key == "train_loss" else "tab:green",
                                  label=label)
        for cls, colour in CLASS_COLOURS:
            pts = [(e, ((r.get("val") or {}).get(cls) or {}).get("dice")) for e, r in zip(epochs, records)]
            pts = [(e, v) for e, v in pts if isinstance(e, int) and isinstance(v, (int, float))]
            if pts:
                self.ax_dice.plot(*zip(*pts), marker="o", ms=3, color=colour, label=cls)
        for ax in (self.ax_loss, self.ax_dice):
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7, loc="best", framealpha=0.6)
        numbered = [e for e in epochs if isinstance(e, int)]
        if numbered:
            self.ax_dice.set_xlim(min(numbered) - 0.5, max(numbered) + 0.5)
        self.n_points = len(records)
        self.draw_idle()
