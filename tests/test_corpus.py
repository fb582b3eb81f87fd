"""A generated corpus of bad and edge-case inputs, each with its expected outcome.

Images (NIfTI, NRRD, MetaImage, slices, zip, special files): a clear message (``InputError`` from
the loader; one ``covidseg: error:`` line and exit code 2 from ``covidseg info``), a warning (the
volume loads and carries a note, which ``covidseg info`` prints), or a correct load (the exact
voxel values and the right spacing).  Checkpoints: a ``CheckpointError`` with the reason, or a
correct load.  Plus bit flips at many random positions of a ``.nii.gz`` and of a checkpoint (every
file whose content changed is refused), and a 2048 x 2048 x 1024 header claim refused with a small
peak memory.
"""

import gzip
import os
import random
import subprocess
import sys
import zipfile
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch

import corpus_helpers as h
from checkpoint_helpers import craft, write_malicious
from napari_covidseg.checkpoint import load_checkpoint, payload_digest, save_checkpoint
from napari_covidseg.cli import main as covidseg
from napari_covidseg.errors import CheckpointError, InputError
from napari_covidseg.io.loader import load_any
from napari_covidseg.models import get_network

ROOT = Path(__file__).resolve().parent.parent
CT = h.ct()
SORTED_CT = np.sort(CT.ravel())
BIG = [3, 2048, 2048, 1024, 1, 1, 1, 1]


def _bytes(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _same_values(expected):
    return lambda v: np.array_equal(np.sort(np.asarray(v.data, np.float64).ravel()), np.sort(np.asarray(expected, np.float64).ravel()))


def _spacing(zyx):
    return lambda v: np.allclose(v.spacing, zyx, rtol=1e-5) and _same_values(CT)(v)


def _mha_detached(t, data_path_maker):
    h.mha(t, "d.mhd", data_file="d.raw")
    data_path_maker(t / "d.raw")
    return t / "d.mhd"


def _png16(t):
    import SimpleITK as sitk

    sitk.WriteImage(sitk.GetImageFromArray(np.arange(256, dtype=np.uint16).reshape(16, 16) * 200), str(t / "s.png"))
    return t / "s.png"


def _dicom_claim(t):
    """A DICOM series whose headers claim 12000 x 12000 pixels a slice (small enough for the memory check)."""
    import pydicom
    import SimpleITK as sitk

    from io_helpers import write_series

    image = sitk.GetImageFromArray(h.ct((4, 32, 32)))
    image.SetSpacing((0.7, 0.7, 2.5))
    write_series(t / "series", image, 1, "claim", shuffle_seed=None)
    for path in (t / "series").iterdir():
        ds = pydicom.dcmread(str(path))
        ds.Rows = ds.Columns = 12000
        ds.save_as(str(path))
    return t / "series"


def _zip(t, members):
    path = t / "a.zip"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def _sheared():
    affine = h.AFFINE.copy()
    affine[1, 2] = 0.4  # a gantry tilt: slices shifted along y
    return affine


def _rotated():
    c, s = np.cos(0.3), np.sin(0.3)
    affine = np.eye(4)
    affine[:3, :3] = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]]) @ np.diag([0.7, 0.7, 2.5])
    return affine


# name -> (maker(tmp_path) -> path, outcome); outcome is ("error", words), ("note", words, check) or ("ok", check)
IMAGES = {
    # -- truncated, empty, not NIfTI --------------------------------------------------------------
    "truncated_gz": (lambda t: _bytes(t / "a.nii.gz", gzip.compress(h.nifti_bytes(h.ct((64, 64, 16))))[:2000]),
                     ("error", "truncated")),
    "truncated_header_gz": (lambda t: _bytes(t / "a.nii.gz", gzip.compress(h.nifti_bytes())[:40]), ("error", "a.nii.gz")),
    "truncated_plain": (lambda t: h.write(t / "a.nii", h.nifti_bytes()[:2000]), ("error", "truncated")),
    "header_only": (lambda t: h.write(t / "a.nii", h.nifti_bytes()[:352]), ("error", "truncated")),
    "empty_file": (lambda t: h.write(t / "a.nii", b""), ("error", "could not be read as NIfTI")),
    "empty_gz": (lambda t: h.write(t / "a.nii.gz", b""), ("error", "could not be read as NIfTI")),
    "text_renamed": (lambda t: h.write(t / "a.nii", b"patient 12, see PACS\n" * 30), ("error", "could not be read as NIfTI")),
    "text_gz_renamed": (lambda t: h.write(t / "a.nii.gz", b"patient 12, see PACS\n" * 30), ("error", "could not be read as NIfTI")),
    "bad_magic": (lambda t: h.nifti(t, "a.nii", magic=b"xyz"), ("error", "could not be read as NIfTI")),
    "unknown_datatype": (lambda t: h.nifti(t, "a.nii", datatype=2048), ("error", "could not be read as NIfTI")),
    # -- gzip damage ------------------------------------------------------------------------------
    "gz_crc_changed": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.__setitem__(-8, d[-8] ^ 0x01)), ("error", "corrupt")),
    "gz_length_changed": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.__setitem__(-2, d[-2] ^ 0x01)), ("error", "corrupt")),
    "gz_body_bit": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.__setitem__(len(d) // 2, d[len(d) // 2] ^ 0x10)),
                    ("error", "a.nii.gz")),
    "gz_trailing_garbage": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.extend(b"trailing junk")), ("error", "corrupt")),
    "gz_end_cut": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.__delitem__(slice(-4, None))), ("error", "a.nii.gz")),
    # -- shape and values ---------------------------------------------------------------------------
    "2d": (lambda t: h.nifti(t, "a.nii.gz", CT[:, :, 0]), ("error", "2D")),
    "4d_series": (lambda t: h.nifti(t, "a.nii.gz", np.stack([CT, CT], -1)), ("error", "2 volumes")),
    "5d": (lambda t: h.nifti(t, "a.nii.gz", CT[..., None, None].repeat(2, -1)), ("error", "multi-volume")),
    "dim_zero": (lambda t: h.nifti(t, "a.nii", dim=[3, 16, 16, 0, 1, 1, 1, 1]), ("error", "empty shape")),
    "dim_negative": (lambda t: h.nifti(t, "a.nii", dim=[3, 16, -16, 8, 1, 1, 1, 1]), ("error", "empty shape")),
    "normalised": (lambda t: h.nifti(t, "a.nii.gz", np.random.default_rng(0).random(h.SHAPE).astype(np.float32)),
                   ("error", "normalised")),
    "all_nan": (lambda t: h.nifti(t, "a.nii.gz", np.full(h.SHAPE, np.nan, np.float32)), ("error", "all voxels")),
    "some_inf": (lambda t: h.nifti(t, "a.nii.gz", np.where(CT > 390, np.inf, CT).astype(np.float32)), ("error", "NaN or infinite")),
    "constant": (lambda t: h.nifti(t, "a.nii.gz", np.full(h.SHAPE, -1000, np.int16)), ("error", "same value")),
    "complex": (lambda t: h.nifti(t, "a.nii.gz", (CT + 1j).astype(np.complex64)), ("error", "complex voxels")),
    "rgb": (lambda t: h.nifti(t, "a.nii.gz", np.zeros(h.SHAPE, [("R", "u1"), ("G", "u1"), ("B", "u1")])), ("error", "RGB")),
    "beyond_float32": (lambda t: h.nifti(t, "a.nii.gz", np.where(CT > 390, 1e300, CT).astype(np.float64)),
                       ("error", "beyond what covidseg computes")),
    "huge_slope_overflow": (lambda t: h.nifti(t, "a.nii.gz", scl_slope=1e38, scl_inter=0.0), ("error", "non-finite")),
    # -- geometry ---------------------------------------------------------------------------------
    "sform_zero": (lambda t: h.nifti(t, "a.nii.gz", srow_x=[0] * 4, srow_y=[0] * 4, srow_z=[0] * 4), ("error", "singular")),
    "sform_nan": (lambda t: h.nifti(t, "a.nii.gz", srow_x=[np.nan] * 4), ("error", "NaN or infinite")),
    "sform_inf": (lambda t: h.nifti(t, "a.nii.gz", srow_y=[0, np.inf, 0, 0]), ("error", "NaN or infinite")),
    "sform_rank2": (lambda t: h.nifti(t, "a.nii.gz", srow_x=[0.7, 0.7, 0, 0], srow_y=[0.7, 0.7, 0, 0]), ("error", "singular")),
    "sform_tiny": (lambda t: h.nifti(t, "a.nii.gz", srow_x=[1e-5, 0, 0, 0], srow_y=[0, 1e-5, 0, 0], srow_z=[0, 0, 1e-5, 0]),
                   ("error", "singular")),
    "qform_pixdim_zero": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, pixdim3=0.0), ("error", "pixdim[3]")),
    "qform_pixdim_nan": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, pixdim1=np.nan), ("error", "pixdim[1]")),
    "qform_pixdim_inf": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, pixdim2=np.inf), ("error", "pixdim[2]")),
    "qform_pixdim_negative": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, pixdim2=-0.7), ("error", "positive")),
    "noform_pixdim_zero": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, qform_code=0, pixdim1=0.0), ("error", "pixdim[1]")),
    "quaternion_nan": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, quatern_b=np.nan), ("error", "not a rotation")),
    "quaternion_too_long": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, quatern_b=2.0), ("error", "not a rotation")),
    "qoffset_nan": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0, qoffset_x=np.nan), ("error", "NaN or infinite")),
    "sform_code_invalid": (lambda t: h.nifti(t, "a.nii.gz", sform_code=99), ("error", "sform_code is 99")),
    "qform_code_invalid": (lambda t: h.nifti(t, "a.nii.gz", qform_code=-3), ("error", "qform_code is -3")),
    "vox_offset_in_header": (lambda t: h.nifti(t, "a.nii", vox_offset=100.0), ("error", "inside the header")),
    "vox_offset_beyond_file": (lambda t: h.nifti(t, "a.nii", vox_offset=1e9), ("error", "truncated")),
    # -- size claims (refused before allocating) --------------------------------------------------
    "claim_2048_plain": (lambda t: h.nifti(t, "a.nii", dim=BIG), ("error", "truncated")),
    "claim_2048_gz": (lambda t: h.nifti(t, "a.nii.gz", dim=BIG), ("error", "cannot unpack")),
    "claim_float64_gz": (lambda t: h.nifti(t, "a.nii.gz", dim=[3, 1024, 1024, 1024, 1, 1, 1, 1], datatype=64, bitpix=64),
                         ("error", "cannot unpack")),
    # -- special files ----------------------------------------------------------------------------
    "fifo_nii_gz": (lambda t: h.fifo(t, "a.nii.gz"), ("error", "named pipe")),
    "fifo_nrrd": (lambda t: h.fifo(t, "a.nrrd"), ("error", "named pipe")),
    "fifo_zip": (lambda t: h.fifo(t, "a.zip"), ("error", "named pipe")),
    "folder_named_nii": (lambda t: (t / "a.nii.gz").mkdir() or t / "a.nii.gz", ("error", "a.nii.gz")),
    "missing": (lambda t: t / "nope.nii.gz", ("error", "does not exist")),
    "dangling_link": (lambda t: os.symlink(t / "gone.nii.gz", t / "a.nii.gz") or t / "a.nii.gz", ("error", "does not exist")),
    # -- NRRD and MetaImage -----------------------------------------------------------------------
    "nrrd_text": (lambda t: h.write(t / "a.nrrd", b"patient 12\n" * 20), ("error", "could not be read as NRRD")),
    "nrrd_zero_direction": (lambda t: h.nrrd(t, "a.nrrd", directions="(0,0,0) (0,0.7,0) (0,0,2.5)"), ("error", "a.nrrd")),
    "nrrd_rank2": (lambda t: h.nrrd(t, "a.nrrd", directions="(0.7,0,0) (0.7,0,0) (0,0,2.5)"), ("error", "singular")),
    "nrrd_claim_raw": (lambda t: h.nrrd(t, "a.nrrd", sizes="2048 2048 1024"), ("error", "truncated")),
    "nrrd_claim_gzip": (lambda t: h.nrrd(t, "a.nrrd", sizes="2048 2048 1024", encoding="gzip"), ("error", "cannot unpack")),
    "mha_zero_spacing": (lambda t: h.mha(t, "a.mha", spacing="0 0.7 2.5"), ("error", "singular")),
    "mha_singular_matrix": (lambda t: h.mha(t, "a.mha", matrix="1 0 0 1 0 0 0 0 1"), ("error", "singular")),
    "mha_claim": (lambda t: h.mha(t, "a.mha", size="2048 2048 1024"), ("error", "truncated")),
    "mhd_missing_data": (lambda t: h.mha(t, "a.mhd", data_file="gone.raw"), ("error", "a.mhd")),
    "mhd_data_is_fifo": (lambda t: _mha_detached(t, lambda p: os.mkfifo(p)), ("error", "named pipe")),
    "mha_colour": (lambda t: h.mha(t, "a.mha", extra="ElementNumberOfChannels = 3\n",
                                   data=np.zeros((8, 16, 16, 3), np.int16).tobytes()), ("error", "3 values per voxel")),
    "dicom_claim": (_dicom_claim, ("error", "12000 x 12000 pixels but the file has only")),
    # -- slices and archives ----------------------------------------------------------------------
    "png_16bit": (_png16, ("error", "not 8-bit")),
    "zip_empty": (lambda t: _zip(t, {}), ("error", "empty zip")),
    "zip_text_renamed": (lambda t: h.write(t / "a.zip", b"not a zip\n" * 10), ("error", "not a valid zip")),
    # -- loads, with a warning --------------------------------------------------------------------
    "microns": (lambda t: h.nifti(t, "a.nii.gz", CT, np.diag([-700.0, -700.0, 2500.0, 1]), xyzt_units=3 | 8),
                ("note", "converted to mm", _spacing((2.5, 0.7, 0.7)))),
    "metres": (lambda t: h.nifti(t, "a.nii.gz", CT, np.diag([-0.0007, -0.0007, 0.0025, 1]), xyzt_units=1 | 8),
               ("note", "converted to mm", _spacing((2.5, 0.7, 0.7)))),
    "sform_qform_disagree": (lambda t: h.nifti(t, "a.nii.gz", qoffset_x=50.0), ("note", "disagree by up to 50 mm", _same_values(CT))),
    "qform_invalid_sform_used": (lambda t: h.nifti(t, "a.nii.gz", quatern_b=2.0), ("note", "qform", _spacing((2.5, 0.7, 0.7)))),
    "uint16_no_intercept": (lambda t: h.nifti(t, "a.nii.gz", (CT + 1024).astype(np.uint16)),
                            ("note", "without the rescale intercept", _same_values(CT + 1024))),
    "int8_ct": (lambda t: h.nifti(t, "a.nii.gz", h.ct(dtype=np.int8, low=-128, high=127)), ("note", "int8", lambda v: True)),
    "complex_real": (lambda t: h.nifti(t, "a.nii.gz", CT.astype(np.complex64)), ("note", "complex numbers", _same_values(CT))),
    "implausible_voxel": (lambda t: h.nifti(t, "a.nii.gz", CT, np.diag([-500.0, -500.0, 900.0, 1])), ("note", "implausible",
                                                                                                   _same_values(CT))),
    "unknown_unit_code": (lambda t: h.nifti(t, "a.nii.gz", xyzt_units=5), ("note", "millimetres are assumed", _same_values(CT))),
    # -- loads exactly ----------------------------------------------------------------------------
    "gz_named_nii": (lambda t: _bytes(t / "a.nii", gzip.compress(h.nifti_bytes())), ("ok", _same_values(CT))),
    "raw_named_nii_gz": (lambda t: _bytes(t / "a.nii.gz", h.nifti_bytes()), ("ok", _same_values(CT))),
    "gz_zero_padding": (lambda t: h.gz_edit(t, "a.nii.gz", lambda d: d.extend(b"\0" * 64)), ("ok", _same_values(CT))),
    "gz_two_members": (lambda t: _bytes(t / "a.nii.gz", gzip.compress(h.nifti_bytes()[:1000]) + gzip.compress(h.nifti_bytes()[1000:])),
                       ("ok", _same_values(CT))),
    "big_endian": (lambda t: h.saved(t, "a.nii.gz", CT, endian=">"), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "nifti2": (lambda t: h.saved(t, "a.nii.gz", CT, image_class=nib.Nifti2Image), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "trailing_singleton": (lambda t: h.nifti(t, "a.nii.gz", CT[..., None]), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "intercept_1024": (lambda t: h.saved(t, "a.nii.gz", (CT + 1024).astype(np.uint16), slope=1.0, inter=-1024.0),
                       ("ok", lambda v: v.data.dtype == np.int16 and _same_values(CT)(v))),
    "qform_only": (lambda t: h.nifti(t, "a.nii.gz", sform_code=0), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "oblique": (lambda t: h.nifti(t, "a.nii.gz", CT, _rotated()), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "gantry_shear_no_qform": (lambda t: h.nifti(t, "a.nii.gz", CT, _sheared(), qform=False), ("ok", _same_values(CT))),
    "mha_ok": (lambda t: h.mha(t, "a.mha"), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "nrrd_gzip_ok": (lambda t: h.nrrd(t, "a.nrrd", encoding="gzip"), ("ok", _spacing((2.5, 0.7, 0.7)))),
    "mhd_detached_ok": (lambda t: _mha_detached(t, lambda p: p.write_bytes(h.ct((8, 16, 16)).tobytes())),
                        ("ok", _spacing((2.5, 0.7, 0.7)))),
}


def test_the_image_corpus_is_large_enough():
    outcomes = [o[0] for _, o in IMAGES.values()]
    assert len(IMAGES) >= 60 and outcomes.count("error") >= 45 and outcomes.count("note") >= 8 and outcomes.count("ok") >= 10


@pytest.mark.parametrize("name", sorted(IMAGES))
def test_image_corpus(tmp_path, capsys, name):
    make, outcome = IMAGES[name]
    path = make(tmp_path)
    code = covidseg(["info", str(path)])
    out, err = capsys.readouterr()
    assert "Traceback" not in err and "internal error" not in err, err
    if outcome[0] == "error":
        with pytest.raises(InputError) as info:
            load_any(path)
        assert outcome[1] in str(info.value), str(info.value)
        assert code == 2 and err.startswith("covidseg: error: ") and len(err.strip().splitlines()) == 1, err
        return
    volume = load_any(path)
    assert code == 0, err
    if outcome[0] == "note":
        assert any(outcome[1] in note for note in volume.notes), volume.notes
        assert any(outcome[1] in line for line in out.splitlines() if line.startswith("note:")), out
    else:
        assert volume.notes == [], volume.notes
    assert outcome[-1](volume), name


# --- checkpoints -------------------------------------------------------------------------------
SMALL = {"base": 4, "depth": 2}


@pytest.fixture(scope="module")
def good_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    model = get_network("unet").create(**SMALL).eval()
    return save_checkpoint(tmp_path_factory.mktemp("good") / "good.pt", model, "unet", SMALL,
                           extra={"optimizer": torch.optim.Adam(model.parameters()).state_dict()})


def _edited(**changes):
    def make(t, good):
        raw = torch.load(good, weights_only=True)
        for key, value in changes.items():
            if key == "preprocessing":
                raw[key] = {**raw[key], **value}
            elif value is None:
                raw.pop(key)
            else:
                raw[key] = value
        return craft(raw, t / "c.pt")
    return make


def _flip_in_tensor(t, good):
    data = bytearray(Path(good).read_bytes())
    with zipfile.ZipFile(good) as archive:
        info = next(i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64)
    local = info.header_offset  # the local header's own name and extra lengths (torch pads the extra field)
    start = local + 30 + int.from_bytes(data[local + 26:local + 28], "little") + int.from_bytes(data[local + 28:local + 30], "little")
    data[start + 10] ^= 0x04
    (t / "c.pt").write_bytes(bytes(data))
    return t / "c.pt"


def _digest_kept(t, good):
    raw = torch.load(good, weights_only=True)
    raw["state_dict"] = {k: (v * 1.01 if v.is_floating_point() else v) for k, v in raw["state_dict"].items()}
    return craft(raw, t / "c.pt", digest="keep")


def _nan_weight(t, good):
    raw = torch.load(good, weights_only=True)
    key = next(k for k, v in raw["state_dict"].items() if v.is_floating_point())
    raw["state_dict"][key] = raw["state_dict"][key].clone().fill_(float("nan"))
    return craft(raw, t / "c.pt")


# name -> (maker(tmp_path, good) -> path, words of the CheckpointError, or None for a correct load)
CHECKPOINTS = {
    "random_bytes": (lambda t, g: h.write(t / "c.pt", np.random.default_rng(0).bytes(5000)), "damaged"),
    "empty": (lambda t, g: h.write(t / "c.pt", b""), "damaged"),
    "truncated": (lambda t, g: h.write(t / "c.pt", Path(g).read_bytes()[:3000]), "damaged"),
    "text": (lambda t, g: h.write(t / "c.pt", b"weights: see the cloud\n" * 20), "damaged"),
    "zip_not_torch": (lambda t, g: _zip(t, {"readme.txt": "hello"}).rename(t / "c.pt") or t / "c.pt", "damaged"),
    "crc_mismatch": (_flip_in_tensor, "CRC check"),
    "digest_mismatch": (_digest_kept, "does not match the digest"),
    "digest_malformed": (lambda t, g: craft({**torch.load(g, weights_only=True), "digest": "abc"}, t / "c.pt", digest="keep"),
                         "digest entry is malformed"),
    "bare_state_dict": (lambda t, g: torch.save(torch.load(g, weights_only=True)["state_dict"], t / "c.pt") or t / "c.pt",
                        "bare state_dict"),
    "other_format": (_edited(format="something-else"), "format is 'something-else'"),
    "future_version": (_edited(format_version=99), "version 99"),
    "unknown_network": (_edited(network="resnet_from_mars"), "known networks"),
    "no_state_dict": (_edited(state_dict=None), "no 'state_dict'"),
    "state_dict_list": (_edited(state_dict=[1, 2]), "not a dict of tensors"),
    "kwargs_base_1024": (_edited(network_kwargs={"base": 1024}), "do not fit"),
    "kwargs_huge_int": (_edited(network_kwargs={"base": 10**12}), "out of range"),
    "kwargs_unknown": (_edited(network_kwargs={**SMALL, "colour": "blue"}), "cannot be built"),
    "kwargs_not_dict": (_edited(network_kwargs=[4, 2]), "not a dict of names"),
    "kwargs_long_list": (_edited(network_kwargs={**SMALL, "widths": list(range(100))}), "list of 100 items"),
    "inplane_huge": (_edited(preprocessing={"inplane_size": [200000, 200000]}), "in-plane size"),
    "spacing_tiny": (_edited(preprocessing={"target_spacing": [1e-6, 1e-6, 1e-6]}), "spacing"),
    "window_inverted": (_edited(preprocessing={"hu_min": 100.0, "hu_max": -100.0}), "preprocessing settings are invalid"),
    "window_nan": (_edited(preprocessing={"hu_min": float("-inf"), "hu_max": 250.0}), "not finite"),
    "nan_weights": (_nan_weight, "NaN or infinite"),
    "fifo": (lambda t, g: h.fifo(t, "c.pt"), "not a regular file"),
    "folder": (lambda t, g: (t / "c.pt").mkdir() or t / "c.pt", "folder"),
    "missing": (lambda t, g: t / "c.pt", "does not exist"),
    "without_digest_loads": (lambda t, g: craft(torch.load(g, weights_only=True), t / "c.pt", digest="drop"), None),
    "float16_loads": (lambda t, g: save_checkpoint(t / "c.pt", load_checkpoint(g).model, "unet", SMALL, half=True), None),
}


def test_the_checkpoint_corpus_is_large_enough():
    assert sum(1 for _, words in CHECKPOINTS.values() if words) >= 15


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_checkpoint_corpus(tmp_path, good_checkpoint, name):
    make, words = CHECKPOINTS[name]
    path = make(tmp_path, good_checkpoint)
    if words is None:
        loaded = load_checkpoint(path, expected_network="unet")
        reference = load_checkpoint(good_checkpoint)
        for key, value in reference.model.state_dict().items():
            assert torch.allclose(value, loaded.model.state_dict()[key], atol=1e-2), key
        return
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert words in message and "\n" not in message and len(message) < 800, message


def test_wrong_expected_network_and_malicious_files(tmp_path, good_checkpoint):
    with pytest.raises(CheckpointError, match="holds an `unet`, not a `chs_net`"):
        load_checkpoint(good_checkpoint, expected_network="chs_net")
    marker = tmp_path / "PWNED"
    for name, path in write_malicious(tmp_path / "evil", marker).items():
        with pytest.raises(CheckpointError):
            load_checkpoint(path)
    assert not marker.exists()


# --- bit flips -------------------------------------------------------------------------------------
def _gzip_header_length(data: bytes) -> int:
    assert data[3] & ~0x08 == 0  # only FNAME may be set in what gzip/nibabel write
    return 10 if not data[3] & 0x08 else data.index(b"\0", 10) + 1


def test_every_bit_flip_in_a_nii_gz_is_refused_or_harmless(tmp_path):
    """200 random single-bit flips: a flip in the deflate data or the trailer is refused (CRC-32 and
    length); one in the gzip header's time stamp / flags / OS bytes may load, but then exactly the
    original voxels and geometry."""
    original = h.nifti(tmp_path, "ct.nii.gz")
    reference = load_any(original)
    data = original.read_bytes()
    header = _gzip_header_length(data)
    rng = random.Random(1)
    refused = harmless = 0
    positions = [rng.randrange(len(data)) for _ in range(180)] + [rng.randrange(header) for _ in range(20)]
    for k, position in enumerate(positions):
        flipped = bytearray(data)
        flipped[position] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{k}.nii.gz"
        path.write_bytes(bytes(flipped))
        try:
            volume = load_any(path)
        except InputError:
            refused += 1
            continue
        assert position < header, f"a flip at byte {position} of {len(data)} loaded"
        assert np.array_equal(volume.data, reference.data) and np.array_equal(volume.geometry.affine, reference.geometry.affine)
        harmless += 1
        path.unlink()
    assert refused + harmless == len(positions) and refused >= 170, (refused, harmless)


def test_every_bit_flip_in_a_checkpoint_is_refused_or_harmless(tmp_path, good_checkpoint):
    """200 random single-bit flips in a checkpoint: every flip that changes what the file holds is
    refused (zip CRC-32 of each member, then the digest); flips in zip metadata torch ignores (e.g.
    time stamps) may load, but then with exactly the original content."""
    data = Path(good_checkpoint).read_bytes()
    reference = payload_digest(torch.load(good_checkpoint, weights_only=True))
    rng = random.Random(2)
    refused = harmless = 0
    for k in range(200):
        flipped = bytearray(data)
        flipped[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
        path = tmp_path / f"flip{k}.pt"
        path.write_bytes(bytes(flipped))
        try:
            loaded = load_checkpoint(path)
        except CheckpointError:
            refused += 1
            continue
        assert payload_digest(loaded.raw) == reference, f"flip {k} loaded other content"
        harmless += 1
    assert refused + harmless == 200 and refused >= 150, (refused, harmless)


# --- memory --------------------------------------------------------------------------------------
# VmHWM: this process's peak resident memory (ru_maxrss would also count the forked pytest's)
PEAK_SCRIPT = """
import sys
from napari_covidseg.cli import main
code = main(["info", sys.argv[1]])
peak = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(code, int(peak.split()[1]) // 1024)
"""


@pytest.mark.parametrize("name", ["claim.nii.gz", "claim.nii", "claim.nrrd"])
def test_a_2048_cubed_header_claim_is_refused_in_little_memory(tmp_path, name):
    if name.endswith(".nrrd"):
        path = h.nrrd(tmp_path, name, sizes="2048 2048 1024", encoding="gzip")
    else:
        path = h.nifti(tmp_path, name, dim=BIG)
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    code, peak_mb = (int(v) for v in proc.stdout.split())
    assert code == 2 and "2048 x 2048 x 1024" in proc.stderr, proc.stderr
    assert peak_mb < 300, f"peak memory {peak_mb} MB"
