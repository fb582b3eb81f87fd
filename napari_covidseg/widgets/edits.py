"""Which masks hold the user's corrections: "edited" means *differs from what was computed*.

A brush stroke marks a layer as possibly edited (cheap, on every stroke); whether it really
differs is decided from a checksum of the data as computed, so painting and then undoing
(Ctrl+Z, which napari applies without a paint event) leaves the layer unedited again: a re-run
may replace it and Save does not prefer it.  A re-run or a revert calls :func:`mark_computed`:
the new data is the computed state.
"""

from __future__ import annotations

import zlib

import numpy as np

#: set in a layer's metadata once the user paints, fills or erases in it (may be undone since)
EDITED_KEY = "covidseg_edited"
CHECKSUM_KEY = "covidseg_computed_checksum"
_WATCHED_KEY = "_covidseg_watched"


def checksum(data) -> tuple:
    array = np.ascontiguousarray(np.asarray(data))
    return array.shape, str(array.dtype), zlib.crc32(array.view(np.uint8).reshape(-1))


def mark_computed(layer) -> None:
    """The layer's data as it is now is what was computed (not an edit)."""
    layer.metadata[CHECKSUM_KEY] = checksum(layer.data)
    layer.metadata[EDITED_KEY] = False


def watch_edits(layer) -> None:
    """Track paint strokes (and whole-array replacements) of ``layer``; see :func:`is_edited`."""
    mark_computed(layer)
    if layer.metadata.get(_WATCHED_KEY):
        return
    layer.metadata[_WATCHED_KEY] = True
    layer.events.paint.connect(lambda event, layer=layer: layer.metadata.__setitem__(EDITED_KEY, True))


def is_edited(layer) -> bool:
    """True when the layer holds hand edits: painted, and not undone back to the computed data."""
    metadata = getattr(layer, "metadata", None) or {}
    if not metadata.get(EDITED_KEY):
        return False
    if CHECKSUM_KEY not in metadata:
        return True
    edited = checksum(layer.data) != metadata[CHECKSUM_KEY]
    if not edited:
        metadata[EDITED_KEY] = False
    return edited
