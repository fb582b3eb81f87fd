"""The Quantify widget's case report: gathers what :mod:`napari_covidseg.report` draws from the
viewer (the CT and its window, the quantified masks, the network that made them and its card)."""

from __future__ import annotations

from pathlib import Path
from typing import List

import numpy as np

from ..errors import InputError
from ..io.geometry import GEOMETRY_KEY, Geometry
from ..report import CaseReport
from .common import layer_spacing_known
from .quantify_table import severity_text, table_rows
from .reading_aids import slice_position_text
from .save_defaults import case_of


def network_lines(infection_layer, lung_layer) -> List[str]:
    """Which network made the masks, and its model card; or that they came from elsewhere."""
    import os

    from ..models.registry import get_network
    from ..weights_catalog import checkpoint_info, model_card, shipped_entry

    source = (infection_layer.metadata or {}).get("covidseg_source") or {}
    if not source.get("network"):
        return [f"Masks not made by a network here: '{lung_layer.name}' and '{infection_layer.name}' "
                "(opened from files or drawn)."]
    lines = [f"Network: {get_network(source['network']).title} ({source['network']}), "
             f"threshold {float(source.get('threshold', 0.5)):.2f}"]
    try:
        shipped = shipped_entry(source["network"])
        is_shipped = shipped is not None and os.path.abspath(shipped.path) == os.path.abspath(str(source["weights"]))
        card = model_card(checkpoint_info(source["weights"]), shipped=is_shipped)
    except Exception as exc:  # the checkpoint moved since: say so, the report is still useful
        return lines + [f"Weights {source.get('weights')}: card unavailable ({exc})."]
    edited = " The masks were corrected by hand after the network." if (infection_layer.metadata or {}).get(
        "covidseg_edited") else ""
    return lines + [card.headline] + ([card.warning] if card.warning else []) + [card.reads] + card.figures + (
        [edited.strip()] if edited else [])


def _positions(ct_layer) -> List[str]:
    geometry = (ct_layer.metadata or {}).get(GEOMETRY_KEY)
    if not isinstance(geometry, Geometry) or not layer_spacing_known(ct_layer):
        return []
    ny, nx = ct_layer.data.shape[1:]
    return [slice_position_text("axial", geometry, (z, (ny - 1) / 2, (nx - 1) / 2)) for z in range(ct_layer.data.shape[0])]


def build_report(widget) -> CaseReport:
    """A :class:`CaseReport` of the Quantify widget's last result."""
    ct, lung, infection = (c.current_layer() for c in (widget.ct_combo, widget.lung_combo, widget.infection_combo))
    if ct is None:
        raise InputError("Choose the CT (in the CT drop-down): the report shows the masks on its slices.")
    if lung is None or infection is None or tuple(ct.data.shape) != tuple(np.shape(infection.data)):
        raise InputError("Choose the CT and the masks of the same case, then Compute again.")
    return CaseReport(
        title=f"{case_of(ct)} — {severity_text(widget.result)}",
        ct=np.asarray(ct.data), lung=np.asarray(lung.data), infection=np.asarray(infection.data),
        spacing=tuple(float(s) for s in ct.scale[-3:]), window=tuple(float(v) for v in ct.contrast_limits),
        table=table_rows(widget.result), quantities=dict(widget.result),
        network_lines=network_lines(infection, lung), slice_positions=_positions(ct) or None)


def default_report_name(widget) -> str:
    ct = widget.ct_combo.current_layer()
    return str(Path.cwd() / f"{case_of(ct) if ct is not None else 'case'}_report.png")
