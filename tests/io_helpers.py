"""Build DICOM series, NRRD/MHA files and slice images for the io tests, from real data where possible.

DICOM series are written slice by slice with SimpleITK's (GDCM's) writer, which stores HU through
a RescaleIntercept, as scanners do; pydicom only edits tags that writer cannot set (an
undecodable transfer syntax).
"""

from __future__ import annotations

import os
import random
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np

CIP_CT = ("cip_ct64", "images", "ct-64.nii.gz")
CIP_LUNG = ("cip_ct64", "lung", "ct-64.nii.gz")
UID_ROOT = "1.2.826.0.1.3680043.9.7539."  # a test root; every series gets its own suffix


def cip_paths(shared_data_dir):
    return os.path.join(shared_data_dir, *CIP_CT), os.path.join(shared_data_dir, *CIP_LUNG)


def rotation(axis: Sequence[float], degrees: float) -> np.ndarray:
    axis = np.asarray(axis, float) / np.linalg.norm(axis)
    a = np.radians(degrees)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(a) * k + (1 - np.cos(a)) * k @ k


def _ds(values: Iterable[float]) -> str:
    return "\\".join(f"{v:.10g}" for v in values)


def write_series(folder, image, series_number: int, description: str, *, modality: str = "CT",
                 image_type: Optional[str] = None, shear: Sequence[float] = (0.0, 0.0, 0.0),
                 skip: Sequence[int] = (), shuffle_seed: Optional[int] = 0, intercept: Optional[int] = -1024,
                 compressor: Optional[str] = None, prefix: str = "IM") -> str:
    """Write the 3D SimpleITK ``image`` as one DICOM file per slice into ``folder``; returns the series UID.

    Files get random names (and InstanceNumbers in random order) when ``shuffle_seed`` is set, so only
    the positions can order them.  ``shear`` (LPS mm per slice) is added to each slice's position: a
    gantry tilt.  ``skip`` leaves slices out (a gap).  HU are stored as unsigned values with
    ``intercept`` as RescaleIntercept (the writer inverts the rescale).
    """
    import SimpleITK as sitk

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    uid = f"{UID_ROOT}{series_number}.{random.Random(description).randrange(10**8)}"
    direction = np.array(image.GetDirection()).reshape(3, 3)
    depth = image.GetDepth()
    order = list(range(depth))
    names = [f"{prefix}{k:04d}.dcm" for k in range(depth)]
    if shuffle_seed is not None:
        rng = random.Random(shuffle_seed)
        rng.shuffle(order)  # InstanceNumber order unrelated to position
        names = [f"{prefix}{rng.randrange(10**9):09d}" for _ in range(depth)]  # no suffix, random names
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    writer.SetImageIO("GDCMImageIO")  # file names without a suffix
    if compressor:
        writer.SetUseCompression(True)
        writer.SetCompressor(compressor)
    for k in range(depth):
        if k in skip:
            continue
        slice_image = image[:, :, k]
        position = np.array(image.TransformIndexToPhysicalPoint((0, 0, k))) + k * np.asarray(shear, float)
        tags = {
            "0008|0060": modality, "0020|000e": uid, "0020|000d": UID_ROOT + "1", "0020|0011": str(series_number),
            "0008|103e": description, "0020|0013": str(order[k] + 1), "0020|0032": _ds(position),
            "0020|0037": _ds(list(direction[:, 0]) + list(direction[:, 1])),
            "0018|0050": f"{image.GetSpacing()[2]:.6g}", "0010|0010": "Test^CIP",
        }
        if intercept is not None:
            tags.update({"0028|1052": str(intercept), "0028|1053": "1"})
        if image_type:
            tags["0008|0008"] = image_type
        for key, value in tags.items():
            slice_image.SetMetaData(key, value)
        writer.SetFileName(str(folder / names[k]))
        writer.Execute(slice_image)
    return uid


def with_direction(image, direction: np.ndarray):
    """A copy of ``image`` with another direction (an oblique acquisition of the same voxels)."""
    copy = image[:, :, :]
    copy.SetDirection(tuple(np.asarray(direction, float).ravel()))
    return copy


def set_transfer_syntax(path, uid: str) -> None:
    """Re-label a file's pixel data with another transfer syntax (encapsulated junk: undecodable)."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = uid
    ds.PixelData = encapsulate([b"\xff\x4f\xff\x51" + bytes(64)])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)


def write_study(folder, image, localizer: bool = False) -> None:
    """A DICOM folder with two CT series of ``image`` (whole, and slices 10..49), an MR series and,
    with ``localizer``, a one-slice topogram: what a PACS export of one visit looks like."""
    write_series(folder, image, 2, "Lung 4.0", prefix="A")
    write_series(folder, image[:, :, 10:50], 6, "Part 4.0", prefix="B")
    if localizer:
        write_series(folder, image[:, :, :1], 1, "Topogram", image_type="ORIGINAL\\PRIMARY\\LOCALIZER", prefix="L")
    write_series(folder, image[:, :, :12], 9, "T1", modality="MR", intercept=None, prefix="M")
