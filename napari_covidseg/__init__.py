"""napari-covidseg: lung and COVID-19 infection segmentation of chest CT in napari."""

__version__ = "0.1.0"
