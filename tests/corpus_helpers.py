"""Makers of bad and edge-case volume files for tests/test_corpus.py: NIfTI headers written byte for
byte (so nibabel cannot 'fix' them on the way), NRRD/MetaImage headers as text, gzip streams edited."""

from __future__ import annotations

import gzip
import io
import os
from pathlib import Path

import nibabel as nib
import numpy as np
from nibabel.nifti1 import header_dtype

AFFINE = np.diag([-0.7, -0.7, 2.5, 1.0])
SHAPE = (16, 16, 8)  # file order (x, y, z)


def ct(shape=SHAPE, seed=0, dtype=np.int16, low=-1000, high=400):
    return np.random.default_rng(seed).integers(low, high, size=shape).astype(dtype)


def nifti_bytes(array=None, affine=AFFINE, qform=True, **fields) -> bytes:
    """A single-file NIfTI-1 of ``array`` (sform and qform code 1, mm), then raw header ``fields``
    overwritten as stored bytes (``pixdimK=v`` sets one pixdim entry)."""
    array = ct() if array is None else array
    img = nib.Nifti1Image(array, affine)
    img.header.set_xyzt_units("mm", "sec")
    img.set_sform(affine, code=1)
    img.set_qform(affine, code=1 if qform else 0)
    buffer = io.BytesIO()
    img.to_file_map(nib.Nifti1Image.make_file_map({"image": buffer, "header": buffer}))
    data = bytearray(buffer.getvalue())
    header = np.frombuffer(bytes(data[:348]), dtype=header_dtype).copy()
    for key, value in fields.items():
        if key.startswith("pixdim"):
            header["pixdim"][0][int(key[6:])] = value
        else:
            header[key] = value
    data[:348] = header.tobytes()
    return bytes(data)


def write(path: Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def nifti(folder, name, array=None, affine=AFFINE, qform=True, **fields) -> Path:
    return write(Path(folder) / name, nifti_bytes(array, affine, qform, **fields))


def saved(folder, name, array, affine=AFFINE, **kwargs) -> Path:
    """A NIfTI written by nibabel itself (for valid edge cases: big-endian, NIfTI-2, scaling)."""
    path = Path(folder) / name
    image_class = kwargs.pop("image_class", nib.Nifti1Image)
    img = image_class(array, affine)
    if "slope" in kwargs:
        img.header.set_slope_inter(kwargs.pop("slope"), kwargs.pop("inter"))
    if "endian" in kwargs:
        img = image_class(array, affine, header=img.header.as_byteswapped(kwargs.pop("endian")))
    nib.save(img, str(path))
    return path


def gz_edit(folder, name, edit) -> Path:
    """A valid .nii.gz whose compressed bytes ``edit(bytearray)`` changed."""
    data = bytearray(gzip.compress(nifti_bytes()))
    edit(data)
    path = Path(folder) / name
    path.write_bytes(bytes(data))
    return path


def mha(folder, name, array=None, spacing="0.7 0.7 2.5", matrix="1 0 0 0 1 0 0 0 1", size="16 16 8",
        data_file="LOCAL", data=None, element="MET_SHORT", extra="") -> Path:
    array = ct((8, 16, 16)) if array is None else array
    header = ("ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\nCompressedData = False\n"
              f"TransformMatrix = {matrix}\nOffset = 0 0 0\nElementSpacing = {spacing}\nDimSize = {size}\n{extra}"
              f"ElementType = {element}\nElementDataFile = {data_file}\n")
    path = Path(folder) / name
    body = array.tobytes() if data is None else data
    path.write_bytes(header.encode() + (body if data_file == "LOCAL" else b""))
    return path


def nrrd(folder, name, directions="(0.7,0,0) (0,0.7,0) (0,0,2.5)", sizes="16 16 8", encoding="raw", data=None) -> Path:
    body = ct((8, 16, 16)).tobytes() if data is None else data
    if encoding == "gzip":
        body = gzip.compress(body)
    header = (f"NRRD0004\ntype: short\ndimension: 3\nspace: left-posterior-superior\nsizes: {sizes}\n"
              f"space directions: {directions}\nendian: little\nencoding: {encoding}\nspace origin: (0,0,0)\n\n")
    path = Path(folder) / name
    path.write_bytes(header.encode() + body)
    return path


def fifo(folder, name) -> Path:
    path = Path(folder) / name
    os.mkfifo(path)
    return path
