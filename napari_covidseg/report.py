"""One-click case report: the picture a radiologist attaches to a study, and its numbers as CSV.

``write_case_report(png_path, case)`` draws, with matplotlib off screen (no Qt, no napari):

* the key axial slices (the ones with the most infection, spread over the lungs; the middle of
  the lungs when there is none) in the CT's window, with the lung outlined in blue and the
  infection filled in orange, each captioned with its slice index and position, R and L marked;
* the quantification table (severity, involvement, volumes, lesions, ground glass vs
  consolidation);
* the network that made the masks and its model card (or "masks from files").

``write_case_csv`` writes the same quantities, the network and its card as ``quantity,value`` rows.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .errors import InputError

LUNG_RGB = (0.20, 0.55, 1.00)
INFECTION_RGB = (1.00, 0.45, 0.05)
N_KEY_SLICES = 4


@dataclass
class CaseReport:
    """What a report shows; arrays are display-ordered (z, y, x)."""

    title: str
    ct: np.ndarray
    lung: np.ndarray
    infection: np.ndarray
    spacing: Tuple[float, float, float]
    window: Tuple[float, float]  # contrast limits (low, high)
    table: List[Tuple[str, str]]  # (quantity, value text) rows
    quantities: Dict  # quantify()'s result, for the CSV
    network_lines: List[str] = field(default_factory=list)  # the model card, or where the masks came from
    slice_positions: Optional[Sequence[str]] = None  # caption per slice index (e.g. "S 45.0 mm")


def key_slices(lung: np.ndarray, infection: np.ndarray, n: int = N_KEY_SLICES) -> List[int]:
    """Up to ``n`` axial slices, most infection first, at least a 1/(2n) of the lungs apart, in
    head-to-foot order; the lungs' quartiles when there is no infection."""
    inf_area = (np.asarray(infection) != 0).sum(axis=(1, 2))
    lung_rows = np.flatnonzero((np.asarray(lung) != 0).any(axis=(1, 2)))
    extent = lung_rows if lung_rows.size else np.arange(len(inf_area))
    if not inf_area.any():
        picks = [int(extent[int(q * (len(extent) - 1))]) for q in np.linspace(0.2, 0.8, n)]
        return sorted(set(picks), reverse=True)
    gap = max(1, int(len(extent) / (2 * n)))
    picks: List[int] = []
    for z in np.argsort(inf_area)[::-1]:
        if inf_area[z] == 0 or len(picks) == n:
            break
        if all(abs(int(z) - p) >= gap for p in picks):
            picks.append(int(z))
    return sorted(picks, reverse=True)  # superior first, as a radiologist pages down


def _draw_slice(ax, report: CaseReport, z: int) -> None:
    dy, dx = report.spacing[1], report.spacing[2]
    ny, nx = report.ct.shape[1:]
    extent = (0, nx * dx, ny * dy, 0)
    ax.imshow(report.ct[z], cmap="gray", vmin=report.window[0], vmax=report.window[1], extent=extent,
              interpolation="nearest")
    infection = np.ma.masked_equal((report.infection[z] != 0).astype(float), 0)
    ax.imshow(infection, cmap=_solid(INFECTION_RGB), alpha=0.55, extent=extent, interpolation="nearest", vmin=0, vmax=1)
    if (report.lung[z] != 0).any():
        ax.contour(np.linspace(dx / 2, nx * dx - dx / 2, nx), np.linspace(dy / 2, ny * dy - dy / 2, ny),
                   (report.lung[z] != 0).astype(float), levels=[0.5], colors=[LUNG_RGB], linewidths=0.8)
    caption = f"slice {z}" + (f" · {report.slice_positions[z]}" if report.slice_positions else "")
    ax.set_title(caption, fontsize=8)
    for x, letter in ((0.02, "R"), (0.98, "L")):
        ax.text(x, 0.5, letter, transform=ax.transAxes, color="yellow", fontsize=9, ha="center", va="center")
    ax.set_axis_off()


def _solid(rgb):
    from matplotlib.colors import ListedColormap

    return ListedColormap([rgb, rgb])


def _draw_text(ax, title: str, lines: Sequence[str]) -> None:
    ax.set_axis_off()
    ax.text(0.0, 1.0, title, fontsize=9, fontweight="bold", va="top", transform=ax.transAxes)
    ax.text(0.0, 0.93, "\n".join(lines), fontsize=7, va="top", family="monospace", transform=ax.transAxes,
            wrap=True)


def _table_lines(rows: Sequence[Tuple[str, str]]) -> List[str]:
    width = max((len(label) for label, _ in rows), default=0)
    return [f"{label:<{width}}  {value}" for label, value in rows]


def _wrapped(lines: Sequence[str], width: int = 70) -> List[str]:
    import textwrap

    out: List[str] = []
    for line in lines:
        out += textwrap.wrap(str(line), width) or [""]
    return out


def render(report: CaseReport):
    """The report as a matplotlib Figure (A4 landscape proportions)."""
    from matplotlib.figure import Figure

    if report.ct.shape != report.lung.shape or report.ct.shape != report.infection.shape:
        raise InputError("The CT and its masks must have the same shape for a report.")
    slices = key_slices(report.lung, report.infection)
    figure = Figure(figsize=(11.7, 8.3), dpi=110)
    figure.suptitle(report.title, fontsize=12, fontweight="bold")
    grid = figure.add_gridspec(2, max(len(slices), 2), height_ratios=(1.0, 0.9), hspace=0.08, wspace=0.04,
                               left=0.02, right=0.98, top=0.93, bottom=0.05)
    for i, z in enumerate(slices):
        _draw_slice(figure.add_subplot(grid[0, i]), report, z)
    half = max(len(slices), 2) // 2
    _draw_text(figure.add_subplot(grid[1, :half]), "Quantification", _table_lines(report.table))
    _draw_text(figure.add_subplot(grid[1, half:]), "Segmentation", _wrapped(report.network_lines))
    figure.text(0.01, 0.01, "Lung outlined in blue, infection in orange; R and L are the patient's sides. "
                            "Not a diagnosis: a measurement to be checked by the reader.", fontsize=7, color="0.3")
    return figure


def write_case_report(path, report: CaseReport) -> Path:
    """Render ``report`` to a PNG at ``path`` (written whole or not at all)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from .atomic_file import atomic_path

    path = Path(path)
    figure = render(report)
    FigureCanvasAgg(figure)
    with atomic_path(path, suffix=".png") as tmp:
        figure.savefig(str(tmp), format="png")
    return path


def csv_value(value) -> str:
    if isinstance(value, float):
        return "" if not math.isfinite(value) else f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return ";".join(csv_value(v) for v in value)
    return "" if value is None else str(value)


def write_case_csv(path, report: CaseReport) -> Path:
    """``quantity,value`` rows: every quantity, then the segmentation lines (network, card)."""
    from .atomic_file import atomic_path

    path = Path(path)
    with atomic_path(path, suffix=".csv") as tmp:
        with open(tmp, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh)
            writer.writerow(["quantity", "value"])
            writer.writerow(["case", report.title])
            for key, value in report.quantities.items():
                writer.writerow([key, csv_value(value.tolist() if isinstance(value, np.ndarray) else value)])
            for i, line in enumerate(report.network_lines):
                writer.writerow([f"segmentation_{i + 1}", line])
    return path
