"""Dock widgets (Qt): the only place besides the napari hooks where Qt is imported."""
