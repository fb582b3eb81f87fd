"""Geometry of a volume: the link between a NIfTI file's voxel array and napari's display array.

napari shows a 3D array with axes (z, y, x): the slider walks z, rows go down, columns go right.
Radiologists read axial slices with the patient's left on the image's right and anterior at the
top, so the display array is the file array reoriented to axis codes (L, P, S) (``x`` increases
toward the patient's left, ``y`` toward posterior, ``z`` toward superior) and transposed to
(z, y, x).  This is a pure permutation and flip of the voxels: nothing is resampled, so
``from_display(to_display(a)) == a`` exactly and saving a mask back gives the file's own affine.

A :class:`Geometry` is kept in every layer's ``metadata[GEOMETRY_KEY]``; layers derived from a CT
(predictions, overlays, corrections) copy it from the CT so that saving them writes the CT's
affine and header.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Tuple

import nibabel as nib
import numpy as np
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

DISPLAY_AXCODES = ("L", "P", "S")
GEOMETRY_KEY = "covidseg_geometry"
#: layer metadata key: False where the layer's spacing (napari scale) is a placeholder, not a measurement
SPACING_KNOWN_KEY = "covidseg_spacing_known"


@dataclass
class Geometry:
    """Where a display-ordered (z, y, x) array sits in the patient (world, RAS+ mm) space.

    ``affine`` and ``header`` are those of the source file (copied, never modified);
    ``file_shape`` is the voxel array shape in the file's own axis order.
    """

    affine: np.ndarray
    file_shape: Tuple[int, int, int]
    header: Optional[nib.Nifti1Header] = field(default=None, repr=False)
    source_path: Optional[str] = None

    def __post_init__(self):
        self.affine = np.array(self.affine, dtype=np.float64)
        self.file_shape = tuple(int(s) for s in self.file_shape[:3])
        if self.affine.shape != (4, 4):
            raise ValueError("affine must be 4x4")

    # --- orientation -------------------------------------------------------------------------
    @property
    def _file_to_display_ornt(self) -> np.ndarray:
        return ornt_transform(io_orientation(self.affine), axcodes2ornt(DISPLAY_AXCODES))

    @property
    def _display_to_file_ornt(self) -> np.ndarray:
        return ornt_transform(axcodes2ornt(DISPLAY_AXCODES), io_orientation(self.affine))

    def to_display(self, file_array: np.ndarray) -> np.ndarray:
        """File-ordered voxels -> (z, y, x) display array (a view where possible)."""
        reoriented = apply_orientation(np.asanyarray(file_array), self._file_to_display_ornt)
        return np.transpose(reoriented, (2, 1, 0) + tuple(range(3, reoriented.ndim)))

    def from_display(self, display_array: np.ndarray) -> np.ndarray:
        """(z, y, x) display array -> voxels in the file's own axis order (exact inverse)."""
        arr = np.asanyarray(display_array)
        lps = np.transpose(arr, (2, 1, 0) + tuple(range(3, arr.ndim)))
        return apply_orientation(lps, self._display_to_file_ornt)

    @property
    def display_shape(self) -> Tuple[int, int, int]:
        perm = self._file_to_display_ornt[:, 0].astype(int)
        lps_shape = [0, 0, 0]
        for file_axis, new_axis in enumerate(perm):
            lps_shape[new_axis] = self.file_shape[file_axis]
        return tuple(lps_shape[::-1])

    # --- spacing -----------------------------------------------------------------------------
    @property
    def file_spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along each file axis (from the affine's column norms)."""
        return tuple(float(v) for v in np.sqrt((self.affine[:3, :3] ** 2).sum(axis=0)))

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along the display axes (z, y, x): napari's ``scale``."""
        perm = self._file_to_display_ornt[:, 0].astype(int)
        lps = [0.0, 0.0, 0.0]
        for file_axis, new_axis in enumerate(perm):
            lps[new_axis] = self.file_spacing[file_axis]
        return (lps[2], lps[1], lps[0])

    @property
    def voxel_volume_ml(self) -> float:
        return float(abs(np.linalg.det(self.affine[:3, :3]))) / 1000.0

    # --- construction ------------------------------------------------------------------------
    @classmethod
    def from_nifti(cls, img: nib.spatialimages.SpatialImage, source_path: Optional[str] = None) -> "Geometry":
        header = img.header.copy() if isinstance(img.header, nib.Nifti1Header) else None
        return cls(affine=img.affine, file_shape=img.shape[:3], header=header, source_path=source_path)

    @classmethod
    def from_display_spacing(cls, display_shape, spacing_zyx, origin_ras=(0.0, 0.0, 0.0)) -> "Geometry":
        """Geometry of an array made directly in display order (e.g. the phantom).

        The file array is the display array transposed to (x, y, z) with axis codes (L, P, S):
        in RAS+ world coordinates x runs toward -R, y toward -A, z toward +S.
        """
        sz, sy, sx = (float(s) for s in spacing_zyx)
        affine = np.diag([-sx, -sy, sz, 1.0])
        affine[:3, 3] = origin_ras
        z, y, x = (int(s) for s in display_shape)
        return cls(affine=affine, file_shape=(x, y, z))

    def copy(self) -> "Geometry":
        return Geometry(self.affine.copy(), self.file_shape, None if self.header is None else self.header.copy(), self.source_path)


#: DICOM, ITK, NRRD and MetaImage give positions in LPS+ (x toward the patient's left, y toward
#: posterior); :class:`Geometry` affines are RAS+ like nibabel's.  The flip is its own inverse.
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])


def lps_to_ras(affine_lps) -> np.ndarray:
    """A 4x4 voxel-to-world affine in LPS+ as the RAS+ affine :class:`Geometry` uses (and back)."""
    return LPS_TO_RAS @ np.asarray(affine_lps, dtype=np.float64)
